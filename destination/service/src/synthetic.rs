//! Synthetic clusters of any size, for benchmarks and load tests: the shape
//! of a typical cluster (namespaces half enrolled, Deployments of a few
//! replicas spread over the nodes, one Service and EndpointSlice per
//! Deployment), without a cluster.

use crate::model::{
    ContainerPort, NamespaceInfo, ObjectKey, PodInfo, ServiceInfo, ServicePortInfo, SliceEndpoint,
    SliceInfo, SlicePort, TargetPort,
};
use crate::policy_model::{AuthorizationObject, PolicyObject, ServerObject};
use crate::store::ClusterObjects;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub pods: usize,
    pub services: usize,
    pub nodes: usize,
    pub namespaces: usize,
}

impl Shape {
    /// The cluster of the first benchmarks: 10 000 pods, 2 000 Services
    /// (5 replicas each), 100 nodes, 20 namespaces.
    pub const TEN_THOUSAND: Shape = Shape {
        pods: 10_000,
        services: 2_000,
        nodes: 100,
        namespaces: 20,
    };

    /// Issue #18's target: 100 000 pods, 10 000 Services (10 replicas
    /// each), 1 000 nodes, 20 namespaces.
    pub const HUNDRED_THOUSAND: Shape = Shape {
        pods: 100_000,
        services: 10_000,
        nodes: 1_000,
        namespaces: 20,
    };

    /// The namespace of pod `i` is enrolled (even namespaces are).
    pub fn enrolled(&self, i: usize) -> bool {
        let per_service = (self.pods / self.services.max(1)).max(1);
        ((i / per_service) % self.namespaces.max(1)).is_multiple_of(2)
    }

    /// The `n`th pod of a sequence of enrolled pods spread over the
    /// cluster (and so over the nodes): what benchmarks change.
    pub fn spread_enrolled_pod(&self, n: usize) -> usize {
        let pods = self.pods.max(1);
        let mut i = n.wrapping_mul(7_919) % pods;
        for _ in 0..pods {
            if self.enrolled(i) {
                return i;
            }
            i = (i + 1) % pods;
        }
        0
    }
}

pub fn node_name(i: usize) -> String {
    format!("node-{i:03}")
}

pub fn cluster(shape: Shape) -> ClusterObjects {
    let mut objects = ClusterObjects::default();
    for n in 0..shape.namespaces {
        let mut labels = BTreeMap::new();
        if n % 2 == 0 {
            labels.insert(crate::model::MESH_LABEL.to_string(), "enabled".to_string());
        }
        let name = format!("ns-{n:02}");
        objects.namespaces.insert(
            name.clone(),
            NamespaceInfo {
                name,
                labels,
                default_policy: None,
            },
        );
    }
    for i in 0..shape.pods {
        let pod = pod(shape, i);
        objects.pods.insert(pod.key.clone(), pod);
    }
    let per_service = shape.pods / shape.services.max(1);
    for s in 0..shape.services {
        let ns = format!("ns-{:02}", s % shape.namespaces);
        let key = ObjectKey::new(&ns, format!("svc-{s:05}"));
        let mut selector = BTreeMap::new();
        selector.insert("app".to_string(), format!("app-{s:05}"));
        objects.services.insert(
            key.clone(),
            ServiceInfo {
                key: key.clone(),
                cluster_ips: vec![IpAddr::V4(Ipv4Addr::new(
                    10,
                    96,
                    (s / 250) as u8,
                    (s % 250) as u8 + 1,
                ))],
                headless: false,
                ports: vec![ServicePortInfo {
                    name: "http".into(),
                    port: 80,
                    target: TargetPort::Name("http".into()),
                    protocol: "TCP".into(),
                    app_protocol: "http".into(),
                }],
                selector: Some(selector),
                created: String::new(),
            },
        );
        let endpoints = (0..per_service)
            .map(|r| s * per_service + r)
            .filter(|i| *i < shape.pods)
            .map(|i| {
                let p = pod(shape, i);
                SliceEndpoint {
                    addresses: p.ips.clone(),
                    ready: true,
                    serving: true,
                    terminating: false,
                    pod: Some(p.key.name.clone()),
                }
            })
            .collect();
        // Policy everywhere: a Server per Deployment's port, and one
        // AuthorizationPolicy admitting the previous Deployment's account
        // (the per-pod cost of the policy index is in the measurement).
        objects
            .servers
            .insert(key.clone(), server(&ns, &key.name, &format!("app-{s:05}")));
        let authz = ObjectKey::new(&ns, format!("{}-authz", key.name));
        objects.authorization_policies.insert(
            authz.clone(),
            authorization(&authz, &key.name, &format!("sa-{:05}", s.saturating_sub(1))),
        );
        let slice_key = ObjectKey::new(&ns, format!("svc-{s:05}-abcde"));
        objects.slices.insert(
            slice_key.clone(),
            SliceInfo {
                key: slice_key,
                service: key.name.clone(),
                endpoints,
                ports: vec![SlicePort {
                    name: "http".into(),
                    port: 8080,
                }],
            },
        );
    }
    objects
}

