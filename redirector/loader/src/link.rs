//! Creating and pinning BPF links with the raw syscall.
//!
//! aya 0.14 cannot turn a `CgroupSockopt` link into a pinnable `FdLink`, so
//! every link we pin is created here the same way: `BPF_LINK_CREATE` then
//! `BPF_OBJ_PIN`. Removing the pin file detaches the link once no fd holds it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

// enum bpf_attach_type (linux/bpf.h)
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;
pub const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
pub const BPF_CGROUP_INET6_GETPEERNAME: u32 = 30;
pub const BPF_SK_LOOKUP: u32 = 36;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;

/// `union bpf_attr` is 128+ bytes in current kernels; the kernel requires
/// the unused tail to be zero, which a zeroed buffer of this size gives.
#[repr(C, align(8))]
struct BpfAttr([u8; 128]);

impl BpfAttr {
    fn zeroed() -> Self {
        Self([0; 128])
    }
    fn put_u32(&mut self, offset: usize, v: u32) {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, offset: usize, v: u64) {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

fn bpf(cmd: libc::c_long, attr: &mut BpfAttr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, zero-padded bpf_attr of the size we pass.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BpfAttr,
            std::mem::size_of::<BpfAttr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Attaches `prog` to `target` (a cgroup or netns fd) and pins the link at
/// `pin`. The returned fd is the link; dropping it leaves the pin attached.
pub fn create_pinned(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
    pin: &Path,
) -> io::Result<OwnedFd> {
    let mut attr = BpfAttr::zeroed();
    // link_create: prog_fd, target_fd, attach_type, flags
    attr.put_u32(0, prog.as_raw_fd() as u32);
    attr.put_u32(4, target.as_raw_fd() as u32);
    attr.put_u32(8, attach_type);
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    pin_fd(link.as_raw_fd(), pin)?;
    Ok(link)
}

fn pin_fd(fd: i32, pin: &Path) -> io::Result<()> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pin path contains NUL"))?;
    let mut attr = BpfAttr::zeroed();
    // obj_pin: pathname (u64 pointer), bpf_fd
    attr.put_u64(0, path.as_ptr() as u64);
    attr.put_u32(8, fd as u32);
    bpf(BPF_OBJ_PIN, &mut attr)?;
    Ok(())
}

/// Unpins the link pinned at `pin`; with no other holder (we keep no fds)
/// the kernel then detaches it. A missing pin is not an error.
pub fn remove_pinned(pin: &Path) -> io::Result<()> {
    match std::fs::remove_file(pin) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Opens the link pinned at `pin`.
fn open_pinned(pin: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pin path contains NUL"))?;
    let mut attr = BpfAttr::zeroed();
    // obj_get: pathname, bpf_fd (0), file_flags (0)
    attr.put_u64(0, path.as_ptr() as u64);
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Replaces the program of the link pinned at `pin` with `new_prog`, in
/// place (`BPF_LINK_UPDATE`): the attachment never goes away, so no hook
/// is ever missing, and only if the link still runs `old_prog_id`'s program
/// (`BPF_F_REPLACE`), so a concurrent upgrade is not undone.
pub fn update_pinned(pin: &Path, new_prog: BorrowedFd<'_>, old_prog_id: u32) -> io::Result<()> {
    const BPF_F_REPLACE: u32 = 1 << 2;
    let link = open_pinned(pin)?;
    let old = prog_by_id(old_prog_id)?;
    let mut attr = BpfAttr::zeroed();
    // link_update: link_fd, new_prog_fd, flags, old_prog_fd
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, new_prog.as_raw_fd() as u32);
    attr.put_u32(8, BPF_F_REPLACE);
    attr.put_u32(12, old.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr)?;
    Ok(())
}

fn prog_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = BpfAttr::zeroed();
    // prog_id (u32), next_id, open_flags
    attr.put_u32(0, id);
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The kernel's tag of a program: a hash of its instructions with map
/// references zeroed, so the same program loaded twice has the same tag
/// and another version of it another one.
pub fn prog_tag(prog: BorrowedFd<'_>) -> io::Result<[u8; 8]> {
    // struct bpf_prog_info: type, id (u32 each), tag[8] at offset 8.
    let mut info = [0u8; 64];
    let mut attr = BpfAttr::zeroed();
    attr.put_u32(0, prog.as_raw_fd() as u32);
    attr.put_u32(4, info.len() as u32);
    attr.put_u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info[8..16].try_into().expect("8 bytes"))
}

/// The tag of the program with kernel id `id`.
pub fn prog_tag_by_id(id: u32) -> io::Result<[u8; 8]> {
    let prog = prog_by_id(id)?;
    prog_tag(std::os::fd::AsFd::as_fd(&prog))
}

/// What the kernel says about a pinned link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedLinkInfo {
    pub link_id: u32,
    pub prog_id: u32,
    /// For netns (sk_lookup) links: the namespace's inode, 0 once the
    /// namespace is gone (the kernel detaches such links by itself).
    pub netns_ino: u32,
}

/// Reads the link pinned at `pin`.
pub fn pinned_info(pin: &Path) -> io::Result<PinnedLinkInfo> {
    let link = open_pinned(pin)?;
    // struct bpf_link_info: type, id, prog_id (u32 each), then an 8-aligned
    // union whose netns member starts with netns_ino (offset 16).
    let mut info = [0u8; 64];
    let mut attr = BpfAttr::zeroed();
    // info: bpf_fd, info_len, info (pointer)
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, info.len() as u32);
    attr.put_u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let word = |i: usize| u32::from_ne_bytes(info[i..i + 4].try_into().expect("4 bytes"));
    Ok(PinnedLinkInfo {
        link_id: word(4),
        prog_id: word(8),
        netns_ino: word(16),
    })
}
