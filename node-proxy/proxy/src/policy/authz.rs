//! Inbound authorization: who may connect to a local pod, decided for every
//! connection the proxy accepts on the pod's behalf, and decided *again* for
//! every open connection whenever the policy changes.
//!
//! The decision itself is `weft_destination_api::authorize`, a pure function
//! of the pod's `Policy` in the destination view; this module is what the
//! proxy does with it: count it, log it, refuse with a TCP reset, and keep a
//! table of admitted connections so that a policy change closes those that
//! are no longer allowed. Linkerd's proxy does the same re-check per
//! connection when a Server's authorizations change; Istio's ztunnel (since
//! 1.20) also closes connections that a changed policy no longer allows.
//! Without it, revoking access would only take effect when clients
//! reconnect, which long-lived connections (database pools, gRPC channels)
//! may never do.
//!
//! Failing closed: with a control plane, a pod whose Policy is not in the
//! view refuses every inbound connection (`no_policy`). The destination
//! service sends a pod's Policy in the same update as the pod, so this only
//! happens with a control plane that does not know the pod at all.

use crate::state::PodInfo;
use crate::telemetry::{AuthzLabels, AuthzMetrics, AuthzReason};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;
use weft_cert_manager::SpiffeId;
use weft_destination_api::policy::policy_name;
use weft_destination_api::{Reason, View, authorize};

/// One inbound connection, as the decision needs it.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub pod: Arc<PodInfo>,
    /// The destination port on the pod (the port the client dialled).
    pub port: u16,
    /// The client's verified identity: `Some` only through the mTLS tunnel.
    pub client: Option<Arc<SpiffeId>>,
    pub client_ip: IpAddr,
}

/// What was decided, in the words the metrics and the access log use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub reason: AuthzReason,
    /// The Server selecting the port (empty: none, the default applied).
    pub server: String,
    /// The AuthorizationPolicy (`namespace/name`) that allowed it, or the
    /// default policy's name (`deny`, `all-authenticated`, …) that decided.
    pub policy: String,
    /// Admitted only for the Server's routes a route-level policy opens to
    /// this client: each request must be authorized by route, and a
    /// connection that is not HTTP refused.
    pub routes_only: bool,
}

impl Verdict {
    fn labels(&self, pod: &PodInfo) -> AuthzLabels {
        AuthzLabels {
            destination_workload: pod.name.clone(),
            destination_namespace: pod.namespace.clone(),
            server: self.server.clone(),
            policy: self.policy.clone(),
            reason: self.reason.as_label().to_string(),
        }
    }
}

/// Decides `conn` against the view (`None`: the proxy runs without a
/// control plane, and there is no policy to enforce).
pub fn decide(view: Option<&View>, conn: &Inbound) -> Verdict {
    let Some(view) = view else {
        return Verdict {
            allowed: true,
            reason: AuthzReason::NoControlPlane,
            server: String::new(),
            policy: String::new(),
            routes_only: false,
        };
    };
    let policy = conn
        .pod
        .workload_uid
        .as_ref()
        .and_then(|uid| view.workloads.get(uid))
        .and_then(|w| view.policy_of(w));
    let Some(policy) = policy else {
        return Verdict {
            allowed: false,
            reason: AuthzReason::NoPolicy,
            server: String::new(),
            policy: String::new(),
            routes_only: false,
        };
    };
    let d = authorize(policy, conn.port, conn.client.as_deref(), conn.client_ip);
    let policy = match (d.policy, d.reason) {
        (Some(p), _) => p,
        (None, Reason::DefaultAllows(p) | Reason::DefaultDenies(p)) => policy_name(p).into(),
        (None, Reason::Audit) => "audit".into(),
        (None, Reason::Probe | Reason::Authorized | Reason::RoutesOnly) => String::new(),
    };
    Verdict {
        allowed: d.allowed,
        reason: match d.reason {
            Reason::Probe => AuthzReason::Probe,
            Reason::Authorized => AuthzReason::Authorized,
            Reason::DefaultAllows(_) => AuthzReason::DefaultAllow,
            Reason::DefaultDenies(_) => AuthzReason::DefaultDeny,
            Reason::Audit => AuthzReason::Audit,
            Reason::RoutesOnly => AuthzReason::RoutesOnly,
        },
        server: d.server.unwrap_or_default(),
        policy,
        routes_only: d.routes_only,
    }
}

