//! `weft-node-proxy`: one per node (a DaemonSet pod with host networking,
//! privileged for eBPF and namespace hand-off).

use clap::Parser;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use weft_node_proxy::admin;
use weft_node_proxy::pods::registering;
use weft_node_proxy::pods::{PodRegistry, Records, RecoveryMetrics};
use weft_node_proxy::policy::InboundAuthz;
use weft_node_proxy::proxy::ProxyInputs;
use weft_node_proxy::state::ControlPlane;
use weft_node_proxy::state::admission::{Admission, admit};
use weft_node_proxy::telemetry::{ProcessCollector, TcpMetrics};
use weft_node_proxy::transport::{ConnectionThreads, DrainWatch};
use weft_redirector::{PodRegistrationListener, Redirector, RedirectorConfig};
use weft_registration::PodEvent;

/// glibc malloc, at most two arenas (the main one and one shared by the
/// other threads). By default glibc gives each thread that meets a locked
/// arena its own, up to 8 per core, and a freed arena's pages stay
/// resident: with the runtime's workers, the blocking pool and the threads
/// that enter pod namespaces, that was ~2 MiB more RSS with 100 enrolled
/// pods and after load, for no measurable CPU saving (docs/benchmarks.md,
/// 2026-12-07; mimalloc and jemalloc were measured too and held more).
/// Before any thread exists, so that every arena is created under it.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a tuning parameter of glibc's allocator;
    // no thread other than this one exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Installing the redirector built its eBPF loader, which parses the
/// kernel's BTF: ~20 MiB of short-lived allocations on the main heap. glibc
/// gives back the free top of a heap by itself, not the free chunks below
/// the allocations that outlive the parse: 1.6 MiB of idle RSS (heap 2.3 →
/// 0.6 MiB, docs/benchmarks.md 2026-12-07). Once, after install.
fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only hands free pages of glibc's heaps back to
    // the kernel; it touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How long a registration waits for the pod to appear in the view.
const VIEW_WAIT: Duration = Duration::from_secs(5);

#[derive(Parser, Debug)]
#[command(name = "weft-node-proxy", about = "Weft's per-node proxy")]
struct Args {
    /// The Kubernetes node this proxy serves.
    #[arg(long, env = "WEFT_NODE_NAME")]
    node: String,
    /// Where pods are registered (shared with the CNI plugin).
    #[arg(long, default_value = weft_registration::DEFAULT_AGENT_SOCKET)]
    agent_socket: PathBuf,
    /// Node-local directory where the proxy keeps every pod registration
    /// and a bind mount of its network namespace, so that a proxy started
    /// again (a crash, a rollout) finds the pods already on the node. On
    /// Kubernetes a hostPath with `mountPropagation: Bidirectional`.
    #[arg(long, default_value = "/var/run/weft/node-proxy")]
    state_dir: PathBuf,
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
    /// Threads that proxy traffic (default: 2, or 1 on a one-core node).
    ///
    /// The node proxy shares the node with the pods it serves, so its
    /// share is bounded rather than one thread per core, as ztunnel's two
    /// workers by default and Linkerd's per-pod CPU limit do. Each pod's
    /// connections run on one of these threads, pods dealt out in turn: a
    /// request crosses several tasks (the client's connection, the
    /// upstream connection, the tunnel), and a hop to another thread is a
    /// wake-up through the kernel (docs/benchmarks.md). One pod's traffic
    /// therefore uses one thread at most.
    #[arg(long, env = "WEFT_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=256))]
    worker_threads: Option<u16>,
    /// Connections one local pod may have through the proxy at once (both
    /// directions); more are refused and counted in
    /// `weft_connections_refused_total{reason="pod_limit"}`.
    #[arg(long, default_value_t = weft_node_proxy::transport::limits::DEFAULT_PER_POD)]
    max_connections_per_pod: usize,
    /// Connections the proxy carries at once for the whole node.
    #[arg(long, default_value_t = weft_node_proxy::transport::limits::DEFAULT_PER_NODE)]
    max_connections: usize,
    #[command(flatten)]
    control_plane: ControlPlaneFlags,
}

