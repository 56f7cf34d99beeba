//! Builds the Kubernetes control plane that `weft-sim up --kube` runs:
//! etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kubectl,
//! from their Go modules, into `$HOME/.cache/weft/k8s/<versions>/bin`.
//!
//! Nothing but the Go module proxy is reachable from a build machine, so the
//! upstream releases are built from source. `k8s.io/kubernetes` cannot be
//! `go install`ed (it requires its staging modules at v0.0.0 and replaces them
//! with local paths), and etcd's server module replaces its siblings with
//! relative paths: the wrapper modules in `e2e/k8s/{kubernetes,etcd}` require
//! them and pin every dependency in their `go.sum`, and the build follows
//! upstream's own (`hack/lib/golang.sh`): `-trimpath`, `CGO_ENABLED=0`, the
//! tags `selinux,notest,grpcnotrace`, and the version `-X` flags without
//! which `/version` is wrong.
//!
//! The binaries are built into a temporary directory next to the cache entry
//! and renamed into place only when all five exist, so an interrupted build
//! is never taken for a cached one; a cached entry makes this a few `stat`s.

use crate::cmd;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

include!("../../e2e/k8s/versions.rs");

/// Where the binaries of this version pair live once built.
pub fn cache_dir() -> Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("HOME is not set: it says where the control plane cache is")?;
    Ok(PathBuf::from(home)
        .join(".cache/weft/k8s")
        .join(control_plane_cache_key()))
}

fn is_complete(dir: &Path) -> bool {
    CONTROL_PLANE_PROGRAMS
        .iter()
        .all(|p| dir.join("bin").join(p).is_file())
}

