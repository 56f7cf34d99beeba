//! The compiled eBPF objects (built by build.rs) and what each program attaches to.

use crate::link;

pub static CGROUP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft_cgroup.bpf.o"));
pub static SK_LOOKUP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft_sk_lookup.bpf.o"));

/// The global in the cgroup object holding the proxy's socket mark.
pub const PROXY_MARK_GLOBAL: &str = "WEFT_PROXY_MARK";
/// The global in the sk_lookup object holding its pod's netns cookie.
pub const NETNS_COOKIE_GLOBAL: &str = "WEFT_NETNS_COOKIE";
pub const SK_LOOKUP_PROGRAM: &str = "weft_sk_lookup";

/// A program of the cgroup object, attached once at the cgroup v2 root.
pub struct CgroupProgram {
    /// Program name in the object, the kernel (`bpftool prog show`) and the link pin.
    pub name: &'static str,
    pub attach_type: u32,
}

pub const CGROUP_PROGRAMS: &[CgroupProgram] = &[
    // Index first, then the getsockopt reader, the connect hooks last: a
    // redirect must never exist without the programs that make it usable.
    CgroupProgram {
        name: "weft_sockops",
        attach_type: link::BPF_CGROUP_SOCK_OPS,
    },
    CgroupProgram {
        name: "weft_getsockopt",
        attach_type: link::BPF_CGROUP_GETSOCKOPT,
    },
    CgroupProgram {
        name: "weft_getpeer4",
        attach_type: link::BPF_CGROUP_INET4_GETPEERNAME,
    },
    CgroupProgram {
        name: "weft_getpeer6",
        attach_type: link::BPF_CGROUP_INET6_GETPEERNAME,
    },
    CgroupProgram {
        name: "weft_connect4",
        attach_type: link::BPF_CGROUP_INET4_CONNECT,
    },
    CgroupProgram {
        name: "weft_connect6",
        attach_type: link::BPF_CGROUP_INET6_CONNECT,
    },
];

/// The cgroup programs as a "previous version" (tests of the in-place
/// upgrade; build.rs compiles it with `testing` only).
#[cfg(feature = "testing")]
pub static CGROUP_OBJECT_PREVIOUS: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft_cgroup_previous.bpf.o"));

/// Do-nothing getsockopt and connect4 programs, for the benchmark's
/// "kernel hook cost" column only (build.rs compiles it with `testing` only).
#[cfg(feature = "testing")]
pub static BENCH_NOOP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft_bench.bpf.o"));

