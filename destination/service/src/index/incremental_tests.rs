//! The incremental index against the reference, the pure full build:
//! random sequences of changes over a small cluster (so that addresses,
//! ClusterIPs and uids collide, slices name missing pods, policy objects
//! refer to each other and go invalid), and after every step the index,
//! every node's view, the delta a subscriber would compute and what the
//! publisher's subscribers receive must be what a full rebuild gives.

use super::{EndpointsFrom, Incremental, Index, IndexConfig, build};
use crate::metrics::Metrics;
use crate::model::{
    self, ContainerPort, Kind, MESH_LABEL, NamespaceInfo, Object, ObjectKey, PodInfo, ServiceInfo,
    ServicePortInfo, SliceEndpoint, SliceInfo, SlicePort, TargetPort,
};
use crate::publisher::Publisher;
use crate::store::{ClusterObjects, StoreUpdate};
use crate::views::NodeView;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use tokio::sync::watch;
use weft_destination_api::{View, WatchResponse};

const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const NODES: [&str; 4] = ["n0", "n1", "n2", "n3"];
/// Views of this node are always empty (no pod is placed there).
const EMPTY_NODE: &str = "n-none";
const APPS: [&str; 3] = ["x", "y", "z"];

fn pick<'a, T>(rng: &mut StdRng, from: &'a [T]) -> &'a T {
    &from[rng.random_range(0..from.len())]
}

fn ns(rng: &mut StdRng) -> String {
    pick(rng, &NAMESPACES).to_string()
}

fn ip(rng: &mut StdRng, third: u8, pool: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, third, rng.random_range(1..=pool)))
}

fn created(rng: &mut StdRng) -> String {
    format!("2026-01-01T00:00:0{}Z", rng.random_range(0..3))
}

fn pod_key(rng: &mut StdRng) -> ObjectKey {
    ObjectKey::new(ns(rng), format!("p{}", rng.random_range(0..8)))
}

fn pod(rng: &mut StdRng, key: ObjectKey) -> PodInfo {
    let mut labels = BTreeMap::new();
    labels.insert("app".to_string(), pick(rng, &APPS).to_string());
    if rng.random_bool(0.15) {
        labels.insert(MESH_LABEL.to_string(), "disabled".to_string());
    }
    let ips = (0..rng.random_range(0..3))
        .map(|_| ip(rng, 0, 14))
        .collect();
    PodInfo {
        key,
        uid: format!("u{}", rng.random_range(0..30)),
        node: (!rng.random_bool(0.1)).then(|| pick(rng, &NODES).to_string()),
        service_account: pick(rng, &["default", "sa0", "sa1"]).to_string(),
        labels,
        ips,
        ports: if rng.random_bool(0.8) {
            vec![ContainerPort {
                name: pick(rng, &["http", "admin"]).to_string(),
                port: *pick(rng, &[8080, 9090]),
                protocol: "TCP".into(),
            }]
        } else {
            Vec::new()
        },
        host_network: rng.random_bool(0.08),
        terminated: rng.random_bool(0.08),
        created: created(rng),
        default_policy: match rng.random_range(0..8) {
            0 => Some("deny".into()),
            1 => Some("not-a-policy".into()),
            _ => None,
        },
        probe_ports: vec![8080],
        opaque_ports: match rng.random_range(0..8) {
            0 => Some("3306,8000-8010".into()),
            1 => Some("http,9-3".into()),
            _ => None,
        },
        host_ips: vec![IpAddr::V4(Ipv4Addr::new(10, 240, 0, 1))],
    }
}

/// One field of an existing pod changes (what most real updates are).
fn modify_pod(rng: &mut StdRng, pod: &mut PodInfo) {
    match rng.random_range(0..8) {
        0 => {
            pod.labels
                .insert("app".into(), pick(rng, &APPS).to_string());
        }
        1 => pod.node = Some(pick(rng, &NODES).to_string()),
        2 => pod.ips = vec![ip(rng, 0, 14)],
        3 => pod.terminated = !pod.terminated,
        4 => {
            if pod.labels.remove(MESH_LABEL).is_none() {
                pod.labels.insert(MESH_LABEL.into(), "disabled".into());
            }
        }
        5 => pod.created = created(rng),
        6 => pod.uid = format!("u{}", rng.random_range(0..30)),
        _ => {
            pod.labels
                .insert("revision".into(), rng.random_range(0..100).to_string());
        }
    }
}

