//! Finding pods that were running before the node agent started, by
//! scanning /proc: every process whose network namespace is not the host's
//! is in some pod; its cgroup path says which.
//!
//! The CNI plugin only reports pods created while the agent listens; after
//! an agent restart (or on first install) this scan fills the gap. The agent
//! matches the result against its pod list (uid, else namespace/name).

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A pod, as far as a cgroup path identifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodKey {
    /// Kubernetes (kubelet cgroup layout): `metadata.uid`.
    Uid(String),
    /// The local simulator (`<cgroup2>/weft-sim/<cluster>/<namespace>.<pod>`).
    Name { namespace: String, name: String },
}

/// One non-host network namespace and a process inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredNetns {
    /// Inode of the namespace (`readlink /proc/<pid>/ns/net` = `net:[inode]`).
    pub netns_inode: u64,
    /// The lowest pid found in it.
    pub pid: u32,
    /// `/proc/<pid>/ns/net`: open it to enroll (valid while that process lives).
    pub netns_path: PathBuf,
    pub pod: Option<PodKey>,
}

/// Scans the host's /proc.
pub fn scan_host() -> io::Result<Vec<DiscoveredNetns>> {
    let host = std::fs::metadata("/proc/self/ns/net")?.ino();
    scan(Path::new("/proc"), host)
}

/// Scans `proc_root` for namespaces other than `host_netns_inode`, one entry
/// per namespace. Processes that vanish mid-scan are skipped.
pub fn scan(proc_root: &Path, host_netns_inode: u64) -> io::Result<Vec<DiscoveredNetns>> {
    let mut by_netns: BTreeMap<u64, DiscoveredNetns> = BTreeMap::new();
    let mut pids: Vec<u32> = std::fs::read_dir(proc_root)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let dir = proc_root.join(pid.to_string());
        let Some(inode) = netns_inode(&dir.join("ns/net")) else {
            continue;
        };
        if inode == host_netns_inode || by_netns.contains_key(&inode) {
            continue;
        }
        let pod = std::fs::read_to_string(dir.join("cgroup"))
            .ok()
            .and_then(|c| pod_from_cgroup(&c));
        by_netns.insert(
            inode,
            DiscoveredNetns {
                netns_inode: inode,
                pid,
                netns_path: dir.join("ns/net"),
                pod,
            },
        );
    }
    Ok(by_netns.into_values().collect())
}

fn netns_inode(link: &Path) -> Option<u64> {
    let target = std::fs::read_link(link).ok()?;
    let s = target.to_str()?;
    s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// The pod of a `/proc/<pid>/cgroup` file, from any of its lines.
pub fn pod_from_cgroup(cgroup_file: &str) -> Option<PodKey> {
    cgroup_file.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        kubelet_pod_uid(path)
            .map(PodKey::Uid)
            .or_else(|| simulator_pod(path))
    })
}

/// kubelet layouts: cgroupfs `/kubepods/<qos>/pod<uid>/<ctr>` and systemd
/// `/kubepods.slice/…/kubepods-<qos>-pod<uid_with_underscores>.slice/…`.
fn kubelet_pod_uid(path: &str) -> Option<String> {
    if !path.contains("kubepods") {
        return None;
    }
    path.split('/').find_map(|seg| {
        let seg = seg.strip_suffix(".slice").unwrap_or(seg);
        let idx = seg.rfind("pod")?;
        let uid = &seg[idx + 3..];
        let looks_like_uid = uid.len() >= 32
            && uid
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_');
        looks_like_uid.then(|| uid.replace('_', "-"))
    })
}

fn simulator_pod(path: &str) -> Option<PodKey> {
    let mut segs = path.split('/').skip_while(|s| *s != "weft-sim");
    segs.next()?;
    let _cluster = segs.next()?;
    let (namespace, name) = segs.next()?.split_once('.')?;
    Some(PodKey::Name {
        namespace: namespace.into(),
        name: name.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const UID: &str = "0b1a5e3c-6d2f-4c8e-9a7b-1f2e3d4c5b6a";

    #[test]
    fn cgroup_paths_name_the_pod() {
        let systemd = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-abc.scope\n",
            UID.replace('-', "_")
        );
        assert_eq!(pod_from_cgroup(&systemd), Some(PodKey::Uid(UID.into())));
        let cgroupfs = format!("12:memory:/kubepods/burstable/pod{UID}/0123abcd\n0::/\n");
        assert_eq!(pod_from_cgroup(&cgroupfs), Some(PodKey::Uid(UID.into())));
        assert_eq!(
            pod_from_cgroup("0::/weft-sim/demo/default.web.v2\n"),
            Some(PodKey::Name {
                namespace: "default".into(),
                name: "web.v2".into()
            })
        );
        assert_eq!(
            pod_from_cgroup("0::/user.slice/user-0.slice/session-1.scope\n"),
            None
        );
        assert_eq!(pod_from_cgroup("garbage"), None);
    }

    #[test]
    fn fake_proc_tree_yields_one_entry_per_pod_netns() {
        let root = tempfile::tempdir().unwrap();
        let add = |pid: u32, netns: u64, cgroup: &str| {
            let dir = root.path().join(pid.to_string());
            std::fs::create_dir_all(dir.join("ns")).unwrap();
            symlink(format!("net:[{netns}]"), dir.join("ns/net")).unwrap();
            std::fs::write(dir.join("cgroup"), cgroup).unwrap();
        };
        add(1, 100, "0::/init.scope\n");
        add(
            40,
            200,
            &format!("0::/kubepods/besteffort/pod{UID}/pause\n"),
        );
        add(41, 200, &format!("0::/kubepods/besteffort/pod{UID}/app\n"));
        add(50, 300, "0::/weft-sim/demo/demo.client\n");
        add(60, 400, "0::/somewhere/else\n");
        std::fs::create_dir_all(root.path().join("70")).unwrap(); // vanished process
        std::fs::write(root.path().join("uptime"), "1 2").unwrap();

        let found = scan(root.path(), 100).unwrap();
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(found[0].netns_inode, 200);
        assert_eq!(found[0].pid, 40);
        assert_eq!(found[0].netns_path, root.path().join("40/ns/net"));
        assert_eq!(found[0].pod, Some(PodKey::Uid(UID.into())));
        assert_eq!(
            found[1].pod,
            Some(PodKey::Name {
                namespace: "demo".into(),
                name: "client".into()
            })
        );
        assert_eq!(found[2].pod, None);
    }
}
