//! The simulator's state file (`docs/simulator.md`): in local mode it says
//! what the manifests leave to the cluster, pod IPs, uids and ClusterIPs.

use crate::model::{Object, ObjectKey};
use serde::Deserialize;
use std::collections::HashMap;
use std::net::IpAddr;

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct SimState {
    #[serde(default)]
    pub pods: Vec<SimPod>,
    #[serde(default)]
    pub services: Vec<SimService>,
    #[serde(default)]
    pub nodes: Vec<SimNode>,
}

/// A node's addresses: where kubelet probes come from (policy lets them
/// reach a pod's probe ports).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct SimNode {
    pub name: String,
    #[serde(default)]
    pub ip: Option<IpAddr>,
    #[serde(default)]
    pub ipv6: Option<IpAddr>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct SimPod {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub ip: Option<IpAddr>,
    #[serde(default)]
    pub ipv6: Option<IpAddr>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct SimService {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub cluster_ip: Option<IpAddr>,
}

impl SimState {
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Fills in what the manifests leave out: a pod's IPs when its status
    /// has none, its uid, its node's addresses (status.hostIPs), a Service's
    /// ClusterIP. What a manifest states wins.
    pub fn complete(&self, objects: &mut [Object]) {
        let pods: HashMap<ObjectKey, &SimPod> = self
            .pods
            .iter()
            .map(|p| (ObjectKey::new(&p.namespace, &p.name), p))
            .collect();
        let services: HashMap<ObjectKey, &SimService> = self
            .services
            .iter()
            .map(|s| (ObjectKey::new(&s.namespace, &s.name), s))
            .collect();
        for object in objects {
            match object {
                Object::Pod(pod) => {
                    let sim = pods.get(&pod.key);
                    if pod.ips.is_empty()
                        && let Some(sim) = sim
                    {
                        pod.ips
                            .extend(sim.ip.iter().chain(sim.ipv6.iter()).copied());
                    }
                    if pod.uid.is_empty() {
                        pod.uid = match sim {
                            Some(sim) if !sim.uid.is_empty() => sim.uid.clone(),
                            // Not running in a simulator (yet): a stable
                            // name-derived key, visibly not a Kubernetes uid.
                            _ => format!("local:{}", pod.key),
                        };
                    }
                    if pod.node.is_none()
                        && let Some(sim) = sim
                        && !sim.node.is_empty()
                    {
                        pod.node = Some(sim.node.clone());
                    }
                    if pod.host_ips.is_empty()
                        && let Some(node) = pod
                            .node
                            .as_ref()
                            .and_then(|n| self.nodes.iter().find(|s| &s.name == n))
                    {
                        pod.host_ips
                            .extend(node.ip.iter().chain(node.ipv6.iter()).copied());
                    }
                }
                Object::Service(svc) => {
                    if svc.cluster_ips.is_empty()
                        && !svc.headless
                        && let Some(ip) = services.get(&svc.key).and_then(|s| s.cluster_ip)
                    {
                        svc.cluster_ips.push(ip);
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_schema() {
        let state = SimState::parse(
            br#"{"name": "demo", "slot": 0,
                "nodes": [{"name": "node-a", "index": 0, "ip": "10.240.0.2", "ipv6": "fd00:10:240:0::2"}],
                "pods": [{"namespace": "demo", "name": "client", "uid": "5f0c", "node": "node-a",
                          "service_account": "default", "labels": {"app": "client"},
                          "ip": "10.244.0.2", "ipv6": "fd00:10:244:0::2", "containers": []}],
                "services": [{"namespace": "demo", "name": "server", "cluster_ip": "10.96.17.4",
                              "ports": [], "endpoints": []}]}"#,
        )
        .unwrap();
        assert_eq!(state.pods[0].ip, Some("10.244.0.2".parse().unwrap()));
        assert_eq!(state.nodes[0].ip, Some("10.240.0.2".parse().unwrap()));
        assert_eq!(
            state.services[0].cluster_ip,
            Some("10.96.17.4".parse().unwrap())
        );
    }
}