fn service(rng: &mut StdRng) -> ServiceInfo {
    let key = ObjectKey::new(ns(rng), format!("s{}", rng.random_range(0..5)));
    let mut ports = vec![ServicePortInfo {
        name: "http".into(),
        port: 80,
        target: if rng.random_bool(0.5) {
            TargetPort::Name("http".into())
        } else {
            TargetPort::Number(8080)
        },
        protocol: "TCP".into(),
        app_protocol: String::new(),
    }];
    if rng.random_bool(0.3) {
        ports.push(ServicePortInfo {
            name: "admin".into(),
            port: 81,
            target: TargetPort::Name("admin".into()),
            protocol: "TCP".into(),
            app_protocol: String::new(),
        });
    }
    ServiceInfo {
        key,
        cluster_ips: (0..rng.random_range(0..3))
            .map(|_| ip(rng, 96, 5))
            .collect(),
        headless: false,
        ports,
        selector: (!rng.random_bool(0.15))
            .then(|| [("app".to_string(), pick(rng, &APPS).to_string())].into()),
        created: created(rng),
    }
}

fn slice(rng: &mut StdRng) -> SliceInfo {
    let ns = ns(rng);
    SliceInfo {
        key: ObjectKey::new(&ns, format!("sl{}", rng.random_range(0..6))),
        service: format!("s{}", rng.random_range(0..6)),
        endpoints: (0..rng.random_range(0..4))
            .map(|_| {
                let ready = rng.random_bool(0.6);
                let terminating = !ready && rng.random_bool(0.5);
                SliceEndpoint {
                    addresses: vec![ip(rng, 0, 14)],
                    ready,
                    serving: ready || rng.random_bool(0.5),
                    terminating,
                    pod: (!rng.random_bool(0.15)).then(|| format!("p{}", rng.random_range(0..9))),
                }
            })
            .collect(),
        ports: vec![SlicePort {
            name: pick(rng, &["http", "admin", "other"]).to_string(),
            port: 8080,
        }],
    }
}

fn namespace(rng: &mut StdRng) -> NamespaceInfo {
    let mut labels = BTreeMap::new();
    if rng.random_bool(0.6) {
        labels.insert(MESH_LABEL.to_string(), "enabled".to_string());
    }
    NamespaceInfo {
        name: ns(rng),
        labels,
        default_policy: match rng.random_range(0..6) {
            0 => Some("all-authenticated".into()),
            1 => Some("bogus".into()),
            _ => None,
        },
    }
}

