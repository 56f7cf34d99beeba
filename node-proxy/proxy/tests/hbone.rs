//! HBONE over real TLS 1.3 mutual TLS on loopback: streams, half-close,
//! pooling, refusals.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_hbone::pool::Connector;
use weft_hbone::{HboneError, HbonePool, HboneRequest, PoolConfig, serve_connection};

struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Self {
            ca: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A workload certificate: SPIFFE URI SAN, plus 127.0.0.1 so the stock
    /// WebPKI verifier accepts it (the SPIFFE verifiers are the identity
    /// crate's; this test is about the tunnel).
    fn leaf(&self, spiffe: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![
            SanType::URI(spiffe.try_into().unwrap()),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        Arc::new(roots)
    }

    fn server(&self) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots(), provider.clone())
            .build()
            .unwrap();
        let (chain, key) = self.leaf("spiffe://cluster.local/ns/demo/sa/server");
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(cfg)
    }

    fn client(&self, with_cert: bool) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(self.roots());
        let mut cfg = if with_cert {
            let (chain, key) = self.leaf("spiffe://cluster.local/ns/demo/sa/client");
            builder.with_client_auth_cert(chain, key).unwrap()
        } else {
            builder.with_no_client_auth()
        };
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(cfg)
    }
}

/// An application: echoes until EOF, then half-closes back.
async fn echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A node proxy's 15008 stand-in: TLS, then HBONE; CONNECTs to the app's
/// port are spliced to it, anything else is refused with 403.
struct TunnelServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

async fn tunnel_server(pki: &Pki, app: SocketAddr) -> TunnelServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server());
    let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (a, c) = (accepted.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let (a, c) = (a.clone(), c.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let handle = move |req: HboneRequest| async move {
                    if req.target != app {
                        req.reject(http::StatusCode::FORBIDDEN);
                        return;
                    }
                    let mut upstream = TcpStream::connect(app).await.unwrap();
                    let mut stream = req.accept().unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
                };
                let _ = serve_connection(tls, handle, std::future::pending()).await;
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    TunnelServer {
        addr,
        accepted,
        closed,
    }
}

fn connector(client: Arc<ClientConfig>, server: SocketAddr) -> Connector<&'static str> {
    Arc::new(move |_key| {
        let client = client.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(server)
                .await
                .map_err(|source| HboneError::Connect {
                    addr: server,
                    source,
                })?;
            let tls = tokio_rustls::TlsConnector::from(client)
                .connect(ServerName::IpAddress(server.ip().into()), tcp)
                .await
                .map_err(|source| HboneError::Tls {
                    addr: server,
                    source,
                })?;
            Ok(weft_hbone::pool::Connected::new(Box::new(tls)))
        })
    })
}

fn payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn stream_carries_megabytes_both_ways_with_half_close() {
    let pki = Pki::new();
    let app = echo_app().await;
    let server = tunnel_server(&pki, app).await;
    let pool = HbonePool::new(
        PoolConfig::default(),
        connector(pki.client(true), server.addr),
    );

    let stream = pool
        .open("client", server.addr, app)
        .await
        .expect("tunnel opens");
    let (mut r, mut w) = tokio::io::split(stream);
    let sent = payload(8 << 20);
    let to_send = sent.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&to_send).await.unwrap();
        w.shutdown().await.unwrap(); // half-close: the echo ends only after this
    });
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut received))
        .await
        .expect("echo completes")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(received.len(), sent.len());
    assert!(received == sent, "payload corrupted in the tunnel");
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn streams_share_a_connection_up_to_the_limit() {
    let pki = Pki::new();
    let app = echo_app().await;
    let server = tunnel_server(&pki, app).await;
    let config = PoolConfig {
        max_streams_per_connection: 2,
        idle_timeout: Duration::from_secs(60),
    };
    let pool = HbonePool::new(config, connector(pki.client(true), server.addr));

    // Sequential streams reuse one connection.
    for i in 0..5u8 {
        let mut s = pool.open("client", server.addr, app).await.unwrap();
        s.write_all(&[i; 10]).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, [i; 10]);
    }
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        1,
        "one TLS handshake for five streams"
    );

    // Three at once with a limit of two: a second connection.
    let held: Vec<_> = open_and_hold(&pool, app, server.addr, 3).await;
    assert_eq!(held.len(), 3);
    assert_eq!(pool.connections(), 2);
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
}

async fn open_and_hold(
    pool: &HbonePool<&'static str>,
    app: SocketAddr,
    addr: SocketAddr,
    n: usize,
) -> Vec<weft_hbone::H2Stream> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(pool.open("client", addr, app).await.unwrap());
    }
    out
}

#[tokio::test]
async fn refused_target_reports_the_status() {
    let pki = Pki::new();
    let app = echo_app().await;
    let server = tunnel_server(&pki, app).await;
    let pool = HbonePool::new(
        PoolConfig::default(),
        connector(pki.client(true), server.addr),
    );
    let elsewhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
    match pool.open("client", server.addr, elsewhere).await {
        Err(HboneError::Refused { target, status, .. }) => {
            assert_eq!(target, elsewhere);
            assert_eq!(status, http::StatusCode::FORBIDDEN);
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| "a stream")),
    }
    // The connection survives a refused stream.
    assert!(pool.open("client", server.addr, app).await.is_ok());
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let pki = Pki::new();
    let app = echo_app().await;
    let server = tunnel_server(&pki, app).await;
    let config = PoolConfig {
        max_streams_per_connection: 10,
        idle_timeout: Duration::from_millis(100),
    };
    let pool = HbonePool::new(config, connector(pki.client(true), server.addr));
    drop(pool.open("client", server.addr, app).await.unwrap());
    for _ in 0..100 {
        if pool.connections() == 0 && server.closed.load(Ordering::SeqCst) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "idle connection not closed: pooled {}, closed at server {}",
        pool.connections(),
        server.closed.load(Ordering::SeqCst)
    );
}
