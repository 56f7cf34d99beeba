//! `cargo xtask test`: the one command CI runs (`.ci/run`).

use crate::{cmd, control_plane, setup};
use anyhow::Result;

pub fn run(extra: &[String]) -> Result<()> {
    setup::run()?;
    // The --kube tests (weft-sim, the CA, the destination) need the
    // Kubernetes control plane: built once per version, then cached.
    control_plane::run()?;
    cmd::run("cargo", &["fmt", "--all", "--check"])?;
    cmd::run(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // Binaries first: end-to-end tests start them (weft-sim, the proxy, the
    // control plane) as separate processes, as on a cluster.
    cmd::run("cargo", &["build", "--workspace", "--bins", "--locked"])?;
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    if cmd::have("cargo-nextest") {
        // nextest runs every test in its own process: a test that crashes
        // cannot take its neighbours' namespaces or cleanup with it.
        let mut args = vec![
            "nextest",
            "run",
            "--workspace",
            "--locked",
            "--no-fail-fast",
        ];
        args.extend(&extra);
        cmd::run("cargo", &args)
    } else {
        let mut args = vec!["test", "--workspace", "--locked", "--no-fail-fast"];
        args.extend(&extra);
        cmd::run("cargo", &args)
    }
}
