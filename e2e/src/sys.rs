//! The machine side: running `ip`/`nft`, cgroups, and reading `/proc`.
//!
//! Networking goes through iproute2 and nftables rather than netlink from
//! Rust: they are the tools an operator debugging the simulator uses anyway,
//! batch mode keeps it to a few processes per node, and every failure comes
//! with the tool's own message.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo); the simulator needs one"
    )]
    NoCgroup2,
}

pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SysError {
    let what = what.into();
    move |source| SysError::Io { what, source }
}

/// Runs a program to completion, feeding `stdin`, failing with its stderr.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), SysError> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!(
            "cannot start `{command}` (is it installed? `cargo xtask setup` installs it)"
        )))?;
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(text.as_bytes())
            .map_err(io(format!("writing to `{command}`")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io(format!("waiting for `{command}`")))?;
    if !out.status.success() {
        return Err(SysError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// `ip [-n NETNS] -batch -` with `script` on stdin.
pub fn ip_batch(netns: Option<&str>, script: &str) -> Result<(), SysError> {
    match netns {
        Some(ns) => run("ip", &["-n", ns, "-batch", "-"], Some(script)),
        None => run("ip", &["-batch", "-"], Some(script)),
    }
}

/// Writes sysctls inside a network namespace (`/proc/sys` is per netns for
/// `net/*`, so it must be written from a process inside it).
pub fn netns_sysctls(netns: &str, values: &[(&str, &str)]) -> Result<(), SysError> {
    let script: String = values
        .iter()
        .map(|(path, value)| format!("echo {value} > /proc/sys/{path}\n"))
        .collect();
    run(
        "ip",
        &["netns", "exec", netns, "sh", "-e", "-c", &script],
        None,
    )
}

pub fn nft_in(netns: &str, rules: &str) -> Result<(), SysError> {
    run(
        "ip",
        &["netns", "exec", netns, "nft", "-f", "-"],
        Some(rules),
    )
}

/// Names of the network namespaces `ip netns` knows.
pub fn netns_list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The alias (`ip link set … alias`) of host interface `name`, when it
/// exists and has one.
pub fn link_alias(name: &str) -> Option<String> {
    let alias =
        std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("ifalias")).ok()?;
    let alias = alias.trim();
    (!alias.is_empty()).then(|| alias.to_string())
}

/// Pids of processes whose network namespace is `netns`.
pub fn netns_pids(netns: &str) -> Vec<i32> {
    let Ok(target) = std::fs::metadata(Path::new("/run/netns").join(netns)) else {
        return Vec::new();
    };
    use std::os::unix::fs::MetadataExt;
    let (dev, ino) = (target.dev(), target.ino());
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    std::fs::metadata(format!("/proc/{pid}/ns/net"))
                        .map(|m| m.dev() == dev && m.ino() == ino)
                        .unwrap_or(false)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The cgroup v2 mount point (on a hybrid layout, `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> Result<PathBuf, SysError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("reading /proc/self/mountinfo"))?;
    info.lines()
        .find_map(|line| {
            // Fields: id parent major:minor root mountpoint options ... - fstype source super
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .ok_or(SysError::NoCgroup2)
}

/// Mount points at or under `dir` (from `/proc/self/mountinfo`), deepest
/// first: what must be unmounted before `dir` can be removed.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| {
            let field = line.split_whitespace().nth(4)?;
            let path = PathBuf::from(unescape_mountinfo(field));
            path.starts_with(dir).then_some(path)
        })
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(oct) = field.get(i + 1..i + 4)
            && let Ok(v) = u8::from_str_radix(oct, 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detaches a mount (`umount2(MNT_DETACH)`): gone from the tree at once,
/// released when its last user is.
pub fn unmount(path: &Path) -> Result<(), SysError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io(format!("unmounting {}", path.display()))(std::io::Error::other(e)))?;
    // SAFETY: umount2(2) with a NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(io(format!("unmounting {}", path.display()))(e));
        }
    }
    Ok(())
}

/// An open `cgroup.procs`, so a child can join the cgroup between fork and
/// exec without allocating (see [`join_cgroup_before_exec`]).
pub struct CgroupHandle {
    procs: std::fs::File,
}

impl CgroupHandle {
    pub fn open(cgroup: &Path) -> Result<Self, SysError> {
        let path = cgroup.join("cgroup.procs");
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io(format!("opening {}", path.display())))?;
        Ok(Self { procs })
    }
}

/// Makes `command`'s process join `cgroup` before it execs, so it and every
/// process it forks are in the pod's cgroup from their first instruction.
pub fn join_cgroup_before_exec(command: &mut Command, cgroup: &CgroupHandle) {
    use std::os::unix::process::CommandExt;
    let fd = cgroup.procs.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed; it makes one write(2) to a file
    // descriptor the parent opened (and keeps open until spawn returns), and
    // allocates nothing. Writing "0" to cgroup.procs moves the writer.
    unsafe {
        command.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// An open network namespace, so a child can enter it between fork and
/// exec (see [`enter_netns_before_exec`]).
pub struct NetnsHandle {
    file: std::fs::File,
}

impl NetnsHandle {
    pub fn open(path: &Path) -> Result<Self, SysError> {
        let file = std::fs::File::open(path)
            .map_err(io(format!("opening network namespace {}", path.display())))?;
        Ok(Self { file })
    }
}

/// Makes `command`'s process enter a network namespace, and only that,
/// before it execs. Node-level processes (the node proxy) start this way
/// rather than through `ip netns exec`, which also gives the child a new
/// mount namespace with `/sys` remounted: that hides the cgroup2 and bpffs
/// mounts a node proxy needs to attach and pin its eBPF programs.
pub fn enter_netns_before_exec(command: &mut Command, netns: &NetnsHandle) {
    use std::os::unix::process::CommandExt;
    let fd = netns.file.as_raw_fd();
    // SAFETY: runs in the forked child before exec; setns(2) is a single
    // async-signal-safe system call on a descriptor the parent keeps open
    // until spawn returns, and nothing is allocated.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Kills every process in a cgroup (`cgroup.kill`, Linux ≥ 5.14), waits for
/// it to empty, and removes the directory. Absent cgroups are fine.
pub fn remove_cgroup(cgroup: &Path, timeout: Duration) -> Result<(), SysError> {
    if !cgroup.exists() {
        return Ok(());
    }
    // Children first: a cgroup with sub-cgroups cannot be removed.
    if let Ok(entries) = std::fs::read_dir(cgroup) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup(&e.path(), timeout)?;
            }
        }
    }
    let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
    let deadline = Instant::now() + timeout;
    loop {
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(SysError::Io {
                what: format!(
                    "processes {} in {} survived cgroup.kill",
                    procs.trim().replace('\n', ","),
                    cgroup.display()
                ),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    loop {
        match std::fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // Killed processes whose parent has not reaped them yet still
            // pin the cgroup for a moment (they no longer show in
            // cgroup.procs).
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io(format!("removing cgroup {}", cgroup.display()))(e)),
        }
    }
}

/// Sends SIGTERM to every process in `cgroups` and waits up to `grace` for
/// them to exit. Whatever is left is for `remove_cgroup` to kill.
pub fn terminate_cgroups(cgroups: &[&Path], grace: Duration) {
    let procs = |cg: &Path| -> Vec<i32> {
        std::fs::read_to_string(cg.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let mut any = false;
    for cg in cgroups {
        for pid in procs(cg) {
            // SAFETY: kill(2) on a process in a cgroup this simulator made.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            any = true;
        }
    }
    if !any {
        return;
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && cgroups.iter().any(|cg| !procs(cg).is_empty()) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// TCP ports in LISTEN state in the network namespace of `pid`.
pub fn listening_ports(pid: u32) -> Vec<u16> {
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1);
            let state = fields.nth(1);
            if state != Some("0A") {
                continue;
            }
            if let Some(port) = local
                .and_then(|l| l.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            {
                ports.push(port);
            }
        }
    }
    ports
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The last `lines` lines of a log file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Writes `bytes` to `path` readable by its owner only (keys, tokens). The
/// mode is set on the open file before anything is written, so a file left
/// over with a wider mode (from an older version, or by hand) is narrowed
/// first instead of keeping its mode, which `open(…, mode)` would do.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)
}

/// One plain HTTP/1.1 GET (control plane and proxy admin endpoints).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        status,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_file_is_its_owners_only_also_when_it_existed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "a longer old content").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"new").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/run/a\\040b"), "/run/a b");
        assert_eq!(unescape_mountinfo("/x\\011y\\134z"), "/x\ty\\z");
        // Not an escape: kept as it is.
        assert_eq!(unescape_mountinfo("/p\\9x"), "/p\\9x");
    }

    #[test]
    fn finds_cgroup2_mount() {
        let m = cgroup2_mount().unwrap();
        assert!(m.join("cgroup.procs").exists(), "{}", m.display());
    }

    #[test]
    fn listening_ports_sees_a_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(listening_ports(std::process::id()).contains(&port));
    }

    #[test]
    fn run_reports_stderr() {
        let e = run("sh", &["-c", "echo nope >&2; exit 3"], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope") && e.contains("exit status: 3"), "{e}");
    }
}
