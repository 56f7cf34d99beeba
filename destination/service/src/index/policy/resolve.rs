//! Resolves policy objects into what the data plane evaluates: a Server's
//! selector and port, an AuthorizationPolicy's target and requirements.
//! Anything that does not resolve is an error naming the fix; the caller
//! leaves that object out (which can only deny more) and reports it.

use super::networks::Cidr;
use super::selector::Selector;
use super::status::Ineffective;
use crate::model::ObjectKey;
use crate::policy_model::{AuthorizationObject, MeshTlsObject, NetworkAuthnObject, ServerObject};
use crate::store::ClusterObjects;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_destination_api::{Authorization, Requirement, spiffe_id};
use weft_policy_api::GROUP;

pub type Failure = (Ineffective, String);

/// A Server that makes sense.
#[derive(Clone, Debug)]
pub struct ValidServer<'a> {
    pub object: &'a ServerObject,
    pub selector: Selector,
    pub port: ServerPort,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ServerPort {
    Number(u16),
    Name(String),
}

pub fn server(object: &ServerObject) -> Result<ValidServer<'_>, Failure> {
    let selector =
        Selector::parse(&object.spec.pod_selector).map_err(|e| (Ineffective::Invalid, e))?;
    let port = server_port(object)?;
    Ok(ValidServer {
        object,
        selector,
        port,
    })
}

/// What an invalid Server still fences off: when only its selector is
/// wrong, the pods it may have meant (a superset) on its port. The index
/// applies `deny` there with no authorizations, so a typo in a Server
/// refuses more rather than falling back to a (wider) default policy. A
/// Server whose port is invalid names no port a client can reach, so it
/// fences nothing.
pub fn fenced_server(object: &ServerObject) -> Option<ValidServer<'_>> {
    Some(ValidServer {
        object,
        selector: Selector::parse_superset(&object.spec.pod_selector),
        port: server_port(object).ok()?,
    })
}

fn server_port(object: &ServerObject) -> Result<ServerPort, Failure> {
    Ok(match &object.spec.port {
        IntOrString::Int(n) => {
            ServerPort::Number(u16::try_from(*n).ok().filter(|n| *n != 0).ok_or_else(|| {
                (
                    Ineffective::Invalid,
                    format!("port {n} is not a port (1-65535)"),
                )
            })?)
        }
        IntOrString::String(s) if s.is_empty() => {
            return Err((
                Ineffective::Invalid,
                "port is empty: name a container port or give its number".into(),
            ));
        }
        IntOrString::String(s) => match s.parse::<i32>() {
            Ok(n) => {
                ServerPort::Number(u16::try_from(n).ok().filter(|n| *n != 0).ok_or_else(|| {
                    (
                        Ineffective::Invalid,
                        format!("port {n} is not a port (1-65535)"),
                    )
                })?)
            }
            Err(_) => ServerPort::Name(s.clone()),
        },
    })
}

/// A group an operator may leave out or spell as ours.
pub(super) fn ours(group: &Option<String>) -> bool {
    matches!(group.as_deref(), None | Some("") | Some(GROUP))
}

/// The core group (ServiceAccount, Namespace).
pub(super) fn core(group: &Option<String>) -> bool {
    matches!(group.as_deref(), None | Some("") | Some("core"))
}

