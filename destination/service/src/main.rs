//! `weft-destination`: the control plane service that streams per-node
//! views of the cluster to node proxies. See docs/destination.md.

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::mpsc;
use weft_destination::admin::Admin;
use weft_destination::index::{EndpointsFrom, IndexConfig};
use weft_destination::metrics::Metrics;
use weft_destination::publisher::Publisher;
use weft_destination::server::{self, DestinationService, TlsFiles};
use weft_destination::source::local::LocalSource;
use weft_destination::store::ClusterObjects;
use weft_destination::{indexer, source};
use weft_node_auth::kubernetes::{DESTINATION_AUDIENCE, TokenReviewAuthenticator};
use weft_node_auth::{LocalCredentials, NodeAuthenticator};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SourceKind {
    /// A directory of manifests (the simulator's), plus its state file.
    Local,
    /// The Kubernetes API (in-cluster config or KUBECONFIG).
    Kube,
}

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Weft destination service: streams per-node views of the cluster to node proxies"
)]
struct Args {
    #[arg(long, value_enum, default_value = "local")]
    source: SourceKind,
    /// Manifest directory (local source).
    #[arg(long, required_if_eq("source", "local"))]
    manifests: Option<PathBuf>,
    /// The simulator's state file, for pod IPs and ClusterIPs the manifests
    /// leave out (local source).
    #[arg(long)]
    cluster_state: Option<PathBuf>,
    /// gRPC (Watch) listen address.
    #[arg(long, default_value = "0.0.0.0:15010")]
    grpc_addr: SocketAddr,
    /// /metrics, /ready and /live.
    #[arg(long, default_value = "0.0.0.0:15015")]
    admin_addr: SocketAddr,
    /// PEM certificate chain the gRPC server presents.
    #[arg(long)]
    tls_cert: PathBuf,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    tls_key: PathBuf,
    /// Directory of `<node>.token` files (local mode node credentials: the
    /// node proxies' destination credentials, not their CA ones). Without
    /// it, node proxies are authenticated by TokenReview (audience
    /// `weft-destination`), which needs the Kubernetes API.
    #[arg(long)]
    local_credentials: Option<PathBuf>,
    /// The node proxy's service account, `<namespace>/<name>` (TokenReview);
    /// tokens of any other account are refused.
    #[arg(long, default_value = weft_node_auth::kubernetes::DEFAULT_NODE_PROXY_ACCOUNT)]
    node_proxy_service_account: String,
    #[arg(long, default_value = weft_destination_api::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// The cluster-wide default inbound policy (docs/policy.md); namespaces
    /// and pods override it with the annotation weft.io/default-inbound-policy.
    #[arg(long, default_value = "all-unauthenticated", value_parser = parse_default_policy)]
    default_inbound_policy: weft_policy_api::DefaultPolicy,
    /// The networks cluster-authenticated and cluster-unauthenticated admit:
    /// comma-separated CIDRs.
    #[arg(long, default_value = weft_destination::index::policy::networks::DEFAULT_CLUSTER_NETWORKS,
          value_parser = parse_networks)]
    cluster_networks: Networks,
}

fn parse_default_policy(s: &str) -> Result<weft_policy_api::DefaultPolicy, String> {
    s.parse()
        .map_err(|e: weft_policy_api::server::UnknownPolicy| e.to_string())
}

/// A newtype: clap would otherwise take a Vec as a repeated argument.
#[derive(Clone, Debug)]
struct Networks(Vec<weft_destination::index::policy::networks::Cidr>);

