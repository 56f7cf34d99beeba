//! Loading the programs and attaching them (cgroup root, pod namespaces).

use super::link_pin;
use crate::kernel::{self, feature_of_program};
use crate::objects::{self, CGROUP_PROGRAMS, ObjectImage};
use crate::{Error, Netns, PROXY_SOCKET_MARK, link};
use aya::programs::{CgroupSockAddr, CgroupSockopt, Program, SkLookup, SockOps};
use aya::{Ebpf, EbpfLoader};
use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{LazyLock, Mutex};

fn load_error(program: &str, e: impl std::fmt::Display) -> Error {
    let feature = feature_of_program(program);
    let detail = e.to_string();
    if kernel::has(&feature) {
        Error::Load {
            program: program.to_string(),
            detail,
        }
    } else {
        kernel::missing(&feature, &kernel::running_release(), detail)
    }
}

/// The process's one eBPF loader. Building an aya loader parses the
/// kernel's BTF (`/sys/kernel/btf/vmlinux`, several MiB, which takes about
/// 20 MiB of heap while it lasts and leaves most of it in the allocator's
/// free lists): a loader per pod made the first captured pod cost ~20 MiB of
/// RSS. So the parse happens once, and its result is dropped at once: the
/// kernel's BTF is only needed for CO-RE relocations, which our objects do
/// not have ([`load_object`] refuses one that does rather than load it
/// unrelocated). The values that differ between loads (a pod's netns
/// cookie) are written into a copy of the object ([`ObjectImage`]), not
/// given to the loader, which would borrow them for its whole life.
static LOADER: LazyLock<Mutex<EbpfLoader<'static>>> = LazyLock::new(|| {
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    Mutex::new(loader)
});

/// Loads `object` (its maps pinned by name under `pin_dir/maps`, shared with
/// every other object loaded there) with `globals` set; `program` names it
/// in errors.
fn load_object(
    pin_dir: &Path,
    object: &[u8],
    globals: &[(&str, &[u8])],
    program: &str,
) -> Result<Ebpf, Error> {
    let not_loadable = |detail: String| Error::Load {
        program: program.to_string(),
        detail,
    };
    let image = ObjectImage::with_globals(object, globals).map_err(not_loadable)?;
    if objects::has_core_relocations(image.bytes()).map_err(not_loadable)? {
        return Err(not_loadable(
            "the object has CO-RE relocations, which need the kernel's BTF; the loader keeps none"
                .into(),
        ));
    }
    // A panic in another load leaves nothing in the loader half-set: each
    // load sets the pin directory it uses.
    let mut loader = LOADER.lock().unwrap_or_else(|e| e.into_inner());
    loader.default_map_pin_directory(pin_dir.join("maps"));
    loader
        .load(image.bytes())
        .map_err(|e| load_error(program, e))
}

fn proxy_mark_global() -> [(&'static str, &'static [u8]); 1] {
    const MARK: [u8; 4] = PROXY_SOCKET_MARK.to_ne_bytes();
    [(objects::PROXY_MARK_GLOBAL, &MARK)]
}

pub(super) fn attach_cgroup_programs(pin_dir: &Path, cgroup_root: &Path) -> Result<(), Error> {
    let mut ebpf = load_object(
        pin_dir,
        objects::CGROUP_OBJECT,
        &proxy_mark_global(),
        "weft_cgroup",
    )?;
    let cgroup = File::open(cgroup_root).map_err(|source| Error::Attach {
        program: "cgroup programs".into(),
        target: cgroup_root.into(),
        source,
    })?;
    for p in CGROUP_PROGRAMS {
        let program = ebpf.program_mut(p.name).ok_or_else(|| Error::Load {
            program: p.name.into(),
            detail: "not in the compiled object".into(),
        })?;
        load_program(program).map_err(|e| load_error(p.name, e))?;
        let prog_fd = program.fd().map_err(|e| load_error(p.name, e))?;
        let pin = link_pin(pin_dir, p.name);
        link::create_pinned(prog_fd.as_fd(), cgroup.as_fd(), p.attach_type, &pin).map_err(
            |source| Error::Attach {
                program: p.name.into(),
                target: cgroup_root.into(),
                source,
            },
        )?;
    }
    // Dropping `ebpf` closes our program fds; the pinned links keep the
    // programs (and, through them, the pinned maps) alive.
    Ok(())
}

