//! Pod volumes of a `--kube` cluster, as the kubelet makes them: a
//! directory per volume on the host (`<state_dir>/pods/<uid>/volumes/<name>`,
//! or the node's own root for `hostPath`), bind-mounted at each container's
//! `mountPath` in the container's own mount namespace ([`pod_exec`]).
//!
//! ConfigMap, Secret, downward API and projected volumes are written the
//! way the kubelet's atomic writer does: the files live in a timestamped
//! directory `..<time>`, `..data` is a symlink to it, and each visible name
//! is a symlink through `..data`; an update writes a new directory and
//! renames a new `..data` link over the old one, so a reader sees the old
//! set or the new one, never a mix.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Largest file a volume may hold (a ConfigMap or Secret is at most 1 MiB).
const MAX_FILE_BYTES: usize = 4 << 20;

/// The files of one atomically written volume: relative path → contents
/// and mode.
pub type Payload = BTreeMap<String, (Vec<u8>, u32)>;

/// Checks a relative path from a manifest (`items[].path`, a projected
/// source's `path`): no absolute path, no `..`, no empty component, not
/// starting with `..` (the writer's own names).
pub fn check_relative(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > 4096 {
        return Err(format!("path {path:?}: empty or too long"));
    }
    if path.starts_with("..") {
        return Err(format!("path {path:?} may not start with '..'"));
    }
    if path.starts_with('/') || !plain_components(path) {
        return Err(format!(
            "path {path:?} must be relative, without '.', '..' or empty components"
        ));
    }
    Ok(())
}

/// Checks an absolute path from a manifest (`hostPath.path`, `mountPath`).
pub fn check_absolute(path: &str) -> Result<(), String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(format!("path {path:?} must be absolute"));
    };
    if path.len() > 4096 || (!rest.is_empty() && !plain_components(rest.trim_end_matches('/'))) {
        return Err(format!(
            "path {path:?} may not contain '.', '..' or empty components"
        ));
    }
    Ok(())
}

/// Every `/`-separated component is a plain name (no `.`, `..`, empty, NUL).
fn plain_components(path: &str) -> bool {
    path.split('/')
        .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'))
}

/// Writes `payload` into `dir` with the atomic `..data` swap, if it differs
/// from what is there. Returns whether anything changed.
pub fn write_atomic(dir: &Path, payload: &Payload) -> std::io::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    if current_payload(dir).as_ref() == Some(payload) {
        return Ok(false);
    }
    for (name, (bytes, _)) in payload {
        check_relative(name).map_err(std::io::Error::other)?;
        if bytes.len() > MAX_FILE_BYTES {
            return Err(std::io::Error::other(format!(
                "{name}: {} bytes, more than a volume file may hold",
                bytes.len()
            )));
        }
    }
    let stamp = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let data_dir = dir.join(&stamp);
    std::fs::create_dir(&data_dir)?;
    for (name, (bytes, mode)) in payload {
        let path = data_dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, bytes)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode & 0o777))?;
    }
    // The new `..data`, renamed over the old one: the swap.
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&stamp, &tmp)?;
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::fs::rename(&tmp, dir.join("..data"))?;
    // Visible names: a symlink per top-level entry, through `..data`.
    let tops: std::collections::BTreeSet<String> = payload
        .keys()
        .map(|k| k.split('/').next().unwrap_or(k).to_string())
        .collect();
    for top in &tops {
        let link = dir.join(top);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(top), &link)?;
        }
    }
    // Names that are gone, and the old data directory.
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !tops.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    if let Some(old) = old
        && old != Path::new(&stamp)
    {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(true)
}

/// What `..data` holds now (to skip a write that changes nothing).
fn current_payload(dir: &Path) -> Option<Payload> {
    use std::os::unix::fs::PermissionsExt;
    let data = dir.join("..data");
    let mut out = Payload::new();
    let mut stack = vec![(data.canonicalize().ok()?, String::new())];
    while let Some((path, prefix)) = stack.pop() {
        for entry in std::fs::read_dir(&path).ok()?.flatten() {
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            let meta = entry.metadata().ok()?;
            if meta.is_dir() {
                stack.push((entry.path(), format!("{name}/")));
            } else {
                let bytes = std::fs::read(entry.path()).ok()?;
                out.insert(name, (bytes, meta.permissions().mode() & 0o777));
            }
        }
    }
    Some(out)
}

