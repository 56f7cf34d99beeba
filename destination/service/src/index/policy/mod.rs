//! The policy index: from the policy objects, the namespaces and the pods,
//! each placed pod's inbound [`Policy`] (docs/policy.md).
//!
//! Per pod: its default policy (pod annotation, else namespace annotation,
//! else the cluster default), the Servers that select its ports with the
//! AuthorizationPolicies in effect for each, its probe ports and the
//! addresses probes come from. Objects that do not resolve are left out
//! and reported; leaving out an authorization can only refuse more.

pub mod networks;
mod resolve;
pub mod routes;
mod selector;
pub mod status;
#[cfg(test)]
mod tests;

use super::{IndexConfig, Problem, ProblemKind};
use crate::model::{Kind, ObjectKey, PodInfo};
use crate::store::ClusterObjects;
use networks::Cidr;
use resolve::{Failure, ServerPort, Target, Targets, ValidServer};
use routes::ResolvedRoute;
use status::PolicyStatus;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use weft_destination_api::{
    Authorization, DefaultPolicy, InboundRoute, Policy, PolicyServer, address,
};
use weft_policy_api::DefaultPolicy as CrdPolicy;

/// What the policy index computes.
#[derive(Debug, Default)]
pub struct PolicyIndex<'a> {
    /// By pod key.
    pub pods: BTreeMap<&'a ObjectKey, Arc<Policy>>,
    /// One per policy object, ordered by kind and key.
    pub statuses: Vec<PolicyStatus>,
}

pub fn proto_policy(p: CrdPolicy) -> DefaultPolicy {
    match p {
        CrdPolicy::AllUnauthenticated => DefaultPolicy::AllUnauthenticated,
        CrdPolicy::AllAuthenticated => DefaultPolicy::AllAuthenticated,
        CrdPolicy::ClusterAuthenticated => DefaultPolicy::ClusterAuthenticated,
        CrdPolicy::ClusterUnauthenticated => DefaultPolicy::ClusterUnauthenticated,
        CrdPolicy::Deny => DefaultPolicy::Deny,
        CrdPolicy::Audit => DefaultPolicy::Audit,
    }
}

pub type Routes = BTreeMap<ObjectKey, Result<ResolvedRoute, Failure>>;

pub fn build<'a>(
    objects: &'a ClusterObjects,
    config: &IndexConfig,
    pods: impl Iterator<Item = &'a PodInfo>,
    routes: &'a Routes,
    problems: &mut Vec<Problem>,
) -> PolicyIndex<'a> {
    let mut statuses = Vec::new();
    let context = Context::new(
        objects,
        config,
        routes,
        None,
        Some((&mut statuses, &mut *problems)),
    );
    let mut out = BTreeMap::new();
    for pod in pods {
        out.insert(&pod.key, context.pod_policy(pod, problems));
    }
    PolicyIndex {
        pods: out,
        statuses,
    }
}

/// What the policy of a pod is computed from: the Servers and the
/// AuthorizationPolicies of a namespace (or of all), resolved once for
/// many pods. A pod's policy depends only on its own namespace's Servers,
/// AuthorizationPolicies and HTTPRoutes (references never cross
/// namespaces, except to the authentications an AuthorizationPolicy
/// requires), its Namespace, and itself: what lets the incremental index
/// recompute only the pods of the namespaces a change touches.
pub struct Context<'a> {
    objects: &'a ClusterObjects,
    routes: &'a Routes,
    valid: Vec<ValidServer<'a>>,
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<usize>>,
    any_labels: HashMap<&'a str, Vec<usize>>,
    fenced: HashMap<&'a str, Vec<ValidServer<'a>>>,
    by_target: BTreeMap<Target, Vec<Authorization>>,
    cluster_networks: Vec<weft_destination_api::Network>,
    cluster_default: DefaultPolicy,
}

/// The objects of `map` in namespace `scope` (all of them: `None`).
fn in_scope<'m, V>(
    map: &'m BTreeMap<ObjectKey, V>,
    scope: Option<&'m str>,
) -> Box<dyn Iterator<Item = (&'m ObjectKey, &'m V)> + 'm> {
    match scope {
        None => Box::new(map.iter()),
        Some(ns) => Box::new(
            map.range(ObjectKey::new(ns, "")..)
                .take_while(move |(k, _)| k.namespace == ns),
        ),
    }
}

