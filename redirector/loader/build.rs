//! Compiles the eBPF programs in `bpf/` with clang (`-target bpf -g -O2`).
//!
//! The objects land in OUT_DIR and are embedded in the crate with
//! `include_bytes!`. `-g` keeps BTF, which aya needs for the BTF-defined maps
//! and the `const volatile` globals the loader sets.

use std::path::{Path, PathBuf};
use std::process::Command;

const PROGRAMS: &[&str] = &["weft_cgroup", "weft_sk_lookup"];
/// The benchmark's do-nothing programs: compiled only with the `testing`
/// feature, so a release build neither compiles nor embeds them.
const TESTING_PROGRAMS: &[&str] = &["weft_bench"];

fn main() {
    let manifest = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let bpf = manifest.join("bpf");
    println!("cargo:rerun-if-changed={}", bpf.display());
    println!("cargo:rerun-if-env-changed=CLANG");

    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    match Command::new(&clang).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => fail(&format!(
            "`{clang}` was not found: the eBPF programs are C compiled with clang. \
             Run `cargo xtask setup` (as root) to install clang, llvm, libbpf-dev and the kernel headers"
        )),
    }
    for header in ["/usr/include/bpf/bpf_helpers.h", "/usr/include/linux/bpf.h"] {
        if !Path::new(header).exists() {
            fail(&format!(
                "{header} is missing. Run `cargo xtask setup` (as root) to install libbpf-dev and linux-libc-dev"
            ));
        }
    }
    let arch_include = multiarch_include();
    let testing = std::env::var_os("CARGO_FEATURE_TESTING").is_some();
    let programs = PROGRAMS
        .iter()
        .chain(TESTING_PROGRAMS.iter().filter(|_| testing));
    // With `testing`, the cgroup programs once more as "the previous
    // version" (different instructions, same behaviour), for the tests of
    // the in-place upgrade.
    let previous = testing.then_some((
        "weft_cgroup_previous",
        "weft_cgroup",
        "-DWEFT_PREVIOUS_VERSION",
    ));
    let builds = programs
        .map(|name| (*name, *name, "-DWEFT_CURRENT_VERSION"))
        .chain(previous);
    for (name, source, define) in builds {
        let src = bpf.join(format!("{source}.bpf.c"));
        let obj = out.join(format!("{name}.bpf.o"));
        let mut cmd = Command::new(&clang);
        cmd.args(["-target", "bpf", "-g", "-O2", "-Wall", "-Werror"])
            .arg(format!("-I{}", bpf.display()));
        if let Some(dir) = &arch_include {
            // asm/types.h lives in the multiarch directory on Debian.
            cmd.arg(format!("-I{dir}"));
        }
        cmd.arg(define).arg("-c").arg(&src).arg("-o").arg(&obj);
        let status = cmd
            .status()
            .unwrap_or_else(|e| fail(&format!("could not run {clang}: {e}")));
        if !status.success() {
            fail(&format!(
                "clang failed to compile {} ({status})",
                src.display()
            ));
        }
    }
}

/// `/usr/include/<triple>` for the build host, when it exists.
fn multiarch_include() -> Option<String> {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").ok()?;
    let triple = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        other => return Some(format!("/usr/include/{other}-linux-gnu")),
    };
    let dir = format!("/usr/include/{triple}");
    Path::new(&dir).exists().then_some(dir)
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    panic!("weft-redirector build failed: {msg}");
}
