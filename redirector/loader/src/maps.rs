//! Rust mirrors of the map keys and values in `bpf/weft_common.h`.
//! Layouts must match the C structs byte for byte (the tests below pin sizes).

use aya::Pod;

pub const NETNS: &str = "weft_netns";
pub const SKIP_PORTS: &str = "weft_skip_ports";
pub const INBOUND: &str = "weft_inbound";
/// Maps of the cgroup object only (the sk_lookup object does not reference them).
pub const SK_ORIG: &str = "weft_sk_orig";
pub const ORIG_DST: &str = "weft_orig_dst";
pub const ALL: &[&str] = &[NETNS, SKIP_PORTS, INBOUND, SK_ORIG, ORIG_DST];

pub const DIR_OUTBOUND: u8 = 0;
pub const DIR_INBOUND: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NetnsInfo {
    pub flags: u32,
    pub pod_uid: [u8; 60],
}

impl NetnsInfo {
    pub fn new(uid: &str) -> Self {
        let mut pod_uid = [0u8; 60];
        let n = uid.len().min(pod_uid.len());
        pod_uid[..n].copy_from_slice(&uid.as_bytes()[..n]);
        Self { flags: 0, pod_uid }
    }

    pub fn uid(&self) -> String {
        let end = self
            .pod_uid
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.pod_uid.len());
        String::from_utf8_lossy(&self.pod_uid[..end]).into_owned()
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkipKey {
    pub netns_cookie: u64,
    pub port: u16,
    pub direction: u8,
    pub pad: [u8; 5],
}

impl SkipKey {
    pub fn new(netns_cookie: u64, port: u16, direction: u8) -> Self {
        Self {
            netns_cookie,
            port,
            direction,
            pad: [0; 5],
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    pub family: u32,
    pub pad: u32,
}

// SAFETY: plain-old-data: repr(C), integer fields only, explicit padding.
unsafe impl Pod for NetnsInfo {}
// SAFETY: as above.
unsafe impl Pod for SkipKey {}
// SAFETY: as above.
unsafe impl Pod for ListenerKey {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_c_structs() {
        assert_eq!(std::mem::size_of::<NetnsInfo>(), 64);
        assert_eq!(std::mem::size_of::<SkipKey>(), 16);
        assert_eq!(std::mem::size_of::<ListenerKey>(), 16);
    }

    #[test]
    fn uid_round_trips_and_truncates() {
        assert_eq!(NetnsInfo::new("5f0c-uid").uid(), "5f0c-uid");
        let long = "x".repeat(80);
        assert_eq!(NetnsInfo::new(&long).uid().len(), 60);
    }
}
