//! The policy CRDs of Weft, API group `policy.weft.io`, version `v1alpha1`.
//!
//! The model is Linkerd's (`policy.linkerd.io`): same kinds, same fields,
//! same semantics, so an operator migrates by replacing the API group. See
//! `docs/policy.md`. These are plain data types; what they mean for a pod's
//! inbound traffic is decided by the destination service's policy index and
//! evaluated by `weft_destination_api::policy::authorize`.
//!
//! The YAML in `crds/` is generated from these types ([`crd::render`],
//! `cargo xtask crds`); a test fails when it is stale.

pub mod authentication;
pub mod authorization;
pub mod crd;
pub mod examples;
pub mod route;
pub mod server;
mod status;

pub use authentication::{
    IdentityRef, MeshTLSAuthentication, MeshTLSAuthenticationSpec, Network, NetworkAuthentication,
    NetworkAuthenticationSpec,
};
pub use authorization::{
    AuthenticationRef, AuthorizationPolicy, AuthorizationPolicySpec, TargetRef,
};
pub use route::{
    HTTPBackendRef, HTTPHeaderMatch, HTTPPathMatch, HTTPRoute, HTTPRouteMatch, HTTPRouteRetry,
    HTTPRouteRule, HTTPRouteSpec, HTTPRouteTimeouts, ParentRef,
};
pub use server::{DefaultPolicy, ProxyProtocol, Server, ServerSpec};
pub use status::PolicyStatus;

/// The API group of every kind here (design.md).
pub const GROUP: &str = "policy.weft.io";
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of the objects: `policy.weft.io/v1alpha1`.
pub const API_VERSION: &str = "policy.weft.io/v1alpha1";
