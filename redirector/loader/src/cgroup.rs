//! Finding the cgroup v2 root this kernel really uses.
//!
//! On a hybrid layout (this machine: v1 controllers under /sys/fs/cgroup,
//! v2 at /sys/fs/cgroup/unified) attaching at /sys/fs/cgroup would fail or
//! attach nowhere useful, so the mount is read from /proc/self/mountinfo.

use crate::Error;
use std::path::{Path, PathBuf};

/// The mount point of the cgroup2 filesystem, from `/proc/self/mountinfo`.
pub fn find_cgroup2_root() -> Result<PathBuf, Error> {
    let mountinfo = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(mountinfo)?;
    cgroup2_mount_point(&text).ok_or_else(|| Error::NoCgroup2 {
        mountinfo: mountinfo.into(),
    })
}

/// The first cgroup2 mount whose root is the hierarchy root (`/`): a mount
/// of a sub-cgroup (as in a container) is not where the root programs go.
fn cgroup2_mount_point(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // id parent major:minor root mount-point options [optional...] - fstype source super-options
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_layout_finds_unified() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_point(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn sub_cgroup_mounts_are_not_the_root() {
        let text = "50 40 0:38 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n\
                    51 40 0:38 / /host/cgroup\\040v2 rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_point(text),
            Some(PathBuf::from("/host/cgroup v2"))
        );
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert_eq!(
            cgroup2_mount_point("1 0 0:1 / / rw - ext4 /dev/sda rw\n"),
            None
        );
    }

    #[test]
    fn this_machine_has_one() {
        let root = find_cgroup2_root().unwrap();
        assert!(root.join("cgroup.procs").exists(), "{}", root.display());
    }
}