/// One bind mount of a container: `source` (a host directory or file) at
/// `target` (the container's `mountPath`).
#[derive(Clone, Debug, PartialEq)]
pub struct Mount {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

impl Mount {
    /// `SOURCE=TARGET[,ro]`, as `weft-sim pod-exec --mount` takes it.
    pub fn to_arg(&self) -> String {
        format!(
            "{}={}{}",
            self.source.display(),
            self.target,
            if self.read_only { ",ro" } else { "" }
        )
    }

    pub fn from_arg(arg: &str) -> Result<Self, String> {
        let (source, rest) = arg
            .split_once('=')
            .ok_or_else(|| format!("--mount {arg:?}: expected SOURCE=TARGET[,ro]"))?;
        let (target, read_only) = match rest.strip_suffix(",ro") {
            Some(t) => (t, true),
            None => (rest, false),
        };
        check_absolute(target)?;
        Ok(Self {
            source: PathBuf::from(source),
            target: target.to_string(),
            read_only,
        })
    }
}

/// `weft-sim pod-exec`: run inside the mount namespace `ip netns exec`
/// made for the container (private to it). Binds each volume at its
/// `mountPath`, then execs `argv`.
///
/// A `mountPath` whose parent does not exist on this machine is made
/// inside an overlay of its nearest existing ancestor (upper layer in
/// `scratch`), so the machine's own directories are never written. Every
/// source — and the netns' `/etc` files, which an overlay of `/etc` would
/// hide — is taken as a detached mount (`open_tree`) *before* any overlay,
/// so that a source under an overlaid directory (the state directory is in
/// `/run`) is the real directory, not the overlay's copy of it.
pub fn pod_exec(
    netns: &str,
    scratch: &Path,
    mounts: &[Mount],
    argv: &[String],
) -> Result<std::convert::Infallible, String> {
    // 1. Detached copies of every source.
    let mut detached = Vec::new();
    for m in mounts {
        detached.push((open_tree(&m.source)?, m));
    }
    let etc = Path::new("/etc/netns").join(netns);
    let mut etc_files = Vec::new();
    for entry in std::fs::read_dir(&etc).into_iter().flatten().flatten() {
        let target = Path::new("/etc").join(entry.file_name());
        if target.exists() {
            etc_files.push((open_tree(&entry.path())?, target));
        }
    }
    // 2. Overlays for targets whose parent is missing: one per topmost
    //    ancestor; the one holding `scratch` last (its upper layer must be
    //    on the real filesystem when it is mounted).
    let mut ancestors: Vec<PathBuf> = Vec::new();
    for m in mounts {
        let target = Path::new(&m.target);
        if std::fs::symlink_metadata(target).is_ok() {
            continue;
        }
        let ancestor = target
            .ancestors()
            .skip(1)
            .find(|a| a.exists())
            .unwrap_or(Path::new("/"));
        let ancestor = ancestor
            .canonicalize()
            .map_err(|e| format!("{}: {e}", ancestor.display()))?;
        if ancestor == Path::new("/") {
            return Err(format!(
                "mountPath {}: its parent does not exist on this machine, and the simulator does not overlay /",
                m.target
            ));
        }
        if !ancestors.iter().any(|a| ancestor.starts_with(a)) {
            ancestors.retain(|a| !a.starts_with(&ancestor));
            ancestors.push(ancestor);
        }
    }
    ancestors.sort_by_key(|a| scratch.starts_with(a));
    for (i, ancestor) in ancestors.iter().enumerate() {
        let layer = scratch.join(format!("overlay{i}"));
        let (upper, work) = (layer.join("upper"), layer.join("work"));
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            ancestor.display(),
            upper.display(),
            work.display()
        );
        mount(
            Some(Path::new("overlay")),
            ancestor,
            Some("overlay"),
            0,
            Some(&options),
        )?;
    }
    // 3. The volumes at their mount paths.
    for (tree, m) in &detached {
        let target = Path::new(&m.target);
        if std::fs::symlink_metadata(target).is_err() {
            if std::fs::metadata(&m.source).is_ok_and(|md| md.is_file()) {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| format!("{}: {e}", parent.display()))?;
                }
                std::fs::write(target, b"").map_err(|e| format!("{}: {e}", target.display()))?;
            } else {
                std::fs::create_dir_all(target)
                    .map_err(|e| format!("{}: {e}", target.display()))?;
            }
        }
        move_mount(tree, target)?;
        if m.read_only {
            mount(
                None,
                target,
                None,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                None,
            )?;
        }
    }
    // 4. The pod's /etc files again, over any overlay of /etc.
    if ancestors
        .iter()
        .any(|a| a.starts_with("/etc") || Path::new("/etc").starts_with(a))
    {
        for (tree, target) in &etc_files {
            move_mount(tree, target)?;
        }
    }
    let program = argv.first().ok_or("pod-exec: no program")?;
    let err = std::os::unix::process::CommandExt::exec(
        std::process::Command::new(program).args(&argv[1..]),
    );
    Err(format!("executing {program}: {err}"))
}

