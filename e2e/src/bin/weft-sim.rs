//! `weft-sim`: the local cluster simulator's command line.

use clap::{Parser, Subcommand};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use weft_sim::mesh::{Mesh, MeshBinaries, MeshState};
use weft_sim::{Options, State, cluster};

#[derive(Parser)]
#[command(
    name = "weft-sim",
    about = "A Kubernetes cluster simulated with network namespaces, from a directory of YAML"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the cluster from DIR, start its pods, print `ready`; stay in the
    /// foreground until SIGINT/SIGTERM (then tear down) unless --detach.
    Up {
        dir: PathBuf,
        #[arg(long, default_value = "weft")]
        name: String,
        /// Return after `ready` and leave the cluster running.
        #[arg(long)]
        detach: bool,
        /// Seconds to wait for every pod to run and listen on its ports.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Also run the mesh: the control plane (weft-identity,
        /// weft-destination on DIR) on the host and one weft-node-proxy per
        /// node. The programs are taken from the directory of weft-sim itself
        /// (`cargo build --bins`).
        #[arg(long)]
        mesh: bool,
        /// Run a real Kubernetes control plane (etcd, kube-apiserver,
        /// kube-controller-manager, kube-scheduler, built by `cargo xtask
        /// setup`), create a Node per simulated node and apply DIR's
        /// manifests to it with server-side apply.
        #[arg(long)]
        kube: bool,
        /// With --kube: a YAML map of image to program (absolute, or
        /// relative to FILE), run for containers that have no `command`.
        #[arg(long, value_name = "FILE", requires = "kube")]
        images: Option<PathBuf>,
    },
    /// Run the control plane's kubectl against a `--kube` cluster, as its
    /// admin (e.g. `weft-sim kubectl get nodes`).
    Kubectl {
        #[arg(long, default_value = "weft")]
        name: String,
        /// kubectl's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a command inside a pod (its network namespace and cgroup).
    Exec {
        #[arg(long, default_value = "weft")]
        name: String,
        /// NAMESPACE/POD
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Show the cluster (--json: the state file).
    Status {
        #[arg(long, default_value = "weft")]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// The simulated kubelet of a `--kube` cluster (started by `up --kube`).
    #[command(hide = true)]
    Kubelet {
        #[arg(long)]
        state_dir: PathBuf,
        /// The node whose kubelet this is (default: every node).
        #[arg(long)]
        node: Option<String>,
    },
    /// Inside a `--kube` container's mount namespace: bind its volumes,
    /// then exec the container's program (started by the kubelet).
    #[command(hide = true)]
    PodExec {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        scratch: PathBuf,
        /// SOURCE=TARGET[,ro]
        #[arg(long = "mount")]
        mounts: Vec<String>,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Restart a node's proxy as a kubelet does (`--mesh` clusters): by
    /// default a crash (SIGKILL, then started again with the same
    /// arguments); `--graceful`: SIGTERM, wait for it to drain and exit,
    /// then start it. Returns once the new one is ready.
    RestartProxy {
        #[arg(long, default_value = "weft")]
        name: String,
        node: String,
        #[arg(long)]
        graceful: bool,
        /// Seconds to wait for the old one to exit and the new one to be ready.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Roll a node's proxy out with surge (`maxSurge: 1, maxUnavailable:
    /// 0`): a new one starts next to the running one; once it is ready the
    /// old one gets SIGTERM. Returns once the old one has exited.
    RolloutProxy {
        #[arg(long, default_value = "weft")]
        name: String,
        node: String,
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Tear the cluster down (idempotent; also cleans up after a crash).
    Down {
        #[arg(long, default_value = "weft")]
        name: String,
    },
}

/// `println!` panics when stdout is a pipe whose reader has gone
/// (`weft-sim status | head`); this returns the error instead, and `main`
/// ends quietly on it, as Unix tools do.
macro_rules! out {
    ($($arg:tt)*) => { writeln!(std::io::stdout(), $($arg)*) };
}

/// The exit status a shell reports for a tool ended by SIGPIPE (128 + 13),
/// which is what `weft-sim … | head` looks like for any other tool.
const CLOSED_PIPE: u8 = 141;

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) if is_closed_pipe(&e) => ExitCode::from(CLOSED_PIPE),
        Err(e) => {
            eprintln!("weft-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The cluster is up whether or not anyone still reads our stdout: `up`
/// stays in the foreground (and tears down on a signal) even when its
/// reader went away, so a closed pipe is not an error here.
fn report_up(state: &State, mesh: Option<&Mesh>) -> std::io::Result<()> {
    print_summary(state)?;
    if let Some(m) = mesh.and_then(|m| m.state()) {
        print_mesh(&m)?;
    }
    out!("ready")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // Runs inside a container's mount namespace, where the cgroup2 mount
    // that `Options::detect` looks for is not visible.
    if let Cmd::PodExec {
        netns,
        scratch,
        mounts,
        argv,
    } = cli.command
    {
        let mounts = mounts
            .iter()
            .map(|m| weft_sim::volumes::Mount::from_arg(m))
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?;
        return match weft_sim::volumes::pod_exec(&netns, &scratch, &mounts, &argv) {
            Ok(never) => match never {},
            Err(e) => Err(anyhow::anyhow!("pod-exec: {e}")),
        };
    }
    let mut opts = Options::detect()?;
    match cli.command {
        Cmd::Up {
            dir,
            name,
            detach,
            timeout,
            mesh,
            kube,
            images,
        } => {
            if let Some(file) = images {
                opts.images = weft_sim::kube::load_images(&file)?;
            }
            opts.ready_timeout = Duration::from_secs(timeout);
            if kube {
                opts.kube = Some(weft_sim::kube::KubeBinaries::from_cache()?);
            }
            let mesh = if mesh {
                let mesh = std::sync::Arc::new(Mesh::new(MeshBinaries::next_to_current_exe()?));
                opts.node_agents = Some(mesh.clone());
                Some(mesh)
            } else {
                None
            };
            // Signals are caught from the start, so a Ctrl-C during set-up
            // also ends in a teardown rather than half a cluster.
            let signals =
                signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM, libc::SIGHUP])?;
            let mut running = cluster::up(&dir, &name, &opts)?;
            match report_up(&running.state, mesh.as_deref()) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                other => other?,
            }
            if detach {
                return Ok(ExitCode::SUCCESS);
            }
            wait_for_signal(signals, &mut running);
            eprintln!("weft-sim: tearing down {name}");
            cluster::down(&name, &opts)?;
            for (pod, container, child) in &mut running.children {
                // `down` killed them; a status other than that signal (or
                // a wait that fails) is worth a line in the output.
                match child.wait() {
                    Ok(status) if status.success() || status.signal().is_some() => {}
                    Ok(status) => {
                        eprintln!("weft-sim: pod {pod} container {container} exited ({status})")
                    }
                    Err(e) => eprintln!("weft-sim: pod {pod} container {container}: {e}"),
                }
            }
            for (_, child) in &mut running.control_plane.children {
                let _ = child.wait();
            }
            if let Some(mesh) = mesh {
                mesh.reap();
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Exec { name, pod, command } => {
            let state = cluster::load(&name, &opts)?;
            let mut cmd = cluster::pod_command(&state, &pod, &command[0], &command[1..])?;
            let status = cmd.status()?;
            Ok(ExitCode::from(
                status.code().unwrap_or(128).clamp(0, 255) as u8
            ))
        }
        Cmd::Kubectl { name, args } => {
            let state = cluster::load(&name, &opts)?;
            let kube = state.kube.ok_or(weft_sim::kube::KubeError::NotKube)?;
            let status = kube.kubectl().args(&args).status()?;
            Ok(ExitCode::from(
                status.code().unwrap_or(128).clamp(0, 255) as u8
            ))
        }
        Cmd::Status { name, json } => {
            let state = cluster::load(&name, &opts)?;
            let mesh = MeshState::load(&state.state_dir);
            if json {
                let mut value = serde_json::to_value(&state)?;
                if let Some(m) = &mesh {
                    value["mesh"] = serde_json::to_value(m)?;
                }
                out!("{}", serde_json::to_string_pretty(&value)?)?;
            } else {
                print_summary(&state)?;
                if let Some(m) = &mesh {
                    print_mesh(m)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Kubelet { state_dir, node } => {
            weft_sim::kubelet::run(&state_dir, node.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::PodExec { .. } => unreachable!("handled above"),
        Cmd::RestartProxy {
            name,
            node,
            graceful,
            timeout,
        } => {
            let state = cluster::load(&name, &opts)?;
            let how = if graceful {
                weft_sim::mesh::ProxyRestart::Graceful
            } else {
                weft_sim::mesh::ProxyRestart::Crash
            };
            let (old, new) = weft_sim::mesh::cycle_node_proxy(
                &state,
                &node,
                Some(how),
                Duration::from_secs(timeout),
            )?;
            out!("node proxy of {node}: pid {old:?} ended ({how:?}), pid {new} ready")?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::RolloutProxy {
            name,
            node,
            timeout,
        } => {
            let state = cluster::load(&name, &opts)?;
            let (old, new) = weft_sim::mesh::cycle_node_proxy(
                &state,
                &node,
                None,
                Duration::from_secs(timeout),
            )?;
            out!("node proxy of {node}: pid {new} ready, then pid {old:?} drained and exited")?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Down { name } => {
            cluster::down(&name, &opts)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn wait_for_signal(mut signals: signal_hook::iterator::Signals, running: &mut weft_sim::Cluster) {
    loop {
        if signals.pending().next().is_some() {
            return;
        }
        for (pod, container, child) in &mut running.children {
            if let Ok(Some(status)) = child.try_wait() {
                eprintln!("weft-sim: pod {pod} container {container} exited ({status})");
            }
        }
        for (program, child) in &mut running.control_plane.children {
            if let Ok(Some(status)) = child.try_wait() {
                eprintln!(
                    "weft-sim: {program} exited ({status}); see its log in {}",
                    running.state.state_dir.join("logs").display()
                );
            }
        }
        running
            .control_plane
            .children
            .retain_mut(|(_, c)| matches!(c.try_wait(), Ok(None)));
        running
            .children
            .retain_mut(|(_, _, c)| matches!(c.try_wait(), Ok(None)));
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn print_summary(s: &State) -> std::io::Result<()> {
    out!(
        "cluster {}: {} nodes, {} pods, {} services (state {})",
        s.name,
        s.nodes.len(),
        s.pods.len(),
        s.services.len(),
        State::path(&s.state_dir).display()
    )?;
    out!(
        "  host   {} {} (fabric {})",
        s.fabric.host_interface,
        s.fabric.host_ip,
        s.fabric.cidr
    )?;
    for n in &s.nodes {
        out!(
            "  node   {:<24} {:<15} pods {}",
            n.name,
            n.ip.to_string(),
            n.pod_cidr
        )?;
    }
    for p in &s.pods {
        out!(
            "  pod    {:<24} {:<15} {} on {}",
            p.key(),
            p.ip.to_string(),
            p.ipv6,
            p.node
        )?;
    }
    if let Some(k) = &s.kube {
        println!(
            "  kube   {} (Kubernetes {}, etcd {}) kubeconfig {}",
            k.api_server,
            k.kubernetes_version,
            k.etcd_version,
            k.kubeconfig.display()
        );
        println!(
            "         export KUBECONFIG={}  or  weft-sim kubectl --name {} …",
            k.kubeconfig.display(),
            s.name
        );
    }
    for svc in &s.services {
        let ports: Vec<String> = svc
            .ports
            .iter()
            .map(|p| {
                format!(
                    "{}->{}",
                    p.port,
                    p.target_port.map(|t| t.to_string()).unwrap_or("?".into())
                )
            })
            .collect();
        let ip = svc
            .cluster_ip
            .map(|i| i.to_string())
            .unwrap_or_else(|| "None".into());
        out!(
            "  svc    {:<24} {:<15} {} endpoints {}",
            format!("{}/{}", svc.namespace, svc.name),
            ip,
            ports.join(","),
            svc.endpoints.len()
        )?;
    }
    Ok(())
}

fn print_mesh(m: &MeshState) -> std::io::Result<()> {
    out!(
        "  mesh   identity {} (metrics {}), destination {} (admin {}), trust domain {}",
        m.identity,
        m.identity_metrics,
        m.destination,
        m.destination_admin,
        m.trust_domain
    )?;
    for p in &m.node_proxies {
        out!(
            "  proxy  {:<24} metrics http://{}/metrics ready http://{}/ready log {}",
            p.node,
            p.metrics,
            p.health,
            p.log.display()
        )?;
    }
    out!("  prometheus file-sd {}", m.prometheus_targets.display())
}
