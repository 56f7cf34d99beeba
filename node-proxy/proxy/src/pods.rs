//! The pods this node proxy serves.
//!
//! A pod arrives through the registration protocol (the CNI plugin, or the
//! simulator, sends `add` with its network namespace). The proxy then opens
//! its listeners *inside* that namespace — 15001 for the pod's outbound
//! connections, 15006 for inbound plaintext — and only then enrolls the
//! namespace, so there is never a moment where the pod's traffic is
//! redirected to a port nobody listens on. `del` undoes it in the opposite
//! order. The listener a connection arrives on says which pod it belongs to:
//! no guessing from source addresses.

mod netns_sockets;
mod records;

pub use netns_sockets::NetnsSockets;
pub use records::{PodRecord, Records};

use crate::proxy::{ProxyInputs, inbound, outbound};
use crate::state::admission::{Admission, Registering, admit};
use crate::state::{self, PodInfo};
use crate::transport::LocalPod;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;
use weft_cert_manager::SpiffeId;
use weft_hbone::HBONE_PORT;
use weft_redirector::{INBOUND_PORT, Netns, OUTBOUND_PORT, PodEnrollment, Redirector};
use weft_registration::{PodEvent, PodRef};

/// What a registered pod should be captured as.
#[derive(Clone, Debug, Default, PartialEq)]
struct Wanted {
    identity: Option<SpiffeId>,
    ip: Option<IpAddr>,
    /// The address of the other family (dual stack).
    other_ip: Option<IpAddr>,
    workload_uid: Option<String>,
}

/// A registration as the admission decision reads it.
pub fn registering<'a>(pod: &'a PodRef, ips: &'a [IpAddr]) -> Registering<'a> {
    Registering {
        namespace: &pod.namespace,
        name: &pod.name,
        uid: &pod.uid,
        ips,
    }
}

/// The key of a pod in the registry (and of its kept registration).
fn pod_id(pod: &PodRef) -> String {
    if pod.uid.is_empty() {
        format!("{}/{}", pod.namespace, pod.name)
    } else {
        pod.uid.clone()
    }
}

/// Aborts the listeners of a capture that failed half-way.
struct Guard(Vec<JoinHandle<()>>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.drain(..).for_each(|h| h.abort());
    }
}

/// A registered pod: the proxy holds its namespace; it is *captured*
/// (listeners open, namespace enrolled) only while its workload is enrolled.
struct Registered {
    pod: PodRef,
    netns: Arc<Netns>,
    annotations: HashMap<String, String>,
    /// The addresses the registration gave (the CNI plugin's result): the
    /// pod's until the view has its own.
    ips: Vec<IpAddr>,
    captured: Option<Captured>,
    /// Found again at start (not registered to this process): its first
    /// failed capture is counted as a pod that could not be recovered.
    recovered: bool,
}

/// `weft_node_proxy_pods_recovered_total` and
/// `weft_node_proxy_pods_unrecovered_total{reason}`: pods found again at
/// start, and those that could not be (each also logged with why).
#[derive(Clone, Debug, Default)]
pub struct RecoveryMetrics {
    recovered: Counter,
    unrecovered: Family<ReasonLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

impl RecoveryMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weft_node_proxy_pods_recovered",
            "Pods already on the node that this proxy found again at start and serves",
            self.recovered.clone(),
        );
        registry.register(
            "weft_node_proxy_pods_unrecovered",
            "Pods enrolled before this proxy started that it could not serve again, by reason",
            self.unrecovered.clone(),
        );
    }

    fn unrecovered(&self, reason: &'static str) {
        self.unrecovered
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

struct Captured {
    pod: Arc<LocalPod>,
    /// The pod's network namespace cookie, what its enrollment is keyed by:
    /// unenrolling by it can never release another pod (a uid may be
    /// empty, and then is not unique).
    netns_cookie: u64,
    /// Accept loops; aborting them closes the listeners (and the kernel then
    /// drops the inbound steering entry: inbound fails closed).
    listeners: Vec<JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("cannot open the network namespace of {pod}: {source}")]
    Netns {
        pod: String,
        source: Box<weft_redirector::Error>,
    },
    #[error(
        "cannot listen on {addr} inside {pod}: {source} (is another node proxy already serving this pod?)"
    )]
    Listen {
        pod: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot enroll {pod}: {source}")]
    Enroll {
        pod: String,
        source: Box<weft_redirector::Error>,
    },
    #[error(
        "{pod} may be in the mesh and cannot be captured yet ({why}); it must not start uncaptured: \
         the kubelet retries (is the destination service reachable from this node?)"
    )]
    Undecided { pod: String, why: &'static str },
}

