//! The start-up check: does this kernel have what the programs need?
//!
//! The release number gives a fast, readable answer; loading the programs
//! is the real probe (a distribution kernel may backport or compile out
//! features), and a load failure is mapped back to the feature it needs.

use crate::Error;

/// A kernel capability the redirector relies on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelFeature {
    pub name: &'static str,
    /// (major, minor) of the first release that has it.
    pub since: (u32, u32),
    pub min_kernel: &'static str,
}

pub const BPF_LINKS: KernelFeature = KernelFeature {
    name: "BPF links for cgroup programs (pinnable attachments)",
    since: (5, 7),
    min_kernel: "5.7",
};
pub const SOCKOPT_AND_GETPEERNAME: KernelFeature = KernelFeature {
    name: "cgroup getpeername4/6 hooks and bpf_get_netns_cookie in cgroup/getsockopt",
    since: (5, 8),
    min_kernel: "5.8",
};
pub const SK_LOOKUP: KernelFeature = KernelFeature {
    name: "sk_lookup programs (inbound steering)",
    since: (5, 9),
    min_kernel: "5.9",
};
pub const SO_NETNS_COOKIE: KernelFeature = KernelFeature {
    name: "SO_NETNS_COOKIE (namespace cookies from user space)",
    since: (5, 14),
    min_kernel: "5.14",
};
pub const SK_LOOKUP_INGRESS_IFINDEX: KernelFeature = KernelFeature {
    name: "ingress_ifindex in sk_lookup programs",
    since: (5, 17),
    min_kernel: "5.17",
};

/// Everything we need, oldest first: the last entry is the overall minimum.
pub const FEATURES: &[KernelFeature] = &[
    BPF_LINKS,
    SOCKOPT_AND_GETPEERNAME,
    SK_LOOKUP,
    SO_NETNS_COOKIE,
    SK_LOOKUP_INGRESS_IFINDEX,
];

/// The feature a program of ours depends on most recently.
pub fn feature_of_program(program: &str) -> KernelFeature {
    match program {
        "weft_sk_lookup" => SK_LOOKUP_INGRESS_IFINDEX,
        "weft_getpeer4" | "weft_getpeer6" | "weft_getsockopt" => SOCKOPT_AND_GETPEERNAME,
        _ => BPF_LINKS,
    }
}

/// The running kernel's release string (`uname -r`).
pub fn running_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Fails with the first missing feature, by release number.
pub fn check_kernel() -> Result<(), Error> {
    check_release(&running_release())
}

fn check_release(release: &str) -> Result<(), Error> {
    let Some(version) = parse_release(release) else {
        // Unparseable (custom) release: let the program loads decide.
        return Ok(());
    };
    match FEATURES.iter().find(|f| version < f.since) {
        Some(f) => Err(missing(f, release, "release too old".into())),
        None => Ok(()),
    }
}

pub fn missing(f: &KernelFeature, running: &str, detail: String) -> Error {
    Error::KernelFeature {
        feature: f.name,
        min_kernel: f.min_kernel,
        running: running.to_string(),
        detail,
    }
}

/// Whether the running kernel is at least as new as `f`.
pub fn has(f: &KernelFeature) -> bool {
    parse_release(&running_release()).is_none_or(|v| v >= f.since)
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_kernels_name_the_missing_feature() {
        let err = check_release("5.10.0-28-amd64").unwrap_err().to_string();
        assert!(err.contains("SO_NETNS_COOKIE"), "{err}");
        assert!(err.contains("5.14"), "{err}");
        let err = check_release("4.19.0").unwrap_err().to_string();
        assert!(err.contains("BPF links"), "{err}");
    }

    #[test]
    fn new_and_custom_kernels_pass() {
        check_release("6.18.44-fc-v669").unwrap();
        check_release("5.17.0").unwrap();
        check_release("custom").unwrap();
    }

    #[test]
    fn this_kernel_passes() {
        check_kernel().unwrap();
    }
}
