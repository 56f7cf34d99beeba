//! The state file: everything a running simulator is made of. `up` writes it
//! before creating anything (so `down` can clean up after a crash half way),
//! and again once every pod runs. Other parts read it in local mode; its
//! schema is documented in `docs/simulator.md` and must stay compatible.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub name: String,
    pub slot: u8,
    pub manifest_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Whether pods are registered with their node's agent (mesh mode).
    #[serde(default)]
    pub registers_pods: bool,
    pub fabric: FabricState,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
    pub services: Vec<ServiceState>,
    /// `up --kube`: the Kubernetes control plane (docs/simulator.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube: Option<KubeState>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FabricState {
    pub netns: String,
    pub host_interface: String,
    pub host_ip: Ipv4Addr,
    pub host_ipv6: Ipv6Addr,
    pub cidr: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeState {
    pub name: String,
    pub index: u8,
    pub ip: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub pod_cidr: String,
    pub pod_cidr_v6: String,
    pub netns: String,
    pub netns_path: PathBuf,
    /// A cgroup for node-level processes (the node proxy runs here).
    pub cgroup: PathBuf,
    /// The node proxy's credential for the identity CA…
    pub ca_credential_file: PathBuf,
    /// …and a different one for the destination service (neither service
    /// can replay what it received to the other).
    pub destination_credential_file: PathBuf,
    /// Where this node's agent (the node proxy) takes pod registrations
    /// (`docs/redirector.md`, "Pod registration protocol").
    pub agent_socket: PathBuf,
    /// Where this node's proxy pins its eBPF programs and maps. On a real
    /// node that is `/sys/fs/bpf/weft`; simulated nodes share one kernel,
    /// so each gets its own directory.
    pub bpf_pin_dir: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub ip: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub netns: String,
    pub netns_path: PathBuf,
    pub cgroup: PathBuf,
    pub containers: Vec<ContainerState>,
}

impl PodState {
    /// `namespace/name`, the way `exec` and errors name a pod.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ContainerState {
    pub name: String,
    pub pid: Option<u32>,
    pub log: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServiceState {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<ServicePortState>,
    pub endpoints: Vec<EndpointState>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServicePortState {
    pub name: Option<String>,
    pub port: u16,
    /// Resolved container port; `None` when a named port matches no endpoint.
    pub target_port: Option<u16>,
    pub protocol: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EndpointState {
    pub pod: String,
    pub ip: Ipv4Addr,
}

impl State {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("state.json")
    }

    pub fn load(state_dir: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(Self::path(state_dir))?;
        serde_json::from_str(&text)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Writes atomically (rename), so a reader never sees half a file.
    pub fn save(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.state_dir)?;
        let tmp = self.state_dir.join("state.json.tmp");
        let text = serde_json::to_string_pretty(self).expect("state serializes");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, Self::path(&self.state_dir))
    }

    pub fn pod(&self, key: &str) -> Option<&PodState> {
        self.pods.iter().find(|p| p.key() == key)
    }

    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// What `status --json` shows of the control plane (in the state file as
/// `"kube"`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KubeState {
    pub kubernetes_version: String,
    pub etcd_version: String,
    /// `https://10.240.<slot>.1:6443`
    pub api_server: String,
    /// An admin (`system:masters`) kubeconfig for the API server.
    pub kubeconfig: PathBuf,
    pub etcd: String,
    /// The directory of the control plane programs (kubectl is there).
    pub bin_dir: PathBuf,
    /// Data, certificates, kubeconfigs.
    pub dir: PathBuf,
    /// The CA that signs the API server's certificate and client certificates.
    pub ca_file: PathBuf,
    /// The service-account token issuer.
    pub service_account_issuer: String,
    /// Image → program: what runs for a container without `command`
    /// (`up --kube --images FILE`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub images: BTreeMap<String, PathBuf>,
}
