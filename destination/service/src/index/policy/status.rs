//! What the index says about each policy object: in effect or not, and why.
//! On Kubernetes this becomes the object's `Accepted` status condition.

use crate::index::ProblemKind;
use crate::model::{Kind, ObjectKey};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Why a policy object is not in effect. Each is a [`ProblemKind`] (logged,
/// and counted in `weft_destination_index_problems` and
/// `weft_destination_ineffective_policies`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ineffective {
    /// A reference names an object that does not exist.
    DanglingReference,
    /// A reference of a kind (or group) Weft does not support.
    UnsupportedKind,
    /// A value that does not make sense (a bad CIDR or identity, a selector
    /// operator Kubernetes does not know), or a reference to such an object.
    Invalid,
}

impl Ineffective {
    pub const ALL: [Ineffective; 3] = [
        Ineffective::DanglingReference,
        Ineffective::UnsupportedKind,
        Ineffective::Invalid,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Ineffective::DanglingReference => "dangling_reference",
            Ineffective::UnsupportedKind => "unsupported_kind",
            Ineffective::Invalid => "invalid",
        }
    }

    pub fn problem(self) -> ProblemKind {
        match self {
            Ineffective::DanglingReference => ProblemKind::PolicyDanglingReference,
            Ineffective::UnsupportedKind => ProblemKind::PolicyUnsupportedKind,
            Ineffective::Invalid => ProblemKind::PolicyInvalid,
        }
    }

    /// The condition's `reason` (CamelCase, as conventions want).
    pub fn condition_reason(self) -> &'static str {
        match self {
            Ineffective::DanglingReference => "DanglingReference",
            Ineffective::UnsupportedKind => "UnsupportedKind",
            Ineffective::Invalid => "Invalid",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyStatus {
    pub kind: Kind,
    pub key: ObjectKey,
    /// `None`: accepted (in effect).
    pub ineffective: Option<(Ineffective, String)>,
    /// The object's `metadata.generation` this judges.
    pub generation: Option<i64>,
}

impl PolicyStatus {
    /// The `Accepted` condition to write on the object.
    pub fn condition(&self, observed_generation: Option<i64>, now: Time) -> Condition {
        let (status, reason, message) = match &self.ineffective {
            None => ("True", "Accepted", "in effect".to_string()),
            Some((why, message)) => ("False", why.condition_reason(), message.clone()),
        };
        Condition {
            type_: "Accepted".into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation,
            last_transition_time: now,
        }
    }
}
