use super::*;
use crate::proto::{InboundRoute, PathMatch, Requirement, Route};

fn rule(name: &str, matches: Vec<RouteMatch>) -> RouteRule {
    RouteRule {
        name: name.into(),
        matches,
        ..Default::default()
    }
}

fn path(kind: PathMatchKind, value: &str) -> RouteMatch {
    RouteMatch {
        path: Some(PathMatch {
            kind: kind as i32,
            value: value.into(),
        }),
        ..Default::default()
    }
}

fn service(routes: Vec<Route>) -> Service {
    Service {
        name: "web".into(),
        namespace: "shop".into(),
        routes,
        ..Default::default()
    }
}

fn route(name: &str, port: u32, rules: Vec<RouteRule>) -> Route {
    Route {
        name: name.into(),
        port,
        rules,
    }
}

/// Which rule `method path` (with `headers`) selects.
fn selected(routes: &OutboundRoutes, method: &str, p: &str, headers: &[(&str, &str)]) -> String {
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        map.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let method = method.parse().unwrap();
    let req = Request {
        method: &method,
        path: p,
        headers: &map,
    };
    match routes.select(&req) {
        Selected::NoRoutes => "no-routes".into(),
        Selected::NotFound => "404".into(),
        Selected::Rule { rule, .. } => rule.name.clone(),
    }
}

#[test]
fn gateway_api_precedence() {
    use PathMatchKind::*;
    let mut by_method = path(PathMatchPrefix, "/api");
    by_method.method = "POST".into();
    let mut by_header = path(PathMatchPrefix, "/api");
    by_header.headers = vec![HeaderMatch {
        name: "x-canary".into(),
        value: "yes|true".into(),
        regex: true,
    }];
    let svc = service(vec![route(
        "shop/r",
        0,
        vec![
            rule("prefix-api", vec![path(PathMatchPrefix, "/api/")]),
            rule("prefix-api-v1", vec![path(PathMatchPrefix, "/api/v1")]),
            rule("exact", vec![path(PathMatchExact, "/api/v1/health")]),
            rule("regex", vec![path(PathMatchRegex, "/v[0-9]+/.*")]),
            rule("post", vec![by_method]),
            rule("canary", vec![by_header]),
        ],
    )]);
    let routes = OutboundRoutes::compile(&svc, 80);
    assert_eq!(selected(&routes, "GET", "/api/v1/health", &[]), "exact");
    assert_eq!(
        selected(&routes, "GET", "/api/v1/users", &[]),
        "prefix-api-v1"
    );
    assert_eq!(selected(&routes, "GET", "/api", &[]), "prefix-api");
    assert_eq!(selected(&routes, "GET", "/api/v2", &[]), "prefix-api");
    // Element-wise prefixes: /apiv1 is not under /api.
    assert_eq!(selected(&routes, "GET", "/apiv1", &[]), "404");
    assert_eq!(selected(&routes, "GET", "/v2/x", &[]), "regex");
    // Regular expressions match the whole path.
    assert_eq!(selected(&routes, "GET", "/x/v2/x", &[]), "404");
    // Same prefix: a method match wins, then more header matches.
    assert_eq!(selected(&routes, "POST", "/api/v2", &[]), "post");
    assert_eq!(
        selected(&routes, "GET", "/api/v2", &[("X-Canary", "true")]),
        "canary"
    );
    assert_eq!(
        selected(&routes, "GET", "/api/v2", &[("x-canary", "truest")]),
        "prefix-api"
    );
}

