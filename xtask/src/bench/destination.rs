//! `cargo xtask bench destination`: index time, snapshot size and update
//! fan-out of the destination service at 10 000 pods / 2 000 Services /
//! 100 nodes. The program is the `bench` example of `weft-destination`
//! (release build); results go in docs/benchmarks.md.

use crate::cmd;
use anyhow::Result;

pub fn run() -> Result<()> {
    cmd::run(
        "cargo",
        &[
            "run",
            "--release",
            "--locked",
            "-p",
            "weft-destination",
            "--example",
            "bench",
        ],
    )
}
