//! Services: VIPs, ports, and ready endpoints, from selectors (local mode)
//! or EndpointSlices (Kubernetes).
//!
//! An endpoint names its workload by uid when that workload is enrolled (it
//! is then in every node's view, with its identity); a backend outside the
//! mesh is given by address, for a plaintext connection.

use super::workloads::Workloads;
use super::{EndpointsFrom, IndexConfig, Problem, ProblemKind};
use crate::model::{ObjectKey, PodInfo, ServiceInfo, SliceInfo, TargetPort};
use crate::store::ClusterObjects;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use weft_destination_api::{Endpoint, ServicePort, Workload, address};

pub fn build(
    objects: &ClusterObjects,
    config: &IndexConfig,
    workloads: &Workloads<'_>,
    mut routes: BTreeMap<ObjectKey, Vec<weft_destination_api::Route>>,
    problems: &mut Vec<Problem>,
) -> BTreeMap<String, Arc<weft_destination_api::Service>> {
    let vip_owners = assign_vips(objects, problems);
    let mut slices_by_service: HashMap<ObjectKey, Vec<&SliceInfo>> = HashMap::new();
    if config.endpoints == EndpointsFrom::EndpointSlices {
        for slice in objects.slices.values() {
            slices_by_service
                .entry(ObjectKey::new(&slice.key.namespace, &slice.service))
                .or_default()
                .push(slice);
        }
    }
    let mut out = BTreeMap::new();
    let placed = |key: &ObjectKey| workloads.placed.get(key).cloned();
    for svc in objects.services.values() {
        let owns = |ip: &IpAddr| vip_owners.get(ip).is_some_and(|owner| **owner == svc.key);
        let service = service(
            objects,
            config,
            svc,
            slices_by_service
                .get(&svc.key)
                .map(Vec::as_slice)
                .unwrap_or(&[]),
            &placed,
            &owns,
            routes.remove(&svc.key).unwrap_or_default(),
            problems,
        );
        out.insert(service.key(), service);
    }
    out
}

/// Who a pod's workload is, if it is placed.
pub type Placed<'p> = dyn Fn(&ObjectKey) -> Option<Arc<Workload>> + 'p;

/// One Service: `slices` are its EndpointSlices in key order (ignored with
/// endpoints from selectors), `owns` whether it holds a ClusterIP it
/// claims, `routes` its outbound routes.
#[allow(clippy::too_many_arguments)]
pub fn service(
    objects: &ClusterObjects,
    config: &IndexConfig,
    svc: &ServiceInfo,
    slices: &[&SliceInfo],
    placed: &Placed<'_>,
    owns: &dyn Fn(&IpAddr) -> bool,
    routes: Vec<weft_destination_api::Route>,
    problems: &mut Vec<Problem>,
) -> Arc<weft_destination_api::Service> {
    let endpoints = match config.endpoints {
        EndpointsFrom::Selectors => from_selector(objects, svc, placed),
        EndpointsFrom::EndpointSlices => from_slices(objects, svc, slices, placed, problems),
    };
    if svc.selector.is_some() && endpoints.is_empty() {
        problems.push(Problem {
            kind: ProblemKind::NoEndpoints,
            object: format!("Service {}", svc.key),
            detail: match config.endpoints {
                EndpointsFrom::Selectors => {
                    "its selector matches no running pod with an address (yet); \
                     connections to it will fail"
                        .into()
                }
                EndpointsFrom::EndpointSlices => {
                    "has no ready endpoints; connections to it will fail".into()
                }
            },
        });
    }
    Arc::new(weft_destination_api::Service {
        name: svc.key.name.clone(),
        namespace: svc.key.namespace.clone(),
        hostname: format!(
            "{}.{}.svc.{}",
            svc.key.name, svc.key.namespace, config.cluster_domain
        ),
        cluster_ips: svc
            .cluster_ips
            .iter()
            .filter(|ip| owns(ip))
            .map(|ip| address::encode(*ip))
            .collect(),
        ports: svc
            .ports
            .iter()
            .map(|p| ServicePort {
                name: p.name.clone(),
                port: p.port.into(),
                target_port: match &p.target {
                    TargetPort::Number(n) => (*n).into(),
                    TargetPort::Name(_) => 0,
                },
                target_port_name: match &p.target {
                    TargetPort::Number(_) => String::new(),
                    TargetPort::Name(n) => n.clone(),
                },
                protocol: p.protocol.clone(),
                app_protocol: p.app_protocol.clone(),
            })
            .collect(),
        endpoints: endpoints.into_values().collect(),
        routes,
    })
}

/// The older Service keeps a ClusterIP two claim.
fn assign_vips<'a>(
    objects: &'a ClusterObjects,
    problems: &mut Vec<Problem>,
) -> HashMap<IpAddr, &'a ObjectKey> {
    let mut owners: HashMap<IpAddr, &'a ServiceInfo> = HashMap::new();
    for svc in objects.services.values() {
        for ip in &svc.cluster_ips {
            match owners.get(ip) {
                None => {
                    owners.insert(*ip, svc);
                }
                Some(current) => {
                    let (winner, loser) =
                        if (&svc.created, &svc.key) < (&current.created, &current.key) {
                            (svc, *current)
                        } else {
                            (*current, svc)
                        };
                    problems.push(Problem {
                        kind: ProblemKind::DuplicateClusterIp,
                        object: format!("Service {}", loser.key),
                        detail: format!(
                            "claims ClusterIP {ip}, which Service {} (created earlier) holds; served without it",
                            winner.key
                        ),
                    });
                    owners.insert(*ip, winner);
                }
            }
        }
    }
    owners.into_iter().map(|(ip, s)| (ip, &s.key)).collect()
}

