//! The node proxy's client against a scripted server: a delta that does
//! not apply makes it ask for a snapshot, keeping its view meanwhile; a
//! rejected credential keeps it retrying with backoff.

mod common;

use common::*;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use weft_destination_api::client::{self, Backoff, ClientConfig, ConnectionState, TokenSource};
use weft_destination_api::proto::destination_server::{Destination, DestinationServer};
use weft_destination_api::{WatchRequest, WatchResponse, Workload};

/// Answers the n-th Watch with `script[n]`, recording each request.
struct Scripted {
    script: Vec<Result<Vec<WatchResponse>, Status>>,
    requests: Arc<Mutex<Vec<WatchRequest>>>,
    /// When each Watch arrived, to measure the client's backoff.
    arrivals: Arc<Mutex<Vec<Instant>>>,
}

#[tonic::async_trait]
impl Destination for Scripted {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.arrivals.lock().unwrap().push(Instant::now());
        let n = {
            let mut requests = self.requests.lock().unwrap();
            requests.push(request.into_inner());
            requests.len() - 1
        };
        let responses = self
            .script
            .get(n)
            .cloned()
            .unwrap_or_else(|| Err(Status::unavailable("script over")))?;
        // Send the scripted responses, then stay open.
        let stream =
            tokio_stream::iter(responses.into_iter().map(Ok)).chain(tokio_stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }
}

fn workload(uid: &str) -> Workload {
    Workload {
        uid: uid.into(),
        name: uid.into(),
        ..Default::default()
    }
}

fn response(version: u64, base: Option<u64>, uids: &[&str]) -> WatchResponse {
    WatchResponse {
        epoch: "e1".into(),
        version,
        snapshot: base.is_none(),
        base_version: base.unwrap_or(0),
        workloads: uids.iter().map(|u| workload(u)).collect(),
        ..Default::default()
    }
}

type Arrivals = Arc<Mutex<Vec<Instant>>>;

async fn serve(
    pki: &Pki,
    script: Vec<Result<Vec<WatchResponse>, Status>>,
) -> (u16, Arc<Mutex<Vec<WatchRequest>>>, Arrivals) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let arrivals = Arrivals::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let service = Scripted {
        script,
        requests: requests.clone(),
        arrivals: arrivals.clone(),
    };
    let identity = Identity::from_pem(&pki.cert_pem, &pki.key_pem);
    tokio::spawn(
        Server::builder()
            .tls_config(ServerTlsConfig::new().identity(identity))
            .unwrap()
            .add_service(DestinationServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (port, requests, arrivals)
}

fn config(pki: &Pki, port: u16) -> ClientConfig {
    ClientConfig {
        endpoint: format!("https://localhost:{port}"),
        ca_pem: pki.ca_pem.clone().into_bytes(),
        server_name: None,
        node: "node-a".into(),
        token: TokenSource::Static("t".into()),
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_that_does_not_apply_leads_to_a_snapshot() {
    let pki = pki();
    let (port, requests, _) = serve(
        &pki,
        vec![
            // Snapshot at 3, then a delta claiming to start from 5.
            Ok(vec![
                response(3, None, &["a"]),
                response(7, Some(5), &["b"]),
            ]),
            // The client must now ask without a resume point.
            Ok(vec![response(9, None, &["a", "c"])]),
        ],
    )
    .await;
    let mut handle = client::spawn(config(&pki, port));
    let view = tokio::time::timeout(
        Duration::from_secs(10),
        handle.view.wait_for(|v| v.version == 9),
    )
    .await
    .expect("converges on the second stream's snapshot")
    .unwrap()
    .clone();
    assert_eq!(view.workloads.keys().collect::<Vec<_>>(), ["a", "c"]);
    assert!(
        !view.workloads.contains_key("b"),
        "the bad delta was not applied"
    );
    let requests = requests.lock().unwrap().clone();
    assert_eq!((requests[0].epoch.as_str(), requests[0].version), ("", 0));
    assert_eq!(requests[1].node, "node-a");
    assert_eq!(
        requests[1].epoch, "",
        "no resume point after a delta that did not apply"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_credential_is_retried_with_backoff_and_reported() {
    let pki = pki();
    let refused = || Err(Status::unauthenticated("credential not recognised"));
    let (port, requests, arrivals) = serve(
        &pki,
        vec![
            refused(),
            refused(),
            refused(),
            Ok(vec![response(1, None, &["a"])]),
        ],
    )
    .await;
    // Delays large enough to tell apart from a reconnect's own cost, and a
    // cap above them, so that each retry should wait twice the one before.
    const INITIAL: Duration = Duration::from_millis(200);
    let mut config = config(&pki, port);
    config.backoff = Backoff {
        initial: INITIAL,
        max: Duration::from_secs(10),
    };
    let mut handle = client::spawn(config);
    let state = tokio::time::timeout(
        Duration::from_secs(10),
        handle
            .state
            .wait_for(|s| matches!(s, ConnectionState::Disconnected { .. })),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    let ConnectionState::Disconnected { reason } = state else {
        unreachable!()
    };
    assert!(reason.contains("credential not recognised"), "{reason}");
    tokio::time::timeout(
        Duration::from_secs(20),
        handle.view.wait_for(|v| v.version == 1),
    )
    .await
    .expect("retries until accepted")
    .unwrap();
    assert_eq!(requests.lock().unwrap().len(), 4);
    // The backoff: each retry waited at least its delay (initial, doubling;
    // jitter only adds). Lower bounds only: a loaded machine makes gaps
    // longer, never shorter, so this cannot fail for want of CPU; a client
    // that retries at once or at a fixed pace fails it.
    let arrivals = arrivals.lock().unwrap().clone();
    let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    for (n, gap) in gaps.iter().enumerate() {
        let least = INITIAL * 2u32.pow(n as u32);
        assert!(
            *gap >= least,
            "retry {} after {gap:?}, before {least:?}: {gaps:?}",
            n + 1
        );
    }
}