fn parse_networks(s: &str) -> Result<Networks, String> {
    weft_destination::index::policy::networks::parse_list(s)
        .map(Networks)
        .map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        // Logs are diagnostics: on stderr, as weft-identity's. On stdout, a
        // reader that went away (`weft-destination … | head`) turned every
        // later log line into a "Broken pipe" complaint on stderr.
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: escape codes in `kubectl logs`,
        // a file or a log collector are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(Args::parse()).await {
        eprintln!("weft-destination: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    // One crypto provider for the process (ring), whatever the dependencies
    // would otherwise pick.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let auth: Arc<dyn NodeAuthenticator> = match &args.local_credentials {
        Some(dir) => Arc::new(LocalCredentials::new(dir)),
        None => {
            let client = kube::Client::try_default().await.context(
                "no node authentication: TokenReview needs the Kubernetes API \
                 (in-cluster or KUBECONFIG); for local mode pass --local-credentials DIR",
            )?;
            Arc::new(TokenReviewAuthenticator::new(
                client,
                &args.node_proxy_service_account,
                DESTINATION_AUDIENCE,
            ))
        }
    };
    let tls = TlsFiles::read(&args.tls_cert, &args.tls_key)?;
    let metrics = Arc::new(Metrics::new());
    let publisher = Arc::new(Publisher::new(metrics.clone()));
    let (tx, rx) = mpsc::channel(1024);

    let (objects, endpoints) = match args.source {
        SourceKind::Local => (
            ClusterObjects {
                tracks_service_accounts: true,
                ..Default::default()
            },
            EndpointsFrom::Selectors,
        ),
        SourceKind::Kube => (ClusterObjects::default(), EndpointsFrom::EndpointSlices),
    };
    let config = IndexConfig {
        trust_domain: args.trust_domain.clone(),
        cluster_domain: args.cluster_domain.clone(),
        endpoints,
        default_policy: args.default_inbound_policy,
        cluster_networks: args.cluster_networks.0.clone(),
    };
    let mut source_task = match args.source {
        SourceKind::Local => {
            let dir = args.manifests.clone().context("--manifests is required")?;
            let local = LocalSource::new(dir, args.cluster_state.clone(), metrics.clone());
            tokio::spawn(async move { local.run(tx).await.map_err(anyhow::Error::from) })
        }
        SourceKind::Kube => {
            let client = kube::Client::try_default()
                .await
                .context("cannot configure the Kubernetes client (in-cluster or KUBECONFIG)")?;
            let metrics = metrics.clone();
            // Each policy object's Accepted condition, kept up to date.
            tokio::spawn(source::kube_status::run(
                client.clone(),
                publisher.policy_statuses(),
            ));
            tokio::spawn(async move {
                source::kube::run(client, tx, metrics).await;
                Ok(())
            })
        }
    };
    // The indexer only ends if a rebuild panicked: then views would go
    // stale silently, so the process exits and is restarted instead.
    let mut indexer_task = tokio::spawn(indexer::run(objects, config, rx, publisher.clone()));

    let admin_listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("cannot listen on {} (--admin-addr)", args.admin_addr))?;
    let admin = Admin {
        metrics: metrics.clone(),
        ready: publisher.ready(),
    };
    let admin_addr = admin_listener.local_addr().unwrap_or(args.admin_addr);
    tokio::spawn(admin.serve(admin_listener));

    let grpc_listener = tokio::net::TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("cannot listen on {} (--grpc-addr)", args.grpc_addr))?;
    // The bound addresses, not the flags: with port 0 the kernel chose, and
    // whoever started us (a test, a script) learns the ports from here.
    let grpc_addr = grpc_listener.local_addr().unwrap_or(args.grpc_addr);
    tracing::info!(
        grpc = %grpc_addr,
        admin = %admin_addr,
        "weft-destination serving"
    );
    let service = DestinationService::new(publisher, auth);
    // SIGTERM (Kubernetes stopping the pod) or Ctrl-C: end the streams so
    // proxies reconnect to another replica at once.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    tokio::select! {
        r = server::serve(grpc_listener, tls, service, shutdown) => r?,
        _ = &mut indexer_task => bail!("the indexer stopped; views would go stale"),
        r = &mut source_task => match r {
            Ok(Ok(())) => bail!("the source stopped"),
            Ok(Err(e)) => return Err(e),
            Err(e) => bail!("the source task failed: {e}"),
        },
    }
    Ok(())
}
