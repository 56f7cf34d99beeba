//! `cargo xtask bench [PART]`: benchmarks. Every benchmark measures its
//! baseline (no mesh) in the same run and reports ratios, medians and spread:
//! the machines are shared and noisy, so absolute numbers alone mislead.

use crate::setup;
use anyhow::{Result, bail};

mod destination;
mod identity;
mod mesh;
mod redirector;

type Bench = fn() -> Result<()>;

/// The parts that have a benchmark, in the order `bench` with no argument runs them.
const PARTS: &[(&str, Bench)] = &[
    ("identity", identity::run),
    ("destination", destination::run),
    ("redirector", redirector::run),
    ("mesh", mesh::run),
];

pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    let known = || PARTS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
    if PARTS.is_empty() {
        bail!("no benchmarks exist yet");
    }
    match args.first() {
        None => PARTS.iter().try_for_each(|(_, bench)| bench()),
        Some(part) => match PARTS.iter().find(|(n, _)| n == part) {
            Some((_, bench)) => bench(),
            None => bail!("no benchmark named {part:?}; known: {}", known()),
        },
    }
}
