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

#[test]
fn one_credential_for_both_control_plane_services_is_refused_before_anything_is_attached() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "a token").unwrap();
    let pins = dir.path().join("pins");
    let _cleanup = PinDir(&pins);
    let out = Command::new(env!("CARGO_BIN_EXE_weft-node-proxy"))
        .args(["--node", "node-a", "--agent-socket"])
        .arg(dir.path().join("cni.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--pin-dir")
        .arg(&pins)
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
        .unwrap();
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
