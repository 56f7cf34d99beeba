//! Deciding one inbound connection against a workload's [`Policy`]: the
//! pure function the node proxy calls for every connection it accepts on a
//! pod's behalf (15008 with the client's verified identity, 15006 without).
//!
//! Order (docs/policy.md, "Evaluation"):
//! 1. a kubelet probe (from one of `probe_sources` to one of `probe_ports`)
//!    is allowed;
//! 2. when a Server selects the port, an authorization that the client
//!    satisfies allows it; otherwise the Server's `accessPolicy` decides;
//!    when that refuses and the client satisfies an authorization of one
//!    of the Server's routes, the connection is admitted *for those
//!    routes only* ([`Decision::routes_only`]): the proxy must then decide
//!    each request ([`crate::routing::InboundRoutes`]) and refuse the
//!    connection if it cannot (not HTTP);
//! 3. otherwise the workload's default policy decides.
//!
//! Anything the proxy cannot make sense of (an unknown enum value, a
//! malformed network, a requirement with nothing in it) matches nobody:
//! a garbled policy can only refuse more, never allow more.

use crate::address;
use crate::proto::{Authorization, DefaultPolicy, Network, Policy, PolicyServer, Requirement};
use std::fmt;
use std::net::IpAddr;
use weft_identity_api::SpiffeId;

/// Why a connection was allowed or refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A kubelet probe: from the node to a probe port.
    Probe,
    /// An AuthorizationPolicy (named in [`Decision::policy`]) is satisfied.
    Authorized,
    /// The default policy, or the Server's `accessPolicy`, allows it.
    DefaultAllows(DefaultPolicy),
    /// The default policy, or the Server's `accessPolicy`, refuses it.
    DefaultDenies(DefaultPolicy),
    /// `audit`: allowed, but `deny` would have refused it (log and count).
    Audit,
    /// An AuthorizationPolicy of one of the Server's routes is satisfied:
    /// admitted for its requests only, each decided by route.
    RoutesOnly,
}

impl Reason {
    /// For metric labels: `probe`, `authorized`, `default_allow`,
    /// `default_deny`, `audit`, `routes_only`.
    pub fn as_label(self) -> &'static str {
        match self {
            Reason::Probe => "probe",
            Reason::Authorized => "authorized",
            Reason::DefaultAllows(_) => "default_allow",
            Reason::DefaultDenies(_) => "default_deny",
            Reason::Audit => "audit",
            Reason::RoutesOnly => "routes_only",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::DefaultAllows(p) | Reason::DefaultDenies(p) => {
                write!(f, "{} ({})", self.as_label(), policy_name(*p))
            }
            _ => f.write_str(self.as_label()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    /// The Server that selects the port, if any.
    pub server: Option<String>,
    /// The AuthorizationPolicy (`namespace/name`) that allowed it, if any.
    pub policy: Option<String>,
    /// Allowed only because a route-level policy admits the client: every
    /// request must be authorized by route, and a connection that is not
    /// HTTP refused.
    pub routes_only: bool,
}

/// The name operators write (`all-authenticated`, …).
pub fn policy_name(p: DefaultPolicy) -> &'static str {
    match p {
        DefaultPolicy::Unspecified => "unspecified",
        DefaultPolicy::AllUnauthenticated => "all-unauthenticated",
        DefaultPolicy::AllAuthenticated => "all-authenticated",
        DefaultPolicy::ClusterAuthenticated => "cluster-authenticated",
        DefaultPolicy::ClusterUnauthenticated => "cluster-unauthenticated",
        DefaultPolicy::Deny => "deny",
        DefaultPolicy::Audit => "audit",
    }
}

/// Decides a connection from `client_ip` (with the verified identity
/// `client` when it came through the mTLS tunnel) to `port` of the
/// workload `policy` belongs to.
pub fn authorize(
    policy: &Policy,
    port: u16,
    client: Option<&SpiffeId>,
    client_ip: IpAddr,
) -> Decision {
    let port32 = u32::from(port);
    if policy.probe_ports.contains(&port32)
        && policy
            .probe_sources
            .iter()
            .any(|a| address::decode(a) == Some(client_ip))
    {
        return Decision {
            allowed: true,
            reason: Reason::Probe,
            server: None,
            policy: None,
            routes_only: false,
        };
    }
    let client_uri = client.map(|id| id.to_string());
    let client = Client {
        identity: client_uri.as_deref(),
        ip: client_ip,
    };
    match policy.servers.iter().find(|s| s.port == port32) {
        Some(server) => decide_server(policy, server, &client),
        None => decide_default(policy, known(policy.default_policy), &client, None),
    }
}

pub(crate) struct Client<'a> {
    pub(crate) identity: Option<&'a str>,
    pub(crate) ip: IpAddr,
}