#[test]
fn ties_go_to_the_older_route_and_ports_filter_routes() {
    use PathMatchKind::*;
    let svc = service(vec![
        route(
            "shop/older",
            80,
            vec![rule("older", vec![path(PathMatchPrefix, "/")])],
        ),
        route(
            "shop/newer",
            0,
            vec![rule("newer", vec![path(PathMatchPrefix, "/")])],
        ),
        route("shop/other-port", 81, vec![rule("other-port", vec![])]),
    ]);
    assert_eq!(
        selected(&OutboundRoutes::compile(&svc, 80), "GET", "/x", &[]),
        "older"
    );
    assert_eq!(
        selected(&OutboundRoutes::compile(&svc, 8080), "GET", "/x", &[]),
        "newer"
    );
    // A rule without matches takes every request (on its port only).
    let only = service(vec![route("shop/p", 81, vec![rule("all", vec![])])]);
    assert_eq!(
        selected(&OutboundRoutes::compile(&only, 81), "DELETE", "/a/b", &[]),
        "all"
    );
    assert_eq!(
        selected(&OutboundRoutes::compile(&only, 80), "GET", "/", &[]),
        "no-routes"
    );
}

#[test]
fn a_broken_regex_matches_nothing() {
    let svc = service(vec![route(
        "shop/r",
        0,
        vec![rule(
            "broken",
            vec![path(PathMatchKind::PathMatchRegex, "((")],
        )],
    )]);
    assert_eq!(
        selected(&OutboundRoutes::compile(&svc, 80), "GET", "/((", &[]),
        "404"
    );
}

const OPS: &str = "spiffe://cluster.local/ns/shop/sa/ops";

fn inbound(server_authz: Vec<Authorization>) -> InboundRoutes {
    let ops_only = Authorization {
        policy: "shop/admin-from-ops".into(),
        requirements: vec![Requirement {
            identities: vec![OPS.into()],
            ..Default::default()
        }],
    };
    InboundRoutes::compile(&PolicyServer {
        name: "web-http".into(),
        port: 8080,
        authorizations: server_authz,
        routes: vec![
            InboundRoute {
                name: "shop/admin".into(),
                matches: vec![path(PathMatchKind::PathMatchPrefix, "/admin")],
                authorizations: vec![ops_only],
            },
            InboundRoute {
                name: "shop/public".into(),
                matches: vec![path(PathMatchKind::PathMatchPrefix, "/public")],
                authorizations: vec![Authorization {
                    policy: "shop/public-to-all".into(),
                    requirements: vec![],
                }],
            },
        ],
        ..Default::default()
    })
}

fn decide(routes: &InboundRoutes, p: &str, client: Option<&str>) -> RouteDecision {
    let headers = http::HeaderMap::new();
    let req = Request {
        method: &http::Method::GET,
        path: p,
        headers: &headers,
    };
    let id = client.map(|c| c.parse::<SpiffeId>().unwrap());
    routes.authorize(&req, id.as_ref(), "10.244.1.2".parse().unwrap())
}

#[test]
fn route_level_authorization() {
    let routes = inbound(vec![]);
    assert_eq!(
        decide(&routes, "/admin/users", Some(OPS)),
        RouteDecision::Allowed {
            route: "shop/admin".into(),
            policy: "shop/admin-from-ops".into()
        }
    );
    let dev = "spiffe://cluster.local/ns/shop/sa/dev";
    let denied_admin = RouteDecision::Denied {
        route: "shop/admin".into(),
    };
    assert_eq!(decide(&routes, "/admin/users", Some(dev)), denied_admin);
    assert_eq!(decide(&routes, "/admin", None), denied_admin);
    assert!(matches!(
        decide(&routes, "/public/x", None),
        RouteDecision::Allowed { .. }
    ));
    assert_eq!(
        decide(&routes, "/other", Some(OPS)),
        RouteDecision::NotFound
    );

    // The Server's own authorizations cover every route.
    let everyone_in_mesh = Authorization {
        policy: "shop/mesh".into(),
        requirements: vec![Requirement {
            identities: vec!["*".into()],
            ..Default::default()
        }],
    };
    let routes = inbound(vec![everyone_in_mesh]);
    assert_eq!(
        decide(&routes, "/admin/users", Some(dev)),
        RouteDecision::Allowed {
            route: "shop/admin".into(),
            policy: "shop/mesh".into()
        }
    );
    let no_routes = InboundRoutes::compile(&PolicyServer::default());
    assert_eq!(decide(&no_routes, "/", None), RouteDecision::NoRoutes);
}