/// A policy object of a random kind, from the JSON the API server sends.
fn policy_object(rng: &mut StdRng) -> Object {
    let ns = ns(rng);
    let other = self::ns(rng);
    let group = "policy.weft.io/v1alpha1";
    let value: Value = match rng.random_range(0..5) {
        0 => {
            let selector = match rng.random_range(0..4) {
                0 => json!({}),
                1 => {
                    json!({"matchExpressions": [{"key": "app", "operator": "Near", "values": ["x"]}]})
                }
                2 => {
                    json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["x", "y"]}]})
                }
                _ => json!({"matchLabels": {"app": pick(rng, &APPS)}}),
            };
            let port = match rng.random_range(0..4) {
                0 => json!(8080),
                1 => json!(0),
                2 => json!("admin"),
                _ => json!("http"),
            };
            json!({"apiVersion": group, "kind": "Server",
                "metadata": {"name": format!("srv{}", rng.random_range(0..3)), "namespace": ns,
                    "creationTimestamp": created(rng)},
                "spec": {"podSelector": selector, "port": port,
                    "accessPolicy": pick(rng, &["deny", "all-authenticated"])}})
        }
        1 => {
            let target = match rng.random_range(0..5) {
                0 => {
                    json!({"kind": "Namespace", "name": pick(rng, &[ns.as_str(), other.as_str()])})
                }
                1 => {
                    json!({"group": "policy.weft.io", "kind": "HTTPRoute", "name": format!("rt{}", rng.random_range(0..2))})
                }
                2 => json!({"kind": "Gateway", "name": "g"}),
                _ => {
                    json!({"group": "policy.weft.io", "kind": "Server", "name": format!("srv{}", rng.random_range(0..3))})
                }
            };
            let reference = match rng.random_range(0..3) {
                0 => json!({"kind": "ServiceAccount", "name": "sa0"}),
                1 => json!({"group": "policy.weft.io", "kind": "MeshTLSAuthentication",
                    "name": format!("m{}", rng.random_range(0..2)), "namespace": other}),
                _ => json!({"group": "policy.weft.io", "kind": "NetworkAuthentication",
                    "name": format!("net{}", rng.random_range(0..2))}),
            };
            json!({"apiVersion": group, "kind": "AuthorizationPolicy",
                "metadata": {"name": format!("az{}", rng.random_range(0..3)), "namespace": ns},
                "spec": {"targetRef": target, "requiredAuthenticationRefs": [reference]}})
        }
        2 => {
            let spec = match rng.random_range(0..3) {
                0 => json!({}),
                1 => json!({"identities": ["*"]}),
                _ => json!({"identities": ["client.a.serviceaccount"]}),
            };
            json!({"apiVersion": group, "kind": "MeshTLSAuthentication",
                "metadata": {"name": format!("m{}", rng.random_range(0..2)), "namespace": ns},
                "spec": spec})
        }
        3 => {
            let cidr = pick(rng, &["10.0.0.0/8", "bogus", "10.244.0.0/16"]);
            json!({"apiVersion": group, "kind": "NetworkAuthentication",
                "metadata": {"name": format!("net{}", rng.random_range(0..2)), "namespace": ns},
                "spec": {"networks": [{"cidr": cidr}]}})
        }
        _ => {
            let parent = if rng.random_bool(0.5) {
                json!({"group": "policy.weft.io", "kind": "Server", "name": format!("srv{}", rng.random_range(0..3))})
            } else {
                json!({"kind": "Service", "name": format!("s{}", rng.random_range(0..5)),
                    "port": pick(rng, &[80, 81, 0])})
            };
            let rules = if rng.random_bool(0.9) {
                json!([{"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                    "backendRefs": [{"name": format!("s{}", rng.random_range(0..5)), "port": 80}]}])
            } else {
                json!([])
            };
            json!({"apiVersion": group, "kind": "HTTPRoute",
                "metadata": {"name": format!("rt{}", rng.random_range(0..2)), "namespace": ns,
                    "creationTimestamp": created(rng)},
                "spec": {"parentRefs": [parent], "rules": rules}})
        }
    };
    model::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{value}: {e}"))
        .expect("a policy kind")
}

fn policy_kinds() -> [Kind; 5] {
    [
        Kind::Server,
        Kind::AuthorizationPolicy,
        Kind::MeshTLSAuthentication,
        Kind::NetworkAuthentication,
        Kind::HTTPRoute,
    ]
}

fn random_key_of(rng: &mut StdRng, objects: &ClusterObjects, kind: Kind) -> Option<ObjectKey> {
    let keys = objects.keys(kind);
    (!keys.is_empty()).then(|| pick(rng, &keys).clone())
}

/// One random change to the cluster.
fn change(rng: &mut StdRng, objects: &ClusterObjects) -> StoreUpdate {
    match rng.random_range(0..20) {
        0..=3 => StoreUpdate::Apply(Object::Pod({
            let key = pod_key(rng);
            pod(rng, key)
        })),
        4..=7 => match random_key_of(rng, objects, Kind::Pod) {
            Some(key) => {
                let mut p = objects.pods[&key].clone();
                modify_pod(rng, &mut p);
                StoreUpdate::Apply(Object::Pod(p))
            }
            None => StoreUpdate::Delete(Kind::Pod, pod_key(rng)),
        },
        8 => StoreUpdate::Delete(
            Kind::Pod,
            random_key_of(rng, objects, Kind::Pod).unwrap_or_else(|| pod_key(rng)),
        ),
        9 => StoreUpdate::Apply(Object::Service(service(rng))),
        10 => match random_key_of(rng, objects, Kind::Service) {
            Some(key) => StoreUpdate::Delete(Kind::Service, key),
            None => StoreUpdate::Apply(Object::Service(service(rng))),
        },
        11 => StoreUpdate::Apply(Object::EndpointSlice(slice(rng))),
        12 => match random_key_of(rng, objects, Kind::EndpointSlice) {
            Some(key) => StoreUpdate::Delete(Kind::EndpointSlice, key),
            None => StoreUpdate::Apply(Object::EndpointSlice(slice(rng))),
        },
        13 => {
            if rng.random_bool(0.8) {
                StoreUpdate::Apply(Object::Namespace(namespace(rng)))
            } else {
                StoreUpdate::Delete(Kind::Namespace, ObjectKey::new("", ns(rng)))
            }
        }
        14 => {
            let key = ObjectKey::new(ns(rng), pick(rng, &["sa0", "sa1"]).to_string());
            if rng.random_bool(0.5) {
                StoreUpdate::Apply(Object::ServiceAccount(key))
            } else {
                StoreUpdate::Delete(Kind::ServiceAccount, key)
            }
        }
        15..=17 => StoreUpdate::Apply(policy_object(rng)),
        18 => {
            let kind = *pick(rng, &policy_kinds());
            match random_key_of(rng, objects, kind) {
                Some(key) => StoreUpdate::Delete(kind, key),
                None => StoreUpdate::Apply(policy_object(rng)),
            }
        }
        _ => {
            // A re-list: every pod (or every Service) is now this set.
            if rng.random_bool(0.5) {
                let mut pods: Vec<Object> = objects
                    .pods
                    .values()
                    .filter(|_| rng.random_bool(0.8))
                    .cloned()
                    .map(Object::Pod)
                    .collect();
                let key = pod_key(rng);
                pods.push(Object::Pod(pod(rng, key)));
                StoreUpdate::Replace {
                    kinds: vec![Kind::Pod],
                    objects: pods,
                }
            } else {
                StoreUpdate::Replace {
                    kinds: vec![Kind::Service],
                    objects: (0..rng.random_range(0..6))
                        .map(|_| Object::Service(service(rng)))
                        .collect(),
                }
            }
        }
    }
}

fn all_nodes() -> Vec<String> {
    NODES
        .iter()
        .copied()
        .chain([EMPTY_NODE])
        .map(str::to_string)
        .collect()
}

/// Every field of the index but the allocations.
fn assert_same_index(inc: &Index, full: &Index, at: &str) {
    assert_eq!(
        inc.mesh.workloads, full.mesh.workloads,
        "{at}: mesh workloads"
    );
    assert_eq!(inc.mesh.services, full.mesh.services, "{at}: services");
    assert_eq!(
        inc.nodes.keys().collect::<Vec<_>>(),
        full.nodes.keys().collect::<Vec<_>>(),
        "{at}: nodes"
    );
    for (node, local) in &full.nodes {
        assert_eq!(inc.nodes[node], *local, "{at}: {node}'s own view");
    }
    assert_eq!(inc.enrolled_namespaces, full.enrolled_namespaces, "{at}");
    assert_eq!(inc.problems, full.problems, "{at}: problems");
    assert_eq!(inc.policy_statuses, full.policy_statuses, "{at}: statuses");
}

/// A delta with its versions left out (those differ by construction).
fn unversioned(mut r: WatchResponse) -> WatchResponse {
    r.version = 0;
    r.base_version = 0;
    r
}

/// What a subscriber of one node holds: the last view it was sent (from the
/// publisher), and the full build's view at the same step.
struct Subscriber {
    node: String,
    rx: watch::Receiver<NodeView>,
    last: NodeView,
    last_full: NodeView,
    client: View,
    /// Reads only every `stride` steps (skips versions, as a slow reader).
    stride: usize,
}

fn run(seed: u64, endpoints: EndpointsFrom, tracks_service_accounts: bool, steps: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let config = IndexConfig {
        endpoints,
        ..IndexConfig::default()
    };
    let mut objects = ClusterObjects {
        tracks_service_accounts,
        ..ClusterObjects::default()
    };
    for _ in 0..rng.random_range(0..30) {
        let update = change(&mut rng, &objects);
        objects.apply(update);
    }
    let mut inc = Incremental::new(objects.clone(), config.clone());
    let publisher = Publisher::new(Arc::new(Metrics::new()));
    let first = inc.refresh();
    assert_same_index(
        &first,
        &build(&objects, &config),
        &format!("seed {seed}, start"),
    );
    publisher.publish_interned(first);
    let epoch = publisher.epoch().to_string();
    let mut previous = build(&objects, &config);
    let mut previous_inc = inc.index();
    let mut subscribers: Vec<Subscriber> = all_nodes()
        .into_iter()
        .enumerate()
        .map(|(i, node)| {
            let mut rx = publisher.subscribe(&node);
            let last = rx.borrow_and_update().clone();
            let mut client = View::default();
            client.apply(last.snapshot(&epoch)).unwrap();
            Subscriber {
                last_full: previous.node_view(&node),
                node,
                rx,
                last,
                client,
                stride: 1 + i % 3,
            }
        })
        .collect();

    for step in 0..steps {
        let at = format!("seed {seed}, {endpoints:?}, step {step}");
        for _ in 0..rng.random_range(1..4) {
            let update = change(&mut rng, &objects);
            objects.apply(update.clone());
            inc.apply(update);
        }
        let full = build(&objects, &config);
        let index = inc.refresh();
        assert_same_index(&index, &full, &at);

        for node in all_nodes() {
            // Each node's view, and the delta since the previous step.
            let (view, full_view) = (index.node_view(&node), full.node_view(&node));
            assert_eq!(view.snapshot("e"), full_view.snapshot("e"), "{at}: {node}");
            assert_eq!(
                unversioned(view.delta_from(&previous_inc.node_view(&node), "e")),
                unversioned(full_view.delta_from(&previous.node_view(&node), "e")),
                "{at}: {node}'s delta"
            );
        }
        // What did not change keeps its allocation (what the publisher
        // and the streams compare), and only that.
        assert_eq!(
            Arc::ptr_eq(&index.mesh, &previous_inc.mesh),
            *index.mesh == *previous_inc.mesh,
            "{at}: mesh kept"
        );
        assert_eq!(
            Arc::ptr_eq(
                &index.enrolled_namespaces,
                &previous_inc.enrolled_namespaces
            ),
            index.enrolled_namespaces == previous_inc.enrolled_namespaces,
            "{at}: namespaces kept"
        );
        for node in all_nodes() {
            let (now, before) = (index.local(&node), previous_inc.local(&node));
            assert_eq!(
                Arc::ptr_eq(&now, &before),
                now == before,
                "{at}: {node}'s own view kept"
            );
        }
        previous_inc = inc.index();

        publisher.publish_interned(index);
        for sub in &mut subscribers {
            let full_view = full.node_view(&sub.node);
            if step % sub.stride != 0 {
                continue;
            }
            let changed = sub.rx.has_changed().unwrap();
            let differs = full_view.snapshot("e") != sub.last_full.snapshot("e");
            // Never left behind; reading every step, woken exactly when its
            // view changed (a slow reader may see a change undone since).
            assert!(changed || !differs, "{at}: {} not woken", sub.node);
            // Woken with nothing to send: only when the mesh changed where
            // the node's own pods hide it (two pods with one uid).
            let hidden = !differs
                && sub.rx.borrow().mesh.as_ref().map(Arc::as_ptr)
                    != sub.last.mesh.as_ref().map(Arc::as_ptr);
            if sub.stride == 1 && !hidden {
                assert_eq!(changed, differs, "{at}: {} woken", sub.node);
            }
            if !changed {
                continue;
            }
            let current = sub.rx.borrow_and_update().clone();
            let delta = current.delta_from(&sub.last, &epoch);
            assert_eq!(
                unversioned(delta.clone()),
                unversioned(full_view.delta_from(&sub.last_full, "e")).with_epoch(&epoch),
                "{at}: {}'s delta from version {}",
                sub.node,
                sub.last.version
            );
            sub.client.apply(delta).unwrap();
            let mut fresh = View::default();
            fresh.apply(full_view.snapshot(&epoch)).unwrap();
            fresh.version = sub.client.version;
            assert_eq!(sub.client, fresh, "{at}: {}", sub.node);
            sub.last = current;
            sub.last_full = full_view;
        }
        previous = full;
    }
}

trait WithEpoch {
    fn with_epoch(self, epoch: &str) -> Self;
}

impl WithEpoch for WatchResponse {
    fn with_epoch(mut self, epoch: &str) -> Self {
        self.epoch = epoch.to_string();
        self
    }
}

#[test]
fn incremental_index_views_and_deltas_equal_a_full_rebuild_after_every_change() {
    for seed in 0..12 {
        run(seed, EndpointsFrom::EndpointSlices, seed % 2 == 0, 150);
        run(seed, EndpointsFrom::Selectors, seed % 3 == 0, 150);
    }
}