/// The node's inbound authorization: decisions, their metrics, and the
/// admitted connections still open.
#[derive(Default)]
pub struct InboundAuthz {
    metrics: AuthzMetrics,
    open: Mutex<HashMap<u64, Admitted>>,
    next_id: AtomicU64,
}

struct Admitted {
    conn: Inbound,
    /// Fired with the new verdict when a policy change refuses the
    /// connection.
    revoke: Option<oneshot::Sender<Verdict>>,
    /// How it is served, and whether it is admitted for routes only now.
    access: ConnectionAccess,
}

/// An admitted connection's access as the policy has it *now*, and how the
/// connection is served: shared between the connection, which reads it for
/// every request (one atomic load), and the table, which updates it when
/// the policy changes.
///
/// Why shared rather than a copy taken at admission: the verdict can stay
/// `allowed` while it moves between full access and routes only (a
/// Server-wide AuthorizationPolicy replaced by one on an HTTPRoute, or the
/// reverse). An HTTP connection must follow that for its next requests, and
/// an opaque one, whose bytes no route can check, must be closed.
///
/// One word, so that recording "served opaque" and a revalidation turning
/// the connection routes-only cannot interleave: whichever comes second
/// sees the first (the splice is refused, or the connection revoked).
#[derive(Clone, Debug, Default)]
pub struct ConnectionAccess(Arc<AtomicU8>);

/// How an admitted connection is being served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// Not decided yet (protocol detection under way).
    Undecided,
    /// Spliced: bytes the proxy does not look into.
    Opaque,
    /// Served request by request (each one decided by route when the
    /// Server has routes).
    Http,
}

impl ConnectionAccess {
    const ROUTES_ONLY: u8 = 1;
    const OPAQUE: u8 = 2;
    const HTTP: u8 = 4;

    /// A connection admitted with `routes_only`, not served yet.
    pub fn new(routes_only: bool) -> Self {
        let bits = if routes_only { Self::ROUTES_ONLY } else { 0 };
        Self(Arc::new(AtomicU8::new(bits)))
    }

    /// Admitted at L4 only for the Server's routes: each request must be
    /// authorized by a route, and a request no route decides is refused.
    pub fn routes_only(&self) -> bool {
        self.0.load(Ordering::Acquire) & Self::ROUTES_ONLY != 0
    }

    /// Records that the connection is about to be spliced as opaque bytes.
    /// `false` (and nothing recorded) when it is admitted for routes only:
    /// the caller must refuse it.
    #[must_use]
    pub fn serve_opaque(&self) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
                (bits & Self::ROUTES_ONLY == 0).then_some(bits | Self::OPAQUE)
            })
            .is_ok()
    }

    /// Records that the connection is served request by request.
    pub fn serve_http(&self) {
        self.0.fetch_or(Self::HTTP, Ordering::AcqRel);
    }

    pub fn served(&self) -> Served {
        let bits = self.0.load(Ordering::Acquire);
        if bits & Self::OPAQUE != 0 {
            Served::Opaque
        } else if bits & Self::HTTP != 0 {
            Served::Http
        } else {
            Served::Undecided
        }
    }

    /// Follows a new (allowed) verdict. `false`: the connection is spliced
    /// and the verdict is routes only, so it can no longer be served and
    /// must be closed (nothing is changed then).
    fn follow(&self, routes_only: bool) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
                if !routes_only {
                    Some(bits & !Self::ROUTES_ONLY)
                } else if bits & Self::OPAQUE == 0 {
                    Some(bits | Self::ROUTES_ONLY)
                } else {
                    None
                }
            })
            .is_ok()
    }
}

impl InboundAuthz {
    pub fn metrics(&self) -> &AuthzMetrics {
        &self.metrics
    }