/// Where the control plane is. Without `--destination-address` the proxy
/// runs standalone: every registered pod is captured and all traffic is
/// plaintext passthrough (for tests of the redirection alone).
#[derive(clap::Args, Debug)]
struct ControlPlaneFlags {
    /// The destination service, `https://host:port`.
    #[arg(long, requires_all = ["ca_address", "trust_anchors", "ca_token_file", "destination_token_file"])]
    destination_address: Option<String>,
    /// Name the destination service's certificate carries (default: the
    /// host of `--destination-address`).
    #[arg(long)]
    destination_server_name: Option<String>,
    /// PEM CA for the destination service's certificate (default:
    /// `--trust-anchors`).
    #[arg(long)]
    destination_ca: Option<PathBuf>,
    /// The identity CA, `host:port`.
    #[arg(long)]
    ca_address: Option<String>,
    /// Name the CA's serving certificate carries.
    #[arg(long, default_value = "weft-identity.weft-system.svc")]
    ca_server_name: String,
    /// The mesh's trust anchors (`ca.crt`): the initial trust bundle.
    #[arg(long)]
    trust_anchors: Option<PathBuf>,
    /// This node's credential for the identity CA (re-read on every call;
    /// on Kubernetes a projected token of audience `weft-identity`).
    #[arg(long)]
    ca_token_file: Option<PathBuf>,
    /// This node's credential for the destination service (re-read on every
    /// call; on Kubernetes a projected token of audience `weft-destination`).
    /// Not the CA's: neither service can replay what it received to the
    /// other.
    #[arg(long)]
    destination_token_file: Option<PathBuf>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
}