/// A compiled object with some of its `const volatile` globals set: a copy
/// of the ELF whose `.rodata` bytes for those symbols are overwritten. This
/// is what aya's `EbpfLoader::override_global` does, but without a loader
/// that borrows every value for its own lifetime, so that one loader serves
/// the whole process (see `attach::LOADER`).
pub(crate) struct ObjectImage {
    /// Over-allocated by `ALIGN` bytes: the ELF starts at `start`, aligned
    /// as the ELF readers need (a `Vec<u8>` promises no alignment).
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

const ALIGN: usize = 8;

impl ObjectImage {
    /// `globals`: (symbol name, value); each symbol must exist and have
    /// exactly the value's size.
    pub(crate) fn with_globals(object: &[u8], globals: &[(&str, &[u8])]) -> Result<Self, String> {
        let mut buf = vec![0u8; object.len() + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        if start >= ALIGN {
            return Err("cannot align a buffer for the object".into());
        }
        buf[start..start + object.len()].copy_from_slice(object);
        let mut image = Self {
            buf,
            start,
            len: object.len(),
        };
        for (name, value) in globals {
            let at = global_offset(image.bytes(), name, value.len())?;
            image.buf[start + at..start + at + value.len()].copy_from_slice(value);
        }
        Ok(image)
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// Where in `object` (an ELF relocatable file) the bytes of global `name`
/// are: its section's file offset plus its offset in that section.
fn global_offset(object: &[u8], name: &str, size: usize) -> Result<usize, String> {
    use object::{Object, ObjectSection, ObjectSymbol};
    let file = object::File::parse(object).map_err(|e| format!("not an ELF object: {e}"))?;
    let symbol = file
        .symbols()
        .find(|s| s.name() == Ok(name))
        .ok_or_else(|| format!("global {name} is not in the object"))?;
    if symbol.size() != size as u64 {
        return Err(format!(
            "global {name} has {} bytes, the value {size}",
            symbol.size()
        ));
    }
    let section = symbol
        .section_index()
        .and_then(|i| file.section_by_index(i).ok())
        .ok_or_else(|| format!("global {name} is in no section"))?;
    let (offset, len) = section
        .file_range()
        .ok_or_else(|| format!("the section of global {name} has no data in the file"))?;
    // In a relocatable object a symbol's value is its offset in its section.
    if symbol.address() + size as u64 > len {
        return Err(format!("global {name} lies outside its section"));
    }
    usize::try_from(offset + symbol.address()).map_err(|e| e.to_string())
}

/// Whether `object` carries CO-RE relocations (`.BTF.ext`'s `core_relo`
/// part), the only thing the kernel's own BTF is needed for when loading.
pub(crate) fn has_core_relocations(object: &[u8]) -> Result<bool, String> {
    use object::{Object, ObjectSection};
    let file = object::File::parse(object).map_err(|e| format!("not an ELF object: {e}"))?;
    let Some(ext) = file.section_by_name(".BTF.ext") else {
        return Ok(false);
    };
    let data = ext.data().map_err(|e| e.to_string())?;
    // struct btf_ext_header: magic (u16), version, flags (u8), hdr_len,
    // func_info_off/len, line_info_off/len (u32), and, when hdr_len says
    // the header has them, core_relo_off/len.
    let word = |at: usize| {
        data.get(at..at + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
    };
    let header_len = word(4).ok_or(".BTF.ext is truncated")?;
    if header_len < 32 {
        return Ok(false);
    }
    Ok(word(28).ok_or(".BTF.ext is truncated")? > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_global(object: &[u8], name: &str) -> u64 {
        let at = global_offset(object, name, 8).unwrap();
        u64::from_ne_bytes(object[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn a_global_is_set_in_the_copy_only() {
        let cookie = 0x0123_4567_89ab_cdef_u64;
        let image = ObjectImage::with_globals(
            SK_LOOKUP_OBJECT,
            &[(NETNS_COOKIE_GLOBAL, &cookie.to_ne_bytes())],
        )
        .unwrap();
        assert_eq!(read_global(image.bytes(), NETNS_COOKIE_GLOBAL), cookie);
        assert_eq!(read_global(SK_LOOKUP_OBJECT, NETNS_COOKIE_GLOBAL), 0);
        // Nothing else changed.
        let at = global_offset(SK_LOOKUP_OBJECT, NETNS_COOKIE_GLOBAL, 8).unwrap();
        assert_eq!(image.bytes()[..at], SK_LOOKUP_OBJECT[..at]);
        assert_eq!(image.bytes()[at + 8..], SK_LOOKUP_OBJECT[at + 8..]);
    }

    #[test]
    fn a_missing_or_mis_sized_global_is_refused() {
        assert!(
            ObjectImage::with_globals(SK_LOOKUP_OBJECT, &[("NO_SUCH_GLOBAL", &[0; 8])]).is_err()
        );
        assert!(
            ObjectImage::with_globals(SK_LOOKUP_OBJECT, &[(NETNS_COOKIE_GLOBAL, &[0; 4])]).is_err()
        );
        assert!(ObjectImage::with_globals(CGROUP_OBJECT, &[(PROXY_MARK_GLOBAL, &[0; 8])]).is_err());
    }

    #[test]
    fn the_shipped_objects_need_no_kernel_btf() {
        // The loader drops the kernel's BTF (attach::LOADER): an object
        // with CO-RE relocations would be refused at load.
        assert!(!has_core_relocations(SK_LOOKUP_OBJECT).unwrap());
        assert!(!has_core_relocations(CGROUP_OBJECT).unwrap());
    }
}
