//! The policy objects (group `policy.weft.io`) as the index reads them, and
//! the pod and namespace fields policy needs (the default-policy annotation,
//! probe ports).
//!
//! Parsing only checks what the API server's schema would (the object
//! deserializes into its CRD type, it has a name). Whether its references
//! resolve and its values make sense is the index's business: such an
//! object is *ineffective*, reported with a status condition, rather than
//! rejected, so that an operator sees why on the object itself.

use crate::object::{Kind, ObjectKey, Rejection};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use weft_policy_api::{
    AuthorizationPolicySpec, HTTPRouteSpec, MeshTLSAuthenticationSpec, NetworkAuthenticationSpec,
    ServerSpec,
};

/// The annotation that overrides the cluster's default inbound policy, on
/// a namespace or on a pod (the pod's wins).
pub const DEFAULT_POLICY_ANNOTATION: &str = "weft.io/default-inbound-policy";

/// One policy object: its key and its spec (the status is ours to write,
/// never an input).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyObject<S> {
    pub key: ObjectKey,
    pub spec: S,
    /// RFC 3339; orders conflicting Servers (the older wins).
    pub created: String,
    /// `metadata.generation`: the status condition says which it judged.
    pub generation: Option<i64>,
}

pub type ServerObject = PolicyObject<ServerSpec>;
pub type AuthorizationObject = PolicyObject<AuthorizationPolicySpec>;
pub type MeshTlsObject = PolicyObject<MeshTLSAuthenticationSpec>;
pub type NetworkAuthnObject = PolicyObject<NetworkAuthenticationSpec>;
pub type HttpRouteObject = PolicyObject<HTTPRouteSpec>;

/// Whether a document of `kind` with this `apiVersion` is ours. `Ok(false)`:
/// another group's kind with the same name (Linkerd's `Server`), not ours
/// to read. Our group at a version we do not serve is refused by name.
pub fn is_ours(kind: Kind, api_version: &str, meta: &ObjectMeta) -> Result<bool, Rejection> {
    match api_version.split_once('/') {
        Some((weft_policy_api::GROUP, weft_policy_api::VERSION)) => Ok(true),
        Some((weft_policy_api::GROUP, other)) => Err(Rejection::new(
            kind,
            meta,
            format!(
                "version {other:?} of {} is not served; use apiVersion: {}",
                weft_policy_api::GROUP,
                weft_policy_api::API_VERSION
            ),
        )),
        _ => Ok(false),
    }
}

/// Deserializes the spec of a policy object (a YAML or JSON document).
pub fn parse<S: DeserializeOwned + Clone>(
    kind: Kind,
    value: &serde_json::Value,
    meta: &ObjectMeta,
) -> Result<PolicyObject<S>, Rejection> {
    let spec = value
        .get("spec")
        .ok_or_else(|| Rejection::new(kind, meta, "spec is missing"))?;
    let spec: S = serde_json::from_value(spec.clone())
        .map_err(|e| Rejection::new(kind, meta, format!("spec does not parse: {e}")))?;
    from_resource(kind, meta, &spec)
}

/// A policy object from its typed form (the kube watchers').
pub fn from_resource<S: Clone>(
    kind: Kind,
    meta: &ObjectMeta,
    spec: &S,
) -> Result<PolicyObject<S>, Rejection> {
    let name = match meta.name.as_deref() {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => return Err(Rejection::new(kind, meta, "metadata.name is missing")),
    };
    let namespace = match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => ns.to_string(),
        _ => "default".to_string(),
    };
    Ok(PolicyObject {
        key: ObjectKey::new(namespace, name),
        spec: spec.clone(),
        created: meta
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        generation: meta.generation,
    })
}

/// The default-policy annotation, as written (validated by the index, which
/// reports a bad value and treats it as `deny`).
pub fn default_policy_annotation(meta: &ObjectMeta) -> Option<String> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(DEFAULT_POLICY_ANNOTATION))
        .cloned()
}

/// The ports kubelet probes (liveness, readiness, startup; HTTP, TCP and
/// gRPC), named ports resolved against the container's own ports. A name
/// that resolves to nothing is skipped: kubelet cannot probe it either.
pub fn probe_ports(spec: &core::PodSpec) -> Vec<u16> {
    let mut ports = Vec::new();
    for c in &spec.containers {
        let probes = [&c.liveness_probe, &c.readiness_probe, &c.startup_probe];
        for probe in probes.into_iter().flatten() {
            let port = if let Some(http) = &probe.http_get {
                Some(http.port.clone())
            } else if let Some(tcp) = &probe.tcp_socket {
                Some(tcp.port.clone())
            } else {
                probe.grpc.as_ref().map(|g| IntOrString::Int(g.port))
            };
            let number = match port {
                Some(IntOrString::Int(n)) => u16::try_from(n).ok().filter(|n| *n != 0),
                Some(IntOrString::String(name)) => c
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .and_then(|p| u16::try_from(p.container_port).ok()),
                None => None,
            };
            if let Some(n) = number
                && !ports.contains(&n)
            {
                ports.push(n);
            }
        }
    }
    ports.sort_unstable();
    ports
}
