//! `weft-node-proxy`: one per node (a DaemonSet pod with host networking,
//! privileged for eBPF and namespace hand-off).

use clap::Parser;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use weft_node_proxy::admin;
use weft_node_proxy::metrics::{ProcessCollector, TcpMetrics};
use weft_node_proxy::pods::{Context, PodRegistry};
use weft_redirector::{PodRegistrationListener, Redirector, RedirectorConfig};

#[derive(Parser, Debug)]
#[command(name = "weft-node-proxy", about = "Weft's per-node proxy")]
struct Args {
    /// The Kubernetes node this proxy serves.
    #[arg(long, env = "WEFT_NODE_NAME")]
    node: String,
    /// Where pods are registered (shared with the CNI plugin).
    #[arg(long, default_value = weft_cni::protocol::DEFAULT_AGENT_SOCKET)]
    agent_socket: PathBuf,
    /// bpffs directory for the redirection programs and maps.
    #[arg(long, default_value = weft_redirector::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    health_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// How long open connections may take to finish after SIGTERM.
    #[arg(long, default_value = "10")]
    drain_seconds: u64,
    /// Remove the eBPF programs when exiting. For a node leaving the mesh
    /// for good (and the simulator); a DaemonSet rollout must not, so that
    /// enrolled pods fail closed while the proxy restarts.
    #[arg(long)]
    uninstall_on_exit: bool,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let redirector = Arc::new(Redirector::install(RedirectorConfig {
        pin_dir: args.pin_dir.clone(),
        cgroup_root: None,
    })?);
    let mut registry = Registry::default();
    let tcp_metrics = TcpMetrics::default();
    tcp_metrics.register(&mut registry);
    registry.register_collector(Box::new(ProcessCollector::new()));
    let pods = Arc::new(PodRegistry::new(
        redirector.clone(),
        Context { tcp_metrics },
    ));

    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {addr} for {what}: {e} (is another node proxy running?)"
            )
        })
    };
    tokio::spawn(admin::serve(
        bind(args.metrics_addr, "metrics").await?,
        admin::metrics_handler(Arc::new(registry)),
        stopped(stop_rx.clone()),
    ));
    tokio::spawn(admin::serve(
        bind(args.health_addr, "health").await?,
        admin::health_handler(ready_rx),
        stopped(stop_rx.clone()),
    ));
    let dump_pods = pods.clone();
    let node = args.node.clone();
    tokio::spawn(admin::serve(
        bind(args.admin_addr, "admin").await?,
        admin::admin_handler(move || {
            let pods: Vec<_> = dump_pods
                .pods()
                .iter()
                .map(|p| serde_json::json!({"namespace": p.namespace, "name": p.name, "uid": p.uid, "netns": p.netns.path()}))
                .collect();
            serde_json::json!({ "node": node, "pods": pods })
        }),
        stopped(stop_rx.clone()),
    ));

    if let Some(dir) = args.agent_socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut registrations = PodRegistrationListener::bind(&args.agent_socket).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen for pod registrations on {}: {e}",
            args.agent_socket.display()
        )
    })?;
    // Without a control plane yet, the proxy is ready as soon as it can take
    // pods (the destination and identity issues add their conditions).
    let _ = ready_tx.send(true);
    tracing::info!(node = %args.node, socket = %args.agent_socket.display(), "node proxy ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            request = registrations.next() => {
                let Some(request) = request else { break };
                match pods.handle(request.event.clone()) {
                    Ok(()) => request.ack(),
                    Err(e) => {
                        tracing::warn!(error = %e, "pod registration refused");
                        request.reject(e);
                    }
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(seconds = args.drain_seconds, "draining");
    let _ = ready_tx.send(false);
    let _ = stop_tx.send(true);
    drop(registrations);
    // Connections in flight run on their own tasks; give them the deadline.
    tokio::time::sleep(Duration::from_millis(100).min(Duration::from_secs(args.drain_seconds)))
        .await;
    drop(pods);
    if args.uninstall_on_exit {
        match Arc::try_unwrap(redirector) {
            Ok(r) => r.uninstall()?,
            Err(_) => weft_redirector::uninstall_at(&args.pin_dir)?,
        }
        tracing::info!("eBPF programs removed");
    }
    Ok(())
}
