//! `HTTPRoute`: the Gateway API's HTTPRoute shape in our group, as Linkerd
//! has it in `policy.linkerd.io`. Its parent decides what it does:
//!
//! - a **Service** parent: *outbound* routing. Requests a meshed client
//!   sends to the Service are matched (path, method, headers) and sent to
//!   the rule's `backendRefs` by weight (a canary split), with its timeouts
//!   and retries;
//! - a **Server** parent: an *inbound* route of that Server, the target of
//!   route-level AuthorizationPolicies.
//!
//! Only the fields the mesh acts on are modelled; like the API server with a
//! structural schema, unknown fields are dropped.

use crate::PolicyStatus;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "policy.weft.io",
    version = "v1alpha1",
    kind = "HTTPRoute",
    namespaced,
    status = "PolicyStatus",
    shortname = "httproute"
)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteSpec {
    /// What the route attaches to: Services (outbound) or Servers (inbound).
    pub parent_refs: Vec<ParentRef>,
    /// Evaluated in order of Gateway API precedence (the most specific
    /// match wins); a request no rule matches is answered 404.
    #[serde(default)]
    pub rules: Vec<HTTPRouteRule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// `""`/`core` for a Service, `policy.weft.io` for a Server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `Service` (the default) or `Server`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    /// Defaults to the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// A Service port the route applies to; unset: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteRule {
    /// Names the rule in metrics (`route` label: `<route>/<rule name>`);
    /// unnamed rules are numbered from 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one must match; none at all matches every request (`/` prefix).
    #[serde(default)]
    pub matches: Vec<HTTPRouteMatch>,
    /// Where matching requests go, by weight; none: the parent Service.
    #[serde(default)]
    pub backend_refs: Vec<HTTPBackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HTTPRouteTimeouts>,
    /// Retries (Gateway API's `HTTPRouteRetry`): a request that fails with
    /// one of `codes`, or cannot connect, is tried again, up to `attempts`
    /// more times and within the proxy's retry budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<HTTPRouteRetry>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HTTPPathMatch>,
    /// All must match.
    #[serde(default)]
    pub headers: Vec<HTTPHeaderMatch>,
    /// `GET`, `POST`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPPathMatch {
    /// `PathPrefix` (the default), `Exact` or `RegularExpression`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub match_type: Option<String>,
    /// Defaults to `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPHeaderMatch {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub match_type: Option<String>,
    /// Case-insensitive, as HTTP header names are.
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPBackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `Service` (the default; the only kind supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    /// Defaults to the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The Service port; defaults to the port the client dialled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Share of the rule's requests, relative to the other backends'
    /// (default 1; 0 sends nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// Gateway API durations: a number and a unit (`h`, `m`, `s`, `ms`), e.g.
/// `10s`, `1500ms`, `1m30s`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteTimeouts {
    /// The whole request, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// One attempt to a backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteRetry {
    /// HTTP statuses that are retried (e.g. 500, 502, 503); empty: 5xx.
    #[serde(default)]
    pub codes: Vec<u16>,
    /// gRPC statuses that are retried, for gRPC requests, by name as in
    /// the gRPC spec (`UNAVAILABLE`, `RESOURCE_EXHAUSTED`; kebab-case as
    /// Linkerd and Envoy write them is accepted too); empty:
    /// `CANCELLED`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED` and
    /// `UNAVAILABLE`. Not a Gateway API field yet (GEP-3440 proposes one
    /// for GRPCRoute).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grpc_codes: Vec<String>,
    /// Retries after the first attempt (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Pause before each retry (a duration, as timeouts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}
