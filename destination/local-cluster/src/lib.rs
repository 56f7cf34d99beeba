//! The state file of a local cluster: what the control plane reads in local
//! mode about what a kubelet and a CNI would otherwise report — which pods
//! run on which node under which service account, their uids and addresses,
//! the nodes' addresses, the Services' ClusterIPs.
//!
//! `weft-sim` writes the file (`<run dir>/<cluster>/state.json`, see
//! `docs/simulator.md`) with more in it than this (namespaces, cgroups,
//! processes); readers take only the fields below and ignore the rest, so
//! the writer may add fields freely. This crate is the one definition of
//! the readers' side: the destination service and the CA both parse with
//! it, and the simulator's tests check that what it writes parses here.
//!
//! Fields other than a pod's or a Service's namespace and name may be
//! missing (a hand-written file for a test names only what it needs).

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LocalClusterState {
    #[serde(default)]
    pub pods: Vec<LocalPod>,
    #[serde(default)]
    pub services: Vec<LocalService>,
    #[serde(default)]
    pub nodes: Vec<LocalNode>,
}

/// A node's addresses: where kubelet probes come from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LocalNode {
    pub name: String,
    #[serde(default)]
    pub ip: Option<IpAddr>,
    #[serde(default)]
    pub ipv6: Option<IpAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LocalPod {
    pub namespace: String,
    pub name: String,
    /// The runtime's uid of the pod (empty when the writer has none).
    #[serde(default)]
    pub uid: String,
    /// The node the pod runs on (empty when not scheduled).
    #[serde(default)]
    pub node: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub ip: Option<IpAddr>,
    #[serde(default)]
    pub ipv6: Option<IpAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LocalService {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub cluster_ip: Option<IpAddr>,
}

fn default_service_account() -> String {
    "default".into()
}

impl LocalClusterState {
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_schema_and_ignores_what_it_does_not_know() {
        let state = LocalClusterState::parse(
            br#"{"name": "demo", "slot": 0,
                "nodes": [{"name": "node-a", "index": 0, "ip": "10.240.0.2", "ipv6": "fd00:10:240:0::2"}],
                "pods": [{"namespace": "demo", "name": "client", "uid": "5f0c", "node": "node-a",
                          "service_account": "api", "labels": {"app": "client"},
                          "ip": "10.244.0.2", "ipv6": "fd00:10:244:0::2", "containers": []}],
                "services": [{"namespace": "demo", "name": "server", "cluster_ip": "10.96.17.4",
                              "ports": [], "endpoints": []}]}"#,
        )
        .unwrap();
        assert_eq!(state.pods[0].ip, Some("10.244.0.2".parse().unwrap()));
        assert_eq!(state.pods[0].ipv6, Some("fd00:10:244::2".parse().unwrap()));
        assert_eq!(state.pods[0].service_account, "api");
        assert_eq!(state.pods[0].uid, "5f0c");
        assert_eq!(state.nodes[0].ip, Some("10.240.0.2".parse().unwrap()));
        assert_eq!(
            state.services[0].cluster_ip,
            Some("10.96.17.4".parse().unwrap())
        );
    }

    #[test]
    fn a_pod_named_only_gets_the_defaults() {
        let state =
            LocalClusterState::parse(br#"{"pods": [{"namespace": "demo", "name": "c"}]}"#).unwrap();
        let pod = &state.pods[0];
        assert_eq!(
            (
                pod.uid.as_str(),
                pod.node.as_str(),
                pod.service_account.as_str()
            ),
            ("", "", "default")
        );
        assert_eq!((pod.ip, pod.ipv6), (None, None));
    }

    #[test]
    fn a_pod_without_a_name_is_an_error_that_says_so() {
        let err = LocalClusterState::parse(br#"{"pods": [{"namespace": "demo"}]}"#).unwrap_err();
        assert!(err.to_string().contains("missing field `name`"), "{err}");
    }
}