pub struct PodRegistry {
    redirector: Arc<Redirector>,
    inputs: ProxyInputs,
    /// Registrations kept for the next start (`None`: nothing is kept).
    records: Option<Records>,
    metrics: RecoveryMetrics,
    pods: Mutex<HashMap<String, Registered>>,
    /// Bumped when a pod is captured or released: readiness follows it.
    changes: tokio::sync::watch::Sender<u64>,
    /// Set at shutdown: from then on the pods are the successor's (a
    /// rollout), and this proxy changes nothing of their capture.
    stopping: std::sync::atomic::AtomicBool,
}

impl PodRegistry {
    pub fn new(redirector: Arc<Redirector>, inputs: ProxyInputs) -> Self {
        Self::with_records(redirector, inputs, None, RecoveryMetrics::default())
    }

    /// A registry that keeps every registration in `records` (and finds
    /// them again with [`PodRegistry::recover`]).
    pub fn with_records(
        redirector: Arc<Redirector>,
        inputs: ProxyInputs,
        records: Option<Records>,
        metrics: RecoveryMetrics,
    ) -> Self {
        Self {
            redirector,
            inputs,
            records,
            metrics,
            pods: Mutex::default(),
            changes: tokio::sync::watch::Sender::new(0),
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Changes whenever the set of captured pods changes.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Handles one registration event; the error is what the CNI plugin
    /// (or simulator) reports back. A pod whose workload is not enrolled
    /// (or not yet in the view) is acknowledged but not captured;
    /// [`PodRegistry::reconcile`] captures it when the view says so.
    pub fn handle(&self, event: PodEvent) -> Result<(), RegistrationError> {
        match event {
            PodEvent::Add {
                pod,
                netns,
                annotations,
                ips,
                ..
            } => self.add(pod, &netns, annotations.unwrap_or_default(), ips),
            PodEvent::Del { pod, .. } => {
                self.remove(&pod);
                Ok(())
            }
        }
    }

    fn add(
        &self,
        pod: PodRef,
        netns_path: &std::path::Path,
        annotations: HashMap<String, String>,
        ips: Vec<IpAddr>,
    ) -> Result<(), RegistrationError> {
        let key = format!("{}/{}", pod.namespace, pod.name);
        // An enrolled pod never starts uncaptured: one that may be in the
        // mesh but cannot be captured yet is refused (the kubelet retries
        // the ADD), before any state changes.
        let wanted = self
            .admission(&pod, &ips)
            .map_err(|why| RegistrationError::Undecided {
                pod: key.clone(),
                why,
            })?;
        // A repeated add (the CNI plugin retried) replaces the old state.
        self.remove(&pod);
        let netns =
            Arc::new(
                Netns::open(netns_path).map_err(|source| RegistrationError::Netns {
                    pod: key.clone(),
                    source: Box::new(source),
                })?,
            );
        let mut registered = Registered {
            pod: pod.clone(),
            netns,
            annotations,
            ips,
            captured: None,
            recovered: false,
        };
        if let Some(wanted) = wanted {
            registered.captured = Some(self.capture(&registered, wanted)?);
        } else {
            tracing::info!(pod = %key, "pod registered, not in the mesh");
        }
        let id = pod_id(&pod);
        self.keep(&id, &registered, netns_path);
        let replaced = self.pods.lock().expect("pods lock").insert(id, registered);
        // Recovery registered the same pod meanwhile: its listeners go,
        // the pod stays enrolled (it is this registration's now).
        if let Some(c) = replaced.and_then(|r| r.captured) {
            for h in c.listeners {
                h.abort();
            }
            self.release_certificate(&c.pod);
        }
        Ok(())
    }

    /// Keeps the registration for the next start of the proxy. A failure
    /// does not refuse the pod (it is served now), but a restarted proxy
    /// will not find it: logged as such.
    fn keep(&self, id: &str, r: &Registered, netns_path: &std::path::Path) {
        let Some(records) = &self.records else { return };
        let key = format!("{}/{}", r.pod.namespace, r.pod.name);
        let saved = r
            .netns
            .cookie()
            .map_err(std::io::Error::other)
            .and_then(|cookie| {
                let record = PodRecord {
                    pod: r.pod.clone(),
                    netns: netns_path.to_path_buf(),
                    annotations: r.annotations.clone(),
                    ips: r.ips.clone(),
                    netns_cookie: cookie,
                };
                records.save(id, &record, &r.netns)
            });
        if let Err(e) = saved {
            tracing::error!(pod = %key, error = %e, dir = %records.dir().display(), "cannot keep the pod's registration: a restarted node proxy will not find it");
        }
    }

    /// Finds again the pods registered to an earlier run of the proxy on
    /// this node (a crash, a rollout): from their records and kept
    /// namespaces, checked against the namespace the runtime still has.
    /// They are registered as if added now; [`PodRegistry::reconcile`]
    /// captures the enrolled ones when the view has them. Returns how many
    /// were found.
    pub fn recover(&self) -> usize {
        self.recover_records(true)
    }

    /// A second pass over the records, for registrations the previous
    /// proxy took in the instant of the hand-over and recorded after this
    /// one's first pass (a rollout): pods already registered here are left
    /// alone.
    pub fn recover_late(&self) -> usize {
        self.recover_records(false)
    }

    fn recover_records(&self, first: bool) -> usize {
        let Some(records) = &self.records else {
            return 0;
        };
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return 0;
        }
        let mut found = 0;
        for (path, record) in records.load() {
            let record = match record {
                Ok(r) => r,
                Err(why) => {
                    tracing::error!(record = %path.display(), %why, "unusable pod record; the pod cannot be recovered");
                    self.metrics.unrecovered("unreadable_record");
                    records.discard(&path);
                    continue;
                }
            };
            let id = pod_id(&record.pod);
            if self.pods.lock().expect("pods lock").contains_key(&id) {
                // Registered to this proxy since (its own record).
                continue;
            }
            let key = format!("{}/{}", record.pod.namespace, record.pod.name);
            match self.recover_one(records, &id, &record) {
                Ok(r) => {
                    // An ADD of the same pod may have come meanwhile: it wins.
                    if let std::collections::hash_map::Entry::Vacant(v) =
                        self.pods.lock().expect("pods lock").entry(id)
                    {
                        tracing::info!(pod = %key, "pod found again from its kept registration");
                        v.insert(r);
                        found += 1;
                    }
                }
                Err((reason, why)) => {
                    tracing::warn!(pod = %key, %why, "pod not recovered");
                    if reason != "pod_gone" {
                        self.metrics.unrecovered(reason);
                    }
                    // Its enrollment, if any, goes with it: a namespace
                    // that is not the pod's any more must not stay captured
                    // (a live pod we cannot serve stays enrolled: fail closed).
                    if reason == "pod_gone"
                        && let Err(e) = self.redirector.unenroll_cookie(record.netns_cookie)
                    {
                        tracing::warn!(pod = %key, error = %e, "unenroll failed");
                    }
                    if reason == "pod_gone" || reason == "namespace_not_kept" {
                        let _ = records.remove(&id);
                    }
                }
            }
        }
        if !first {
            if found > 0 {
                tracing::info!(
                    pods = found,
                    "found pods recorded by the previous node proxy during the hand-over"
                );
                self.reconcile();
                self.changes.send_modify(|n| *n += 1);
            }
            return found;
        }
        // Enrolled namespaces that vanished without a DEL while no proxy ran.
        match self.redirector.remove_stale() {
            Ok(stale) if !stale.is_empty() => {
                tracing::info!(
                    pods = stale.len(),
                    "unenrolled pods whose namespace is gone"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot check for stale enrollments"),
        }
        // Enrolled in the kernel but with no record: cut off (fail closed)
        // until the CNI plugin registers it again.
        let known: Vec<String> = self
            .pods
            .lock()
            .expect("pods lock")
            .values()
            .map(|r| r.pod.uid.clone())
            .collect();
        if let Ok(enrolled) = self.redirector.enrolled() {
            let missing: Vec<_> = enrolled
                .into_iter()
                .filter(|e| !known.contains(&e.pod_uid))
                .collect();
            found += self.discover(missing);
        }
        // Standalone, every pod is captured now; with a control plane,
        // those the view has (again when it changes).
        self.reconcile();
        self.changes.send_modify(|n| *n += 1);
        found
    }

    /// Pods enrolled in the kernel with no record (a state directory that
    /// did not outlive the proxy): their namespaces are found among the
    /// node's processes (`/proc/<pid>/ns/net`) by the enrolled cookie, and
    /// the pod by the uid the map holds; namespace and name come from the
    /// view when it has them. Not recorded again (a process's path is not
    /// a stable name): a later start finds them the same way. A pod whose
    /// namespace no process holds is counted (`no_record`) and stays
    /// enrolled: refused, until it is registered again.
    fn discover(&self, missing: Vec<weft_redirector::Enrolled>) -> usize {
        if missing.is_empty() {
            return 0;
        }
        let scanned = match weft_redirector::discovery::scan_host() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot scan /proc for the namespaces of enrolled pods");
                Vec::new()
            }
        };
        let mut by_cookie: HashMap<u64, Netns> = HashMap::new();
        for d in scanned {
            if let Ok(n) = Netns::open(&d.netns_path)
                && let Ok(cookie) = n.cookie()
                && missing.iter().any(|e| e.netns_cookie == cookie)
            {
                by_cookie.entry(cookie).or_insert(n);
            }
        }
        let mut found = 0;
        for e in missing {
            let Some(netns) = by_cookie.remove(&e.netns_cookie) else {
                tracing::error!(pod_uid = %e.pod_uid, cookie = e.netns_cookie, "pod enrolled on this node but no registration is kept for it and no process holds its namespace: its connections are refused until it is registered again");
                self.metrics.unrecovered("no_record");
                continue;
            };
            let pod = PodRef {
                namespace: String::new(),
                name: String::new(),
                uid: e.pod_uid.clone(),
            };
            let id = pod_id(&pod);
            if let std::collections::hash_map::Entry::Vacant(v) =
                self.pods.lock().expect("pods lock").entry(id)
            {
                tracing::info!(pod_uid = %e.pod_uid, netns = %netns.path().display(), "pod found by its namespace (no kept registration)");
                v.insert(Registered {
                    pod,
                    netns: Arc::new(netns),
                    annotations: HashMap::new(),
                    ips: Vec::new(),
                    captured: None,
                    recovered: true,
                });
                found += 1;
            }
        }
        found
    }

    fn recover_one(
        &self,
        records: &Records,
        id: &str,
        record: &PodRecord,
    ) -> Result<Registered, (&'static str, String)> {
        let same = |n: &Netns| n.cookie().is_ok_and(|c| c == record.netns_cookie);
        // The runtime's path still naming the same namespace is what says
        // the pod lives: once the pod is deleted only our bind mount holds it.
        let runtime = Netns::open(&record.netns).ok().filter(same);
        let kept = records.kept_netns(id);
        let netns = match Netns::open(&kept) {
            Ok(n) if same(&n) => n,
            // The kept mount did not survive (a state directory that is not
            // shared with the host): the runtime's path still serves.
            _ => match runtime {
                Some(n) => {
                    tracing::warn!(pod = %record.pod.name, kept = %kept.display(), "kept namespace missing; using the runtime's path");
                    if let Err(e) = records.save(id, record, &n) {
                        tracing::warn!(error = %e, "cannot keep the namespace again");
                    }
                    return Ok(Registered {
                        pod: record.pod.clone(),
                        netns: Arc::new(n),
                        annotations: record.annotations.clone(),
                        ips: record.ips.clone(),
                        captured: None,
                        recovered: true,
                    });
                }
                None => {
                    return Err((
                        "namespace_not_kept",
                        format!(
                            "neither {} nor {} is the pod's namespace any more",
                            kept.display(),
                            record.netns.display()
                        ),
                    ));
                }
            },
        };
        if runtime.is_none() {
            return Err((
                "pod_gone",
                format!(
                    "{} no longer names the pod's namespace (deleted while no proxy ran)",
                    record.netns.display()
                ),
            ));
        }
        Ok(Registered {
            pod: record.pod.clone(),
            netns: Arc::new(netns),
            annotations: record.annotations.clone(),
            ips: record.ips.clone(),
            captured: None,
            recovered: true,
        })
    }

    /// `/ready`: every registered pod the view wants in the mesh is
    /// captured and has its certificate.
    pub fn all_served(&self) -> bool {
        let pods = self.pods.lock().expect("pods lock");
        pods.values().all(|r| match self.wanted(r) {
            None => true,
            Some(_) => r.captured.as_ref().is_some_and(|c| {
                match (&self.inputs.control_plane, &c.pod.identity) {
                    (Some(cp), Some(id)) => cp.certs.current_certificate(id).is_some(),
                    _ => true,
                }
            }),
        })
    }

    /// Whether a pod should be captured and as what: standalone, always;
    /// with a control plane, when it is in the mesh
    /// ([`crate::state::admission`]).
    fn wanted(&self, r: &Registered) -> Option<Wanted> {
        self.admission(&r.pod, &r.ips).ok().flatten()
    }

    /// What [`Self::wanted`] says of a registration, or why it cannot be
    /// decided yet (a pod that may be in the mesh).
    fn admission(&self, pod: &PodRef, ips: &[IpAddr]) -> Result<Option<Wanted>, &'static str> {
        let Some(control_plane) = &self.inputs.control_plane else {
            return Ok(Some(Wanted::default()));
        };
        match admit(&control_plane.view.borrow(), registering(pod, ips)) {
            Admission::Capture(c) => Ok(Some(Wanted {
                identity: Some(c.identity),
                ip: Some(c.ip),
                other_ip: c.other_ip,
                workload_uid: Some(c.workload_uid),
            })),
            Admission::Outside => Ok(None),
            Admission::Undecided(why) => Err(why),
        }
    }

