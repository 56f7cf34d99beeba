//! The index: a pure function from the cluster's objects to every node's
//! view. No I/O, no clock, no state between calls: the same objects always
//! give the same views, which is what lets the tests drive it with object
//! JSON alone and lets the publisher compare results to find what changed.
//!
//! [`build`] is linear in the cluster. The indexer uses it once, through
//! [`Incremental`], which then recomputes only what each change affects
//! and is tested against [`build`] after every step of random change
//! sequences (`incremental_tests`).

mod addresses;
pub mod incremental;
pub mod policy;
mod problems;
mod services;
mod workloads;

pub use incremental::Incremental;
pub use problems::{Problem, ProblemKind};

use crate::store::ClusterObjects;
use crate::views::{LocalView, MeshView, Namespaces};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Where Service endpoints come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointsFrom {
    /// Computed from Service selectors over pods, as the endpoints
    /// controller would (local mode: no controller runs).
    Selectors,
    /// Read from EndpointSlices (on Kubernetes).
    EndpointSlices,
}

#[derive(Clone, Debug)]
pub struct IndexConfig {
    pub trust_domain: String,
    pub cluster_domain: String,
    pub endpoints: EndpointsFrom,
    /// The cluster-wide default inbound policy (`--default-inbound-policy`).
    pub default_policy: weft_policy_api::DefaultPolicy,
    /// The networks `cluster-*` policies admit (`--cluster-networks`).
    pub cluster_networks: Vec<policy::networks::Cidr>,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            trust_domain: weft_destination_api::DEFAULT_TRUST_DOMAIN.into(),
            cluster_domain: "cluster.local".into(),
            endpoints: EndpointsFrom::EndpointSlices,
            default_policy: weft_policy_api::DefaultPolicy::AllUnauthenticated,
            cluster_networks: policy::default_cluster_networks(),
        }
    }
}

/// Everything the index computes.
#[derive(Debug, Default)]
pub struct Index {
    pub mesh: Arc<MeshView>,
    /// Nodes with at least one pod. Any other node's view is empty.
    pub nodes: BTreeMap<String, Arc<LocalView>>,
    /// The namespaces in the mesh (every node's view carries them).
    pub enrolled_namespaces: Namespaces,
    /// Inconsistencies found (served around, reported).
    pub problems: Vec<Problem>,
    /// Whether each policy object is in effect (its `Accepted` condition).
    /// Shared: unchanged from one generation to the next unless a policy
    /// object (or what one refers to) changed.
    pub policy_statuses: Arc<Vec<policy::status::PolicyStatus>>,
}

impl Index {
    pub fn local(&self, node: &str) -> Arc<LocalView> {
        // One shared empty view: a node without pods keeps the same view
        // from one generation to the next (and its subscribers sleep).
        static EMPTY: std::sync::LazyLock<Arc<LocalView>> = std::sync::LazyLock::new(Arc::default);
        self.nodes
            .get(node)
            .cloned()
            .unwrap_or_else(|| EMPTY.clone())
    }

    /// What `node` is sent (version aside).
    pub fn node_view(&self, node: &str) -> crate::views::NodeView {
        crate::views::NodeView::new(&self.mesh, self.local(node), &self.enrolled_namespaces)
    }
}

pub fn build(objects: &ClusterObjects, config: &IndexConfig) -> Index {
    let mut problems = Vec::new();
    let owners = addresses::assign(objects, &mut problems);
    let workloads = workloads::build(objects, config, &owners, &mut problems);
    let routes = policy::routes::resolve(objects);
    let services = services::build(
        objects,
        config,
        &workloads,
        policy::routes::by_service(&routes),
        &mut problems,
    );

    let placed_pods = workloads
        .placed
        .keys()
        .filter_map(|key| objects.pods.get(*key));
    let policies = policy::build(objects, config, placed_pods, &routes, &mut problems);

    let mut nodes: BTreeMap<String, LocalView> = BTreeMap::new();
    let mut mesh = MeshView {
        workloads: BTreeMap::new(),
        services,
        lineage: Default::default(),
    };
    for (key, w) in &workloads.placed {
        let local = nodes.entry(w.node.clone()).or_default();
        local.workloads.insert(w.uid.clone(), w.clone());
        if let Some(p) = policies.pods.get(key) {
            local.policies.insert(key.to_string(), p.clone());
        }
        if w.enrolled {
            local.has_enrolled = true;
            mesh.workloads.insert(w.uid.clone(), w.clone());
        }
    }
    problems.sort();
    Index {
        mesh: Arc::new(mesh),
        nodes: nodes.into_iter().map(|(n, v)| (n, Arc::new(v))).collect(),
        enrolled_namespaces: Arc::new(
            workloads::enrolled_namespaces(objects)
                .into_iter()
                .map(str::to_string)
                .collect(),
        ),
        problems,
        policy_statuses: Arc::new(policies.statuses),
    }
}

#[cfg(test)]
mod incremental_tests;
#[cfg(test)]
mod tests;