pub fn run() -> Result<()> {
    let dir = cache_dir()?;
    if is_complete(&dir) {
        eprintln!(
            "setup: Kubernetes {KUBERNETES_VERSION} and etcd {ETCD_VERSION} (weft-sim up --kube) cached in {}",
            dir.display()
        );
        return Ok(());
    }
    eprintln!(
        "setup: building Kubernetes {KUBERNETES_VERSION} (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl) and etcd {ETCD_VERSION} from their Go modules for `weft-sim up --kube` and its tests, into {} (once per version: 9 to 17 minutes on 2 cores, 3 GB of Go build cache, 1.2 GB of modules)",
        dir.display()
    );
    require_go()?;
    let parent = dir.parent().expect("the cache dir has a parent");
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = parent.join(format!(
        ".{}.building-{}",
        control_plane_cache_key(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    let bin = staging.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    let result = build_into(&bin);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    // A concurrent setup may have finished first: keep its result.
    if is_complete(&dir) {
        let _ = std::fs::remove_dir_all(&staging);
    } else {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&staging, &dir)
            .with_context(|| format!("moving {} to {}", staging.display(), dir.display()))?;
    }
    eprintln!(
        "setup: control plane binaries in {}",
        dir.join("bin").display()
    );
    Ok(())
}

fn require_go() -> Result<()> {
    let out = Command::new("go")
        .args(["env", "GOVERSION"])
        .env("GOTOOLCHAIN", "local")
        .output();
    let version = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => bail!(
            "setup: building the control plane needs Go 1.26 or later on PATH (`go` not found); install it, then run `cargo xtask setup` again"
        ),
    };
    let minor = version
        .strip_prefix("go1.")
        .and_then(|v| v.split(['.', 'r', 'b']).next())
        .and_then(|v| v.parse::<u32>().ok());
    if minor.is_none_or(|m| m < 26) {
        bail!(
            "setup: building the control plane needs Go 1.26 or later (the wrapper modules say `go 1.26.0`), found {version}; install a newer Go, then run `cargo xtask setup` again"
        );
    }
    Ok(())
}

fn build_into(bin: &Path) -> Result<()> {
    let root = cmd::root().join("e2e/k8s");
    let etcd = root.join("etcd");
    let kubernetes = root.join("kubernetes");
    let started = Instant::now();
    go(
        "downloading the etcd modules (checked against e2e/k8s/etcd/go.sum)",
        &etcd,
        &["mod", "download"],
    )?;
    go(
        "downloading the Kubernetes modules (checked against e2e/k8s/kubernetes/go.sum)",
        &kubernetes,
        &["mod", "download"],
    )?;
    let etcd_out = bin.join("etcd");
    go(
        &format!("building etcd {ETCD_VERSION}"),
        &etcd,
        &[
            "build",
            "-trimpath",
            "-ldflags",
            "-s -w",
            "-o",
            path_str(&etcd_out)?,
            "go.etcd.io/etcd/server/v3",
        ],
    )?;
    let ldflags = kubernetes_ldflags();
    let out_dir = format!("{}/", path_str(bin)?);
    go(
        &format!(
            "building kube-apiserver, kube-controller-manager, kube-scheduler and kubectl {KUBERNETES_VERSION}"
        ),
        &kubernetes,
        &[
            "build",
            "-trimpath",
            "-tags",
            "selinux,notest,grpcnotrace",
            "-ldflags",
            &ldflags,
            "-o",
            &out_dir,
            "k8s.io/kubernetes/cmd/kube-apiserver",
            "k8s.io/kubernetes/cmd/kube-controller-manager",
            "k8s.io/kubernetes/cmd/kube-scheduler",
            "k8s.io/kubernetes/cmd/kubectl",
        ],
    )?;
    if !CONTROL_PLANE_PROGRAMS.iter().all(|p| bin.join(p).is_file()) {
        bail!(
            "setup: the Go build succeeded but {} lacks some of {CONTROL_PLANE_PROGRAMS:?}; run `cargo xtask setup` again",
            bin.display()
        );
    }
    eprintln!("setup: control plane built in {:.0?}", started.elapsed());
    Ok(())
}

/// What upstream's `hack/lib/version.sh` sets, for both packages that report
/// the version (`kubectl version`, the API server's `/version`).
fn kubernetes_ldflags() -> String {
    let version = KUBERNETES_VERSION;
    let mut parts = version.trim_start_matches('v').split('.');
    let major = parts.next().unwrap_or_default();
    let minor = parts.next().unwrap_or_default();
    let mut flags = String::from("-s -w");
    for package in [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ] {
        for (key, value) in [
            ("gitVersion", version),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
        ] {
            flags.push_str(&format!(" -X {package}.{key}={value}"));
        }
    }
    flags
}

/// One step of the build: `go ARGS` in a wrapper module, with the
/// environment that makes it reproducible and offline-safe (module sums
/// checked, no toolchain download, no cgo).
fn go(step: &str, module: &Path, args: &[&str]) -> Result<()> {
    eprintln!("setup: {step}");
    let shown: Vec<String> = args
        .iter()
        .map(|a| {
            if a.contains(' ') {
                format!("'{a}'")
            } else {
                a.to_string()
            }
        })
        .collect();
    eprintln!("+ (cd {}; go {})", module.display(), shown.join(" "));
    let started = Instant::now();
    let status = Command::new("go")
        .args(args)
        .current_dir(module)
        .env("CGO_ENABLED", "0")
        .env("GOFLAGS", "-mod=readonly")
        .env("GOTOOLCHAIN", "local")
        .env("GOWORK", "off")
        .status()
        .with_context(|| format!("setup: could not start `go` for: {step}"))?;
    if !status.success() {
        bail!(
            "setup: {step} failed ({status}); the Go module and build caches keep what was done, so `cargo xtask setup` retries from there (if modules could not be fetched, check that the Go module proxy, `go env GOPROXY`, is reachable)"
        );
    }
    eprintln!("setup: {step}: done in {:.0?}", started.elapsed());
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_flags_name_both_packages() {
        let flags = kubernetes_ldflags();
        assert!(flags.contains("-X k8s.io/component-base/version.gitVersion=v1.36.3"));
        assert!(flags.contains("-X k8s.io/client-go/pkg/version.gitMinor=36"));
        assert!(flags.contains("-X k8s.io/client-go/pkg/version.gitMajor=1"));
    }
}
