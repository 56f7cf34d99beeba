//! `cargo xtask bench mesh`: the mesh against the direct path in the same
//! run (iperf3 throughput, connection set-up rate and latency, proxy RSS).
//! The program proper is the `mesh-bench` example of weft-node-proxy; it
//! runs the release binaries of the node proxy and the control plane.

use crate::cmd;
use anyhow::{Result, bail};

pub fn run() -> Result<()> {
    cmd::run(
        "cargo",
        &[
            "build",
            "--release",
            "--locked",
            "--bins",
            "-p",
            "weft-node-proxy",
            "-p",
            "weft-identity",
            "-p",
            "weft-destination",
        ],
    )?;
    cmd::run(
        "cargo",
        &[
            "build",
            "--release",
            "--locked",
            "-p",
            "weft-node-proxy",
            "--example",
            "mesh-bench",
        ],
    )?;
    let bin = cmd::root().join("target/release/examples/mesh-bench");
    let Some(bin) = bin.to_str() else {
        bail!("target directory path is not UTF-8: {}", bin.display());
    };
    cmd::run(bin, &[])
}