impl<'a> Context<'a> {
    /// `scope`: the namespace whose pods will be asked about (`None`:
    /// every namespace). `report`: where to record every policy object's
    /// status and problems (only meaningful with `scope` `None`).
    pub fn new(
        objects: &'a ClusterObjects,
        config: &IndexConfig,
        routes: &'a Routes,
        scope: Option<&'a str>,
        mut report: Option<(&mut Vec<PolicyStatus>, &mut Vec<Problem>)>,
    ) -> Self {
        let td = &config.trust_domain;
        let mut report = |kind: Kind,
                          key: &ObjectKey,
                          generation: Option<i64>,
                          failure: Option<resolve::Failure>| {
            let Some((statuses, problems)) = report.as_mut() else {
                return;
            };
            if let Some((why, detail)) = &failure {
                problems.push(Problem {
                    kind: why.problem(),
                    object: format!("{kind} {key}"),
                    detail: format!("{detail}; the policy is not in effect (it grants nothing)"),
                });
            }
            statuses.push(PolicyStatus {
                kind,
                key: key.clone(),
                ineffective: failure,
                generation,
            });
        };

        // Servers.
        let mut servers: BTreeMap<&ObjectKey, Result<ValidServer<'_>, String>> = BTreeMap::new();
        for (key, object) in in_scope(&objects.servers, scope) {
            let valid = resolve::server(object);
            report(
                Kind::Server,
                key,
                object.generation,
                valid.as_ref().err().cloned(),
            );
            servers.insert(key, valid.map_err(|(_, why)| why));
        }
        if scope.is_none() {
            // Authentications are reported on their own, and again through
            // each policy that uses them.
            for (key, object) in &objects.mesh_tls_authentications {
                report(
                    Kind::MeshTLSAuthentication,
                    key,
                    object.generation,
                    resolve::mesh_tls(object, td).err(),
                );
            }
            for (key, object) in &objects.network_authentications {
                report(
                    Kind::NetworkAuthentication,
                    key,
                    object.generation,
                    resolve::network_authn(object).err(),
                );
            }
            for (key, route) in routes {
                let generation = objects.http_routes.get(key).and_then(|o| o.generation);
                report(
                    Kind::HTTPRoute,
                    key,
                    generation,
                    route.as_ref().err().cloned(),
                );
            }
        }
        // AuthorizationPolicies, grouped by what they target (always in
        // their own namespace).
        let server_state = |key: &ObjectKey| {
            servers
                .get(key)
                .map(|r| r.as_ref().map(|_| ()).map_err(Clone::clone))
        };
        let route_state = |key: &ObjectKey| {
            routes.get(key).map(|r| {
                r.as_ref()
                    .map(|r| !r.servers.is_empty())
                    .map_err(|(_, why)| why.clone())
            })
        };
        let targets = Targets {
            servers: &server_state,
            routes: &route_state,
        };
        let mut by_target: BTreeMap<Target, Vec<Authorization>> = BTreeMap::new();
        for (key, object) in in_scope(&objects.authorization_policies, scope) {
            match resolve::authorization(object, objects, &targets, td) {
                Ok((target, authz)) => {
                    report(Kind::AuthorizationPolicy, key, object.generation, None);
                    by_target.entry(target).or_default().push(authz);
                }
                Err(failure) => report(
                    Kind::AuthorizationPolicy,
                    key,
                    object.generation,
                    Some(failure),
                ),
            }
        }

        // Servers only select pods of their own namespace, and most require
        // a label: index them by (namespace, one required label) so that a
        // pod is matched against the few Servers that can select it, not
        // against every Server of its namespace.
        let mut valid = Vec::new();
        let mut by_label: HashMap<(&str, &str, &str), Vec<usize>> = HashMap::new();
        let mut any_labels: HashMap<&str, Vec<usize>> = HashMap::new();
        // Invalid Servers fail closed on what they may have selected.
        let mut fenced: HashMap<&str, Vec<ValidServer<'_>>> = HashMap::new();
        for (key, server) in servers {
            let ns = key.namespace.as_str();
            match server {
                Ok(server) => {
                    // The selector's required label is its first
                    // `matchLabels` pair, read from the object (which
                    // outlives the context).
                    let required = server
                        .object
                        .spec
                        .pod_selector
                        .match_labels
                        .as_ref()
                        .and_then(|m| m.iter().next());
                    debug_assert_eq!(
                        required.map(|(k, v)| (k.as_str(), v.as_str())),
                        server.selector.required_label()
                    );
                    match required {
                        Some((k, v)) => by_label
                            .entry((ns, k.as_str(), v.as_str()))
                            .or_default()
                            .push(valid.len()),
                        None => any_labels.entry(ns).or_default().push(valid.len()),
                    }
                    valid.push(server);
                }
                Err(_) => {
                    if let Some(f) = objects.servers.get(key).and_then(resolve::fenced_server) {
                        fenced.entry(ns).or_default().push(f);
                    }
                }
            }
        }
        Context {
            objects,
            routes,
            valid,
            by_label,
            any_labels,
            fenced,
            by_target,
            cluster_networks: config
                .cluster_networks
                .iter()
                .map(|c| c.to_network(vec![]))
                .collect(),
            cluster_default: proto_policy(config.default_policy),
        }
    }

