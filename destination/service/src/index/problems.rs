//! Inconsistencies in the cluster's objects the index works around. Each is
//! reported (logged when it appears, counted by kind in
//! `weft_destination_index_problems`); none stops the rest being served.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProblemKind {
    /// Two pods claim one IP: the older keeps it, the other is served
    /// without it.
    DuplicateAddress,
    /// Two Services claim one ClusterIP: the older keeps it.
    DuplicateClusterIp,
    /// A Service with a selector has no endpoints.
    NoEndpoints,
    /// A pod runs as a ServiceAccount the manifests do not declare.
    MissingServiceAccount,
    /// An EndpointSlice points at a pod the index does not know.
    UnknownEndpointPod,
    /// A policy object names an object that does not exist: not in effect.
    PolicyDanglingReference,
    /// A policy object refers to a kind Weft does not support: not in effect.
    PolicyUnsupportedKind,
    /// A policy object holds a value that makes no sense: not in effect.
    PolicyInvalid,
    /// Two Servers select one port of a pod: the older applies.
    ServerConflict,
    /// A `weft.io/default-inbound-policy` annotation is not a policy: `deny`.
    InvalidDefaultPolicy,
    /// A `weft.io/opaque-ports` entry is not a port or range: ignored.
    InvalidOpaquePorts,
}

impl ProblemKind {
    pub const ALL: [ProblemKind; 11] = [
        ProblemKind::DuplicateAddress,
        ProblemKind::DuplicateClusterIp,
        ProblemKind::NoEndpoints,
        ProblemKind::MissingServiceAccount,
        ProblemKind::UnknownEndpointPod,
        ProblemKind::PolicyDanglingReference,
        ProblemKind::PolicyUnsupportedKind,
        ProblemKind::PolicyInvalid,
        ProblemKind::ServerConflict,
        ProblemKind::InvalidDefaultPolicy,
        ProblemKind::InvalidOpaquePorts,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::DuplicateAddress => "duplicate_address",
            ProblemKind::DuplicateClusterIp => "duplicate_cluster_ip",
            ProblemKind::NoEndpoints => "no_endpoints",
            ProblemKind::MissingServiceAccount => "missing_service_account",
            ProblemKind::UnknownEndpointPod => "unknown_endpoint_pod",
            ProblemKind::PolicyDanglingReference => "policy_dangling_reference",
            ProblemKind::PolicyUnsupportedKind => "policy_unsupported_kind",
            ProblemKind::PolicyInvalid => "policy_invalid",
            ProblemKind::ServerConflict => "server_conflict",
            ProblemKind::InvalidDefaultPolicy => "invalid_default_policy",
            ProblemKind::InvalidOpaquePorts => "invalid_opaque_ports",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Problem {
    pub kind: ProblemKind,
    /// `Kind namespace/name`.
    pub object: String,
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.detail)
    }
}
