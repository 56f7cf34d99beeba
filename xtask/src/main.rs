//! `cargo xtask …`: the project's own commands. Each one installs what it
//! needs first (see `setup`), so the README's two commands work on a fresh
//! Debian machine with nothing but the Rust toolchain.

/// `println!` panics when stdout is a pipe whose reader has gone
/// (`cargo xtask demo | head`); this returns the error instead, and `main`
/// ends quietly on it, as Unix tools do.
macro_rules! out {
    ($($arg:tt)*) => { writeln!(std::io::stdout(), $($arg)*) };
}

mod bench;
mod cmd;
mod control_plane;
mod crds;
mod demo;
mod fuzz;
mod setup;
mod test;

use anyhow::{Result, bail};
use std::io::Write;

/// The exit status a shell reports for a tool ended by SIGPIPE (128 + 13).
const CLOSED_PIPE: i32 = 141;

const USAGE: &str = "\
usage: cargo xtask <command>

  setup            install the system and Python packages builds and tests need,
                   build the Kubernetes control plane (weft-sim up --kube) once per version
  test             set up, check formatting and lints, run every test
  demo [DIR]       set up, run the local mesh on the simulator (examples/demo), show it, tear down
  bench [PART]     set up, run the benchmarks (PART: identity, destination, redirector, mesh)
  crds             regenerate crds/ (the policy CRDs) from the Rust types
  fuzz [--seconds N] [TARGET...]
                   fuzz every parser of untrusted bytes for N s each (default 30; cargo-fuzz,
                   nightly); crashes are kept in fuzz/regressions/ and replayed by `test`
";

fn main() {
    if let Err(e) = run() {
        let closed_pipe = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if closed_pipe {
            std::process::exit(CLOSED_PIPE);
        }
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    match command.as_str() {
        "setup" => setup::run().and_then(|()| control_plane::run()),
        "test" => test::run(&rest),
        "demo" => demo::run(&rest),
        "bench" => bench::run(&rest),
        "crds" => crds::run(),
        "fuzz" => fuzz::run(&rest),
        "" | "help" | "-h" | "--help" => {
            write!(std::io::stdout(), "{USAGE}")?;
            Ok(())
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}
