//! `cargo xtask demo [DIR]`: the main job on a fresh machine. Brings up the
//! local cluster from `examples/demo` (or DIR), shows traffic crossing it, and
//! tears everything down again, also when a step fails.

use crate::{cmd, setup};
use anyhow::{Context, Result, bail};
use std::process::Command;

const CLUSTER: &str = "demo";

pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    let dir = match args.first() {
        Some(d) => std::path::PathBuf::from(d),
        None => cmd::root().join("examples/demo"),
    };
    cmd::run(
        "cargo",
        &[
            "build",
            "--quiet",
            "--package",
            "weft-sim",
            "--bin",
            "weft-sim",
        ],
    )?;
    let sim = cmd::root().join("target/debug/weft-sim");
    let sim = sim.to_str().context("workspace path is not UTF-8")?;

    let dir = dir.to_str().context("DIR is not UTF-8")?;
    cmd::run(sim, &["up", dir, "--name", CLUSTER, "--detach"])?;
    let shown = show(sim);
    let down = cmd::run(sim, &["down", "--name", CLUSTER]);
    shown?;
    down
}

fn show(sim: &str) -> Result<()> {
    cmd::run(sim, &["status", "--name", CLUSTER])?;
    println!(
        "\n== demo/client -> http://server.demo:8080/ (pod on node-a to pod on node-b, through a Service)"
    );
    let out = Command::new(sim)
        .args(["exec", "--name", CLUSTER, "demo/client", "--"])
        .args(["curl", "-sS", "--max-time", "5", "http://server.demo:8080/"])
        .output()
        .context("running curl in demo/client")?;
    if !out.status.success() {
        bail!(
            "curl in demo/client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!("{}", String::from_utf8_lossy(&out.stdout).trim_end());
    Ok(())
}