    /// Opens the pod's listeners inside its namespace, then enrolls it.
    fn capture(&self, r: &Registered, wanted: Wanted) -> Result<Captured, RegistrationError> {
        let key = format!("{}/{}", r.pod.namespace, r.pod.name);
        let netns = &r.netns;
        let local = Arc::new(LocalPod {
            info: Arc::new(PodInfo {
                namespace: r.pod.namespace.clone(),
                name: r.pod.name.clone(),
                uid: r.pod.uid.clone(),
                identity: wanted.identity.clone(),
                ip: wanted.ip,
                other_ip: wanted.other_ip,
                workload_uid: wanted.workload_uid.clone(),
            }),
            sockets: Arc::new(NetnsSockets::new(netns.clone())),
        });
        let listen = |addr: SocketAddr| {
            local
                .sockets
                .listen(addr)
                .and_then(tokio::net::TcpListener::from_std)
                .map_err(|source| RegistrationError::Listen {
                    pod: key.clone(),
                    addr,
                    source,
                })
        };
        tune_namespace(netns, &key);
        // The pod's connections run on one thread (`transport::threads`):
        // its listeners are registered with that thread's runtime and their
        // tasks spawned there. Nothing below awaits while it is entered.
        let thread = self.inputs.threads.next_for_pod();
        let entered = thread.enter();
        let mut listeners = Guard(Vec::new());
        for ip in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            let l = listen(SocketAddr::new(ip, OUTBOUND_PORT))?;
            listeners.0.push(tokio::spawn(outbound::serve(
                l,
                local.clone(),
                self.inputs.clone(),
            )));
        }
        for ip in [
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ] {
            let l = listen(SocketAddr::new(ip, INBOUND_PORT))?;
            self.redirector
                .register_inbound_listener(netns, &l)
                .map_err(|source| RegistrationError::Enroll {
                    pod: key.clone(),
                    source: Box::new(source),
                })?;
            listeners.0.push(tokio::spawn(inbound::serve_plaintext(
                l,
                local.clone(),
                self.inputs.clone(),
            )));
        }
        if let (Some(control_plane), Some(identity)) = (&self.inputs.control_plane, &local.identity)
        {
            // Fetch the certificate now, not on the first connection.
            control_plane.certs.register_pod(identity);
            // On every address of the pod: a source dials the address of
            // the family its client used (IPv6 was reset when only the
            // first address listened).
            for ip in local.addresses() {
                let l = match listen(SocketAddr::new(ip, HBONE_PORT)) {
                    Ok(l) => l,
                    Err(e) => {
                        control_plane.certs.unregister_pod(identity);
                        return Err(e);
                    }
                };
                listeners.0.push(tokio::spawn(inbound::serve_hbone(
                    l,
                    local.clone(),
                    self.inputs.clone(),
                )));
            }
        }
        drop(entered);
        let enrollment = PodEnrollment {
            netns,
            pod_uid: r.pod.uid.clone(),
            annotations: r.annotations.clone(),
        };
        let enrolled = match self.redirector.enroll(&enrollment) {
            Ok(enrolled) => enrolled,
            Err(source) => {
                self.release_certificate(&local);
                return Err(RegistrationError::Enroll {
                    pod: key,
                    source: Box::new(source),
                });
            }
        };
        tracing::info!(pod = %key, identity = ?local.identity.as_ref().map(|i| i.to_string()), "pod enrolled");
        self.changes.send_modify(|n| *n += 1);
        Ok(Captured {
            pod: local,
            netns_cookie: enrolled.netns_cookie,
            listeners: std::mem::take(&mut listeners.0),
        })
    }

    fn release_certificate(&self, pod: &LocalPod) {
        if let (Some(control_plane), Some(identity)) = (&self.inputs.control_plane, &pod.identity) {
            control_plane.certs.unregister_pod(identity);
        }
    }

    /// Unenrolls first (from now on the pod's connects go direct: the pod is
    /// leaving the mesh) rather than to listeners about to close.
    fn release(&self, captured: Captured) {
        if let Err(e) = self.redirector.unenroll_cookie(captured.netns_cookie) {
            tracing::warn!(pod = %captured.pod.key(), error = %e, "unenroll failed");
        }
        for h in captured.listeners {
            h.abort();
        }
        self.release_certificate(&captured.pod);
        self.changes.send_modify(|n| *n += 1);
        tracing::info!(pod = %captured.pod.key(), "pod left the mesh");
    }

    fn remove(&self, pod: &PodRef) {
        let removed = {
            let mut pods = self.pods.lock().expect("pods lock");
            let id = pods
                .iter()
                // By uid when the runtime gave one: a StatefulSet pod
                // recreated under the same name may be added before the old
                // sandbox's del arrives, and that del must not remove it.
                .find(|(_, r)| {
                    if pod.uid.is_empty() {
                        r.pod.namespace == pod.namespace && r.pod.name == pod.name
                    } else {
                        r.pod.uid == pod.uid
                    }
                })
                .map(|(id, _)| id.clone());
            id.and_then(|id| pods.remove(&id).map(|r| (id, r)))
        };
        let Some((id, registered)) = removed else {
            return;
        };
        if let Some(c) = registered.captured {
            self.release(c);
        }
        if let Some(records) = &self.records
            && let Err(e) = records.remove(&id)
        {
            tracing::warn!(error = %e, "cannot remove a pod's kept registration");
        }
        tracing::info!(pod = %format!("{}/{}", registered.pod.namespace, registered.pod.name), "pod removed");
    }

    /// Brings every registered pod in line with the view: captures pods
    /// whose workload became enrolled, releases those that left. Called
    /// whenever the view changes; enrolment follows the namespace label
    /// without restarting pods.
    pub fn reconcile(&self) {
        // A draining proxy neither captures (its listeners would take a
        // pod's inbound steering from the successor, and its exit would
        // then drop it) nor releases (the successor owns the enrollment).
        let mut pods = self.pods.lock().expect("pods lock");
        // Checked under the lock `stop_accepting` sets it under.
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        for r in pods.values_mut() {
            if r.pod.name.is_empty()
                && let Some(cp) = &self.inputs.control_plane
                && let Some(w) = state::local_workload(&cp.view.borrow(), &r.pod.uid)
            {
                r.pod.namespace = w.namespace.clone();
                r.pod.name = w.name.clone();
            }
            let wanted = self.wanted(r);
            let current = r.captured.as_ref().map(|c| Wanted {
                identity: c.pod.identity.clone(),
                ip: c.pod.ip,
                other_ip: c.pod.other_ip,
                workload_uid: c.pod.workload_uid.clone(),
            });
            if wanted == current {
                continue;
            }
            if let Some(c) = r.captured.take() {
                self.release(c);
            }
            if let Some(w) = wanted {
                match self.capture(r, w) {
                    Ok(c) => {
                        if std::mem::take(&mut r.recovered) {
                            self.metrics.recovered.inc();
                        }
                        r.captured = Some(c);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot bring a pod into the mesh");
                        if std::mem::take(&mut r.recovered) {
                            self.metrics.unrecovered("capture_failed");
                        }
                    }
                }
            }
        }
    }

    /// Shutdown: closes every pod's listeners (new connections of captured
    /// pods are refused: they fail closed) and tells HBONE connections to
    /// drain; connections in flight go on.
    pub fn stop_accepting(&self) {
        self.inputs.drain.start();
        let mut pods = self.pods.lock().expect("pods lock");
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for r in pods.values_mut() {
            for h in r.captured.iter_mut().flat_map(|c| c.listeners.drain(..)) {
                h.abort();
            }
        }
    }

    /// Pods currently served, for `/config_dump`.
    /// The per-endpoint balancer state (for `/config_dump`).
    pub fn balancer(&self) -> Arc<weft_balance::Balancer<SocketAddr>> {
        self.inputs.balancer.clone()
    }

    pub fn pods(&self) -> Vec<Arc<LocalPod>> {
        self.pods
            .lock()
            .expect("pods lock")
            .values()
            .filter_map(|r| r.captured.as_ref().map(|c| c.pod.clone()))
            .collect()
    }
}