fn decide_server(policy: &Policy, server: &PolicyServer, client: &Client<'_>) -> Decision {
    if let Some(authz) = server.authorizations.iter().find(|a| satisfied(a, client)) {
        return Decision {
            allowed: true,
            reason: Reason::Authorized,
            server: Some(server.name.clone()),
            policy: Some(authz.policy.clone()),
            routes_only: false,
        };
    }
    let decision = decide_default(
        policy,
        known(server.access_policy),
        client,
        Some(server.name.clone()),
    );
    if decision.allowed {
        return decision;
    }
    // A client authorized on some route only: admitted, each request then
    // decided by route (the others get 403). Without this a route-level
    // AuthorizationPolicy could never let anyone in.
    let on_route = server
        .routes
        .iter()
        .flat_map(|r| &r.authorizations)
        .find(|a| satisfied(a, client));
    match on_route {
        Some(authz) => Decision {
            allowed: true,
            reason: Reason::RoutesOnly,
            server: Some(server.name.clone()),
            policy: Some(authz.policy.clone()),
            routes_only: true,
        },
        None => decision,
    }
}

/// Unknown values (a newer control plane's, or garbage) count as `deny`.
fn known(raw: i32) -> DefaultPolicy {
    match DefaultPolicy::try_from(raw) {
        Ok(DefaultPolicy::Unspecified) | Err(_) => DefaultPolicy::Deny,
        Ok(p) => p,
    }
}

fn decide_default(
    policy: &Policy,
    default: DefaultPolicy,
    client: &Client<'_>,
    server: Option<String>,
) -> Decision {
    let in_cluster = || {
        policy
            .cluster_networks
            .iter()
            .any(|n| network_contains(n, client.ip))
    };
    let authenticated = client.identity.is_some();
    let allowed = match default {
        DefaultPolicy::AllUnauthenticated | DefaultPolicy::Audit => true,
        DefaultPolicy::AllAuthenticated => authenticated,
        DefaultPolicy::ClusterAuthenticated => authenticated && in_cluster(),
        DefaultPolicy::ClusterUnauthenticated => in_cluster(),
        DefaultPolicy::Deny | DefaultPolicy::Unspecified => false,
    };
    let reason = match (default, allowed) {
        (DefaultPolicy::Audit, _) => Reason::Audit,
        (p, true) => Reason::DefaultAllows(p),
        (p, false) => Reason::DefaultDenies(p),
    };
    Decision {
        allowed,
        reason,
        server,
        policy: None,
        routes_only: false,
    }
}

pub(crate) fn satisfied(authz: &Authorization, client: &Client<'_>) -> bool {
    authz
        .requirements
        .iter()
        .all(|r| requirement_met(r, client))
}

fn requirement_met(req: &Requirement, client: &Client<'_>) -> bool {
    // Exactly one of the two lists is filled by the control plane; a
    // requirement with both or neither is malformed and matches nobody.
    match (req.identities.is_empty(), req.networks.is_empty()) {
        (false, true) => client
            .identity
            .is_some_and(|id| req.identities.iter().any(|p| identity_matches(p, id))),
        (true, false) => req.networks.iter().any(|n| network_contains(n, client.ip)),
        _ => false,
    }
}

/// The longest identity pattern a policy may hold, in bytes.
pub const MAX_IDENTITY_PATTERN_LEN: usize = 256;
/// The most `*` an identity pattern may hold.
pub const MAX_IDENTITY_PATTERN_WILDCARDS: usize = 8;