/// Every connection of every enrolled pod of the node is a file descriptor
/// here (two on the destination side). Container runtimes commonly start
/// processes with a soft limit of 1024 and a much higher hard one, which
/// a busy node passes quickly; the soft limit is raised to the hard one,
/// as Go's runtime does for every Go program. Accepting goes on (after a
/// pause) when the limit is reached anyway: see `transport::accept_loop`.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open file limit"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open file limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open file limit"),
    }
}

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Logs (the access log included) are diagnostics: on stderr, as the
    // control plane's, so that a reader of stdout that went away cannot turn
    // every log line into a "Broken pipe" complaint.
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            // Colours only for a person at a terminal: escape codes in `kubectl logs`,
            // a file or a log collector are noise.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    raise_open_file_limit();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = args.worker_threads.map_or(cores.min(2), usize::from);
    // The control plane, certificates, pods' registration and the admin
    // server: one thread; traffic runs on the connection threads.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let threads = match ConnectionThreads::start(workers) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("cannot start {workers} connection threads: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, threads)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, threads: ConnectionThreads) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let tcp_metrics = TcpMetrics::default();
    tcp_metrics.register(&mut registry);
    registry.register_collector(Box::new(ProcessCollector::new()));
    let mesh = match &args.control_plane.destination_address {
        Some(address) => Some(connect_control_plane(
            &args.control_plane,
            address,
            &args.node,
            &mut registry,
        )?),
        None => None,
    };
    // Only once the configuration has been read and found whole: a proxy
    // that cannot run must not have changed the node's redirection first.
    let redirector = Arc::new(Redirector::install(RedirectorConfig {
        pin_dir: args.pin_dir.clone(),
        cgroup_root: None,
    })?);
    release_freed_heap();
    let mut inputs = ProxyInputs::new(tcp_metrics.clone(), mesh.clone());
    inputs.threads = threads;
    inputs.limits = weft_node_proxy::transport::ConnectionLimits::new(
        args.max_connections_per_pod,
        args.max_connections,
        tcp_metrics.clone(),
    );
    inputs.request_metrics.register(&mut registry);
    inputs.authz.metrics().register(&mut registry);
    let authz = inputs.authz.clone();
    // One drain for everything: the admin servers stop when it starts, and
    // every connection holds a watch until it is done.
    let drain = inputs.drain.clone();
    let recovery = RecoveryMetrics::default();
    recovery.register(&mut registry);
    let pods = Arc::new(PodRegistry::with_records(
        redirector.clone(),
        inputs,
        Some(Records::new(&args.state_dir)),
        recovery,
    ));

    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut watch: DrainWatch| async move { watch.signaled().await };
    // SO_REUSEPORT: in a rollout the new proxy binds these while the old
    // one still serves them, so they never stop answering.
    let bind = |addr: SocketAddr, what: &'static str| async move {
        admin::bind_shared(addr).map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {addr} for {what}: {e} (is a node proxy of another user running?)"
            )
        })
    };
    tokio::spawn(admin::serve(
        bind(args.metrics_addr, "metrics").await?,
        admin::metrics_handler(Arc::new(registry)),
        stopped(drain.watch()),
    ));
    tokio::spawn(admin::serve(
        bind(args.health_addr, "health").await?,
        admin::health_handler(ready_rx),
        stopped(drain.watch()),
    ));
    let dump_pods = pods.clone();
    let dump_mesh = mesh.clone();
    let node = args.node.clone();
    tokio::spawn(admin::serve(
        bind(args.admin_addr, "admin").await?,
        admin::admin_handler(move || config_dump(&node, &dump_pods, dump_mesh.as_ref())),
        stopped(drain.watch()),
    ));

    if let Some(dir) = args.agent_socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Taken over from a running proxy (rollout) in one rename: the CNI
    // plugin always finds a listening socket. Before the kept pods are
    // read, so a pod added from now on is this proxy's, and one added
    // before has its record.
    let mut registrations = PodRegistrationListener::bind(&args.agent_socket).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen for pod registrations on {}: {e}",
            args.agent_socket.display()
        )
    })?;
    let recovered = pods.recover();
    if recovered > 0 {
        tracing::info!(
            pods = recovered,
            "found pods registered to an earlier node proxy"
        );
    }
    // An ADD the previous proxy took just before the socket changed hands
    // is recorded once it is handled (up to VIEW_WAIT later): read the
    // records once more after that.
    let late = pods.clone();
    let late_recovery = tokio::spawn(async move {
        tokio::time::sleep(VIEW_WAIT + Duration::from_secs(5)).await;
        late.recover_late();
    });
    match &mesh {
        // Ready once the proxy has a view and a certificate for every pod
        // it captured; pods move in and out of the mesh as the view changes.
        Some(mesh) => {
            tokio::spawn(follow_view(
                mesh.clone(),
                pods.clone(),
                authz.clone(),
                ready_tx.clone(),
            ));
        }
        // Standalone: ready once every kept pod is captured again.
        None => {
            let ready = pods.all_served();
            if ready {
                tracing::info!("node proxy ready: every enrolled pod of this node is served");
            }
            let _ = ready_tx.send(ready);
        }
    }
    tracing::info!(node = %args.node, socket = %args.agent_socket.display(), mesh = mesh.is_some(), "node proxy listening for pods");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            request = registrations.next() => {
                let Some(request) = request else { break };
                // A new pod may register before the view has it (the
                // destination service learns of it at the same time): wait
                // a bounded moment for the view to decide, so that an
                // enrolled pod is captured before its containers start (and
                // refused, the kubelet retrying, if it still cannot be),
                // off the loop so other registrations are not held up. A
                // pod the view already places outside the mesh is not held.
                let (pods, mesh) = (pods.clone(), mesh.clone());
                tokio::spawn(async move {
                    if let (Some(mesh), PodEvent::Add { pod, ips, .. }) = (&mesh, &request.event) {
                        let decided = |v: &weft_destination_api::View| {
                            !matches!(admit(v, registering(pod, ips)), Admission::Undecided(_))
                        };
                        let mut view = mesh.view.clone();
                        let waited = tokio::time::timeout(VIEW_WAIT, view.wait_for(decided)).await;
                        if waited.is_err() {
                            tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name), "pod may be in the mesh and is not in the destination view yet: refused, the kubelet retries");
                        }
                    }
                    match pods.handle(request.event.clone()) {
                        Ok(()) => request.ack(),
                        Err(e) => {
                            tracing::warn!(error = %e, "pod registration refused");
                            request.reject(e);
                        }
                    }
                });
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(seconds = args.drain_seconds, "draining");
    // A draining proxy captures nothing more (its listeners would take the
    // pods' inbound steering from its successor).
    late_recovery.abort();
    let _ = ready_tx.send(false);
    drop(registrations);
    // No new connection (the pods' listeners close: they fail closed); the
    // open ones finish, up to the deadline.
    pods.stop_accepting();
    let open = drain.finish(Duration::from_secs(args.drain_seconds)).await;
    if open > 0 {
        tracing::info!(open, "drain deadline reached; closing");
    }
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

