//! The floor under the new-connection row: two plain TCP relays, one in
//! each node's namespace, between the direct path's client and server.
//!
//! Any mesh with a user-space proxy on each node makes a new connection
//! cross two more processes than the direct path: client → node A's proxy
//! → node B's proxy → application and back. These relays do nothing else:
//! no TLS, no HTTP/2, no policy, no metrics, no log, one thread each (no
//! hand-over between threads). Node A's relay keeps [`AHEAD`] connections
//! to node B's relay made ahead (as the mesh keeps its HBONE connection),
//! so a client's connection costs no handshake between the nodes; node B's
//! relay connects to the application when the first bytes arrive. What
//! the row measures through them is what the hops alone cost on this
//! machine, the part of the mesh's ratio no proxy code can remove.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use tokio::net::{TcpListener, TcpStream};
use weft_sim::TestCluster;

/// The relays' port on each node's address.
const PORT: u16 = 15999;
/// Connections node A's relay holds ready to node B's.
const AHEAD: usize = 8;

/// `relay PORT TARGET ahead|on-first-byte`: relays each connection
/// accepted on PORT to TARGET, with connections to TARGET made `ahead` or
/// when the accepted one's first bytes arrive. Prints `listening` once
/// bound.
pub fn serve(port: u16, target: SocketAddr, ahead: bool) -> ! {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(("0.0.0.0", port))
            .await
            .unwrap_or_else(|e| panic!("relay: port {port}: {e}"));
        println!("listening");
        let (ready_tx, mut ready) = tokio::sync::mpsc::channel::<TcpStream>(AHEAD);
        if ahead {
            tokio::spawn(async move {
                while let Ok(permit) = ready_tx.reserve().await {
                    match TcpStream::connect(target).await {
                        Ok(stream) => permit.send(stream),
                        Err(e) => {
                            eprintln!("relay: connect {target}: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                continue;
            };
            let upstream = if ahead { ready.recv().await } else { None };
            tokio::spawn(async move {
                let _ = client.set_nodelay(true);
                let upstream = match upstream {
                    Some(stream) => Ok(stream),
                    None => match client.readable().await {
                        Ok(()) => TcpStream::connect(target).await,
                        Err(e) => Err(e),
                    },
                };
                let Ok(mut upstream) = upstream else { return };
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    std::process::exit(1)
}

/// The two relays of a cluster, stopped when dropped.
pub struct Relays {
    children: Vec<Child>,
    /// Where the client connects: node A's relay.
    pub entry: SocketAddr,
}

impl Relays {
    /// Starts node B's relay to `server:port`, then node A's to node B's,
    /// each in its node's namespace, and waits until both listen.
    pub fn start(cluster: &TestCluster, server: &str, port: u16) -> Relays {
        let node_ip = |n: &str| -> std::net::IpAddr { cluster.state().node(n).unwrap().ip.into() };
        let entry = SocketAddr::new(node_ip("node-a"), PORT);
        let exit = SocketAddr::new(node_ip("node-b"), PORT);
        let mut relays = Relays {
            children: Vec::new(),
            entry,
        };
        for (node, target, mode) in [
            ("node-b", format!("{server}:{port}"), "on-first-byte"),
            ("node-a", exit.to_string(), "ahead"),
        ] {
            let args = ["relay".to_string(), PORT.to_string(), target, mode.into()];
            let mut command =
                weft_sim::cluster::node_command(cluster.state(), node, &super::exe(), &args)
                    .expect("a command in the node's namespace");
            let mut child = command
                .stdout(Stdio::piped())
                .spawn()
                .expect("the relay starts");
            let mut line = String::new();
            let stdout = child.stdout.take().expect("the relay's stdout");
            relays.children.push(child);
            BufReader::new(stdout)
                .read_line(&mut line)
                .expect("the relay's first line");
            assert_eq!(line.trim(), "listening", "relay on {node}");
        }
        relays
    }
}

impl Relays {
    /// The relays' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
