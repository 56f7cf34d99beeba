//! The gRPC service: who is calling, may they have this identity, is the
//! request well-formed — then sign.

use crate::authority::{Authority, SignError};
use crate::failures::FailureLimiter;
use crate::material::unix_seconds;
use crate::metrics::CaMetrics;
use crate::workloads::{Placement, WorkloadDirectory};
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use weft_identity_api::SpiffeId;
use weft_identity_api::pb::identity_server::{Identity, IdentityServer};
use weft_identity_api::pb::{
    CertifyRequest, CertifyResponse, TrustBundle, WatchTrustBundleRequest,
};
use weft_node_auth::{AuthError, NodeAuthenticator, bearer_token};

/// Largest Certify request decoded; larger ones fail with OUT_OF_RANGE.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

pub struct IdentityService {
    authority: Arc<Authority>,
    auth: Arc<dyn NodeAuthenticator>,
    workloads: Arc<dyn WorkloadDirectory>,
    metrics: CaMetrics,
    /// Ends the trust-bundle streams, so a graceful stop is not held up by
    /// clients that watch forever.
    shutdown: CancellationToken,
    /// Callers that keep failing are refused before they cost anything.
    failures: FailureLimiter,
}

/// Failures a source address may have in a burst, and how fast it may
/// fail after that: far above what a misconfigured but honest node proxy
/// does (it backs off), far below a loop.
pub const FAILURE_BURST: u32 = 20;
pub const FAILURES_PER_SECOND: f64 = 1.0;

impl IdentityService {
    pub fn new(
        authority: Arc<Authority>,
        auth: Arc<dyn NodeAuthenticator>,
        workloads: Arc<dyn WorkloadDirectory>,
        metrics: CaMetrics,
    ) -> Self {
        Self {
            authority,
            auth,
            workloads,
            metrics,
            shutdown: CancellationToken::new(),
            failures: FailureLimiter::new(FAILURE_BURST, FAILURES_PER_SECOND),
        }
    }

    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    pub fn into_server(self) -> IdentityServer<Self> {
        // Requests are an identity and a CSR of at most MAX_CSR_BYTES: refuse
        // anything much larger before decoding it (tonic's default is 4 MiB).
        IdentityServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    async fn authenticate<T>(&self, request: &Request<T>) -> Result<String, Status> {
        // A token that authenticated recently is let through even from an
        // address that is being limited: another process on a node proxy's
        // address (a hostNetwork pod) must not lock the proxy out.
        let credential = bearer_of(request);
        let known_good = self.failures.is_known_good(&credential);
        if !known_good
            && let Some(ip) = request.remote_addr().map(|a| a.ip())
            && let Err(wait) = self.failures.check(ip)
        {
            return Err(Status::resource_exhausted(format!(
                "too many failed requests from {ip}; retry in {} ms (fix the cause: see the CA's log for the refusals)",
                wait.as_millis().max(1)
            )));
        }
        let result = self.authenticate_bearer(request).await;
        match (&result, request.remote_addr().map(|a| a.ip())) {
            (Ok(_), _) => self.failures.good(&credential),
            (Err(_), Some(ip)) => self.failures.failed(ip),
            (Err(_), None) => {}
        }
        result
    }

    async fn authenticate_bearer<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or(""));
        let token = bearer_token(header).map_err(auth_status)?;
        let node = self.auth.authenticate(token).await.map_err(auth_status)?;
        Ok(node.node)
    }

    async fn certify(&self, request: Request<CertifyRequest>) -> Result<CertifyResponse, Status> {
        let node = self.authenticate(&request).await?;
        let peer = request.remote_addr().map(|a| a.ip());
        let result = self.certify_for(&node, request).await;
        // An authenticated node that keeps asking for what it may not have
        // (or sends malformed requests) is a failing caller too.
        if let (Err(status), Some(ip)) = (&result, peer)
            && matches!(
                status.code(),
                tonic::Code::PermissionDenied | tonic::Code::InvalidArgument
            )
        {
            self.failures.failed(ip);
        }
        result
    }

    async fn certify_for(
        &self,
        node: &str,
        request: Request<CertifyRequest>,
    ) -> Result<CertifyResponse, Status> {
        let CertifyRequest { identity, csr } = request.into_inner();
        let identity: SpiffeId = identity
            .parse()
            .map_err(|e| Status::invalid_argument(format!("identity: {e}")))?;
        let trust_domain = &self.authority.policy().trust_domain;
        if identity.trust_domain() != trust_domain {
            return Err(Status::invalid_argument(format!(
                "identity {identity} is outside this CA's trust domain {trust_domain:?}"
            )));
        }
        match self
            .workloads
            .placement(node, &identity)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
        {
            Placement::OnNode { pod } => {
                tracing::debug!(%node, %identity, %pod, "identity authorized");
            }
            Placement::NotOnNode(why) => {
                return Err(Status::permission_denied(format!(
                    "node {node:?} runs no pod with service account {}/{} ({why}); a node proxy may only obtain identities of pods on its own node",
                    identity.namespace(),
                    identity.service_account()
                )));
            }
        }
        let signed = self
            .authority
            .certify(&identity, &csr)
            .map_err(|e| match e {
                SignError::ForeignTrustDomain(..) | SignError::Csr(_) => {
                    Status::invalid_argument(e.to_string())
                }
                SignError::IssuerExpired(_) => Status::unavailable(e.to_string()),
                SignError::Sign(_) => Status::internal(e.to_string()),
            })?;
        tracing::info!(%node, %identity, valid_until = unix_seconds(signed.not_after), "issued certificate");
        Ok(CertifyResponse {
            leaf: signed.leaf.to_vec(),
            intermediates: signed.intermediates.iter().map(|c| c.to_vec()).collect(),
            valid_until: unix_seconds(signed.not_after),
        })
    }
}