/// A detached copy of the mount tree at `path` (`open_tree(2)` with
/// `OPEN_TREE_CLONE`), to attach later with [`move_mount`].
fn open_tree(path: &Path) -> Result<std::os::fd::OwnedFd, String> {
    use std::os::fd::FromRawFd;
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{}: contains a NUL byte", path.display()))?;
    // SAFETY: open_tree(2) with a NUL-terminated path; returns a new file
    // descriptor that we own, or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_RECURSIVE,
        )
    };
    if fd < 0 {
        return Err(format!(
            "taking {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` is a descriptor open_tree just returned to us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches a detached mount tree at `target` (`move_mount(2)`).
fn move_mount(tree: &std::os::fd::OwnedFd, target: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
    let c = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| format!("{}: contains a NUL byte", target.display()))?;
    let empty = CString::default();
    // SAFETY: move_mount(2) with a descriptor we own, an empty path (the
    // descriptor itself) and a NUL-terminated target path.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(format!(
            "mounting on {}: {}",
            target.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let c = |b: &[u8]| CString::new(b).map_err(|_| "a path contains a NUL byte".to_string());
    let source_c = source.map(|s| c(s.as_os_str().as_bytes())).transpose()?;
    let target_c = c(target.as_os_str().as_bytes())?;
    let fstype_c = fstype.map(|f| c(f.as_bytes())).transpose()?;
    let data_c = data.map(|d| c(d.as_bytes())).transpose()?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the
    // call, or null where mount(2) allows it.
    let rc = unsafe {
        libc::mount(
            source_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target_c.as_ptr(),
            fstype_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data_c
                .as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    };
    if rc != 0 {
        return Err(format!(
            "mounting {} on {}: {}",
            source.map_or("(remount)".into(), |s| s.display().to_string()),
            target.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(items: &[(&str, &str)]) -> Payload {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), (v.as_bytes().to_vec(), 0o644)))
            .collect()
    }

    #[test]
    fn the_data_link_swaps_to_the_new_contents_and_old_names_go() {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("v");
        assert!(write_atomic(&vol, &payload(&[("a", "1"), ("sub/b", "2")])).unwrap());
        assert_eq!(std::fs::read_to_string(vol.join("a")).unwrap(), "1");
        assert_eq!(std::fs::read_to_string(vol.join("sub/b")).unwrap(), "2");
        let first = std::fs::read_link(vol.join("..data")).unwrap();
        assert!(!write_atomic(&vol, &payload(&[("a", "1"), ("sub/b", "2")])).unwrap());
        assert!(write_atomic(&vol, &payload(&[("a", "3")])).unwrap());
        assert_eq!(std::fs::read_to_string(vol.join("a")).unwrap(), "3");
        assert!(!vol.join("sub").exists());
        assert_ne!(std::fs::read_link(vol.join("..data")).unwrap(), first);
        assert!(
            !vol.join(first).exists(),
            "the old data directory is removed"
        );
        assert_eq!(
            std::fs::read_link(vol.join("a")).unwrap(),
            Path::new("..data/a")
        );
    }

    #[test]
    fn hostile_paths_are_refused() {
        for bad in ["../x", "/etc/passwd", "a/../../b", "..data", "", "./a"] {
            assert!(check_relative(bad).is_err(), "{bad}");
        }
        assert!(check_relative("a/b.txt").is_ok());
        for bad in ["relative", "/a/../b", "/a/./b"] {
            assert!(check_absolute(bad).is_err(), "{bad}");
        }
        assert!(check_absolute("/var/run/secrets").is_ok());
        let dir = tempfile::tempdir().unwrap();
        let e = write_atomic(dir.path(), &payload(&[("../escape", "x")])).unwrap_err();
        assert!(e.to_string().contains("may not start with"), "{e}");
        assert!(Mount::from_arg("/src=relative").is_err());
        assert_eq!(
            Mount::from_arg("/s=/t,ro").unwrap(),
            Mount {
                source: "/s".into(),
                target: "/t".into(),
                read_only: true
            }
        );
    }
}