fn connect_control_plane(
    cp: &ControlPlaneFlags,
    destination: &str,
    node: &str,
    registry: &mut Registry,
) -> anyhow::Result<ControlPlane> {
    use anyhow::Context as _;
    use weft_cert_manager::{
        CertManager, CertManagerConfig, CertManagerMetrics, GrpcCaClient, GrpcCaConfig,
        SharedTrustBundle, TrustBundle,
    };
    use weft_destination_api::client::{self, Backoff, ClientConfig, TokenSource};
    // clap's `requires_all` guarantees these with --destination-address.
    let (Some(ca_address), Some(anchors), Some(ca_token), Some(destination_token)) = (
        &cp.ca_address,
        &cp.trust_anchors,
        &cp.ca_token_file,
        &cp.destination_token_file,
    ) else {
        anyhow::bail!(
            "--destination-address needs --ca-address, --trust-anchors, --ca-token-file and --destination-token-file"
        );
    };
    if ca_token == destination_token {
        anyhow::bail!(
            "--ca-token-file and --destination-token-file are the same file ({}): each service \
             takes its own credential (on Kubernetes, projected tokens of audiences weft-identity \
             and weft-destination), so that neither can replay the other's",
            ca_token.display()
        );
    }
    let anchors_pem = std::fs::read(anchors).with_context(|| {
        format!(
            "cannot read the trust anchors {} (--trust-anchors: the mesh CA's ca.crt)",
            anchors.display()
        )
    })?;
    let bundle = SharedTrustBundle::new(
        TrustBundle::from_pem(cp.trust_domain.clone(), &anchors_pem)
            .with_context(|| format!("invalid trust anchors in {}", anchors.display()))?,
    );
    let ca = GrpcCaClient::new(
        GrpcCaConfig {
            address: ca_address.clone(),
            server_name: cp.ca_server_name.clone(),
            token_file: ca_token.clone(),
            request_timeout: Duration::from_secs(10),
        },
        bundle.watch(),
    )
    .context("cannot set up the identity CA client")?;
    let metrics = CertManagerMetrics::register(registry);
    let certs = CertManager::new(Arc::new(ca), bundle, CertManagerConfig::default(), metrics);
    certs.start_trust_bundle_watch();
    let ca_pem = match &cp.destination_ca {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("cannot read {} (--destination-ca)", path.display()))?,
        None => anchors_pem,
    };
    let handle = client::spawn(ClientConfig {
        endpoint: destination.to_string(),
        ca_pem,
        server_name: cp.destination_server_name.clone(),
        node: node.to_string(),
        token: TokenSource::File(destination_token.clone()),
        backoff: Backoff::default(),
    });
    Ok(ControlPlane::new(
        handle.view.clone(),
        handle.state.clone(),
        certs,
        Some(Arc::new(handle)),
    ))
}

