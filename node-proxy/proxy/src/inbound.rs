//! Inbound traffic to a local pod. 15006: plaintext connections from
//! outside the mesh, steered here by `sk_lookup`; the accepted socket's
//! local address is the address the client dialled (podIP:port).
//!
//! The proxy delivers to the application from inside the pod (a
//! proxy-marked socket to podIP:port: `sk_lookup` lets a connection whose
//! source is the pod's own address through, so it does not loop).

use crate::metrics::{Reporter, SecurityPolicy, TcpLabels};
use crate::outbound::connect_from_pod;
use crate::pods::{Context, LocalPod};
use crate::splice::splice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::{TcpListener, TcpStream};

pub async fn serve_plaintext(listener: TcpListener, pod: Arc<LocalPod>, cx: Context) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(handle_plaintext(stream, peer, pod.clone(), cx.clone()));
            }
            Err(e) => {
                tracing::warn!(pod = %pod.key(), error = %e, "inbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle_plaintext(
    mut client: TcpStream,
    peer: SocketAddr,
    pod: Arc<LocalPod>,
    cx: Context,
) {
    let started = Instant::now();
    let Ok(target) = client.local_addr() else {
        return;
    };
    let labels = TcpLabels {
        reporter: Reporter::Destination,
        source_workload: String::new(),
        source_namespace: String::new(),
        source_principal: String::new(),
        destination_workload: pod.name.clone(),
        destination_namespace: pod.namespace.clone(),
        destination_principal: String::new(),
        destination_service: String::new(),
        connection_security_policy: SecurityPolicy::None,
    };
    let open = cx.tcp_metrics.open(labels);
    let mut app = match connect_from_pod(&pod, target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(target: "access", pod = %pod.key(), %peer, dst = %target, error = %e, "inbound delivery failed");
            open.close(&Default::default());
            return;
        }
    };
    let (moved, err) = splice(&mut client, &mut app).await;
    tracing::info!(
        target: "access",
        direction = "inbound",
        src = %peer,
        dst = %pod.key(),
        port = target.port(),
        from_client = moved.a_to_b,
        to_client = moved.b_to_a,
        duration_ms = started.elapsed().as_millis() as u64,
        error = err.as_ref().map(|e| e.to_string()),
        "connection closed"
    );
    open.close(&moved);
}
