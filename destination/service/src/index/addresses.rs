//! Who owns each pod IP. A pod IP must name one workload: the proxy picks
//! the identity to expect from it. When two live pods claim one address
//! (a stale status, a misbehaving CNI, a hand-written manifest) the one
//! created first keeps it, ties broken by name, and the conflict is
//! reported. Finished pods (Succeeded/Failed) claim nothing: their IPs are
//! legitimately reused.

use super::{Problem, ProblemKind};
use crate::model::{ObjectKey, PodInfo};
use crate::store::ClusterObjects;
use std::collections::HashMap;
use std::net::IpAddr;

pub type Owners<'a> = HashMap<IpAddr, &'a ObjectKey>;

pub fn claims(pod: &PodInfo) -> bool {
    !pod.terminated && !pod.host_network && pod.node.is_some()
}

pub fn assign<'a>(objects: &'a ClusterObjects, problems: &mut Vec<Problem>) -> Owners<'a> {
    let mut owners: HashMap<IpAddr, &'a PodInfo> = HashMap::new();
    for pod in objects.pods.values().filter(|p| claims(p)) {
        for ip in &pod.ips {
            match owners.get(ip) {
                None => {
                    owners.insert(*ip, pod);
                }
                Some(current) => {
                    let (winner, loser) =
                        if (&pod.created, &pod.key) < (&current.created, &current.key) {
                            (pod, *current)
                        } else {
                            (*current, pod)
                        };
                    problems.push(Problem {
                        kind: ProblemKind::DuplicateAddress,
                        object: format!("Pod {}", loser.key),
                        detail: format!(
                            "claims {ip}, which Pod {} (created earlier) holds; served without that address",
                            winner.key
                        ),
                    });
                    owners.insert(*ip, winner);
                }
            }
        }
    }
    owners.into_iter().map(|(ip, pod)| (ip, &pod.key)).collect()
}
