//! The index driven by object JSON as the API server returns it
//! (`tests/fixtures/*.json`), patched per scenario.

use super::*;
use crate::model::{self, Kind, ObjectKey};
use crate::store::{ClusterObjects, StoreUpdate};
use crate::views::NodeView;
use serde_json::{Value, json};
use std::net::IpAddr;
use weft_destination_api::{Workload, address};

fn fixture(name: &str) -> Value {
    let text = match name {
        "namespace" => include_str!("../../tests/fixtures/namespace.json"),
        "pod" => include_str!("../../tests/fixtures/pod.json"),
        "service" => include_str!("../../tests/fixtures/service.json"),
        "endpointslice" => include_str!("../../tests/fixtures/endpointslice.json"),
        other => panic!("no fixture {other}"),
    };
    serde_json::from_str(text).unwrap()
}

/// A second pod of the same Deployment, on another node.
fn pod(name: &str, uid: &str, node: &str, ip: &str) -> Value {
    let mut p = fixture("pod");
    p["metadata"]["name"] = json!(name);
    p["metadata"]["uid"] = json!(uid);
    p["spec"]["nodeName"] = json!(node);
    p["status"]["podIP"] = json!(ip);
    p["status"]["podIPs"] = json!([{ "ip": ip }]);
    p
}

fn slice_endpoint(pod: &str, uid: &str, ip: &str, node: &str, ready: bool) -> Value {
    json!({
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": ready, "terminating": false},
        "nodeName": node,
        "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop", "uid": uid}
    })
}

struct Cluster {
    objects: ClusterObjects,
    config: IndexConfig,
}

impl Cluster {
    fn new(endpoints: EndpointsFrom) -> Self {
        Self {
            objects: ClusterObjects::default(),
            config: IndexConfig {
                endpoints,
                ..IndexConfig::default()
            },
        }
    }

    fn kube() -> Self {
        let mut c = Self::new(EndpointsFrom::EndpointSlices);
        for f in ["namespace", "pod", "service", "endpointslice"] {
            c.apply(fixture(f));
        }
        c
    }

    fn apply(&mut self, value: Value) {
        let object = model::from_value(value).unwrap().expect("an indexed kind");
        self.objects.apply(StoreUpdate::Apply(object));
    }

    fn delete(&mut self, kind: Kind, ns: &str, name: &str) {
        self.objects
            .apply(StoreUpdate::Delete(kind, ObjectKey::new(ns, name)));
    }

    fn index(&self) -> Index {
        build(&self.objects, &self.config)
    }

    fn node(&self, node: &str) -> NodeView {
        let index = self.index();
        index.node_view(node)
    }
}

const WEB_UID: &str = "c5a1e7f2-6b3d-4e8a-9c0f-1d2e3f4a5b6c";

fn ips(w: &Workload) -> Vec<IpAddr> {
    w.addresses
        .iter()
        .filter_map(|a| address::decode(a))
        .collect()
}

fn workload<'a>(view: &'a NodeView, uid: &str) -> Option<&'a Workload> {
    view.workloads().find(|(k, _)| *k == uid).map(|(_, w)| &**w)
}

fn service<'a>(view: &'a NodeView, key: &str) -> Option<&'a weft_destination_api::Service> {
    view.services().find(|(k, _)| *k == key).map(|(_, s)| &**s)
}

