//! `cargo xtask fuzz [--seconds N] [TARGET…]`: coverage-guided fuzzing of
//! every parser that takes untrusted bytes (docs/testing.md, "Fuzzing").
//!
//! Runs cargo-fuzz (libFuzzer, nightly) on each target of `fuzz/` for a
//! bounded time. New interesting inputs go to a working corpus under
//! `fuzz/target/` (not committed; the committed seeds stay small); a crash,
//! hang or excessive allocation is copied into `fuzz/regressions/<target>/`,
//! which `cargo xtask test` replays on stable from then on, and the command
//! fails with the line that reproduces it.

use crate::cmd;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;

/// Every target, with its `-max_len`: the names of `fuzz/fuzz_targets/*.rs`
/// and of the corpus directories (fuzz-targets/src/lib.rs has the bodies
/// and the same bounds; the replay test checks each has a binary here).
const TARGETS: &[(&str, usize)] = &[
    ("detect", 8 * 1024 + 256),
    ("hbone_connect", 16 * 1024),
    ("hbone_authority", 512),
    ("registration", 8 * 1024),
    ("csr", 4096 + 64),
    ("manifests", 16 * 1024),
    ("normalize_path", 1024),
];

const DEFAULT_SECONDS: u64 = 30;
/// libFuzzer's per-input limits: an input slower than this is a hang, one
/// that allocates more is an excessive allocation; both are findings.
const TIMEOUT_SECONDS: u64 = 10;
const RSS_LIMIT_MB: u64 = 2048;
const MALLOC_LIMIT_MB: u64 = 512;

pub fn run(args: &[String]) -> Result<()> {
    let mut seconds = DEFAULT_SECONDS;
    let mut chosen = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                let n = args.next().context("--seconds needs a number")?;
                seconds = n.parse().with_context(|| format!("--seconds {n:?}"))?;
            }
            name => match TARGETS.iter().find(|(t, _)| *t == name) {
                Some(t) => chosen.push(*t),
                None => {
                    let known: Vec<&str> = TARGETS.iter().map(|(t, _)| *t).collect();
                    bail!("no fuzz target {name:?}; known: {}", known.join(", "))
                }
            },
        }
    }
    if chosen.is_empty() {
        chosen = TARGETS.to_vec();
    }
    install()?;
    let fuzz = cmd::root().join("fuzz");
    let mut found = Vec::new();
    for (target, max_len) in chosen {
        eprintln!("== fuzz {target}: {seconds} s, inputs up to {max_len} bytes");
        let work = fuzz.join("target/corpus").join(target);
        let artifacts = fuzz.join("target/artifacts").join(target);
        let regressions = fuzz.join("regressions").join(target);
        for dir in [&work, &artifacts, &regressions] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let before = listing(&artifacts)?;
        // The first corpus directory receives new inputs; the committed
        // seeds and regressions are read only.
        let args = [
            "+nightly".to_string(),
            "fuzz".into(),
            "run".into(),
            target.into(),
            work.display().to_string(),
            fuzz.join("corpus").join(target).display().to_string(),
            regressions.display().to_string(),
            "--".into(),
            format!("-max_total_time={seconds}"),
            format!("-max_len={max_len}"),
            format!("-timeout={TIMEOUT_SECONDS}"),
            format!("-rss_limit_mb={RSS_LIMIT_MB}"),
            format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"),
            format!("-artifact_prefix={}/", artifacts.display()),
            "-print_final_stats=1".into(),
        ];
        eprintln!("+ (cd fuzz && cargo {})", args.join(" "));
        let mut cargo = Command::new("cargo");
        // `cargo xtask` runs under `cargo run`, which describes the xtask
        // package in the environment; build scripts (ring's) see that as a
        // change and rebuild everything, so the reproduce command, run from
        // a shell, would rebuild again. The fuzzer gets a shell's environment.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            if name == "CARGO"
                || name == "RUSTUP_TOOLCHAIN"
                || name.starts_with("CARGO_PKG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                ]
                .contains(&name.as_str())
            {
                cargo.env_remove(name);
            }
        }
        let status = cargo
            .args(&args)
            .current_dir(&fuzz)
            .status()
            .context("could not start cargo fuzz")?;
        let new: Vec<_> = listing(&artifacts)?
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        for file in &new {
            let name = file.file_name().expect("an artifact has a name");
            let kept = regressions.join(name);
            std::fs::copy(file, &kept)
                .with_context(|| format!("copying {} to {}", file.display(), kept.display()))?;
            found.push(format!(
                "{target}: kept {} (reproduce: cd fuzz && cargo +nightly fuzz run {target} {})",
                kept.strip_prefix(cmd::root()).unwrap_or(&kept).display(),
                kept.strip_prefix(&fuzz).unwrap_or(&kept).display(),
            ));
        }
        if !status.success() && new.is_empty() {
            bail!("cargo fuzz run {target} failed ({status}) without leaving an input");
        }
    }
    if !found.is_empty() {
        bail!(
            "fuzzing found {} failing input(s), now replayed by `cargo xtask test`:\n{}",
            found.len(),
            found.join("\n")
        );
    }
    Ok(())
}

/// cargo-fuzz and the nightly toolchain it needs, installed when missing.
fn install() -> Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !nightly {
        eprintln!("fuzz: installing the nightly toolchain (libFuzzer's instrumentation needs it)");
        cmd::run(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    if !cmd::have("cargo-fuzz") {
        eprintln!("fuzz: cargo-fuzz is missing; installing it (cargo install cargo-fuzz --locked)");
        cmd::run("cargo", &["install", "cargo-fuzz", "--locked"])?;
    }
    Ok(())
}

fn listing(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    Ok(files)
}