/// `*` alone matches any identity; elsewhere `*` matches any run of
/// characters without `/` (so `spiffe://cluster.local/ns/shop/sa/*` is
/// every account of `shop`, and cannot reach into another path segment).
///
/// Linear in the lengths of both: a pattern is evaluated for every
/// connection on a proxy that every tenant of the node shares, so a
/// pattern such as `*a*a*a…*b` must cost no more than its length (a
/// backtracking matcher took exponential time on it and froze the node).
pub fn identity_matches(pattern: &str, identity: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    // `*` never matches `/`, so the segments pair up one to one.
    let mut patterns = pattern.split('/');
    let mut segments = identity.split('/');
    loop {
        match (patterns.next(), segments.next()) {
            (None, None) => return true,
            (Some(p), Some(s)) if segment_matches(p, s) => {}
            _ => return false,
        }
    }
}

/// One path segment against a pattern whose `*` match any run of
/// characters. The literal pieces between the stars are placed leftmost,
/// each after the previous one (a greedy placement is optimal when the
/// only wildcard is `*`), with a linear-time substring search.
fn segment_matches(pattern: &str, segment: &str) -> bool {
    let mut pieces = pattern.split('*');
    let first = pieces.next().unwrap_or_default();
    let Some(rest) = segment.strip_prefix(first) else {
        return false;
    };
    let mut middle: Vec<&str> = pieces.collect();
    let Some(last) = middle.pop() else {
        // No star at all.
        return rest.is_empty();
    };
    let Some(mut rest) = rest.strip_suffix(last) else {
        return false;
    };
    for piece in middle {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

/// Why an identity pattern is refused (the destination service reports it
/// on the policy object, which then grants nothing); `None`: acceptable.
pub fn identity_pattern_problem(pattern: &str) -> Option<String> {
    if pattern.len() > MAX_IDENTITY_PATTERN_LEN {
        return Some(format!(
            "is {} bytes long; at most {MAX_IDENTITY_PATTERN_LEN} are allowed",
            pattern.len()
        ));
    }
    let stars = pattern.matches('*').count();
    if stars > MAX_IDENTITY_PATTERN_WILDCARDS {
        return Some(format!(
            "has {stars} `*`; at most {MAX_IDENTITY_PATTERN_WILDCARDS} are allowed"
        ));
    }
    None
}

/// Whether `ip` is in `network` and in none of its exceptions. A network
/// whose address does not decode, or whose prefix is too long, contains
/// nothing (its exceptions cannot widen it either).
pub fn network_contains(network: &Network, ip: IpAddr) -> bool {
    in_prefix(network, ip) && !network.except.iter().any(|e| in_prefix_or_all(e, ip))
}

fn in_prefix(network: &Network, ip: IpAddr) -> bool {
    let Some(base) = address::decode(&network.address) else {
        return false;
    };
    prefix_match(base, network.prefix_len, ip).unwrap_or(false)
}

/// An exception that is malformed excludes everything: a garbled `except`
/// must not let through what it was meant to keep out.
fn in_prefix_or_all(network: &Network, ip: IpAddr) -> bool {
    match address::decode(&network.address) {
        Some(base) => prefix_match(base, network.prefix_len, ip).unwrap_or(true),
        None => true,
    }
}

/// `None`: the prefix length is too long for the family.
fn prefix_match(base: IpAddr, prefix_len: u32, ip: IpAddr) -> Option<bool> {
    match (base, ip) {
        (IpAddr::V4(b), IpAddr::V4(a)) => {
            let len = Some(prefix_len).filter(|l| *l <= 32)?;
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            Some(u32::from(b) & mask == u32::from(a) & mask)
        }
        (IpAddr::V6(b), IpAddr::V6(a)) => {
            let len = Some(prefix_len).filter(|l| *l <= 128)?;
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            Some(u128::from(b) & mask == u128::from(a) & mask)
        }
        // An IPv4 client seen as IPv4-mapped IPv6 is compared as IPv4.
        (IpAddr::V4(_), IpAddr::V6(a)) => match a.to_ipv4_mapped() {
            Some(a4) => prefix_match(base, prefix_len, IpAddr::V4(a4)),
            None => Some(false),
        },
        (IpAddr::V6(_), IpAddr::V4(_)) => {
            // Still validate the prefix length.
            (prefix_len <= 128).then_some(false)
        }
    }
}

/// Builds a [`Network`] from an address and prefix length.
pub fn network(ip: IpAddr, prefix_len: u8, except: Vec<Network>) -> Network {
    Network {
        address: address::encode(ip),
        prefix_len: prefix_len.into(),
        except,
    }
}

#[cfg(test)]
mod tests;