/// The `authorization` header's value, for recognising a token (never
/// logged).
fn bearer_of<T>(request: &Request<T>) -> Vec<u8> {
    request
        .metadata()
        .get("authorization")
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default()
}

fn auth_status(e: AuthError) -> Status {
    match e {
        AuthError::Unavailable(_) => Status::unavailable(e.to_string()),
        _ => Status::unauthenticated(e.to_string()),
    }
}

fn result_label(status: &Status) -> &'static str {
    match status.code() {
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::PermissionDenied => "permission_denied",
        tonic::Code::InvalidArgument => "invalid_argument",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::ResourceExhausted => "rate_limited",
        _ => "internal",
    }
}

type BundleStream = Pin<Box<dyn Stream<Item = Result<TrustBundle, Status>> + Send>>;

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let result = IdentityService::certify(self, request).await;
        match &result {
            Ok(_) => self.metrics.count("issued"),
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "certify refused");
                self.metrics.count(result_label(status));
            }
        }
        result.map(Response::new)
    }

    type WatchTrustBundleStream = BundleStream;

    async fn watch_trust_bundle(
        &self,
        request: Request<WatchTrustBundleRequest>,
    ) -> Result<Response<Self::WatchTrustBundleStream>, Status> {
        // Any authenticated node may read the bundle: it is public material,
        // but answering strangers would make the CA an open oracle of its
        // rotation state.
        self.authenticate(&request).await?;
        let trust_domain = self.authority.policy().trust_domain.clone();
        let mut anchors = self.authority.watch_anchors();
        let shutdown = self.shutdown.clone();
        let stream = async_stream(move |tx| async move {
            loop {
                let bundle = TrustBundle {
                    trust_domain: trust_domain.clone(),
                    anchors: anchors
                        .borrow_and_update()
                        .iter()
                        .map(|c| c.to_vec())
                        .collect(),
                };
                if tx.send(Ok(bundle)).await.is_err() {
                    return; // the client went away
                }
                tokio::select! {
                    changed = anchors.changed() => if changed.is_err() {
                        return; // the CA is shutting down
                    },
                    // Do not hold a task per departed client until the next rotation.
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => return,
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task; the task ends when the receiver is dropped.
fn async_stream<F, Fut>(f: F) -> BundleStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<TrustBundle, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