#[test]
fn enrolled_pod_has_identity_addresses_and_backs_its_service() {
    let c = Cluster::kube();
    let view = c.node("node-a");
    let w = workload(&view, WEB_UID).expect("the pod is in its node's view");
    assert_eq!(w.identity, "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(w.node, "node-a");
    assert!(w.enrolled);
    assert_eq!(w.tunnel, weft_destination_api::TunnelProtocol::Hbone as i32);
    assert_eq!(
        ips(w),
        [
            "10.244.1.7".parse::<IpAddr>().unwrap(),
            "fd00:10:244:1::7".parse().unwrap()
        ]
    );
    assert_eq!(
        w.ports
            .iter()
            .map(|p| (p.name.as_str(), p.port))
            .collect::<Vec<_>>(),
        [("http", 8080), ("grpc", 9090)]
    );

    let s = service(&view, "shop/web").expect("the Service is in the view");
    assert_eq!(s.hostname, "web.shop.svc.cluster.local");
    assert_eq!(
        address::decode(&s.cluster_ips[0]),
        Some("10.96.12.34".parse().unwrap())
    );
    assert_eq!(s.ports[0].target_port_name, "http");
    assert_eq!(s.ports[1].app_protocol, "kubernetes.io/h2c");
    assert_eq!(s.endpoints.len(), 1);
    let ep = &s.endpoints[0];
    assert_eq!(ep.workload_uid, WEB_UID);
    assert!(
        ep.addresses.is_empty(),
        "enrolled backends are referenced, not repeated"
    );
    assert_eq!(
        ep.ports.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(),
        [(80, 8080), (9090, 9090)]
    );
    assert!(c.index().problems.is_empty(), "{:?}", c.index().problems);
}

#[test]
fn node_without_enrolled_pods_gets_only_its_own_pods() {
    let mut c = Cluster::kube();
    let mut other = pod("batch-1", "uid-batch-1", "node-b", "10.244.2.9");
    other["metadata"]["namespace"] = json!("batch");
    c.apply(other);
    let view = c.node("node-b");
    let uids: Vec<_> = view.workloads().map(|(k, _)| k.clone()).collect();
    assert_eq!(uids, ["uid-batch-1"]);
    assert!(!workload(&view, "uid-batch-1").unwrap().enrolled);
    assert_eq!(view.services().count(), 0);
    // A node nobody runs on: empty.
    assert_eq!(c.node("node-z").workloads().count(), 0);
}

#[test]
fn enrollment_follows_namespace_and_pod_labels() {
    let mut c = Cluster::kube();
    // Leave the mesh: relabel the namespace.
    let mut ns = fixture("namespace");
    ns["metadata"]["labels"]["weft.io/mesh"] = json!("disabled");
    c.apply(ns.clone());
    let view = c.node("node-a");
    let w = workload(&view, WEB_UID).expect("still a local pod of node-a");
    assert!(!w.enrolled);
    assert_eq!(w.tunnel, weft_destination_api::TunnelProtocol::None as i32);
    assert!(
        view.mesh.is_none(),
        "no enrolled pod on node-a: no mesh picture"
    );
    let s = &c.index().mesh.services["shop/web"];
    assert_eq!(
        s.endpoints[0].workload_uid, "",
        "a backend outside the mesh is given by address"
    );
    assert_eq!(
        address::decode(&s.endpoints[0].addresses[0]),
        Some("10.244.1.7".parse().unwrap())
    );

    // Re-enroll the namespace, but opt this one pod out.
    ns["metadata"]["labels"]["weft.io/mesh"] = json!("enabled");
    c.apply(ns);
    let mut p = fixture("pod");
    p["metadata"]["labels"]["weft.io/mesh"] = json!("disabled");
    c.apply(p);
    assert!(!workload(&c.node("node-a"), WEB_UID).unwrap().enrolled);
    assert!(!c.index().mesh.workloads.contains_key(WEB_UID));

    // Opt back in.
    c.apply(fixture("pod"));
    assert!(workload(&c.node("node-a"), WEB_UID).unwrap().enrolled);
    assert!(c.index().mesh.workloads.contains_key(WEB_UID));
}

/// `shop/web` backed by two ready pods: the fixture's and `web-2` on
/// node-b; its EndpointSlice, to edit.
fn two_replicas(c: &mut Cluster) -> Value {
    c.apply(pod("web-2", "uid-web-2", "node-b", "10.244.2.3"));
    let mut slice = fixture("endpointslice");
    slice["endpoints"]
        .as_array_mut()
        .unwrap()
        .push(slice_endpoint(
            "web-2",
            "uid-web-2",
            "10.244.2.3",
            "node-b",
            true,
        ));
    c.apply(slice.clone());
    slice
}

/// The workloads behind `shop/web`, as the mesh sees them.
fn backends(c: &Cluster) -> Vec<String> {
    c.index().mesh.services["shop/web"]
        .endpoints
        .iter()
        .map(|e| e.workload_uid.clone())
        .collect()
}

#[test]
fn endpoints_churn_with_slices() {
    let mut c = Cluster::kube();
    let mut slice = two_replicas(&mut c);
    let mut both = vec![WEB_UID.to_string(), "uid-web-2".to_string()];
    both.sort();
    assert_eq!(backends(&c), both);

    // web-2 stops being ready: out of the rotation.
    slice["endpoints"][1]["conditions"]["ready"] = json!(false);
    c.apply(slice);
    assert_eq!(backends(&c), [WEB_UID]);

    // The slice goes away: no endpoints, reported.
    c.delete(Kind::EndpointSlice, "shop", "web-8kq2m");
    assert!(backends(&c).is_empty());
    let problems = c.index().problems;
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].kind, ProblemKind::NoEndpoints);
    assert_eq!(problems[0].object, "Service shop/web");
}

