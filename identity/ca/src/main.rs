//! `weft-identity serve|init`.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use weft_identity::authority::LeafPolicy;
use weft_identity::kubernetes::KubeWorkloads;
use weft_identity::server::{self, ServeConfig};
use weft_identity::serving::default_server_names;
use weft_identity::workloads::WorkloadDirectory;
use weft_identity::{init, workloads::LocalClusterDirectory};
use weft_identity_api::DEFAULT_TRUST_DOMAIN;
use weft_node_auth::kubernetes::{IDENTITY_AUDIENCE, TokenReviewAuthenticator};
use weft_node_auth::{LocalCredentials, NodeAuthenticator};

#[derive(Parser)]
#[command(name = "weft-identity", about = "The Weft mesh CA")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve Certify and the trust bundle over gRPC/TLS.
    Serve {
        /// Directory with tls.crt, tls.key (PKCS#8), ca.crt (cert-manager's layout).
        #[arg(long, default_value = "/var/run/weft/ca")]
        ca_dir: PathBuf,
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: SocketAddr,
        #[arg(long, default_value = "0.0.0.0:15014")]
        metrics_listen: SocketAddr,
        /// Workload certificate lifetime, seconds.
        #[arg(long, default_value_t = 24 * 3600)]
        leaf_ttl_seconds: u64,
        /// How far notBefore is back-dated, seconds.
        #[arg(long, default_value_t = 60)]
        clock_skew_seconds: u64,
        /// Names (DNS or IP) in the CA's serving certificate; repeat the flag.
        /// Default: the weft-identity Service names, localhost, 127.0.0.1, ::1.
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Local mode: directory of `<node>.token` files written by weft-sim.
        /// Without the two `--local-*` flags the CA runs against Kubernetes
        /// (in-cluster config or KUBECONFIG): TokenReview and the pods API.
        #[arg(long, requires = "local_cluster_state")]
        local_credentials: Option<PathBuf>,
        /// Local mode: weft-sim's state file (which pods run on which node).
        #[arg(long, requires = "local_credentials")]
        local_cluster_state: Option<PathBuf>,
        /// Kubernetes mode: the node proxy's service account, `<namespace>/<name>`;
        /// tokens of any other account are refused.
        #[arg(long, default_value = weft_node_auth::kubernetes::DEFAULT_NODE_PROXY_ACCOUNT)]
        node_proxy_service_account: String,
    },
    /// Write a new trust anchor and issuer into DIR (cert-manager's layout).
    Init {
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        #[arg(long)]
        out: PathBuf,
        /// Issuer lifetime, days (the anchor lives 10 years).
        #[arg(long, default_value_t = 365)]
        issuer_days: u64,
    },
}

/// The exit status a shell reports for a tool ended by SIGPIPE (128 + 13):
/// `weft-identity init … | head` ends quietly, as other tools do, instead
/// of panicking in `println!`.
const CLOSED_PIPE: u8 = 141;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::from(CLOSED_PIPE)
        }
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    // One default crypto provider for the process (ring, as the CA's own
    // TLS uses), as the destination service does: when rustls is built
    // with aws-lc-rs too (a test build: the node proxy's benchmark compares
    // the two), a dependency that asks rustls for the default (the
    // Kubernetes client) would otherwise find none.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: escape codes in `kubectl logs`,
        // a file or a log collector are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Init {
            trust_domain,
            out,
            issuer_days,
        } => {
            const DAY: u64 = 24 * 3600;
            let anchor = init::trust_anchor(&trust_domain, "1", Duration::from_secs(3650 * DAY))?;
            let issuer = init::issuer(
                &anchor,
                &trust_domain,
                "1",
                Duration::from_secs(issuer_days * DAY),
            )?;
            init::write_layout(&out, &issuer, &[&anchor])?;
            writeln!(
                std::io::stdout(),
                "wrote tls.crt, tls.key, ca.crt to {}",
                out.display()
            )?;
            Ok(())
        }
        Command::Serve {
            ca_dir,
            trust_domain,
            listen,
            metrics_listen,
            leaf_ttl_seconds,
            clock_skew_seconds,
            server_names,
            local_credentials,
            local_cluster_state,
            node_proxy_service_account,
        } => {
            weft_identity_api::SpiffeId::new(&trust_domain, "x", "x").context("--trust-domain")?;
            let mut policy = LeafPolicy::new(trust_domain);
            policy.ttl = Duration::from_secs(leaf_ttl_seconds.max(1));
            policy.clock_skew = Duration::from_secs(clock_skew_seconds);
            let config = ServeConfig {
                ca_dir,
                listen,
                metrics_listen,
                server_names: if server_names.is_empty() {
                    default_server_names()
                } else {
                    server_names
                },
                policy,
                poll: Duration::from_secs(30),
            };
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let (auth, workloads): (Arc<dyn NodeAuthenticator>, Arc<dyn WorkloadDirectory>) =
                    match (local_credentials, local_cluster_state) {
                        (Some(credentials), Some(state)) => (
                            Arc::new(LocalCredentials::new(credentials)),
                            Arc::new(LocalClusterDirectory::new(state)),
                        ),
                        _ => {
                            let client = kube::Client::try_default().await.context(
                                "no Kubernetes configuration; for local mode pass --local-credentials and --local-cluster-state",
                            )?;
                            (
                                Arc::new(TokenReviewAuthenticator::new(
                                    client.clone(),
                                    &node_proxy_service_account,
                                    IDENTITY_AUDIENCE,
                                )),
                                Arc::new(KubeWorkloads::new(client)),
                            )
                        }
                    };
                let ca = server::spawn(config, auth, workloads).await?;
                // Whoever started us may have stopped reading: the CA
                // serves on regardless, so a closed stdout is no error.
                match writeln!(std::io::stdout(), "ready {} metrics {}", ca.addr, ca.metrics_addr) {
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                    other => other?,
                }
                shutdown_signal().await;
                ca.stop().await;
                Ok(())
            })
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