/// Applies every new view to the registered pods and keeps `/ready` true
/// only while the proxy has a view and the certificates of its pods.
async fn follow_view(
    mesh: ControlPlane,
    pods: Arc<PodRegistry>,
    authz: Arc<InboundAuthz>,
    ready: tokio::sync::watch::Sender<bool>,
) {
    // The snapshots, not the raw view: the revalidation below must decide
    // on the state new connections are decided on (a snapshot is built
    // after its view arrives), and holds no lock while it does.
    let mut snapshots = mesh.snapshot.clone();
    let mut certificates = mesh.certs.changes();
    let mut captured = pods.changes();
    let mut last_version = None;
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        let version = (snapshot.view.epoch.clone(), snapshot.view.version);
        if last_version.as_ref() != Some(&version) {
            pods.reconcile();
            weft_node_proxy::state::forget_departed_endpoints(&snapshot.view, &pods.balancer());
            // Policies change with the view: close what is no longer allowed.
            let revoked = authz.revalidate(Some(&snapshot.view));
            if revoked > 0 {
                tracing::info!(revoked, "policy change closed connections");
            }
            last_version = Some(version);
        }
        // Ready: every pod of this node the view has in the mesh is
        // captured, with its certificate (after a restart: found again).
        let now_ready = mesh.has_view() && pods.all_served();
        if ready.send_if_modified(|r| std::mem::replace(r, now_ready) != now_ready) {
            if now_ready {
                tracing::info!(
                    pods = pods.pods().len(),
                    "node proxy ready: every enrolled pod of this node is served"
                );
            } else {
                tracing::info!("node proxy not ready: a pod of this node is not served");
            }
        }
        // Ready changes with the view, with a certificate issued or
        // withdrawn, and with a pod captured or released.
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            changed = certificates.changed() => if changed.is_err() { return },
            changed = captured.changed() => if changed.is_err() { return },
        }
    }
}

fn config_dump(node: &str, pods: &PodRegistry, mesh: Option<&ControlPlane>) -> serde_json::Value {
    use serde_json::json;
    let balancer = pods.balancer();
    let now = std::time::SystemTime::now();
    let pods: Vec<_> = pods
        .pods()
        .iter()
        .map(|p| {
            json!({
                "namespace": p.namespace, "name": p.name, "uid": p.uid,
                "netns": p.sockets.describe(), "ip": p.ip, "identity": p.identity.as_ref().map(|i| i.to_string()),
            })
        })
        .collect();
    let Some(mesh) = mesh else {
        return json!({ "node": node, "pods": pods, "mesh": false });
    };
    let certificates: Vec<_> = mesh
        .certs
        .identities()
        .iter()
        .map(|id| {
            let cert = mesh.certs.current_certificate(id);
            json!({
                "identity": id.to_string(),
                "serial": cert.as_ref().map(|c| c.serial.clone()),
                "expires_in_seconds": cert.as_ref().map(|c| c.remaining(now).as_secs()),
                "valid_until_unix": cert.as_ref().and_then(|c| c.valid_until.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs()),
            })
        })
        .collect();
    let view = mesh.view.borrow();
    let workloads: Vec<_> = view
        .workloads
        .values()
        .map(|w| {
            json!({
                "uid": w.uid, "namespace": w.namespace, "name": w.name, "identity": w.identity,
                "node": w.node, "enrolled": w.enrolled,
                "addresses": w.addresses.iter().filter_map(|a| weft_destination_api::address::decode(a)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let services: Vec<_> = view
        .services
        .values()
        .map(|s| json!({"hostname": s.hostname, "endpoints": s.endpoints.len()}))
        .collect();
    let state = format!("{:?}", *mesh.view_state.borrow());
    // What the balancer knows of each endpoint it has picked (per-request
    // latency for HTTP, connect latency for TCP), sorted for stable output.
    let mut endpoints = balancer.snapshot();
    endpoints.sort_by_key(|(addr, _)| *addr);
    let endpoints: Vec<_> = endpoints
        .into_iter()
        .map(|(addr, s)| {
            json!({
                "address": addr, "latency_ewma_ms": s.latency_ewma.as_secs_f64() * 1e3,
                "in_flight": s.in_flight, "consecutive_failures": s.consecutive_failures,
                "backed_off": s.backed_off,
            })
        })
        .collect();
    json!({
        "node": node,
        "mesh": true,
        "balancer": endpoints,
        "pods": pods,
        "certificates": certificates,
        "destination": { "state": state, "epoch": view.epoch, "version": view.version,
                         "workloads": workloads, "services": services },
    })
}
