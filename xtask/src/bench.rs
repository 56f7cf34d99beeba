//! `cargo xtask bench [PART]`: benchmarks. Every benchmark measures its
//! baseline in the same run and reports medians and spread (ratios where a
//! baseline without the mesh exists): the machines are shared and noisy, so
//! absolute numbers alone mislead. Results are recorded in docs/benchmarks.md.

use crate::{cmd, setup};
use anyhow::{Result, bail};

/// A benchmark: an example program of the part's crate, run in release mode.
struct Bench {
    part: &'static str,
    package: &'static str,
    example: &'static str,
    /// Packages whose binaries the example runs (built in release first).
    binaries: &'static [&'static str],
    what: &'static str,
}

/// In the order `bench` with no argument runs them.
const BENCHES: &[Bench] = &[
    Bench {
        part: "identity",
        package: "weft-identity",
        example: "certify-bench",
        binaries: &[],
        what: "certificates issued per second and Certify p50/p99, against signing alone",
    },
    Bench {
        part: "destination",
        package: "weft-destination",
        example: "bench",
        binaries: &[],
        what: "full build, one pod change (incremental update, every node's delta, fan-out to real subscribers) against the full rebuild, snapshot size, RSS and churn at 10 000 pods / 2 000 Services / 100 nodes and at 100 000 / 10 000 / 1 000 (WEFT_BENCH_SCALE=10k|100k for one)",
    },
    Bench {
        part: "redirector",
        package: "weft-redirector",
        example: "redirector-bench",
        binaries: &[],
        what: "added cost per call of the connect and getsockopt hooks, against no programs (needs root)",
    },
    Bench {
        part: "mesh",
        package: "weft-node-proxy",
        example: "mesh-bench",
        binaries: &[
            "weft-node-proxy",
            "weft-identity",
            "weft-destination",
            "weft-cni",
        ],
        what: "the mesh against the direct path on the simulator: iperf3 throughput, connection rate, open-loop HTTP latency, proxy RSS (idle, 100 enrolled pods), real Python/Node.js/Go/gRPC servers with sequential requests, requests failed when one of three replicas is SIGKILLed under load against a run without a kill, requests sent/failed/p99 while both node proxies are rolled out against a window without (WEFT_BENCH_PART=failover|rollout for one table alone)",
    },
];

pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    let chosen: Vec<&Bench> = match args.first() {
        None => BENCHES.iter().collect(),
        Some(part) => match BENCHES.iter().find(|b| b.part == part) {
            Some(b) => vec![b],
            None => {
                let known: Vec<&str> = BENCHES.iter().map(|b| b.part).collect();
                bail!("no benchmark named {part:?}; known: {}", known.join(", "))
            }
        },
    };
    for b in chosen {
        eprintln!("== bench {}: {}", b.part, b.what);
        if !b.binaries.is_empty() {
            let mut args = vec!["build", "--release", "--locked", "--bins"];
            for p in b.binaries {
                args.extend(["--package", p]);
            }
            cmd::run("cargo", &args)?;
        }
        cmd::run(
            "cargo",
            &[
                "run",
                "--release",
                "--locked",
                "--package",
                b.package,
                "--example",
                b.example,
            ],
        )?;
    }
    Ok(())
}
