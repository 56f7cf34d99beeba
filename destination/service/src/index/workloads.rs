//! Pods to workloads: identity, addresses, enrollment.

use super::addresses::{self, Owners};
use super::{IndexConfig, Problem, ProblemKind};
use crate::model::{MESH_LABEL, ObjectKey, PodInfo};
use crate::store::ClusterObjects;
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use weft_destination_api::{NamedPort, PortRange, TunnelProtocol, Workload, address, spiffe_id};

pub struct Workloads<'a> {
    /// Pods on a node, not finished, by key.
    pub placed: BTreeMap<&'a ObjectKey, Arc<Workload>>,
}

/// Enrolled: the namespace opts in, the pod does not opt out, and the pod
/// has a network namespace of its own (a hostNetwork pod shares the node's:
/// capturing it would capture the node).
pub fn enrolled(pod: &PodInfo, enrolled_namespaces: &HashSet<&str>) -> bool {
    enrolled_namespaces.contains(pod.key.namespace.as_str())
        && pod.labels.get(MESH_LABEL).map(String::as_str) != Some("disabled")
        && !pod.host_network
}

/// The namespaces that opt in (`weft.io/mesh=enabled`).
pub fn enrolled_namespaces(objects: &ClusterObjects) -> HashSet<&str> {
    objects
        .namespaces
        .values()
        .filter(|ns| ns.labels.get(MESH_LABEL).map(String::as_str) == Some("enabled"))
        .map(|ns| ns.name.as_str())
        .collect()
}

pub fn build<'a>(
    objects: &'a ClusterObjects,
    config: &IndexConfig,
    owners: &Owners<'a>,
    problems: &mut Vec<Problem>,
) -> Workloads<'a> {
    let enrolled_namespaces = enrolled_namespaces(objects);
    let mut placed = BTreeMap::new();
    for pod in objects.pods.values() {
        let owns = |ip: &IpAddr| owners.get(ip).is_some_and(|owner| **owner == pod.key);
        if let Some(workload) =
            workload(objects, config, pod, &enrolled_namespaces, &owns, problems)
        {
            placed.insert(&pod.key, workload);
        }
    }
    Workloads { placed }
}

/// The workload of one pod: `None` unless it is placed on a node and not
/// finished. `owns`: whether the pod owns an address it claims.
pub fn workload(
    objects: &ClusterObjects,
    config: &IndexConfig,
    pod: &PodInfo,
    enrolled_namespaces: &HashSet<&str>,
    owns: &dyn Fn(&IpAddr) -> bool,
    problems: &mut Vec<Problem>,
) -> Option<Arc<Workload>> {
    let node = pod.node.as_ref()?;
    if pod.terminated {
        return None;
    }
    if objects.tracks_service_accounts
        && pod.service_account != "default"
        && !objects
            .service_accounts
            .contains(&ObjectKey::new(&pod.key.namespace, &pod.service_account))
    {
        problems.push(Problem {
            kind: ProblemKind::MissingServiceAccount,
            object: format!("Pod {}", pod.key),
            detail: format!(
                "runs as ServiceAccount {:?}, which is not declared in namespace {:?}; \
                 its identity is still derived from that name",
                pod.service_account, pod.key.namespace
            ),
        });
    }
    let enrolled = enrolled(pod, enrolled_namespaces);
    let addresses = if addresses::claims(pod) {
        pod.ips
            .iter()
            .filter(|ip| owns(ip))
            .map(|ip| address::encode(*ip))
            .collect()
    } else {
        Vec::new()
    };
    let opaque_ports = match &pod.opaque_ports {
        Some(annotation) => {
            let (ranges, bad) = parse_port_ranges(annotation);
            if !bad.is_empty() {
                problems.push(Problem {
                    kind: ProblemKind::InvalidOpaquePorts,
                    object: format!("Pod {}", pod.key),
                    detail: format!(
                        "weft.io/opaque-ports has entries that are not a port or a range                              of ports (1-65535, e.g. \"3306,8000-8010\"): {}; they are ignored                              and those ports get protocol detection",
                        bad.join(", ")
                    ),
                });
            }
            ranges
        }
        None => Vec::new(),
    };
    let workload = Workload {
        uid: pod.uid.clone(),
        name: pod.key.name.clone(),
        namespace: pod.key.namespace.clone(),
        service_account: pod.service_account.clone(),
        identity: spiffe_id(
            &config.trust_domain,
            &pod.key.namespace,
            &pod.service_account,
        ),
        node: node.clone(),
        addresses,
        labels: pod.labels.clone(),
        ports: pod
            .ports
            .iter()
            .map(|p| NamedPort {
                name: p.name.clone(),
                port: p.port.into(),
                protocol: p.protocol.clone(),
            })
            .collect(),
        enrolled,
        tunnel: if enrolled {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        } as i32,
        opaque_ports,
    };
    Some(Arc::new(workload))
}

/// Parses a comma-separated list of ports and inclusive ranges
/// (`"25, 3306,8000-8010"`). Returns the valid ranges and the entries that
/// are not (empty entries, as in a trailing comma, are ignored).
pub fn parse_port_ranges(list: &str) -> (Vec<PortRange>, Vec<String>) {
    let port = |s: &str| s.trim().parse::<u16>().ok().filter(|p| *p != 0);
    let mut ranges = Vec::new();
    let mut bad = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let parsed = match entry.split_once('-') {
            Some((a, b)) => port(a).zip(port(b)).filter(|(a, b)| a <= b),
            None => port(entry).map(|p| (p, p)),
        };
        match parsed {
            Some((first, last)) => ranges.push(PortRange {
                first: first.into(),
                last: last.into(),
            }),
            None => bad.push(format!("{entry:?}")),
        }
    }
    (ranges, bad)
}

#[cfg(test)]
mod opaque_ports_tests {
    use super::*;

    fn r(first: u32, last: u32) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn ports_and_ranges_parse_and_bad_entries_are_reported() {
        assert_eq!(
            parse_port_ranges("3306, 8000-8010,25,"),
            (vec![r(3306, 3306), r(8000, 8010), r(25, 25)], vec![])
        );
        let (ok, bad) = parse_port_ranges("80,http,0,9-3,70000,1-2-3, 443");
        assert_eq!(ok, vec![r(80, 80), r(443, 443)]);
        assert_eq!(
            bad,
            ["\"http\"", "\"0\"", "\"9-3\"", "\"70000\"", "\"1-2-3\""]
        );
        assert_eq!(parse_port_ranges(""), (vec![], vec![]));
    }
}
