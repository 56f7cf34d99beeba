//! The Kubernetes objects the index reads, validated and reduced to the
//! fields it uses. Sources convert what they receive (kube watch events,
//! YAML documents) into these; an object that fails is a [`Rejection`]:
//! logged with its name and the reason, counted, and never reaches the index.

use crate::policy_model::{
    self, AuthorizationObject, HttpRouteObject, MeshTlsObject, NetworkAuthnObject, ServerObject,
};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;
use std::net::IpAddr;

pub use crate::object::{Kind, ObjectKey, Rejection};

/// The label that enrolls a namespace (`enabled`) or opts a pod out (`disabled`).
pub const MESH_LABEL: &str = "weft.io/mesh";
/// Pod annotation: ports carried as TCP without protocol detection.
pub const OPAQUE_PORTS_ANNOTATION: &str = "weft.io/opaque-ports";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone, Debug, PartialEq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `weft.io/default-inbound-policy`, as written.
    pub default_policy: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ContainerPort {
    pub name: String,
    pub port: u16,
    pub protocol: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PodInfo {
    pub key: ObjectKey,
    /// `metadata.uid`; empty from a manifest without one (the local source
    /// fills it in).
    pub uid: String,
    pub node: Option<String>,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<ContainerPort>,
    pub host_network: bool,
    /// Succeeded or Failed: its IP may already belong to another pod.
    pub terminated: bool,
    /// RFC 3339, for deciding which of two pods claiming one IP keeps it.
    pub created: String,
    /// `weft.io/default-inbound-policy`, as written.
    pub default_policy: Option<String>,
    /// Ports kubelet probes (policy lets the node reach them).
    pub probe_ports: Vec<u16>,
    /// `weft.io/opaque-ports`, as written (parsed by the index).
    pub opaque_ports: Option<String>,
    /// The node's addresses (`status.hostIPs`): where kubelet probes come
    /// from. The local source fills them from the simulator's state.
    pub host_ips: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServicePortInfo {
    pub name: String,
    pub port: u16,
    pub target: TargetPort,
    pub protocol: String,
    pub app_protocol: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceInfo {
    pub key: ObjectKey,
    pub cluster_ips: Vec<IpAddr>,
    /// `clusterIP: None`.
    pub headless: bool,
    pub ports: Vec<ServicePortInfo>,
    /// `None`: no selector (endpoints are managed by someone else).
    pub selector: Option<BTreeMap<String, String>>,
    pub created: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready`; unset means ready (the API's documented default).
    /// A terminating pod's endpoint is never ready.
    pub ready: bool,
    /// `conditions.serving`: passing its readiness checks, terminating or
    /// not; unset means as `ready` (the API's documented default).
    pub serving: bool,
    /// `conditions.terminating`: its pod is being deleted.
    pub terminating: bool,
    /// The Pod behind it (`targetRef` of kind Pod): its name.
    pub pod: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SlicePort {
    pub name: String,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SliceInfo {
    pub key: ObjectKey,
    /// The Service it belongs to (label `kubernetes.io/service-name`).
    pub service: String,
    pub endpoints: Vec<SliceEndpoint>,
    pub ports: Vec<SlicePort>,
}

/// One validated object.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(NamespaceInfo),
    Pod(PodInfo),
    Service(ServiceInfo),
    EndpointSlice(SliceInfo),
    ServiceAccount(ObjectKey),
    Node(String),
    Server(ServerObject),
    AuthorizationPolicy(AuthorizationObject),
    MeshTLSAuthentication(MeshTlsObject),
    NetworkAuthentication(NetworkAuthnObject),
    HTTPRoute(HttpRouteObject),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::ServiceAccount(_) => Kind::ServiceAccount,
            Object::Node(_) => Kind::Node,
            Object::Server(_) => Kind::Server,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::MeshTLSAuthentication(_) => Kind::MeshTLSAuthentication,
            Object::NetworkAuthentication(_) => Kind::NetworkAuthentication,
            Object::HTTPRoute(_) => Kind::HTTPRoute,
        }
    }

    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Namespace(ns) => ObjectKey::new("", &ns.name),
            Object::Pod(p) => p.key.clone(),
            Object::Service(s) => s.key.clone(),
            Object::EndpointSlice(s) => s.key.clone(),
            Object::ServiceAccount(k) => k.clone(),
            Object::Node(n) => ObjectKey::new("", n),
            Object::Server(o) => o.key.clone(),
            Object::AuthorizationPolicy(o) => o.key.clone(),
            Object::MeshTLSAuthentication(o) => o.key.clone(),
            Object::NetworkAuthentication(o) => o.key.clone(),
            Object::HTTPRoute(o) => o.key.clone(),
        }
    }
}

fn name(kind: Kind, meta: &ObjectMeta) -> Result<String, Rejection> {
    match meta.name.as_deref() {
        Some(n) if !n.is_empty() => Ok(n.to_string()),
        _ => Err(Rejection::new(kind, meta, "metadata.name is missing")),
    }
}

/// Namespaced objects from the API server always carry their namespace; a
/// manifest may leave it out, and then it is `default`, as with kubectl.
fn namespace(meta: &ObjectMeta) -> String {
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => ns.to_string(),
        _ => "default".to_string(),
    }
}

fn port(kind: Kind, meta: &ObjectMeta, what: &str, value: i32) -> Result<u16, Rejection> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            Rejection::new(
                kind,
                meta,
                format!("{what} {value} is not a port (1-65535)"),
            )
        })
}

fn ip(kind: Kind, meta: &ObjectMeta, what: &str, value: &str) -> Result<IpAddr, Rejection> {
    value
        .parse()
        .map_err(|_| Rejection::new(kind, meta, format!("{what} {value:?} is not an IP address")))
}

fn created(meta: &ObjectMeta) -> String {
    meta.creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default()
}

pub fn namespace_info(ns: &core::Namespace) -> Result<NamespaceInfo, Rejection> {
    Ok(NamespaceInfo {
        name: name(Kind::Namespace, &ns.metadata)?,
        labels: ns.metadata.labels.clone().unwrap_or_default(),
        default_policy: policy_model::default_policy_annotation(&ns.metadata),
    })
}

pub fn pod_info(pod: &core::Pod) -> Result<PodInfo, Rejection> {
    let meta = &pod.metadata;
    let kind = Kind::Pod;
    let key = ObjectKey::new(namespace(meta), name(kind, meta)?);
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| Rejection::new(kind, meta, "spec is missing"))?;
    let status = pod.status.as_ref();
    let mut ips = Vec::new();
    if let Some(list) = status.and_then(|s| s.pod_ips.as_ref()) {
        for (i, entry) in list.iter().enumerate() {
            ips.push(ip(kind, meta, &format!("status.podIPs[{i}]"), &entry.ip)?);
        }
    }
    if ips.is_empty()
        && let Some(single) = status.and_then(|s| s.pod_ip.as_deref())
        && !single.is_empty()
    {
        ips.push(ip(kind, meta, "status.podIP", single)?);
    }
    let mut ports = Vec::new();
    for container in &spec.containers {
        for p in container.ports.iter().flatten() {
            ports.push(ContainerPort {
                name: p.name.clone().unwrap_or_default(),
                port: port(
                    kind,
                    meta,
                    &format!("container {:?} containerPort", container.name),
                    p.container_port,
                )?,
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            });
        }
    }
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
    let mut host_ips = Vec::new();
    if let Some(list) = status.and_then(|s| s.host_ips.as_ref()) {
        for (i, entry) in list.iter().enumerate() {
            host_ips.push(ip(kind, meta, &format!("status.hostIPs[{i}]"), &entry.ip)?);
        }
    }
    if host_ips.is_empty()
        && let Some(single) = status.and_then(|s| s.host_ip.as_deref())
        && !single.is_empty()
    {
        host_ips.push(ip(kind, meta, "status.hostIP", single)?);
    }
    Ok(PodInfo {
        key,
        uid: meta.uid.clone().unwrap_or_default(),
        node: spec.node_name.clone().filter(|n| !n.is_empty()),
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        labels: meta.labels.clone().unwrap_or_default(),
        ips,
        ports,
        host_network: spec.host_network.unwrap_or(false),
        terminated: matches!(phase, "Succeeded" | "Failed"),
        created: created(meta),
        default_policy: policy_model::default_policy_annotation(meta),
        probe_ports: policy_model::probe_ports(spec),
        opaque_ports: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(OPAQUE_PORTS_ANNOTATION))
            .cloned(),
        host_ips,
    })
}

pub fn service_info(svc: &core::Service) -> Result<ServiceInfo, Rejection> {
    let meta = &svc.metadata;
    let kind = Kind::Service;
    let key = ObjectKey::new(namespace(meta), name(kind, meta)?);
    let spec = svc.spec.clone().unwrap_or_default();
    let mut headless = false;
    let mut cluster_ips = Vec::new();
    let listed = spec
        .cluster_ips
        .clone()
        .unwrap_or_default()
        .into_iter()
        .chain(spec.cluster_ip.clone());
    for value in listed {
        if value == "None" {
            headless = true;
        } else if !value.is_empty() {
            let addr = ip(kind, meta, "spec.clusterIP", &value)?;
            if !cluster_ips.contains(&addr) {
                cluster_ips.push(addr);
            }
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let number = port(kind, meta, &format!("spec.ports[{i}].port"), p.port)?;
        let target = match &p.target_port {
            None => TargetPort::Number(number),
            Some(IntOrString::Int(n)) => TargetPort::Number(port(
                kind,
                meta,
                &format!("spec.ports[{i}].targetPort"),
                *n,
            )?),
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => {
                    TargetPort::Number(port(kind, meta, &format!("spec.ports[{i}].targetPort"), n)?)
                }
                Err(_) => TargetPort::Name(s.clone()),
            },
        };
        ports.push(ServicePortInfo {
            name: p.name.clone().unwrap_or_default(),
            port: number,
            target,
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            app_protocol: p.app_protocol.clone().unwrap_or_default(),
        });
    }
    Ok(ServiceInfo {
        key,
        cluster_ips,
        headless,
        ports,
        selector: spec.selector.filter(|s| !s.is_empty()),
        created: created(meta),
    })
}

/// `Ok(None)`: a slice that belongs to no Service (no service-name label);
/// nothing to index, nothing wrong.
pub fn slice_info(slice: &discovery::EndpointSlice) -> Result<Option<SliceInfo>, Rejection> {
    let meta = &slice.metadata;
    let kind = Kind::EndpointSlice;
    let key = ObjectKey::new(namespace(meta), name(kind, meta)?);
    let Some(service) = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
    else {
        return Ok(None);
    };
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        // FQDN slices name hosts, not addresses: nothing the data plane can
        // match a connection against.
        return Ok(None);
    }
    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let mut addresses = Vec::new();
        for a in &ep.addresses {
            addresses.push(ip(kind, meta, &format!("endpoints[{i}].addresses"), a)?);
        }
        let pod = ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.name.clone());
        let conditions = ep.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        endpoints.push(SliceEndpoint {
            addresses,
            ready,
            serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            pod,
        });
    }
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        if let Some(n) = p.port {
            ports.push(SlicePort {
                name: p.name.clone().unwrap_or_default(),
                port: port(kind, meta, &format!("ports[{i}].port"), n)?,
            });
        }
    }
    Ok(Some(SliceInfo {
        key,
        service,
        endpoints,
        ports,
    }))
}

pub fn service_account_key(sa: &core::ServiceAccount) -> Result<ObjectKey, Rejection> {
    Ok(ObjectKey::new(
        namespace(&sa.metadata),
        name(Kind::ServiceAccount, &sa.metadata)?,
    ))
}

pub fn node_name(node: &core::Node) -> Result<String, Rejection> {
    name(Kind::Node, &node.metadata)
}

/// Parses one document (YAML or JSON, as a generic value) of a kind the index
/// reads. `Ok(None)`: a kind the index does not read, or an object with
/// nothing to index; ignored.
pub fn from_value(value: serde_json::Value) -> Result<Option<Object>, Rejection> {
    let kind_name = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string();
    let Some(kind) = Kind::from_kind(&kind_name) else {
        return Ok(None);
    };
    // Name the object in the rejection even when its body does not parse.
    let meta: ObjectMeta = value
        .get("metadata")
        .cloned()
        .and_then(|m| serde_json::from_value(m).ok())
        .unwrap_or_default();
    if kind.is_policy() {
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if !policy_model::is_ours(kind, api_version, &meta)? {
            return Ok(None);
        }
    }
    let bad = |e: serde_json::Error| Rejection::new(kind, &meta, format!("does not parse: {e}"));
    Ok(Some(match kind {
        Kind::Namespace => Object::Namespace(namespace_info(
            &serde_json::from_value(value).map_err(bad)?,
        )?),
        Kind::Pod => Object::Pod(pod_info(&serde_json::from_value(value).map_err(bad)?)?),
        Kind::Service => {
            Object::Service(service_info(&serde_json::from_value(value).map_err(bad)?)?)
        }
        Kind::EndpointSlice => match slice_info(&serde_json::from_value(value).map_err(bad)?)? {
            Some(s) => Object::EndpointSlice(s),
            None => return Ok(None),
        },
        Kind::ServiceAccount => Object::ServiceAccount(service_account_key(
            &serde_json::from_value(value).map_err(bad)?,
        )?),
        Kind::Node => Object::Node(node_name(&serde_json::from_value(value).map_err(bad)?)?),
        Kind::Server => Object::Server(policy_model::parse(kind, &value, &meta)?),
        Kind::AuthorizationPolicy => {
            Object::AuthorizationPolicy(policy_model::parse(kind, &value, &meta)?)
        }
        Kind::MeshTLSAuthentication => {
            Object::MeshTLSAuthentication(policy_model::parse(kind, &value, &meta)?)
        }
        Kind::NetworkAuthentication => {
            Object::NetworkAuthentication(policy_model::parse(kind, &value, &meta)?)
        }
        Kind::HTTPRoute => Object::HTTPRoute(policy_model::parse(kind, &value, &meta)?),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_kinds_are_ignored() {
        let v = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}});
        assert_eq!(from_value(v).unwrap(), None);
    }

    #[test]
    fn pod_with_bad_ip_is_rejected_by_name() {
        let v = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"containers": [{"name": "c"}]},
            "status": {"podIP": "10.1.2.300"}});
        let err = from_value(v).unwrap_err();
        assert_eq!(err.object, "shop/web");
        assert!(err.reason.contains("10.1.2.300"), "{err}");
    }

    #[test]
    fn wrongly_typed_field_is_rejected_not_panicking() {
        let v = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": {"ports": [{"port": "eighty"}]}});
        let err = from_value(v).unwrap_err();
        assert_eq!(err.kind, "Service");
        assert_eq!(err.object, "shop/api");
        assert!(err.reason.contains("does not parse"), "{err}");
    }

    #[test]
    fn pod_without_name_or_spec_is_rejected() {
        let v = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "a"},
            "spec": {"containers": []}});
        assert!(from_value(v).unwrap_err().reason.contains("metadata.name"));
        let v = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}});
        assert!(from_value(v).unwrap_err().reason.contains("spec"));
    }

    #[test]
    fn named_and_numeric_target_ports() {
        let v = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.9", "ports": [
                {"name": "http", "port": 80, "targetPort": "web"},
                {"name": "grpc", "port": 9090, "targetPort": 9091, "appProtocol": "kubernetes.io/h2c"},
                {"name": "raw", "port": 7000}]}});
        let Some(Object::Service(s)) = from_value(v).unwrap() else {
            panic!("not a service")
        };
        assert_eq!(s.ports[0].target, TargetPort::Name("web".into()));
        assert_eq!(s.ports[1].target, TargetPort::Number(9091));
        assert_eq!(s.ports[1].app_protocol, "kubernetes.io/h2c");
        assert_eq!(s.ports[2].target, TargetPort::Number(7000));
        assert_eq!(s.cluster_ips, vec!["10.96.0.9".parse::<IpAddr>().unwrap()]);
    }
}