#[test]
fn terminating_endpoints_take_no_new_request_unless_none_is_ready() {
    let mut c = Cluster::kube();
    let mut slice = two_replicas(&mut c);
    // `kubectl delete pod web-2`: terminating, still serving, not ready.
    slice["endpoints"][1]["conditions"] =
        json!({"ready": false, "serving": true, "terminating": true});
    c.apply(slice.clone());
    assert_eq!(
        backends(&c),
        [WEB_UID],
        "no new request to a terminating pod"
    );

    // The other one terminates too (the last replicas of a rollout): the
    // serving terminating endpoints take the requests rather than none.
    slice["endpoints"][0]["conditions"] =
        json!({"ready": false, "serving": true, "terminating": true});
    c.apply(slice.clone());
    let mut both = vec![WEB_UID.to_string(), "uid-web-2".to_string()];
    both.sort();
    assert_eq!(backends(&c), both);

    // One that no longer serves (its readiness probe fails) is left out
    // even then; and a ready endpoint wins over them again.
    slice["endpoints"][1]["conditions"] =
        json!({"ready": false, "serving": false, "terminating": true});
    c.apply(slice.clone());
    assert_eq!(backends(&c), [WEB_UID]);
    slice["endpoints"][1]["conditions"] = json!({"ready": true});
    c.apply(slice);
    assert_eq!(backends(&c), ["uid-web-2"]);
}

#[test]
fn pod_moving_between_nodes_moves_between_views() {
    let mut c = Cluster::kube();
    assert!(workload(&c.node("node-a"), WEB_UID).is_some());
    // A Deployment replaces the pod: the old one is deleted, a new one with
    // the same name (StatefulSet-style) comes up on node-b.
    c.delete(Kind::Pod, "shop", "web-7d9c8b6f5d-x2k9p");
    let mut moved = fixture("pod");
    moved["metadata"]["uid"] = json!("uid-moved");
    moved["spec"]["nodeName"] = json!("node-b");
    moved["status"]["podIPs"] = json!([{"ip": "10.244.2.4"}]);
    moved["status"]["podIP"] = json!("10.244.2.4");
    c.apply(moved);
    let a = c.node("node-a");
    assert_eq!(a.workloads().count(), 0, "node-a runs nothing any more");
    assert!(a.mesh.is_none());
    let b = c.node("node-b");
    let w = workload(&b, "uid-moved").unwrap();
    assert_eq!(w.node, "node-b");
    assert_eq!(ips(w), ["10.244.2.4".parse::<IpAddr>().unwrap()]);
    assert!(workload(&b, WEB_UID).is_none());
}

#[test]
fn deleted_pod_leaves_views_and_stale_slice_is_served_by_address() {
    let mut c = Cluster::kube();
    c.delete(Kind::Pod, "shop", "web-7d9c8b6f5d-x2k9p");
    let index = c.index();
    assert!(index.mesh.workloads.is_empty());
    let ep = &index.mesh.services["shop/web"].endpoints[0];
    assert_eq!(ep.workload_uid, "");
    assert_eq!(
        address::decode(&ep.addresses[0]),
        Some("10.244.1.7".parse().unwrap())
    );
    assert_eq!(index.problems[0].kind, ProblemKind::UnknownEndpointPod);

    c.delete(Kind::Service, "shop", "web");
    assert!(c.index().mesh.services.is_empty());
}

#[test]
fn two_pods_claiming_one_ip_the_older_keeps_it() {
    let mut c = Cluster::kube();
    let mut impostor = pod("impostor", "uid-impostor", "node-b", "10.244.1.7");
    impostor["metadata"]["creationTimestamp"] = json!("2026-11-21T00:00:00Z");
    c.apply(impostor);
    let index = c.index();
    let owner = &index.mesh.workloads[WEB_UID];
    assert_eq!(ips(owner)[0], "10.244.1.7".parse::<IpAddr>().unwrap());
    assert!(ips(&index.mesh.workloads["uid-impostor"]).is_empty());
    assert_eq!(index.problems.len(), 1);
    assert_eq!(index.problems[0].kind, ProblemKind::DuplicateAddress);
    assert_eq!(index.problems[0].object, "Pod shop/impostor");

    // A finished pod's IP is free to reuse: no conflict.
    let mut done = pod("impostor", "uid-impostor", "node-b", "10.244.1.7");
    done["status"]["phase"] = json!("Succeeded");
    c.apply(done);
    assert!(c.index().problems.is_empty());
}

