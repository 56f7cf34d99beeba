//! Matching a request against HTTPRoutes (docs/routes.md): the pure half of
//! request routing and route-level authorization, which the node proxy
//! calls per request. Routes are compiled once per view change
//! ([`OutboundRoutes::compile`], [`InboundRoutes::compile`]): regular
//! expressions are built then, not per request.
//!
//! Precedence among matching rules is the Gateway API's: an `Exact` path
//! over a `PathPrefix`, a longer prefix over a shorter one, then a method
//! match, then more header matches; a tie goes to the older route (the
//! control plane sends routes oldest first) and, within a route, to the
//! earlier rule. Regular-expression paths rank after prefixes (the Gateway
//! API leaves their precedence to implementations; Linkerd does the same).

mod path;
pub use path::{PathRejection, normalize_path};

use crate::policy::{Client, satisfied};
use crate::proto::{
    Authorization, HeaderMatch, PathMatchKind, PolicyServer, RouteMatch, RouteRule, Service,
};
use std::net::IpAddr;
use std::sync::Arc;
use weft_identity_api::SpiffeId;

/// The parts of a request routes look at.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a http::Method,
    /// The path, without the query.
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// One compiled `RouteMatch`.
#[derive(Clone, Debug)]
struct Matcher {
    path: PathMatcher,
    method: Option<String>,
    headers: Vec<(String, ValueMatcher)>,
}

#[derive(Clone, Debug)]
enum PathMatcher {
    Any,
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

#[derive(Clone, Debug)]
enum ValueMatcher {
    Exact(String),
    Regex(regex::Regex),
}

/// How specific a match is: compared as a tuple, larger wins.
type Rank = (u8, usize, bool, usize);

impl Matcher {
    /// `None`: a regular expression that does not compile (the control
    /// plane refuses those, so only a newer or broken one sends it); such
    /// a match matches nothing.
    fn compile(m: &RouteMatch) -> Option<Self> {
        let path = match &m.path {
            None => PathMatcher::Any,
            Some(p) => match PathMatchKind::try_from(p.kind).ok()? {
                PathMatchKind::PathMatchExact => PathMatcher::Exact(p.value.clone()),
                PathMatchKind::PathMatchPrefix => {
                    // `/api/` and `/api` are the same prefix.
                    let trimmed = p.value.trim_end_matches('/');
                    PathMatcher::Prefix(trimmed.to_string())
                }
                PathMatchKind::PathMatchRegex => PathMatcher::Regex(anchored(&p.value)?),
            },
        };
        let headers = m
            .headers
            .iter()
            .map(|HeaderMatch { name, value, regex }| {
                let matcher = if *regex {
                    ValueMatcher::Regex(anchored(value)?)
                } else {
                    ValueMatcher::Exact(value.clone())
                };
                Some((name.to_ascii_lowercase(), matcher))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            path,
            method: (!m.method.is_empty()).then(|| m.method.clone()),
            headers,
        })
    }

    /// The rank of the match, if the request matches.
    fn matches(&self, req: &Request<'_>) -> Option<Rank> {
        let path_rank = match &self.path {
            PathMatcher::Any => (0, 0),
            PathMatcher::Exact(p) => (req.path == p).then_some((3, p.len()))?,
            PathMatcher::Prefix(p) => prefix_matches(p, req.path).then_some((2, p.len()))?,
            PathMatcher::Regex(r) => r.is_match(req.path).then_some((1, 0))?,
        };
        if let Some(m) = &self.method
            && m != req.method.as_str()
        {
            return None;
        }
        for (name, value) in &self.headers {
            let found = req.headers.get_all(name.as_str()).iter().any(|v| {
                v.to_str().is_ok_and(|v| match value {
                    ValueMatcher::Exact(e) => v == e,
                    ValueMatcher::Regex(r) => r.is_match(v),
                })
            });
            if !found {
                return None;
            }
        }
        Some((
            path_rank.0,
            path_rank.1,
            self.method.is_some(),
            self.headers.len(),
        ))
    }
}

/// Adds the compiled `matches` of entry `index`; no match at all takes every
/// request (as a `/` prefix would).
fn push_matchers(out: &mut Vec<(Matcher, usize)>, matches: &[RouteMatch], index: usize) {
    if matches.is_empty() {
        let any = Matcher {
            path: PathMatcher::Prefix(String::new()),
            method: None,
            headers: Vec::new(),
        };
        out.push((any, index));
    }
    out.extend(
        matches
            .iter()
            .filter_map(Matcher::compile)
            .map(|m| (m, index)),
    );
}

/// Gateway API regular expressions match the whole value.
fn anchored(pattern: &str) -> Option<regex::Regex> {
    regex::Regex::new(&format!("^(?:{pattern})$")).ok()
}

/// Element-wise: `/api` matches `/api`, `/api/` and `/api/v1`, not `/apiv1`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix.is_empty() {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The best-ranked entry matching `req`: `(entry index, rank)`; ties keep
/// the first, which is the older route and the earlier rule.
fn best<'a, T>(entries: impl Iterator<Item = (&'a Matcher, T)>, req: &Request<'_>) -> Option<T> {
    let mut best: Option<(Rank, T)> = None;
    for (matcher, item) in entries {
        if let Some(rank) = matcher.matches(req)
            && best.as_ref().is_none_or(|(b, _)| rank > *b)
        {
            best = Some((rank, item));
        }
    }
    best.map(|(_, item)| item)
}

