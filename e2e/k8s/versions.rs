// The Kubernetes control plane that `weft-sim up --kube` runs. Shared by the
// simulator (where to find the binaries) and `cargo xtask setup` (what to
// build), with `include!`. The wrapper modules next to this file
// (`kubernetes/go.mod`, `etcd/go.mod`) pin the same versions; a test of
// `weft-sim` checks that they agree.

/// `k8s.io/kubernetes`: kube-apiserver, kube-controller-manager,
/// kube-scheduler, kubectl.
pub const KUBERNETES_VERSION: &str = "v1.36.3";

/// `go.etcd.io/etcd/server/v3`.
pub const ETCD_VERSION: &str = "v3.6.16";

/// The programs of the control plane, as named in the cache's `bin/`.
pub const CONTROL_PLANE_PROGRAMS: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
];

/// The cache directory's name under `$HOME/.cache/weft/k8s/`: one per pair
/// of versions, so a version bump builds anew and never mixes binaries.
pub fn control_plane_cache_key() -> String {
    format!("{KUBERNETES_VERSION}-etcd-{ETCD_VERSION}")
}