/// Endpoints keyed by workload uid or, outside the mesh, by address: a
/// stable order, so an unchanged Service compares equal across rebuilds.
type Endpoints = BTreeMap<String, Endpoint>;

fn endpoint_for(pod: &PodInfo, placed: &Placed<'_>, addresses: &[IpAddr]) -> (String, Endpoint) {
    match placed(&pod.key) {
        Some(w) if w.enrolled => (
            w.uid.clone(),
            Endpoint {
                workload_uid: w.uid.clone(),
                addresses: Vec::new(),
                weight: 1,
                ports: BTreeMap::new(),
            },
        ),
        _ => plain_endpoint(addresses),
    }
}

fn plain_endpoint(addresses: &[IpAddr]) -> (String, Endpoint) {
    let key = addresses.first().map(|a| a.to_string()).unwrap_or_default();
    (
        key,
        Endpoint {
            workload_uid: String::new(),
            addresses: addresses.iter().map(|a| address::encode(*a)).collect(),
            weight: 1,
            ports: BTreeMap::new(),
        },
    )
}

fn from_selector(objects: &ClusterObjects, svc: &ServiceInfo, placed: &Placed<'_>) -> Endpoints {
    let mut out = Endpoints::new();
    let Some(selector) = &svc.selector else {
        return out;
    };
    let namespace = &svc.key.namespace;
    let start = ObjectKey::new(namespace.clone(), "");
    for pod in objects
        .pods
        .range(start..)
        .map(|(_, p)| p)
        .take_while(|p| &p.key.namespace == namespace)
    {
        if !selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v)) {
            continue;
        }
        // Running somewhere, with an address it owns.
        let Some(w) = placed(&pod.key) else {
            continue;
        };
        let addresses: Vec<IpAddr> = w
            .addresses
            .iter()
            .filter_map(|a| address::decode(a))
            .collect();
        if addresses.is_empty() {
            continue;
        }
        let mut ports = BTreeMap::new();
        for p in &svc.ports {
            let target = match &p.target {
                TargetPort::Number(n) => Some(*n),
                TargetPort::Name(name) => pod
                    .ports
                    .iter()
                    .find(|c| &c.name == name && c.protocol == p.protocol)
                    .map(|c| c.port),
            };
            // A named port the pod does not declare: not an endpoint for
            // that port, as with the endpoints controller.
            if let Some(target) = target {
                ports.insert(u32::from(p.port), u32::from(target));
            }
        }
        if ports.is_empty() && !svc.ports.is_empty() {
            continue;
        }
        let (key, mut endpoint) = endpoint_for(pod, placed, &addresses);
        endpoint.ports = ports;
        out.insert(key, endpoint);
    }
    out
}

fn from_slices(
    objects: &ClusterObjects,
    svc: &ServiceInfo,
    slices: &[&SliceInfo],
    placed: &Placed<'_>,
    problems: &mut Vec<Problem>,
) -> Endpoints {
    let mut out = Endpoints::new();
    // Ready endpoints take the requests; a terminating pod's endpoint is
    // never ready, so it gets no new request while another is ready and
    // keeps the ones it has. Only when none is ready do the terminating
    // ones that still serve take new requests (as kube-proxy does): better
    // than refusing everything during a rollout of the last replicas.
    let any_ready = slices.iter().any(|s| s.endpoints.iter().any(|e| e.ready));
    let usable = |e: &&crate::model::SliceEndpoint| {
        if any_ready {
            e.ready
        } else {
            e.serving && e.terminating
        }
    };
    for slice in slices {
        // Slice ports are named after the Service's ports.
        let ports: BTreeMap<u32, u32> = slice
            .ports
            .iter()
            .filter_map(|sp| {
                svc.ports
                    .iter()
                    .find(|p| p.name == sp.name)
                    .map(|p| (u32::from(p.port), u32::from(sp.port)))
            })
            .collect();
        for ep in slice.endpoints.iter().filter(usable) {
            let pod = ep.pod.as_ref().and_then(|name| {
                let pod = objects.pods.get(&ObjectKey::new(&svc.key.namespace, name));
                if pod.is_none() {
                    problems.push(Problem {
                        kind: ProblemKind::UnknownEndpointPod,
                        object: format!("EndpointSlice {}", slice.key),
                        detail: format!(
                            "lists pod {name:?}, which is not known (yet); served by address"
                        ),
                    });
                }
                pod
            });
            let (key, endpoint) = match pod {
                Some(pod) => endpoint_for(pod, placed, &ep.addresses),
                None => plain_endpoint(&ep.addresses),
            };
            // Dual-stack Services have one slice per family listing the same
            // pod: merge them into one endpoint.
            match out.entry(key) {
                std::collections::btree_map::Entry::Vacant(slot) => {
                    let mut endpoint = endpoint;
                    endpoint.ports = ports.clone();
                    slot.insert(endpoint);
                }
                std::collections::btree_map::Entry::Occupied(mut slot) => {
                    let entry = slot.get_mut();
                    for a in endpoint.addresses {
                        if !entry.addresses.contains(&a) {
                            entry.addresses.push(a);
                        }
                    }
                    entry.ports.extend(ports.iter().map(|(k, v)| (*k, *v)));
                }
            }
        }
    }
    out
}