    /// Decides a new connection, counts and logs the decision, and on
    /// allow keeps it in the table until the returned [`Admission`] drops.
    /// On deny the caller must reset the connection.
    pub fn admit(
        self: &Arc<Self>,
        view: Option<&View>,
        conn: Inbound,
    ) -> Result<Admission, Verdict> {
        let verdict = decide(view, &conn);
        let labels = verdict.labels(&conn.pod);
        let client = conn.client.as_ref().map(|c| c.to_string());
        if !verdict.allowed {
            self.metrics.count(&labels, false);
            tracing::info!(
                target: "access",
                pod = %conn.pod.key(), port = conn.port, src = %conn.client_ip,
                src_identity = client, server = %verdict.server, policy = %verdict.policy,
                reason = %verdict.reason, "inbound connection denied"
            );
            return Err(verdict);
        }
        self.metrics.count(&labels, true);
        if verdict.reason == AuthzReason::Audit {
            // Every connection that reaches an `audit` default is one that
            // `deny` would refuse: that is what the operator wants to see
            // before switching to `deny`.
            tracing::warn!(
                target: "access",
                pod = %conn.pod.key(), port = conn.port, src = %conn.client_ip,
                src_identity = client, server = %verdict.server,
                "audit: allowed, but the deny policy would refuse this connection"
            );
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let access = ConnectionAccess::new(verdict.routes_only);
        self.open.lock().expect("authz lock").insert(
            id,
            Admitted {
                conn,
                revoke: Some(tx),
                access: access.clone(),
            },
        );
        Ok(Admission {
            authz: self.clone(),
            id,
            revoked: rx,
            access,
        })
    }

    /// Re-decides every admitted connection against a new view and revokes
    /// those no longer allowed (their [`Admission::revoked`] completes):
    /// refused outright, or spliced as opaque while the client is now
    /// authorized for HTTP routes only (reason `routes_only_opaque`). The
    /// others follow the new verdict (see [`ConnectionAccess`]).
    /// Returns how many were revoked.
    pub fn revalidate(&self, view: Option<&View>) -> usize {
        let mut open = self.open.lock().expect("authz lock");
        let mut revoked = 0;
        for admitted in open.values_mut() {
            if admitted.revoke.is_none() {
                continue;
            }
            let mut verdict = decide(view, &admitted.conn);
            if verdict.allowed {
                if admitted.access.follow(verdict.routes_only) {
                    continue;
                }
                // Allowed for HTTP routes, but this connection's bytes are
                // spliced unchecked: as it is served, it is not allowed.
                verdict.allowed = false;
                verdict.reason = AuthzReason::RoutesOnlyOpaque;
            }
            let conn = &admitted.conn;
            self.metrics.count_revoked(&verdict.labels(&conn.pod));
            tracing::info!(
                target: "access",
                pod = %conn.pod.key(), port = conn.port, src = %conn.client_ip,
                src_identity = conn.client.as_ref().map(|c| c.to_string()),
                server = %verdict.server, policy = %verdict.policy, reason = %verdict.reason,
                "policy changed: closing a connection that is no longer allowed"
            );
            if let Some(tx) = admitted.revoke.take() {
                let _ = tx.send(verdict);
                revoked += 1;
            }
        }
        revoked
    }

    /// Admitted connections still open.
    pub fn open_connections(&self) -> usize {
        self.open.lock().expect("authz lock").len()
    }
}

/// An admitted connection's place in the table; dropping it (the
/// connection ended) removes it.
pub struct Admission {
    authz: Arc<InboundAuthz>,
    id: u64,
    revoked: oneshot::Receiver<Verdict>,
    /// Updated by [`InboundAuthz::revalidate`]; see [`ConnectionAccess`].
    pub access: ConnectionAccess,
}

impl Admission {
    /// Completes when a policy change refuses this connection; never
    /// otherwise.
    pub async fn revoked(&mut self) -> Verdict {
        match (&mut self.revoked).await {
            Ok(v) => v,
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Ok(mut open) = self.authz.open.lock() {
            open.remove(&self.id);
        }
    }
}

#[cfg(test)]
#[path = "authz_tests.rs"]
mod tests;
