//! `cargo xtask crds`: regenerates `crds/` from the Rust types of
//! `weft-policy-api`. The renderer is that crate's `crds` example, so xtask
//! stays free of kube and schemars; the crate's tests fail when `crds/` is
//! stale.

use crate::cmd;
use anyhow::Result;

pub fn run() -> Result<()> {
    let out = cmd::root().join("crds");
    let out = out.to_string_lossy();
    cmd::run(
        "cargo",
        &[
            "run",
            "--quiet",
            "--locked",
            "--package",
            "weft-policy-api",
            "--example",
            "crds",
            "--",
            &out,
        ],
    )
}