    /// The inbound policy of `pod` (of a namespace in the context's scope).
    pub fn pod_policy(&self, pod: &PodInfo, problems: &mut Vec<Problem>) -> Arc<Policy> {
        let objects = self.objects;
        let routes = self.routes;
        let by_target = &self.by_target;
        let default = default_policy(objects, pod, self.cluster_default, problems);
        let mut selected: BTreeMap<u16, Vec<&ValidServer<'_>>> = BTreeMap::new();
        let ns = pod.key.namespace.as_str();
        // Each Server is indexed once, and a pod has one value per label
        // key: no Server comes up twice.
        let candidates = self.any_labels.get(ns).into_iter().flatten().chain(
            pod.labels
                .iter()
                .filter_map(|(k, v)| self.by_label.get(&(ns, k.as_str(), v.as_str())))
                .flatten(),
        );
        for server in candidates.map(|i| &self.valid[*i]) {
            if !server.selector.matches(&pod.labels) {
                continue;
            }
            let port = port_of(server, pod);
            if let Some(port) = port {
                selected.entry(port).or_default().push(server);
            }
        }
        let mut fenced_ports: BTreeMap<u16, &ValidServer<'_>> = BTreeMap::new();
        for server in self.fenced.get(ns).into_iter().flatten() {
            if !server.selector.matches(&pod.labels) {
                continue;
            }
            let port = port_of(server, pod);
            // A valid Server on the same port decides there.
            if let Some(port) = port.filter(|p| !selected.contains_key(p)) {
                fenced_ports.entry(port).or_insert(server);
            }
        }
        let mut policy_servers = Vec::new();
        for (port, mut candidates) in selected {
            // Two Servers on one port: the older wins, as in Linkerd.
            candidates.sort_by(|a, b| {
                (&a.object.created, &a.object.key).cmp(&(&b.object.created, &b.object.key))
            });
            let winner = candidates[0];
            for loser in &candidates[1..] {
                problems.push(Problem {
                kind: ProblemKind::ServerConflict,
                object: format!("Server {}", loser.object.key),
                detail: format!(
                    "selects port {port} of pod {} like the older Server {}, which applies there",
                    pod.key, winner.object.key.name
                ),
            });
            }
            let mut authorizations: Vec<Authorization> = Vec::new();
            for target in [
                Target::Server(winner.object.key.clone()),
                Target::Namespace(pod.key.namespace.clone()),
            ] {
                authorizations.extend(by_target.get(&target).into_iter().flatten().cloned());
            }
            authorizations.sort_by(|a, b| a.policy.cmp(&b.policy));
            let routes = inbound_routes(routes, &winner.object.key, by_target);
            policy_servers.push(PolicyServer {
                name: winner.object.key.name.clone(),
                port: port.into(),
                access_policy: proto_policy(winner.object.spec.access_policy) as i32,
                proxy_protocol: winner
                    .object
                    .spec
                    .proxy_protocol
                    .map(|p| {
                        serde_json::to_value(p)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default()
                    })
                    .unwrap_or_default(),
                authorizations,
                routes,
            });
        }
        for (port, server) in fenced_ports {
            policy_servers.push(PolicyServer {
                name: server.object.key.name.clone(),
                port: port.into(),
                access_policy: DefaultPolicy::Deny as i32,
                proxy_protocol: String::new(),
                authorizations: Vec::new(),
                routes: Vec::new(),
            });
        }
        policy_servers.sort_by_key(|s| s.port);
        Arc::new(Policy {
            name: pod.key.name.clone(),
            namespace: pod.key.namespace.clone(),
            workload_uid: pod.uid.clone(),
            default_policy: default as i32,
            cluster_networks: self.cluster_networks.clone(),
            servers: policy_servers,
            probe_ports: pod.probe_ports.iter().map(|p| u32::from(*p)).collect(),
            probe_sources: pod.host_ips.iter().map(|ip| address::encode(*ip)).collect(),
        })
    }
}

