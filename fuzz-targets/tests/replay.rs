//! Every seed (`fuzz/corpus/<target>/`) and every crash kept
//! (`fuzz/regressions/<target>/`) through its target, on stable: what the
//! fuzzer once found stays found. Fails naming each file that panics.

use std::path::{Path, PathBuf};
use weft_fuzz_targets::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a readable directory entry").path())
        .filter(|p| p.is_file() && p.file_name().is_none_or(|n| n != "README.md"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_and_regression_input_passes_its_target() {
    let mut ran = 0;
    let mut failed = Vec::new();
    for target in TARGETS {
        let corpus = inputs(&fuzz_dir().join("corpus").join(target.name));
        assert!(
            !corpus.is_empty(),
            "target {} has no seed corpus in fuzz/corpus/{}",
            target.name,
            target.name
        );
        let regressions = inputs(&fuzz_dir().join("regressions").join(target.name));
        for file in corpus.iter().chain(&regressions) {
            let data = std::fs::read(file).expect("a readable input");
            ran += 1;
            if std::panic::catch_unwind(|| (target.run)(&data)).is_err() {
                failed.push(format!("{}: {}", target.name, file.display()));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {ran} inputs panicked (reproduce one with \
         `cd fuzz && cargo +nightly fuzz run TARGET FILE`):\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert!(ran >= TARGETS.len());
}

#[test]
fn every_target_has_a_fuzz_binary() {
    for target in TARGETS {
        let bin = fuzz_dir()
            .join("fuzz_targets")
            .join(format!("{}.rs", target.name));
        assert!(bin.is_file(), "{} is missing", bin.display());
    }
}

#[test]
fn cargo_xtask_fuzz_knows_every_target() {
    let xtask =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/src/fuzz.rs"))
            .expect("xtask/src/fuzz.rs");
    for target in TARGETS {
        assert!(
            xtask.contains(&format!("(\"{}\",", target.name)),
            "xtask/src/fuzz.rs does not list {}",
            target.name
        );
    }
}