/// Loads the cgroup programs this build carries and, for every pinned
/// cgroup link whose program differs (by the kernel's tag), replaces the
/// program in place (`BPF_LINK_UPDATE`). Returns the names of the programs
/// replaced.
pub(crate) fn upgrade_cgroup_programs(
    pin_dir: &Path,
    object: &[u8],
) -> Result<Vec<&'static str>, Error> {
    let mut ebpf = load_object(pin_dir, object, &proxy_mark_global(), "weft_cgroup")?;
    let mut upgraded = Vec::new();
    // The same order as attaching: readers before the connect hooks.
    for p in CGROUP_PROGRAMS {
        let program = ebpf.program_mut(p.name).ok_or_else(|| Error::Load {
            program: p.name.into(),
            detail: "not in the compiled object".into(),
        })?;
        load_program(program).map_err(|e| load_error(p.name, e))?;
        let prog_fd = program.fd().map_err(|e| load_error(p.name, e))?;
        let pin = link_pin(pin_dir, p.name);
        if replace_if_different(&pin, prog_fd.as_fd()).map_err(|source| Error::Pin {
            path: pin.clone(),
            source,
        })? {
            upgraded.push(p.name);
        }
    }
    Ok(upgraded)
}

/// Replaces the program of the link at `pin` with `new_prog` unless it
/// already runs the same code; whether it did.
fn replace_if_different(
    pin: &Path,
    new_prog: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<bool> {
    let current = link::pinned_info(pin)?;
    let attached = link::prog_tag_by_id(current.prog_id)?;
    if attached == link::prog_tag(new_prog)? {
        return Ok(false);
    }
    link::update_pinned(pin, new_prog, current.prog_id)?;
    Ok(true)
}

/// The tag of the sk_lookup program this build carries (the same for every
/// pod: the cookie is data, not code).
pub(super) fn sk_lookup_tag(pin_dir: &Path) -> Result<[u8; 8], Error> {
    let ebpf = load_sk_lookup(pin_dir, 0)?;
    let prog_fd = sk_lookup_fd(&ebpf)?;
    link::prog_tag(prog_fd.as_fd()).map_err(|source| Error::Pin {
        path: pin_dir.into(),
        source,
    })
}

/// Like [`upgrade_cgroup_programs`] for a pod's sk_lookup link: a program
/// instance with the pod's cookie replaces the attached one if it differs.
pub(super) fn upgrade_sk_lookup(pin_dir: &Path, cookie: u64, pin: &Path) -> Result<bool, Error> {
    let ebpf = load_sk_lookup(pin_dir, cookie)?;
    let prog_fd = sk_lookup_fd(&ebpf)?;
    replace_if_different(pin, prog_fd.as_fd()).map_err(|source| Error::Pin {
        path: pin.to_path_buf(),
        source,
    })
}

/// The sk_lookup program loaded for the pod of namespace `cookie`.
fn load_sk_lookup(pin_dir: &Path, cookie: u64) -> Result<aya::Ebpf, Error> {
    let mut ebpf = load_object(
        pin_dir,
        objects::SK_LOOKUP_OBJECT,
        &[(objects::NETNS_COOKIE_GLOBAL, &cookie.to_ne_bytes())],
        objects::SK_LOOKUP_PROGRAM,
    )?;
    let program = ebpf
        .program_mut(objects::SK_LOOKUP_PROGRAM)
        .ok_or_else(|| Error::Load {
            program: objects::SK_LOOKUP_PROGRAM.into(),
            detail: "not in the compiled object".into(),
        })?;
    load_program(program).map_err(|e| load_error(objects::SK_LOOKUP_PROGRAM, e))?;
    Ok(ebpf)
}

fn sk_lookup_fd(ebpf: &aya::Ebpf) -> Result<&aya::programs::ProgramFd, Error> {
    ebpf.program(objects::SK_LOOKUP_PROGRAM)
        .ok_or_else(|| Error::Load {
            program: objects::SK_LOOKUP_PROGRAM.into(),
            detail: "not in the compiled object".into(),
        })?
        .fd()
        .map_err(|e| load_error(objects::SK_LOOKUP_PROGRAM, e))
}

fn load_program(program: &mut Program) -> Result<(), aya::programs::ProgramError> {
    match program {
        Program::CgroupSockAddr(p) => CgroupSockAddr::load(p),
        Program::CgroupSockopt(p) => CgroupSockopt::load(p),
        Program::SockOps(p) => SockOps::load(p),
        Program::SkLookup(p) => SkLookup::load(p),
        _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
    }
}

/// One sk_lookup instance per pod: the program cannot ask which namespace it
/// runs in, so it is loaded with the pod's cookie as a constant.
pub(super) fn attach_sk_lookup(
    pin_dir: &Path,
    cookie: u64,
    netns: &Netns,
    pin: &Path,
) -> Result<(), Error> {
    let ebpf = load_sk_lookup(pin_dir, cookie)?;
    let prog_fd = sk_lookup_fd(&ebpf)?;
    link::create_pinned(prog_fd.as_fd(), netns.as_fd(), link::BPF_SK_LOOKUP, pin).map_err(
        |source| Error::Attach {
            program: objects::SK_LOOKUP_PROGRAM.into(),
            target: netns.path().into(),
            source,
        },
    )?;
    Ok(())
}