/// A MeshTLSAuthentication's identity patterns.
pub fn mesh_tls(object: &MeshTlsObject, trust_domain: &str) -> Result<Vec<String>, Failure> {
    let spec = &object.spec;
    if spec.identities.is_empty() && spec.identity_refs.is_empty() {
        return Err((
            Ineffective::Invalid,
            "names no identity: set identities or identityRefs".into(),
        ));
    }
    let mut patterns = Vec::new();
    for identity in &spec.identities {
        let well_formed = identity == "*"
            || identity
                .strip_prefix("spiffe://")
                .is_some_and(|rest| !rest.is_empty() && !rest.contains("**"));
        if !well_formed {
            return Err((
                Ineffective::Invalid,
                format!(
                    "identity {identity:?} is neither `*` nor a SPIFFE ID \
                     (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, `*` allowed)"
                ),
            ));
        }
        // Matched for every connection on a shared proxy: bounded.
        if let Some(problem) = weft_destination_api::policy::identity_pattern_problem(identity) {
            return Err((
                Ineffective::Invalid,
                format!("identity {identity:?} {problem}"),
            ));
        }
        patterns.push(identity.clone());
    }
    for r in &spec.identity_refs {
        match r.kind.as_str() {
            "ServiceAccount" if core(&r.group) => {
                let ns = r.namespace.as_deref().unwrap_or(&object.key.namespace);
                patterns.push(spiffe_id(trust_domain, ns, &r.name));
            }
            "Namespace" if core(&r.group) => {
                patterns.push(format!("spiffe://{trust_domain}/ns/{}/sa/*", r.name));
            }
            kind => {
                return Err((
                    Ineffective::UnsupportedKind,
                    format!(
                        "identityRefs: kind {kind:?} (group {:?}) is not supported; use ServiceAccount or Namespace",
                        r.group.as_deref().unwrap_or("")
                    ),
                ));
            }
        }
    }
    Ok(patterns)
}

/// A NetworkAuthentication's networks.
pub fn network_authn(
    object: &NetworkAuthnObject,
) -> Result<Vec<weft_destination_api::Network>, Failure> {
    if object.spec.networks.is_empty() {
        return Err((Ineffective::Invalid, "networks is empty".into()));
    }
    let mut out = Vec::new();
    for n in &object.spec.networks {
        let cidr: Cidr = n
            .cidr
            .parse()
            .map_err(|e| (Ineffective::Invalid, format!("{e}")))?;
        let mut except = Vec::new();
        for e in &n.except {
            let sub: Cidr = e
                .parse()
                .map_err(|e| (Ineffective::Invalid, format!("except: {e}")))?;
            if !cidr.covers(&sub) {
                return Err((
                    Ineffective::Invalid,
                    format!("except {sub} is not inside cidr {cidr}"),
                ));
            }
            except.push(sub.to_network(vec![]));
        }
        out.push(cidr.to_network(except));
    }
    Ok(out)
}

/// What an AuthorizationPolicy applies to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// One Server (its key).
    Server(ObjectKey),
    /// Every Server of this namespace.
    Namespace(String),
    /// Requests matching one HTTPRoute whose parent is a Server.
    Route(ObjectKey),
}

/// What an AuthorizationPolicy may target, as the index resolved it:
/// `None` when it does not exist, else whether it is valid (`Err`: why not).
pub struct Targets<'a> {
    pub servers: &'a dyn Fn(&ObjectKey) -> Option<Result<(), String>>,
    /// `Ok(true)`: a valid route with a Server parent.
    pub routes: &'a dyn Fn(&ObjectKey) -> Option<Result<bool, String>>,
}