#[test]
fn selectors_compute_endpoints_in_local_mode() {
    let mut c = Cluster::new(EndpointsFrom::Selectors);
    c.apply(fixture("namespace"));
    c.apply(fixture("service"));
    let problems = c.index().problems;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].kind, ProblemKind::NoEndpoints);
    assert!(
        problems[0]
            .detail
            .contains("selector matches no running pod")
    );

    c.apply(fixture("pod"));
    let mut plain = pod("web-legacy", "uid-legacy", "node-b", "10.244.2.8");
    plain["metadata"]["labels"]["weft.io/mesh"] = json!("disabled");
    // Declares no port named http: only the numeric grpc port applies.
    plain["spec"]["containers"][0]["ports"] = json!([{"containerPort": 9090, "protocol": "TCP"}]);
    c.apply(plain);
    c.apply(pod("other-app", "uid-other", "node-b", "10.244.2.9"));
    let mut other = pod("other-app", "uid-other", "node-b", "10.244.2.9");
    other["metadata"]["labels"] = json!({"app": "other"});
    c.apply(other);

    let index = c.index();
    assert!(index.problems.is_empty(), "{:?}", index.problems);
    let s = &index.mesh.services["shop/web"];
    assert_eq!(s.endpoints.len(), 2);
    let legacy = s
        .endpoints
        .iter()
        .find(|e| e.workload_uid.is_empty())
        .unwrap();
    assert_eq!(
        address::decode(&legacy.addresses[0]),
        Some("10.244.2.8".parse().unwrap())
    );
    assert_eq!(
        legacy
            .ports
            .iter()
            .map(|(a, b)| (*a, *b))
            .collect::<Vec<_>>(),
        [(9090, 9090)]
    );
    let web = s
        .endpoints
        .iter()
        .find(|e| e.workload_uid == WEB_UID)
        .unwrap();
    assert_eq!(
        web.ports.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(),
        [(80, 8080), (9090, 9090)]
    );
}

#[test]
fn missing_service_account_is_reported_in_local_mode() {
    let mut c = Cluster::new(EndpointsFrom::Selectors);
    c.objects.tracks_service_accounts = true;
    c.apply(fixture("namespace"));
    c.apply(fixture("pod"));
    let problems = c.index().problems;
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].kind, ProblemKind::MissingServiceAccount);
    // Still served, with the identity its ServiceAccount name implies.
    assert_eq!(
        c.index().mesh.workloads[WEB_UID].identity,
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    c.apply(json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "web", "namespace": "shop"}}));
    assert!(c.index().problems.is_empty());
}

#[test]
fn host_network_pods_are_never_enrolled_nor_claim_the_node_ip() {
    let mut c = Cluster::kube();
    for name in ["agent-1", "agent-2"] {
        let mut p = pod(name, &format!("uid-{name}"), "node-a", "172.18.0.3");
        p["spec"]["hostNetwork"] = json!(true);
        c.apply(p);
    }
    let index = c.index();
    assert!(index.problems.is_empty(), "{:?}", index.problems);
    let local = index.local("node-a");
    assert!(!local.workloads["uid-agent-1"].enrolled);
    assert!(local.workloads["uid-agent-1"].addresses.is_empty());
}

#[test]
fn same_objects_give_equal_views() {
    let c = Cluster::kube();
    let (a, b) = (c.index(), c.index());
    assert_eq!(*a.mesh, *b.mesh);
    assert_eq!(a.nodes, b.nodes);
}

#[test]
fn opaque_ports_annotation_reaches_the_workload_and_bad_entries_are_reported() {
    let mut c = Cluster::kube();
    let mut p = fixture("pod");
    p["metadata"]["annotations"] = json!({"weft.io/opaque-ports": "3306, 8000-8010, mysql"});
    c.apply(p);
    let view = c.node("node-a");
    let w = workload(&view, WEB_UID).expect("the pod is in its node's view");
    assert_eq!(
        w.opaque_ports
            .iter()
            .map(|r| (r.first, r.last))
            .collect::<Vec<_>>(),
        [(3306, 3306), (8000, 8010)]
    );
    let problems = c.index().problems;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].kind, ProblemKind::InvalidOpaquePorts);
    assert!(problems[0].detail.contains("\"mysql\""), "{problems:?}");
}