impl Drop for PodRegistry {
    fn drop(&mut self) {
        for (_, r) in self.pods.lock().expect("pods lock").drain() {
            for h in r.captured.into_iter().flat_map(|c| c.listeners) {
                h.abort();
            }
        }
    }
}

/// The two settings of a captured pod's namespace the proxy depends on,
/// made in one visit.
fn tune_namespace(netns: &Netns, key: &str) {
    // When a proxy closes its listeners (a rollout's old proxy), the
    // connections in their accept queues move to the successor's
    // listeners of the same reuseport group instead of being reset.
    let tuned = netns.run(|| {
        Ok((
            std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1"),
            reuse_time_wait(),
        ))
    });
    let (migrate, reuse) = match tuned {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(pod = %key, error = %e, "cannot tune the pod's network namespace (tcp_migrate_req, tcp_tw_reuse)");
            return;
        }
    };
    if let Err(e) = migrate {
        tracing::warn!(pod = %key, error = %e, "cannot set tcp_migrate_req: connections queued at a hand-over may be reset");
    }
    match reuse {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(pod = %key, "the pod sets net.ipv4.tcp_tw_reuse to 0: each of its ports takes at most about 470 new connections a second through the mesh (docs/node-proxy.md, \"Sockets and source ports of the connections to an application\")")
        }
        Err(e) => {
            tracing::warn!(pod = %key, error = %e, "cannot set tcp_tw_reuse: each of the pod's ports takes at most about 470 new connections a second through the mesh")
        }
    }
}

/// Every connection the proxy delivers to an application leaves from the
/// pod's own address to the same address and port, whoever the client: all
/// of a port's clients share one range of source ports. The proxy closes
/// first whenever the client does, so each such connection holds its
/// source port in TIME_WAIT for 60 s, and with the kernel's default (reuse
/// for loopback addresses only) the range (28,232 ports) ran out at about
/// 470 new connections a second, summed over every client: one client's
/// churn refused everyone's connections. Reuse (1) lets a port in TIME_WAIT
/// serve a new connection a second later, as loopback connections already
/// may; these connections never leave the pod either. A pod's own choice
/// (0) is kept. Returns whether reuse is on.
fn reuse_time_wait() -> std::io::Result<bool> {
    const TW_REUSE: &str = "/proc/sys/net/ipv4/tcp_tw_reuse";
    match std::fs::read_to_string(TW_REUSE)?.trim() {
        "1" => Ok(true),
        "2" => std::fs::write(TW_REUSE, "1").map(|()| true),
        _ => Ok(false),
    }
}
