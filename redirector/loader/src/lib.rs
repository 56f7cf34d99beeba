//! Weft's socket redirection: the eBPF programs that bring enrolled pods'
//! traffic into the node proxy, and the library the node proxy drives them with.
//!
//! - [`Redirector::install`] loads the cgroup programs, attaches them at the
//!   cgroup v2 root and pins everything under a bpffs directory of ours
//!   ([`RedirectorConfig::pin_dir`]); a restarted proxy adopts them in place.
//! - [`Redirector::enroll`] puts a pod's network namespace under capture;
//!   [`Redirector::unenroll`] releases it; [`Redirector::uninstall`] removes
//!   every program, link, pin and map.
//! - [`Netns`] opens sockets inside a pod's namespace (the proxy's
//!   15001/15006/15008 listeners and its own marked sockets).
//! - [`PodRegistrationListener`] is the node agent's end of the CNI plugin's
//!   protocol (`weft_registration`); [`discovery`] finds pods that existed
//!   before the agent started.
//!
//! Decisions and the protocol: `docs/redirector.md`.

mod annotations;
mod bpffs;
mod cgroup;
pub mod discovery;
mod error;
mod kernel;
mod link;
mod maps;
mod netns;
mod objects;
mod original_dst;
mod redirector;
mod registration;

pub use annotations::{SKIP_INBOUND_PORTS, SKIP_OUTBOUND_PORTS, SkipPorts};
pub use cgroup::find_cgroup2_root;
pub use error::Error;
pub use kernel::{KernelFeature, check_kernel};
pub use netns::Netns;
pub use original_dst::{SO_ORIGINAL_DST, original_dst};
pub use redirector::{
    DEFAULT_PIN_DIR, Enrolled, InstalledObjects, PodEnrollment, Redirector, RedirectorConfig,
    uninstall_at,
};
pub use registration::{PodRegistrationListener, RegistrationRequest};

/// Ports of the node proxy inside each enrolled pod (design.md).
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture: sk_lookup steers inbound connections here.
pub const INBOUND_PORT: u16 = 15006;
/// Inbound HBONE (mTLS tunnel): never steered.
pub const HBONE_PORT: u16 = 15008;

/// The socket mark (`SO_MARK`) the node proxy sets on its own sockets: the
/// connect hooks never redirect a socket carrying it. 0x5746 is "WF" in
/// ASCII, below the bits Calico (0xffff0000) and Cilium (0x0f00, 0xf000 areas
/// of the high half) use; Istio uses 1337 for the same purpose.
pub const PROXY_SOCKET_MARK: u32 = 0x5746;

/// For `redirector-bench` only (feature `testing`): not part of the API.
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod bench_support {
    pub use crate::objects::BENCH_NOOP_OBJECT;

    /// Tests of the in-place upgrade: puts the "previous version" of the
    /// cgroup programs (same behaviour, other instructions) on the links
    /// pinned under `pin_dir`, in place; returns the programs replaced.
    pub fn attach_previous_version(
        pin_dir: &std::path::Path,
    ) -> Result<Vec<&'static str>, crate::Error> {
        crate::redirector::attach::upgrade_cgroup_programs(
            pin_dir,
            crate::objects::CGROUP_OBJECT_PREVIOUS,
        )
    }

    /// The tag of the program a pinned link runs.
    pub fn linked_program_tag(pin: &std::path::Path) -> std::io::Result<[u8; 8]> {
        crate::link::prog_tag_by_id(crate::link::pinned_info(pin)?.prog_id)
    }
}
