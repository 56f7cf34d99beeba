//! What outlives the node proxy process: one record per registered pod and
//! a bind mount of its network namespace, under a node-local directory
//! (`--state-dir`), so that a proxy started again (a crash, a rollout)
//! finds the pods already on the node without their restart.
//!
//! ```text
//! <state_dir>/pods/<id>.json    the registration: pod, namespace path, annotations, netns cookie
//! <state_dir>/netns/<id>        the pod's network namespace, bind-mounted (as `ip netns add` does)
//! ```
//!
//! `<id>` is the pod's key in hex, so no pod-supplied string ever becomes a
//! path component. The files are read back as hostile input: anything that
//! does not parse is reported and removed, never trusted.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use weft_redirector::Netns;
use weft_registration::PodRef;

/// Records larger than this are not read (a registration is a few hundred bytes).
const MAX_RECORD: u64 = 256 * 1024;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PodRecord {
    pub pod: PodRef,
    /// The namespace path the registration named (the runtime's).
    pub netns: PathBuf,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// The addresses the registration gave (the view may not have them yet).
    #[serde(default)]
    pub ips: Vec<std::net::IpAddr>,
    /// The namespace's cookie when it was registered: a path that names
    /// another namespace later is not this pod's any more.
    pub netns_cookie: u64,
}

/// The node-local directory of records and kept namespaces.
#[derive(Clone, Debug)]
pub struct Records {
    dir: PathBuf,
}

fn hex(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

impl Records {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.dir.join("pods").join(format!("{}.json", hex(key)))
    }

    /// Where the pod's namespace is kept.
    pub fn kept_netns(&self, key: &str) -> PathBuf {
        self.dir.join("netns").join(hex(key))
    }

    /// Writes the record (atomically: a crash leaves the old one or the new
    /// one) and keeps the namespace reachable by a bind mount of `netns`.
    pub fn save(&self, key: &str, record: &PodRecord, netns: &Netns) -> io::Result<()> {
        let kept = self.kept_netns(key);
        std::fs::create_dir_all(self.dir.join("netns"))?;
        std::fs::create_dir_all(self.dir.join("pods"))?;
        unmount(&kept)?;
        std::fs::write(&kept, b"")?;
        let source = PathBuf::from(format!("/proc/self/fd/{}", netns.as_fd().as_raw_fd()));
        nix::mount::mount(
            Some(&source),
            &kept,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            io::Error::other(format!(
                "bind-mounting the namespace on {}: {e}",
                kept.display()
            ))
        })?;
        let path = self.record_path(key);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec(record).map_err(io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)
    }

    /// Forgets a pod: its record and its kept namespace.
    pub fn remove(&self, key: &str) -> io::Result<()> {
        match std::fs::remove_file(self.record_path(key)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        unmount(&self.kept_netns(key))
    }

    /// Every record on disk: the pod's key and the record, or why the
    /// file cannot be used (the caller removes it).
    pub fn load(&self) -> Vec<(PathBuf, Result<PodRecord, String>)> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("pods")) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                // An interrupted write's temporary file.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            out.push((path.clone(), read_record(&path)));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Removes an unusable record file.
    pub fn discard(&self, path: &Path) {
        let _ = std::fs::remove_file(path);
    }
}

fn read_record(path: &Path) -> Result<PodRecord, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut text = Vec::new();
    file.take(MAX_RECORD + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("cannot read: {e}"))?;
    if text.len() as u64 > MAX_RECORD {
        return Err(format!("longer than {MAX_RECORD} bytes"));
    }
    serde_json::from_slice(&text).map_err(|e| format!("not a pod record: {e}"))
}

/// Unmounts a kept namespace (if mounted) and removes its file.
fn unmount(path: &Path) -> io::Result<()> {
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(io::Error::other(format!(
                "unmounting {}: {e}",
                path.display()
            )));
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_hex_file_names() {
        let r = Records::new("/x");
        assert_eq!(
            r.record_path("../a/b"),
            PathBuf::from("/x/pods/2e2e2f612f62.json")
        );
        assert_eq!(r.kept_netns("u1"), PathBuf::from("/x/netns/7531"));
    }

    #[test]
    fn unusable_records_are_reported_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let r = Records::new(dir.path());
        std::fs::create_dir_all(dir.path().join("pods")).unwrap();
        std::fs::write(dir.path().join("pods/aa.json"), b"{not json").unwrap();
        std::fs::write(dir.path().join("pods/bb.json"), vec![b' '; 300 * 1024]).unwrap();
        std::fs::write(dir.path().join("pods/cc.json.tmp"), b"{}").unwrap();
        let good = PodRecord {
            pod: PodRef {
                namespace: "demo".into(),
                name: "p".into(),
                uid: "u".into(),
            },
            netns: "/run/netns/p".into(),
            annotations: HashMap::new(),
            ips: vec!["10.244.0.5".parse().unwrap()],
            netns_cookie: 7,
        };
        std::fs::write(
            dir.path().join("pods/dd.json"),
            serde_json::to_vec(&good).unwrap(),
        )
        .unwrap();
        let loaded = r.load();
        assert_eq!(loaded.len(), 3, "{loaded:?}");
        assert!(
            loaded[0]
                .1
                .as_ref()
                .unwrap_err()
                .contains("not a pod record")
        );
        assert!(loaded[1].1.as_ref().unwrap_err().contains("longer than"));
        assert_eq!(loaded[2].1.as_ref().unwrap(), &good);
        assert!(!dir.path().join("pods/cc.json.tmp").exists());
    }
}