/// The outcome of routing one request.
#[derive(Debug, PartialEq)]
pub enum Selected<'a> {
    /// The Service has no route (for this port): balance it as usual.
    NoRoutes,
    /// This rule of this route applies (shared, so that a request's plan
    /// can hold it without copying it).
    Rule {
        route: &'a str,
        rule: &'a Arc<RouteRule>,
    },
    /// The Service has routes and none matches: answer 404, as the Gateway
    /// API requires.
    NotFound,
}

/// The outbound routes of one Service port, compiled.
#[derive(Clone, Debug, Default)]
pub struct OutboundRoutes {
    /// (route name, rule) by index.
    rules: Vec<(String, Arc<RouteRule>)>,
    /// Every match of every rule, in route then rule order.
    matchers: Vec<(Matcher, usize)>,
}

impl OutboundRoutes {
    pub fn compile(service: &Service, port: u16) -> Self {
        let mut out = Self::default();
        for route in &service.routes {
            if route.port != 0 && route.port != u32::from(port) {
                continue;
            }
            for rule in &route.rules {
                let index = out.rules.len();
                out.rules.push((route.name.clone(), Arc::new(rule.clone())));
                push_matchers(&mut out.matchers, &rule.matches, index);
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn select(&self, req: &Request<'_>) -> Selected<'_> {
        if self.rules.is_empty() {
            return Selected::NoRoutes;
        }
        match best(self.matchers.iter().map(|(m, i)| (m, *i)), req) {
            Some(i) => Selected::Rule {
                route: &self.rules[i].0,
                rule: &self.rules[i].1,
            },
            None => Selected::NotFound,
        }
    }
}

/// A request's route-level authorization.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteDecision {
    /// The Server has no routes: the connection's decision stands.
    NoRoutes,
    /// Allowed on `route` by `policy` (a route-level AuthorizationPolicy,
    /// or one of the Server's own).
    Allowed { route: String, policy: String },
    /// `route` matched and nothing authorizes this client for it: 403
    /// (gRPC: PERMISSION_DENIED).
    Denied { route: String },
    /// The Server has routes and none matches: 404.
    NotFound,
}

/// The inbound routes of one Server, compiled.
#[derive(Clone, Debug, Default)]
pub struct InboundRoutes {
    /// (route name, its authorizations) by index.
    routes: Vec<(String, Vec<Authorization>)>,
    matchers: Vec<(Matcher, usize)>,
    /// The Server's own authorizations: they cover every route.
    server: Vec<Authorization>,
}

impl InboundRoutes {
    pub fn compile(server: &PolicyServer) -> Self {
        let mut out = Self {
            server: server.authorizations.clone(),
            ..Self::default()
        };
        for route in &server.routes {
            let index = out.routes.len();
            out.routes
                .push((route.name.clone(), route.authorizations.clone()));
            push_matchers(&mut out.matchers, &route.matches, index);
        }
        out
    }

    /// Decides one request from `client` (verified identity, if any) at
    /// `client_ip`.
    pub fn authorize(
        &self,
        req: &Request<'_>,
        client: Option<&SpiffeId>,
        client_ip: IpAddr,
    ) -> RouteDecision {
        if self.routes.is_empty() {
            return RouteDecision::NoRoutes;
        }
        let Some(i) = best(self.matchers.iter().map(|(m, i)| (m, *i)), req) else {
            return RouteDecision::NotFound;
        };
        let (route, authorizations) = &self.routes[i];
        let uri = client.map(|c| c.to_string());
        let client = Client {
            identity: uri.as_deref(),
            ip: client_ip,
        };
        match authorizations
            .iter()
            .chain(&self.server)
            .find(|a| satisfied(a, &client))
        {
            Some(a) => RouteDecision::Allowed {
                route: route.clone(),
                policy: a.policy.clone(),
            },
            None => RouteDecision::Denied {
                route: route.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests;
