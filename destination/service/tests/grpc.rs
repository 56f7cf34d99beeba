//! The Watch API over real TLS on loopback.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Streaming};
use weft_destination_api::client::{self, Backoff, ClientConfig, ConnectionState, TokenSource};
use weft_destination_api::proto::destination_client::DestinationClient;
use weft_destination_api::{View, WatchRequest, WatchResponse, address};

const WAIT: Duration = Duration::from_secs(10);

async fn channel(served: &Served, pki: &Pki, window: Option<u32>) -> Channel {
    Endpoint::from_shared(served.url())
        .unwrap()
        .initial_stream_window_size(window)
        .initial_connection_window_size(window)
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&pki.ca_pem))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn watch(
    channel: Channel,
    token: Option<&str>,
    node: &str,
    epoch: &str,
    version: u64,
) -> Result<Streaming<WatchResponse>, tonic::Status> {
    let mut request = tonic::Request::new(WatchRequest {
        node: node.into(),
        epoch: epoch.into(),
        version,
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    DestinationClient::new(channel)
        .watch(request)
        .await
        .map(|r| r.into_inner())
}

async fn next(stream: &mut Streaming<WatchResponse>) -> WatchResponse {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a response within the timeout")
        .expect("the stream is healthy")
        .expect("the stream is open")
}

/// Two nodes: node-a runs an enrolled client and server; node-b runs a pod
/// of a namespace outside the mesh.
fn two_node_cluster() -> Cluster {
    let mut c = Cluster::default();
    c.apply(namespace("shop", true))
        .apply(namespace("legacy", false))
        .apply(pod(
            "shop",
            "client",
            "node-a",
            "10.244.0.2",
            json!({"app": "client"}),
        ))
        .apply(pod(
            "shop",
            "server",
            "node-a",
            "10.244.0.3",
            json!({"app": "server"}),
        ))
        .apply(service(
            "shop",
            "server",
            "10.96.0.10",
            json!({"app": "server"}),
        ))
        .apply(pod(
            "legacy",
            "batch",
            "node-b",
            "10.244.1.2",
            json!({"app": "batch"}),
        ));
    c
}

fn uids(view: &View) -> Vec<String> {
    view.workloads.keys().cloned().collect()
}

fn config(served: &Served, pki: &Pki, node: &str) -> ClientConfig {
    ClientConfig {
        endpoint: served.url(),
        ca_pem: pki.ca_pem.clone().into_bytes(),
        server_name: Some("localhost".into()),
        node: node.into(),
        token: TokenSource::Static(token(node)),
        backoff: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(200),
        },
    }
}

async fn wait_view(
    rx: &mut tokio::sync::watch::Receiver<View>,
    what: &str,
    check: impl FnMut(&View) -> bool,
) -> View {
    tokio::time::timeout(WAIT, rx.wait_for(check))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_subscribers_on_different_nodes_get_their_own_views() {
    let pki = pki();
    let creds = Credentials::new(&["node-a", "node-b"]);
    let served = Served::start(&pki, &creds).await;
    served.publish(&two_node_cluster());

    let mut a = client::spawn(config(&served, &pki, "node-a"));
    let mut b = client::spawn(config(&served, &pki, "node-b"));
    let va = wait_view(&mut a.view, "node-a's view", |v| v.version > 0).await;
    let vb = wait_view(&mut b.view, "node-b's view", |v| v.version > 0).await;

    // node-a has enrolled pods: its own pods and the Service, with the
    // server backing it by reference.
    assert_eq!(uids(&va), ["uid-shop-client", "uid-shop-server"]);
    let server = va
        .workload_by_address("10.244.0.3".parse().unwrap())
        .unwrap();
    assert_eq!(server.identity, "spiffe://cluster.local/ns/shop/sa/server");
    let svc = va.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
    assert_eq!(svc.endpoints.len(), 1);
    assert_eq!(svc.endpoints[0].workload_uid, "uid-shop-server");

    // node-b has no enrolled pod: only its own pod, nothing of the mesh.
    assert_eq!(uids(&vb), ["uid-legacy-batch"]);
    assert!(vb.services.is_empty());
    assert!(!vb.workloads["uid-legacy-batch"].enrolled);

    assert_eq!(*a.state.borrow(), ConnectionState::Connected);
    assert_eq!(served.metrics.subscribers.get(), 2);

    // Enrolling legacy (a label change) gives node-b the mesh without any
    // restart.
    let mut cluster = two_node_cluster();
    cluster.apply(namespace("legacy", true));
    served.publish(&cluster);
    let vb = wait_view(&mut b.view, "node-b enrolled", |v| {
        v.workloads
            .get("uid-legacy-batch")
            .is_some_and(|w| w.enrolled)
    })
    .await;
    assert_eq!(
        uids(&vb),
        ["uid-legacy-batch", "uid-shop-client", "uid-shop-server"]
    );
    assert!(vb.service_by_vip("10.96.0.10".parse().unwrap()).is_some());

    drop(a);
    drop(b);
    tokio::time::timeout(WAIT, async {
        while served.metrics.subscribers.get() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("closed streams leave the subscriber gauge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_may_only_watch_itself() {
    let pki = pki();
    let creds = Credentials::new(&["node-a", "node-b"]);
    let served = Served::start(&pki, &creds).await;
    served.publish(&two_node_cluster());
    let ch = channel(&served, &pki, None).await;

    let err = watch(ch.clone(), Some(&token("node-a")), "node-b", "", 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    let err = watch(ch.clone(), None, "node-a", "", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    let err = watch(ch.clone(), Some("not-a-token"), "node-a", "", 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    let mut ok = watch(ch, Some(&token("node-a")), "node-a", "", 0)
        .await
        .unwrap();
    assert!(next(&mut ok).await.snapshot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_subscriber_resumes_with_a_delta() {
    let pki = pki();
    let creds = Credentials::new(&["node-a"]);
    let served = Served::start(&pki, &creds).await;
    let mut cluster = two_node_cluster();
    served.publish(&cluster);
    let ch = channel(&served, &pki, None).await;
    let tok = token("node-a");

    let mut stream = watch(ch.clone(), Some(&tok), "node-a", "", 0)
        .await
        .unwrap();
    let first = next(&mut stream).await;
    assert!(first.snapshot);
    let mut held = View::default();
    held.apply(first).unwrap();
    drop(stream);

    // While disconnected: a new pod, and the server pod changes node.
    cluster.apply(pod(
        "shop",
        "web",
        "node-a",
        "10.244.0.4",
        json!({"app": "web"}),
    ));
    served.publish(&cluster);
    cluster.apply(pod(
        "shop",
        "server",
        "node-c",
        "10.244.2.3",
        json!({"app": "server"}),
    ));
    served.publish(&cluster);

    let mut stream = watch(ch.clone(), Some(&tok), "node-a", &held.epoch, held.version)
        .await
        .unwrap();
    let resumed = next(&mut stream).await;
    assert!(!resumed.snapshot, "a recent version resumes with a delta");
    assert_eq!(resumed.base_version, held.version);
    assert_eq!(
        resumed.workloads.len(),
        2,
        "only what changed: web added, server moved"
    );
    held.apply(resumed).unwrap();

    let mut fresh_stream = watch(ch.clone(), Some(&tok), "node-a", "", 0)
        .await
        .unwrap();
    let mut fresh = View::default();
    fresh.apply(next(&mut fresh_stream).await).unwrap();
    assert_eq!(held, fresh, "resumed view converges to a fresh snapshot");
    let server = held
        .workload_by_address("10.244.2.3".parse().unwrap())
        .unwrap();
    assert_eq!(server.node, "node-c");
    assert!(
        held.workload_by_address("10.244.0.3".parse().unwrap())
            .is_none()
    );

    // Already current: an empty delta confirms it.
    let mut stream = watch(ch.clone(), Some(&tok), "node-a", &held.epoch, held.version)
        .await
        .unwrap();
    let same = next(&mut stream).await;
    assert!(!same.snapshot);
    assert_eq!(
        (same.base_version, same.version),
        (held.version, held.version)
    );
    assert!(same.workloads.is_empty() && same.removed_workloads.is_empty());

    // Another epoch (a restarted control plane): a snapshot.
    let mut stream = watch(ch, Some(&tok), "node-a", "0123456789abcdef", held.version)
        .await
        .unwrap();
    assert!(next(&mut stream).await.snapshot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_keeps_its_view_while_the_control_plane_is_gone_then_converges() {
    let pki = pki();
    let creds = Credentials::new(&["node-a"]);
    let served = Served::start(&pki, &creds).await;
    served.publish(&two_node_cluster());
    let addr = served.addr;

    let mut handle = client::spawn(config(&served, &pki, "node-a"));
    let before = wait_view(&mut handle.view, "first view", |v| v.version > 0).await;
    assert_eq!(uids(&before), ["uid-shop-client", "uid-shop-server"]);

    served.stop().await;
    tokio::time::timeout(
        WAIT,
        handle
            .state
            .wait_for(|s| matches!(s, ConnectionState::Disconnected { .. })),
    )
    .await
    .expect("the client notices the control plane is gone")
    .unwrap();
    assert_eq!(
        uids(&handle.view.borrow()),
        uids(&before),
        "the last view is kept"
    );

    // A new control plane run (new epoch) with a changed cluster.
    let served = Served::start_on(&pki, &creds, addr).await;
    let mut cluster = two_node_cluster();
    cluster.apply(pod(
        "shop",
        "web",
        "node-a",
        "10.244.0.4",
        json!({"app": "web"}),
    ));
    served.publish(&cluster);
    let after = wait_view(&mut handle.view, "the new run's view", |v| {
        v.workloads.contains_key("uid-shop-web")
    })
    .await;
    assert_ne!(after.epoch, before.epoch);
    assert_eq!(
        uids(&after),
        ["uid-shop-client", "uid-shop-server", "uid-shop-web"]
    );
    tokio::time::timeout(
        WAIT,
        handle.state.wait_for(|s| *s == ConnectionState::Connected),
    )
    .await
    .unwrap()
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_gets_one_coalesced_delta_not_a_backlog() {
    const UPDATES: usize = 400;
    let pki = pki();
    let creds = Credentials::new(&["node-a"]);
    let served = Served::start(&pki, &creds).await;
    let mut cluster = Cluster::default();
    cluster.apply(namespace("shop", true));
    cluster.apply(pod("shop", "anchor", "node-a", "10.244.0.2", json!({})));
    served.publish(&cluster);

    // A 16 KiB window: the subscriber's transport stops accepting data
    // after a few updates while it does not read.
    let ch = channel(&served, &pki, Some(16 * 1024)).await;
    let mut stream = watch(ch, Some(&token("node-a")), "node-a", "", 0)
        .await
        .unwrap();
    let mut view = View::default();
    view.apply(next(&mut stream).await).unwrap();

    // Each update adds a pod carrying ~2 KiB: without coalescing the
    // server would have to hold ~800 KiB for this subscriber.
    let blob = "x".repeat(2048);
    for i in 0..UPDATES {
        let ip = format!("10.244.{}.{}", 10 + i / 200, 2 + i % 200);
        cluster.apply(pod(
            "shop",
            &format!("p{i:04}"),
            "node-a",
            &ip,
            json!({"blob": blob}),
        ));
        served.publish(&cluster);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let final_version = served.publisher.generation();

    let mut responses = 0;
    while view.version != final_version {
        view.apply(next(&mut stream).await).unwrap();
        responses += 1;
    }
    eprintln!("{responses} responses carried {UPDATES} updates");
    assert_eq!(view.workloads.len(), UPDATES + 1);
    assert!(
        responses < UPDATES / 4,
        "{responses} responses for {UPDATES} updates: not coalesced"
    );
    let p = view.workloads.get("uid-shop-p0399").unwrap();
    assert_eq!(
        address::decode(&p.addresses[0]),
        Some("10.244.11.201".parse().unwrap())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_skips_superseded_versions_entirely() {
    const UPDATES: usize = 400;
    let pki = pki();
    let creds = Credentials::new(&["node-a"]);
    let served = Served::start(&pki, &creds).await;
    let mut cluster = Cluster::default();
    cluster.apply(namespace("shop", true));
    cluster.apply(pod("shop", "hot", "node-a", "10.244.0.2", json!({})));
    served.publish(&cluster);

    let ch = channel(&served, &pki, Some(16 * 1024)).await;
    let mut stream = watch(ch, Some(&token("node-a")), "node-a", "", 0)
        .await
        .unwrap();
    let mut view = View::default();
    view.apply(next(&mut stream).await).unwrap();

    // The same pod changes 400 times, ~2 KiB each time: 800 KiB of updates
    // of which only the last matters.
    for i in 0..UPDATES {
        let blob = format!("{i:04}{}", "x".repeat(2048));
        cluster.apply(pod(
            "shop",
            "hot",
            "node-a",
            "10.244.0.2",
            json!({"blob": blob}),
        ));
        served.publish(&cluster);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let final_version = served.publisher.generation();

    let mut received_bytes = 0;
    while view.version != final_version {
        let response = next(&mut stream).await;
        received_bytes += prost::Message::encoded_len(&response);
        view.apply(response).unwrap();
    }
    let produced = UPDATES * 2048;
    eprintln!("{received_bytes} bytes received for {produced} bytes of updates");
    // What was superseded while the subscriber did not read was never
    // queued: at most the transport's windows' worth plus the final state.
    assert!(
        received_bytes < produced / 8,
        "{received_bytes} bytes delivered of {produced}: superseded versions were queued"
    );
    let blob = &view.workloads["uid-shop-hot"].labels["blob"];
    assert!(blob.starts_with(&format!("{:04}", UPDATES - 1)));
}
