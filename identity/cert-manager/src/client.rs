//! Talking to the CA. [`CaClient`] is what the manager needs; [`GrpcCaClient`]
//! is the real one (gRPC over TLS, the CA verified against the current trust
//! bundle, the node's bearer credential re-read for every call since
//! projected tokens rotate).

use crate::bundle::TrustBundle;
use crate::verify::{BundleWatch, CaServerVerifier};
use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};
use weft_identity_api::SpiffeId;
use weft_identity_api::pb::identity_client::IdentityClient;
use weft_identity_api::pb::{CertifyRequest, WatchTrustBundleRequest};

/// What the CA signed.
#[derive(Debug, Clone)]
pub struct CertifyReply {
    pub leaf: Vec<u8>,
    pub intermediates: Vec<Vec<u8>>,
    pub valid_until: i64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CaError {
    /// Worth retrying: the CA is down, overloaded, or cannot decide now.
    #[error("CA unreachable or unavailable: {0}")]
    Unavailable(String),
    /// The CA answered no; retrying the same request will not help until
    /// something changes (the pod is scheduled, credentials fixed).
    #[error("CA refused ({code}): {message}")]
    Refused { code: String, message: String },
}

pub trait CaClient: Send + Sync + 'static {
    fn certify<'a>(
        &'a self,
        identity: &'a SpiffeId,
        csr: Vec<u8>,
    ) -> BoxFuture<'a, Result<CertifyReply, CaError>>;

    /// The trust bundle, first the current one then every change.
    fn watch_trust_bundle(
        &self,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<TrustBundle, CaError>>, CaError>>;
}

/// Where and how to reach the CA.
#[derive(Debug, Clone)]
pub struct GrpcCaConfig {
    /// `host:port` to dial, resolved at every connect (on Kubernetes the
    /// Service name, e.g. `weft-identity.weft-system.svc:15012`).
    pub address: String,
    /// Name the CA's serving certificate must carry (DNS or IP).
    pub server_name: String,
    /// File holding this node's bearer credential (re-read per call).
    pub token_file: PathBuf,
    pub request_timeout: Duration,
}

#[derive(Clone)]
pub struct GrpcCaClient {
    client: IdentityClient<Channel>,
    token_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientSetupError {
    #[error("invalid CA server name {0:?}")]
    ServerName(String),
    #[error("invalid CA endpoint: {0}")]
    Endpoint(String),
}

impl GrpcCaClient {
    /// Connects lazily: the first call dials, and a broken connection is
    /// re-dialled by the next call.
    pub fn new(config: GrpcCaConfig, bundle: BundleWatch) -> Result<Self, ClientSetupError> {
        let server_name = ServerName::try_from(config.server_name.clone())
            .map_err(|_| ClientSetupError::ServerName(config.server_name.clone()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(CaServerVerifier::new(bundle)))
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let connector = TlsConnector::from(Arc::new(tls));
        let address = config.address.clone();
        let connect = tower::service_fn(move |_uri: http::Uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            let address = address.clone();
            async move {
                let tcp = TcpStream::connect(address.as_str()).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        });
        // The URI only names the authority for HTTP/2; the connector above
        // decides where to dial and how to verify.
        let endpoint = Endpoint::from_shared(format!("http://{}", config.address))
            .map_err(|e| ClientSetupError::Endpoint(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(config.request_timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let channel = endpoint.connect_with_connector_lazy(connect);
        Ok(Self {
            client: IdentityClient::new(channel),
            token_file: config.token_file,
        })
    }

    fn authorize<T>(&self, message: T) -> Result<tonic::Request<T>, CaError> {
        let token = std::fs::read_to_string(&self.token_file).map_err(|e| {
            CaError::Unavailable(format!(
                "cannot read node credential {}: {e}",
                self.token_file.display()
            ))
        })?;
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| CaError::Refused {
                code: "local".into(),
                message: format!(
                    "node credential {} is not a valid header value",
                    self.token_file.display()
                ),
            })?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

fn from_status(status: tonic::Status) -> CaError {
    use tonic::Code;
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Unknown
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Cancelled
        | Code::Internal => {
            CaError::Unavailable(format!("{:?}: {}", status.code(), status.message()))
        }
        code => CaError::Refused {
            code: format!("{code:?}"),
            message: status.message().to_string(),
        },
    }
}

impl CaClient for GrpcCaClient {
    fn certify<'a>(
        &'a self,
        identity: &'a SpiffeId,
        csr: Vec<u8>,
    ) -> BoxFuture<'a, Result<CertifyReply, CaError>> {
        Box::pin(async move {
            let request = self.authorize(CertifyRequest {
                identity: identity.to_string(),
                csr,
            })?;
            let reply = self
                .client
                .clone()
                .certify(request)
                .await
                .map_err(from_status)?
                .into_inner();
            Ok(CertifyReply {
                leaf: reply.leaf,
                intermediates: reply.intermediates,
                valid_until: reply.valid_until,
            })
        })
    }

    fn watch_trust_bundle(
        &self,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<TrustBundle, CaError>>, CaError>> {
        Box::pin(async move {
            let request = self.authorize(WatchTrustBundleRequest {})?;
            let stream = self
                .client
                .clone()
                .watch_trust_bundle(request)
                .await
                .map_err(from_status)?
                .into_inner();
            Ok(stream
                .map(|item| {
                    let bundle = item.map_err(from_status)?;
                    TrustBundle::from_der(
                        bundle.trust_domain,
                        bundle
                            .anchors
                            .into_iter()
                            .map(CertificateDer::from)
                            .collect(),
                    )
                    .map_err(|e| CaError::Refused {
                        code: "bundle".into(),
                        message: e.to_string(),
                    })
                })
                .boxed())
        })
    }
}
