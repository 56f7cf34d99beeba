//! The local cluster simulator: plays kubelet, CNI and kube-proxy on one
//! Linux machine from a directory of ordinary Kubernetes YAML, so the whole
//! mesh runs and is tested without Kubernetes. See `docs/simulator.md`.
//!
//! - [`manifest`]: loading the YAML;
//! - [`plan`]: addresses, names and Service endpoints (pure);
//! - [`netconf`]: the network of each namespace as scripts (pure);
//! - [`sys`]: `ip`, `nft`, cgroups and `/proc`;
//! - [`cluster`]: `up`, `down`, running commands inside pods and nodes;
//! - [`kube`]: the Kubernetes control plane of `up --kube`;
//! - [`cni`]: chained CNI plugins of a `--kube` node;
//! - [`kubelet`]: the simulated kubelet and kube-proxy of `up --kube`;
//! - [`mesh`]: the control plane and node proxies (`up --mesh`);
//! - [`registration`]: telling node agents about pods (the CNI protocol);
//! - [`volumes`]: pod volumes of `up --kube` (atomic writer, mounts);
//! - [`testing`]: a cluster per test, torn down on drop.

pub mod cluster;
pub mod cni;
pub mod kube;
pub mod kubelet;
pub mod manifest;
pub mod mesh;
pub mod netconf;
pub mod plan;
pub mod probe;
pub mod registration;
pub mod state;
pub mod sys;
pub mod testing;
pub mod volumes;

pub use cluster::{Cluster, Options, SimError, down, load, node_command, pod_command, up};
pub use state::{NodeState, PodState, ServiceState, State};
pub use testing::TestCluster;
