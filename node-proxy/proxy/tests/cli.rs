//! The node proxy's command line, as an operator meets it: a configuration
//! it cannot run with is refused with what to change, before the proxy has
//! touched the node's redirection.

use std::path::Path;
use std::process::Command;

/// Whatever a run left under `pin_dir` (pinned links that would keep
/// programs attached to the machine's root cgroup, and the bpffs the proxy
/// mounts on the pin directory's parent) is removed, also when an
/// assertion failed.
struct PinDir<'a>(&'a Path);

impl Drop for PinDir<'_> {
    fn drop(&mut self) {
        let links = self.0.join("links");
        if let Ok(entries) = std::fs::read_dir(&links) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        // The test's own temporary directory: a mount there is the proxy's
        // (when there is none, umount fails with EINVAL, harmlessly).
        if let Some(parent) = self.0.parent() {
            let _ = nix::mount::umount2(parent, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// The node proxy with a configuration it refuses (one token file for both
/// control plane services), run through `launcher` (e.g. `prlimit …`).
fn refused_run(dir: &Path, launcher: &[&str]) -> std::process::Output {
    let token = dir.join("token");
    std::fs::write(&token, "a token").unwrap();
    let proxy = env!("CARGO_BIN_EXE_weft-node-proxy");
    let mut cmd = match launcher.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(proxy);
            c
        }
        None => Command::new(proxy),
    };
    cmd.args(["--node", "node-a", "--agent-socket"])
        .arg(dir.join("cni.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--pin-dir")
        .arg(dir.join("pins"))
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--health-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--destination-address",
            "https://127.0.0.1:1",
            "--ca-address",
            "127.0.0.1:1",
        ])
        .arg("--trust-anchors")
        .arg(&token)
        .arg("--ca-token-file")
        .arg(&token)
        .arg("--destination-token-file")
        .arg(&token)
        .output()
        .unwrap()
}

#[test]
fn one_credential_for_both_control_plane_services_is_refused_before_anything_is_attached() {
    let dir = tempfile::tempdir().unwrap();
    let pins = dir.path().join("pins");
    let _cleanup = PinDir(&pins);
    let out = refused_run(dir.path(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--ca-token-file and --destination-token-file are the same file"),
        "{err}"
    );
    assert!(
        !pins.exists(),
        "the proxy attached its programs before refusing its configuration: {err}"
    );
}

/// Started with the low soft limit of open files container runtimes
/// commonly give, the proxy raises it to the hard limit first thing.
#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = PinDir(&dir.path().join("pins"));
    let out = refused_run(dir.path(), &["prlimit", "--nofile=512:4096"]);
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("raised the open file limit"))
        .unwrap_or_else(|| panic!("no limit raised: {err}"));
    assert!(
        line.contains("from=512") && line.contains("to=4096"),
        "{line}"
    );
}
