//! `cargo xtask bench [PART]`: benchmarks. Every benchmark measures its
//! baseline (no mesh) in the same run and reports ratios, medians and spread:
//! the machines are shared and noisy, so absolute numbers alone mislead.

use crate::setup;
use anyhow::{Result, bail};

/// The parts that have a benchmark, in the order `bench` with no argument runs them.
const PARTS: &[&str] = &[];

pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    let wanted: Vec<&str> = match args.first() {
        Some(part) => vec![part.as_str()],
        None => PARTS.to_vec(),
    };
    if wanted.is_empty() {
        bail!("no benchmarks exist yet");
    }
    for part in wanted {
        match part {
            other => bail!("no benchmark named {other:?}; known: {}", PARTS.join(", ")),
        }
    }
    Ok(())
}