/// Pod `i` belongs to Service `s = i / (pods / services)`, in that
/// Service's namespace; replica `r` of a Service lands on node
/// `(s + 17 r) % nodes`, so that every node runs pods of enrolled and of
/// other namespaces, and replicas spread.
pub fn pod(shape: Shape, i: usize) -> PodInfo {
    let per_service = (shape.pods / shape.services.max(1)).max(1);
    let s = i / per_service;
    let ns = format!("ns-{:02}", s % shape.namespaces);
    let node = (s + 17 * (i % per_service)) % shape.nodes;
    let mut labels = BTreeMap::new();
    labels.insert("app".to_string(), format!("app-{s:05}"));
    labels.insert("pod-template-hash".to_string(), "7d9c8b6f5d".to_string());
    PodInfo {
        key: ObjectKey::new(&ns, format!("app-{s:05}-7d9c8b6f5d-{i:05}")),
        uid: format!("00000000-0000-4000-8000-{i:012}"),
        node: Some(node_name(node)),
        service_account: format!("sa-{s:05}"),
        labels,
        // Unique per pod (per-node pod CIDRs do not matter to the index).
        ips: vec![IpAddr::V4(Ipv4Addr::new(
            10,
            (100 + i / 62_500) as u8,
            ((i / 250) % 250) as u8,
            (i % 250) as u8 + 2,
        ))],
        ports: vec![ContainerPort {
            name: "http".into(),
            port: 8080,
            protocol: "TCP".into(),
        }],
        host_network: false,
        terminated: false,
        created: String::new(),
        default_policy: None,
        probe_ports: vec![8080],
        opaque_ports: None,
        host_ips: vec![IpAddr::V4(Ipv4Addr::new(
            10,
            240,
            (node / 250) as u8,
            (node % 250) as u8 + 1,
        ))],
    }
}

fn server(ns: &str, name: &str, app: &str) -> ServerObject {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    PolicyObject {
        key: ObjectKey::new(ns, name),
        spec: weft_policy_api::ServerSpec {
            pod_selector: LabelSelector {
                match_labels: Some([("app".to_string(), app.to_string())].into()),
                match_expressions: None,
            },
            port: IntOrString::String("http".into()),
            proxy_protocol: None,
            access_policy: weft_policy_api::DefaultPolicy::Deny,
        },
        created: String::new(),
        generation: Some(1),
    }
}

fn authorization(key: &ObjectKey, server: &str, account: &str) -> AuthorizationObject {
    PolicyObject {
        key: key.clone(),
        spec: weft_policy_api::AuthorizationPolicySpec {
            target_ref: weft_policy_api::TargetRef {
                group: Some(weft_policy_api::GROUP.into()),
                kind: "Server".into(),
                name: server.into(),
            },
            required_authentication_refs: vec![weft_policy_api::AuthenticationRef {
                group: None,
                kind: "ServiceAccount".into(),
                name: account.into(),
                namespace: None,
            }],
        },
        created: String::new(),
        generation: Some(1),
    }
}
