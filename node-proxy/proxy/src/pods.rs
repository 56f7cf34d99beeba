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

use crate::inbound;
use crate::metrics::TcpMetrics;
use crate::outbound;
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;
use weft_cni::protocol::{PodEvent, PodRef};
use weft_redirector::{INBOUND_PORT, Netns, OUTBOUND_PORT, PodEnrollment, Redirector};

/// A pod on this node, as far as the data plane is concerned.
#[derive(Debug)]
pub struct LocalPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub netns: Arc<Netns>,
}

impl LocalPod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

struct Registered {
    pod: Arc<LocalPod>,
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
        source: Box<weft_redirector::Error>,
    },
    #[error("cannot enroll {pod}: {source}")]
    Enroll {
        pod: String,
        source: Box<weft_redirector::Error>,
    },
}

/// Shared context of every connection handler.
#[derive(Clone)]
pub struct Context {
    pub tcp_metrics: TcpMetrics,
}

pub struct PodRegistry {
    redirector: Arc<Redirector>,
    context: Context,
    pods: Mutex<HashMap<String, Registered>>,
}

impl PodRegistry {
    pub fn new(redirector: Arc<Redirector>, context: Context) -> Self {
        Self {
            redirector,
            context,
            pods: Mutex::default(),
        }
    }

    /// Handles one registration event; the error is what the CNI plugin
    /// (or simulator) reports back.
    pub fn handle(&self, event: PodEvent) -> Result<(), RegistrationError> {
        match event {
            PodEvent::Add {
                pod,
                netns,
                annotations,
                ..
            } => self.add(pod, &netns, annotations.unwrap_or_default()),
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
    ) -> Result<(), RegistrationError> {
        let key = format!("{}/{}", pod.namespace, pod.name);
        // A repeated add (the CNI plugin retried) replaces the old state.
        self.remove(&pod);
        let netns =
            Arc::new(
                Netns::open(netns_path).map_err(|source| RegistrationError::Netns {
                    pod: key.clone(),
                    source: Box::new(source),
                })?,
            );
        let local = Arc::new(LocalPod {
            namespace: pod.namespace,
            name: pod.name,
            uid: pod.uid.clone(),
            netns: netns.clone(),
        });
        let listen = |addr: SocketAddr| {
            netns
                .listen_tcp(addr)
                .and_then(|l| {
                    tokio::net::TcpListener::from_std(l).map_err(weft_redirector::Error::from)
                })
                .map_err(|source| RegistrationError::Listen {
                    pod: key.clone(),
                    addr,
                    source: Box::new(source),
                })
        };
        let mut listeners = Vec::new();
        let abort_all =
            |listeners: &mut Vec<JoinHandle<()>>| listeners.drain(..).for_each(|h| h.abort());
        for ip in [
            std::net::IpAddr::V4(Ipv4Addr::LOCALHOST),
            std::net::IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            match listen(SocketAddr::new(ip, OUTBOUND_PORT)) {
                Ok(l) => listeners.push(tokio::spawn(outbound::serve(
                    l,
                    local.clone(),
                    self.context.clone(),
                ))),
                Err(e) => {
                    abort_all(&mut listeners);
                    return Err(e);
                }
            }
        }
        for ip in [
            std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            std::net::IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ] {
            let l = match listen(SocketAddr::new(ip, INBOUND_PORT)) {
                Ok(l) => l,
                Err(e) => {
                    abort_all(&mut listeners);
                    return Err(e);
                }
            };
            if let Err(source) = self.redirector.register_inbound_listener(&netns, &l) {
                abort_all(&mut listeners);
                return Err(RegistrationError::Enroll {
                    pod: key,
                    source: Box::new(source),
                });
            }
            listeners.push(tokio::spawn(inbound::serve_plaintext(
                l,
                local.clone(),
                self.context.clone(),
            )));
        }
        let enrollment = PodEnrollment {
            netns: &netns,
            pod_uid: pod.uid,
            annotations,
        };
        if let Err(source) = self.redirector.enroll(&enrollment) {
            abort_all(&mut listeners);
            return Err(RegistrationError::Enroll {
                pod: key,
                source: Box::new(source),
            });
        }
        tracing::info!(pod = %key, "pod enrolled");
        self.pods.lock().expect("pods lock").insert(
            local.uid.clone(),
            Registered {
                pod: local,
                listeners,
            },
        );
        Ok(())
    }

    fn remove(&self, pod: &PodRef) {
        let removed = {
            let mut pods = self.pods.lock().expect("pods lock");
            let uid = if pod.uid.is_empty() {
                pods.values()
                    .find(|r| r.pod.namespace == pod.namespace && r.pod.name == pod.name)
                    .map(|r| r.pod.uid.clone())
            } else {
                Some(pod.uid.clone())
            };
            uid.and_then(|u| pods.remove(&u))
        };
        let Some(registered) = removed else { return };
        // Unenroll first: from now on the pod's connects go direct (the pod
        // is leaving the mesh) rather than to listeners about to close.
        if let Err(e) = self.redirector.unenroll(&registered.pod.uid) {
            tracing::warn!(pod = %registered.pod.key(), error = %e, "unenroll failed");
        }
        for h in registered.listeners {
            h.abort();
        }
        tracing::info!(pod = %registered.pod.key(), "pod removed");
    }

    /// Pods currently served, for `/config_dump`.
    pub fn pods(&self) -> Vec<Arc<LocalPod>> {
        self.pods
            .lock()
            .expect("pods lock")
            .values()
            .map(|r| r.pod.clone())
            .collect()
    }
}

impl Drop for PodRegistry {
    fn drop(&mut self) {
        for (_, r) in self.pods.lock().expect("pods lock").drain() {
            for h in r.listeners {
                h.abort();
            }
        }
    }
}