/// Resolves an AuthorizationPolicy: its target and every requirement. The
/// authentications it names must exist and be valid themselves.
pub fn authorization(
    object: &AuthorizationObject,
    objects: &ClusterObjects,
    targets: &Targets<'_>,
    trust_domain: &str,
) -> Result<(Target, Authorization), Failure> {
    let ns = &object.key.namespace;
    let t = &object.spec.target_ref;
    let target = match t.kind.as_str() {
        "Server" if ours(&t.group) => {
            let key = ObjectKey::new(ns, &t.name);
            match (targets.servers)(&key) {
                None => {
                    return Err((
                        Ineffective::DanglingReference,
                        format!("targetRef: Server {key} does not exist"),
                    ));
                }
                Some(Err(why)) => {
                    return Err((
                        Ineffective::Invalid,
                        format!("targetRef: Server {key} is invalid: {why}"),
                    ));
                }
                Some(Ok(())) => Target::Server(key),
            }
        }
        "Namespace" if core(&t.group) => {
            if &t.name != ns {
                return Err((
                    Ineffective::Invalid,
                    format!(
                        "targetRef: Namespace {:?} is not the policy's own namespace {ns:?}",
                        t.name
                    ),
                ));
            }
            Target::Namespace(ns.clone())
        }
        "HTTPRoute" if ours(&t.group) => {
            let key = ObjectKey::new(ns, &t.name);
            match (targets.routes)(&key) {
                None => {
                    return Err((
                        Ineffective::DanglingReference,
                        format!("targetRef: HTTPRoute {key} does not exist"),
                    ));
                }
                Some(Err(why)) => {
                    return Err((
                        Ineffective::Invalid,
                        format!("targetRef: HTTPRoute {key} is invalid: {why}"),
                    ));
                }
                Some(Ok(false)) => {
                    return Err((
                        Ineffective::Invalid,
                        format!(
                            "targetRef: HTTPRoute {key} has no Server parent; route-level \
                             authorization needs a route whose parentRef is a Server"
                        ),
                    ));
                }
                Some(Ok(true)) => Target::Route(key),
            }
        }
        kind => {
            return Err((
                Ineffective::UnsupportedKind,
                format!(
                    "targetRef: kind {kind:?} (group {:?}) is not supported; use Server, Namespace or HTTPRoute",
                    t.group.as_deref().unwrap_or("")
                ),
            ));
        }
    };
    let mut requirements = Vec::new();
    for r in &object.spec.required_authentication_refs {
        let ref_ns = r.namespace.as_deref().unwrap_or(ns);
        let key = ObjectKey::new(ref_ns, &r.name);
        let requirement = match r.kind.as_str() {
            "MeshTLSAuthentication" if ours(&r.group) => {
                let Some(authn) = objects.mesh_tls_authentications.get(&key) else {
                    return Err((
                        Ineffective::DanglingReference,
                        format!(
                            "requiredAuthenticationRefs: MeshTLSAuthentication {key} does not exist"
                        ),
                    ));
                };
                let identities = mesh_tls(authn, trust_domain).map_err(|(_, why)| {
                    (
                        Ineffective::Invalid,
                        format!("requiredAuthenticationRefs: MeshTLSAuthentication {key} is invalid: {why}"),
                    )
                })?;
                Requirement {
                    source: format!("MeshTLSAuthentication {key}"),
                    identities,
                    networks: vec![],
                }
            }
            "NetworkAuthentication" if ours(&r.group) => {
                let Some(authn) = objects.network_authentications.get(&key) else {
                    return Err((
                        Ineffective::DanglingReference,
                        format!(
                            "requiredAuthenticationRefs: NetworkAuthentication {key} does not exist"
                        ),
                    ));
                };
                let networks = network_authn(authn).map_err(|(_, why)| {
                    (
                        Ineffective::Invalid,
                        format!("requiredAuthenticationRefs: NetworkAuthentication {key} is invalid: {why}"),
                    )
                })?;
                Requirement {
                    source: format!("NetworkAuthentication {key}"),
                    identities: vec![],
                    networks,
                }
            }
            "ServiceAccount" if core(&r.group) => Requirement {
                source: format!("ServiceAccount {key}"),
                identities: vec![spiffe_id(trust_domain, ref_ns, &r.name)],
                networks: vec![],
            },
            kind => {
                return Err((
                    Ineffective::UnsupportedKind,
                    format!(
                        "requiredAuthenticationRefs: kind {kind:?} (group {:?}) is not supported; \
                         use MeshTLSAuthentication, NetworkAuthentication or ServiceAccount",
                        r.group.as_deref().unwrap_or("")
                    ),
                ));
            }
        };
        requirements.push(requirement);
    }
    Ok((
        target,
        Authorization {
            policy: object.key.to_string(),
            requirements,
        },
    ))
}
