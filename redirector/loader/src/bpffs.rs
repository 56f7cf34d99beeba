//! The bpffs directory that holds our pins.
//!
//! Pins outlive the process, which is what lets a restarted node proxy find
//! its programs attached and its maps filled. Some hosts (this one) boot
//! without bpffs mounted at /sys/fs/bpf; we mount it there, as systemd does.

use crate::Error;
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
use std::fs::{File, OpenOptions};
use std::path::Path;

const SYS_FS_BPF: &str = "/sys/fs/bpf";

/// Makes `pin_dir` exist on a bpffs, mounting bpffs on its parent if needed.
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<(), Error> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) {
        // A parent that does not exist yet inside a mounted bpffs (a nested
        // pin directory, such as a simulated node's) is created there;
        // mounting another bpffs on it would make a separate instance whose
        // pins nobody else sees, and leave a mount behind.
        let existing = parent.ancestors().find(|a| a.exists());
        if existing.is_some_and(is_bpffs) {
            std::fs::create_dir_all(parent).map_err(|source| Error::Pin {
                path: parent.into(),
                source,
            })?;
        } else {
            mount_bpffs(mount_point(parent)).map_err(|source| Error::Bpffs {
                path: pin_dir.into(),
                source,
            })?;
            std::fs::create_dir_all(parent).map_err(|source| Error::Pin {
                path: parent.into(),
                source,
            })?;
        }
    }
    for sub in ["", "maps", "links", "pods"] {
        let dir = pin_dir.join(sub);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(Error::Pin { path: dir, source }),
        }
    }
    Ok(())
}

/// Where to mount bpffs for pins under `parent`: the conventional
/// `/sys/fs/bpf` when they live under it (after a boot without bpffs, the
/// nested directories of a simulated node cannot be created in the sysfs
/// directory underneath), else `parent` itself.
fn mount_point(parent: &Path) -> &Path {
    if parent.starts_with(SYS_FS_BPF) {
        Path::new(SYS_FS_BPF)
    } else {
        parent
    }
}

pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Mounts bpffs at `dir`, serialised by a lock file: parallel callers (tests,
/// a proxy restarting while another instance exits) must not stack mounts.
fn mount_bpffs(dir: &Path) -> std::io::Result<()> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/weft-bpffs.lock")?;
    let _guard = Locked::exclusive(lock)?;
    if is_bpffs(dir) {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    nix::mount::mount(
        Some("bpf"),
        dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(std::io::Error::from)
}

/// An flock held until drop.
struct Locked(File);

impl Locked {
    fn exclusive(file: File) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor we own; no memory is shared.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self(file))
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as above; closing the file would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_under_sys_fs_bpf_mount_it_there_others_mount_their_parent() {
        for parent in ["/sys/fs/bpf", "/sys/fs/bpf/weft-sim/c1/node-a"] {
            assert_eq!(mount_point(Path::new(parent)), Path::new("/sys/fs/bpf"));
        }
        let other = Path::new("/run/weft-test/bpf");
        assert_eq!(mount_point(other), other);
    }
}