/// The valid HTTPRoutes whose parent is `server`, each with the
/// AuthorizationPolicies targeting it.
fn inbound_routes(
    routes: &BTreeMap<ObjectKey, Result<ResolvedRoute, Failure>>,
    server: &ObjectKey,
    by_target: &BTreeMap<Target, Vec<Authorization>>,
) -> Vec<InboundRoute> {
    routes
        .iter()
        .filter_map(|(key, r)| Some((key, r.as_ref().ok()?)))
        .filter(|(_, r)| r.servers.contains(server))
        .map(|(key, r)| {
            let mut authorizations: Vec<Authorization> = by_target
                .get(&Target::Route(key.clone()))
                .cloned()
                .unwrap_or_default();
            authorizations.sort_by(|a, b| a.policy.cmp(&b.policy));
            InboundRoute {
                name: key.to_string(),
                matches: r
                    .rules
                    .iter()
                    .flat_map(|rule| rule.matches.clone())
                    .collect(),
                authorizations,
            }
        })
        .collect()
}

/// The port a Server selects on `pod`: its number, or the pod's container
/// port of that name (none: the Server does not select this pod).
fn port_of(server: &ValidServer<'_>, pod: &PodInfo) -> Option<u16> {
    match &server.port {
        ServerPort::Number(n) => Some(*n),
        ServerPort::Name(name) => pod.ports.iter().find(|p| &p.name == name).map(|p| p.port),
    }
}

/// Pod annotation, else namespace annotation, else the cluster default. A
/// value that is not a policy is reported and read as `deny`: a typo must
/// not fall back to a wider default.
fn default_policy(
    objects: &ClusterObjects,
    pod: &PodInfo,
    cluster: DefaultPolicy,
    problems: &mut Vec<Problem>,
) -> DefaultPolicy {
    let namespace = objects.namespaces.get(&pod.key.namespace);
    let (value, object) = match (
        &pod.default_policy,
        namespace.and_then(|ns| ns.default_policy.as_ref()),
    ) {
        (Some(v), _) => (v, format!("Pod {}", pod.key)),
        (None, Some(v)) => (v, format!("Namespace {}", pod.key.namespace)),
        (None, None) => return cluster,
    };
    match value.parse::<CrdPolicy>() {
        Ok(p) => proto_policy(p),
        Err(e) => {
            problems.push(Problem {
                kind: ProblemKind::InvalidDefaultPolicy,
                object,
                detail: format!(
                    "annotation {}: {e}; pod {} is served with deny",
                    crate::policy_model::DEFAULT_POLICY_ANNOTATION,
                    pod.key
                ),
            });
            DefaultPolicy::Deny
        }
    }
}

/// The cluster networks when none are configured.
pub fn default_cluster_networks() -> Vec<Cidr> {
    networks::parse_list(networks::DEFAULT_CLUSTER_NETWORKS).expect("the default list parses")
}
