//! `cargo xtask bench identity`: certificates issued per second and Certify
//! latency (p50/p99) of the CA, with signing alone as the in-run baseline.
//! The program is `identity/ca/examples/certify-bench.rs`.

use crate::cmd;
use anyhow::Result;
use std::path::PathBuf;

pub fn run() -> Result<()> {
    cmd::run(
        "cargo",
        &[
            "build",
            "--release",
            "--locked",
            "-p",
            "weft-identity",
            "--example",
            "certify-bench",
        ],
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::root().join("target"));
    let program = target.join("release/examples/certify-bench");
    cmd::run(&program.to_string_lossy(), &[])
}
