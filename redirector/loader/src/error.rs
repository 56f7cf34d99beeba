//! The one error type of the crate: every variant says what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "this kernel lacks {feature} (needs Linux {min_kernel} or newer; running {running}): {detail}"
    )]
    KernelFeature {
        feature: &'static str,
        min_kernel: &'static str,
        running: String,
        detail: String,
    },
    #[error(
        "no cgroup v2 hierarchy is mounted (looked in {mountinfo}); mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoCgroup2 { mountinfo: PathBuf },
    #[error(
        "{path} is not on a bpffs and mounting one failed: {source}; mount it with `mount -t bpf bpf /sys/fs/bpf`"
    )]
    Bpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not load the eBPF program {program}: {detail}")]
    Load { program: String, detail: String },
    #[error("could not attach {program} to {target}: {source}")]
    Attach {
        program: String,
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("eBPF map {map}: {detail}")]
    Map { map: &'static str, detail: String },
    #[error("pin {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace {path}: {source}; is the pod still running?")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "annotation {annotation}={value:?} is invalid: {reason}; expected comma-separated ports 1-65535, e.g. \"5432,6379\""
    )]
    Annotation {
        annotation: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "refusing to enroll {path}: it is the node agent's own (host) network namespace, and capturing it would redirect the node's own traffic; pass the pod's namespace"
    )]
    HostNetns { path: PathBuf },
    #[error("pod {uid:?} is not enrolled")]
    NotEnrolled { uid: String },
    #[error(
        "pod uid {uid:?} does not name one enrollment ({count} have it): release the pod by its network namespace's cookie"
    )]
    AmbiguousUid { uid: String, count: usize },
    #[error(
        "the redirector is not installed under {pin_dir} (missing {missing}); run the node proxy's install first"
    )]
    NotInstalled { pin_dir: PathBuf, missing: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
