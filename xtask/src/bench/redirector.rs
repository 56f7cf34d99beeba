//! `cargo xtask bench redirector`: added cost per call of the connect and
//! getsockopt hooks, against a baseline without programs in the same run.
//! The program proper is the `redirector-bench` example of weft-redirector
//! (it needs root: it loads eBPF and creates a network namespace).

use crate::cmd;
use anyhow::{Result, bail};

pub fn run() -> Result<()> {
    cmd::run(
        "cargo",
        &[
            "build",
            "--release",
            "--locked",
            "-p",
            "weft-redirector",
            "--example",
            "redirector-bench",
        ],
    )?;
    let bin = cmd::root().join("target/release/examples/redirector-bench");
    let Some(bin) = bin.to_str() else {
        bail!("target directory path is not UTF-8: {}", bin.display());
    };
    cmd::run(bin, &[])
}
