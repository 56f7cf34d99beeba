//! Local mode: the local cluster's state file ([`LocalClusterState`],
//! `docs/simulator.md`) says what the manifests leave to the cluster — pod
//! IPs, uids, nodes and ClusterIPs.

use crate::model::{Object, ObjectKey};
use std::collections::HashMap;
pub use weft_local_cluster::{LocalClusterState, LocalPod, LocalService};

/// Fills in what the manifests leave out: a pod's IPs when its status
/// has none, its uid, its node's addresses (status.hostIPs), a Service's
/// ClusterIP. What a manifest states wins.
pub fn complete(state: &LocalClusterState, objects: &mut [Object]) {
    let pods: HashMap<ObjectKey, &LocalPod> = state
        .pods
        .iter()
        .map(|p| (ObjectKey::new(&p.namespace, &p.name), p))
        .collect();
    let services: HashMap<ObjectKey, &LocalService> = state
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
                        .and_then(|n| state.nodes.iter().find(|s| &s.name == n))
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
