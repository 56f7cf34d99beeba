//! Installs what the build and the tests need and a fresh machine lacks.
//!
//! Each requirement is checked by what a tool really needs (a command on PATH,
//! a header file), so a machine that already has everything costs a few
//! `stat`s and no `apt-get` at all.

use crate::cmd;
use anyhow::{Result, bail};
use std::path::Path;

/// A Debian package and how to tell it is already there.
struct Need {
    package: &'static str,
    present: Probe,
    why: &'static str,
}

enum Probe {
    Command(&'static str),
    File(&'static str),
    /// `python3 -c "import NAME"` succeeds.
    PythonModule(&'static str),
}

const DEBIAN: &[Need] = &[
    Need {
        package: "iproute2",
        present: Probe::Command("ip"),
        why: "network namespaces and veths (simulator)",
    },
    Need {
        package: "nftables",
        present: Probe::Command("nft"),
        why: "Service ClusterIPs (simulator's kube-proxy)",
    },
    Need {
        package: "clang",
        present: Probe::Command("clang"),
        why: "compiling the eBPF programs (redirector)",
    },
    Need {
        package: "llvm",
        present: Probe::Command("llvm-strip"),
        why: "eBPF object tooling (redirector)",
    },
    Need {
        package: "libbpf-dev",
        present: Probe::File("/usr/include/bpf/bpf_helpers.h"),
        why: "eBPF helper headers (redirector)",
    },
    Need {
        package: "linux-libc-dev",
        present: Probe::File("/usr/include/linux/bpf.h"),
        why: "kernel UAPI headers (redirector)",
    },
    Need {
        package: "bpftool",
        present: Probe::Command("bpftool"),
        why: "checking that uninstall leaves no BPF objects (tests)",
    },
    Need {
        package: "curl",
        present: Probe::Command("curl"),
        why: "HTTP client in pods (tests, demo)",
    },
    Need {
        package: "tcpdump",
        present: Probe::Command("tcpdump"),
        why: "captures proving traffic is encrypted (tests, demo)",
    },
    Need {
        package: "iperf3",
        present: Probe::Command("iperf3"),
        why: "throughput benchmark",
    },
    Need {
        package: "prometheus",
        present: Probe::Command("promtool"),
        why: "a real scrape of the node proxies and `promtool check metrics` (tests)",
    },
    Need {
        package: "protobuf-compiler",
        present: Probe::Command("protoc"),
        why: "gRPC code generation (destination, identity)",
    },
    Need {
        package: "python3",
        present: Probe::Command("python3"),
        why: "test workloads in pods",
    },
    Need {
        package: "python3-pip",
        present: Probe::PythonModule("pip"),
        why: "installing the Python packages below",
    },
    Need {
        package: "nghttp2-client",
        present: Probe::Command("h2load"),
        why: "HTTP/2 load through the mesh (L7 tests)",
    },
];

/// PyPI packages the test workloads import, and the module that proves each.
struct PythonNeed {
    package: &'static str,
    module: &'static str,
    why: &'static str,
}

const PYPI: &[PythonNeed] = &[PythonNeed {
    package: "grpcio",
    module: "grpc",
    why: "gRPC client and server in pods (L7 tests)",
}];

pub fn run() -> Result<()> {
    debian()?;
    python()
}

/// Installs the PyPI packages with the `python3` on PATH (the one the pods
/// run), so `import` works for the test workloads.
fn python() -> Result<()> {
    let missing: Vec<&PythonNeed> = PYPI.iter().filter(|n| !python_has(n.module)).collect();
    if missing.is_empty() {
        eprintln!("setup: all Python packages present");
        return Ok(());
    }
    for n in &missing {
        eprintln!("setup: pip installing {} ({})", n.package, n.why);
    }
    let mut args = vec!["-m", "pip", "install", "--quiet"];
    // Debian's python refuses system-wide pip installs (PEP 668) unless told.
    if python_is_externally_managed() {
        args.push("--break-system-packages");
    }
    args.extend(missing.iter().map(|n| n.package));
    cmd::run("python3", &args)?;
    let still: Vec<&str> = missing
        .iter()
        .filter(|n| !python_has(n.module))
        .map(|n| n.package)
        .collect();
    if !still.is_empty() {
        bail!(
            "setup: pip installed but python3 still cannot import: {}",
            still.join(", ")
        );
    }
    Ok(())
}

fn python_has(module: &str) -> bool {
    std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn python_is_externally_managed() -> bool {
    std::process::Command::new("python3")
        .args([
            "-c",
            "import sysconfig, os, sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')) else 1)",
        ])
        .status()
        .is_ok_and(|s| s.success())
}

fn debian() -> Result<()> {
    let missing: Vec<&Need> = DEBIAN.iter().filter(|n| !is_present(&n.present)).collect();
    if missing.is_empty() {
        eprintln!("setup: all system packages present");
        return Ok(());
    }
    if !is_root() {
        bail!(
            "setup: missing packages {} and not running as root; run `cargo xtask setup` as root",
            names(&missing)
        );
    }
    for n in &missing {
        eprintln!("setup: installing {} ({})", n.package, n.why);
    }
    let packages: Vec<&str> = missing.iter().map(|n| n.package).collect();
    cmd::run("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(packages.iter().copied());
    // apt must never stop to ask a question: CI has no standard input.
    cmd::run_with_env("apt-get", &args, &[("DEBIAN_FRONTEND", "noninteractive")])?;
    let still: Vec<&Need> = missing
        .into_iter()
        .filter(|n| !is_present(&n.present))
        .collect();
    if !still.is_empty() {
        bail!("setup: installed but still not found: {}", names(&still));
    }
    Ok(())
}

fn is_present(p: &Probe) -> bool {
    match p {
        Probe::Command(c) => cmd::have(c),
        Probe::File(f) => Path::new(f).exists(),
        Probe::PythonModule(m) => python_has(m),
    }
}

fn names(needs: &[&Need]) -> String {
    needs
        .iter()
        .map(|n| n.package)
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
