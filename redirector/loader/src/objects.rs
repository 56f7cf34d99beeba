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
