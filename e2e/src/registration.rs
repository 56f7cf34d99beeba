//! Telling node agents about pods, as the chained CNI plugin does on a real
//! node (`weft-cni`, protocol `weft-registration`, in `docs/redirector.md`): `add` once a pod's
//! network exists and before its containers start, so capture is in place
//! before the application's first connection; `del` after its containers
//! are gone.
//!
//! `add` fails closed like the plugin: a pod whose agent does not answer is
//! not started (the kubelet would retry; the simulator reports and tears
//! down). `del` is best effort, as CNI requires.

use crate::state::{NodeState, PodState};
use std::time::Duration;
use weft_registration::{ClientError, Message, PodEvent, PodRef};

const TIMEOUT: Duration = Duration::from_secs(5);

fn pod_ref(pod: &PodState) -> PodRef {
    PodRef {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
    }
}

/// The simulator has no container runtime; the pod's netns name stands in
/// for the sandbox container id.
fn container_id(pod: &PodState) -> String {
    pod.netns.clone()
}

pub fn add(node: &NodeState, pod: &PodState) -> Result<(), ClientError> {
    let event = PodEvent::Add {
        pod: pod_ref(pod),
        netns: pod.netns_path.clone(),
        container_id: container_id(pod),
        annotations: Some(pod.annotations.clone().into_iter().collect()),
        ips: vec![pod.ip.into(), pod.ipv6.into()],
    };
    weft_registration::send(&node.agent_socket, &Message::new(event), TIMEOUT)
}

pub fn del(node: &NodeState, pod: &PodState) -> Result<(), ClientError> {
    let event = PodEvent::Del {
        pod: pod_ref(pod),
        netns: Some(pod.netns_path.clone()),
        container_id: container_id(pod),
    };
    weft_registration::send(
        &node.agent_socket,
        &Message::new(event),
        Duration::from_secs(1),
    )
}
