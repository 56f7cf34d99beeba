//! The floors under two rows: plain relays, one in each node's namespace,
//! between the direct path's client and server.
//!
//! Any mesh with a user-space proxy on each node makes a request cross two
//! more processes than the direct path: client → node A's proxy → node B's
//! proxy → application and back. These relays do nothing else: no TLS, no
//! policy, no metrics, no log, one thread each (no hand-over between
//! threads).
//!
//! - [`RelayKind::Tcp`] copies bytes. Node A's relay keeps [`AHEAD`]
//!   connections to node B's made ahead (as the mesh keeps its HBONE
//!   connection), so a client's connection costs no handshake between the
//!   nodes; node B's relay connects to the application when the first
//!   bytes arrive. Through them, new connections cost what the hops alone
//!   cost on this machine: the part of the mesh's ratio no proxy code can
//!   remove.
//! - [`RelayKind::Http2`] takes each request apart and sends it on, with
//!   hyper (the HTTP/2 the mesh uses): an HTTP/2 server for the incoming
//!   connections, one HTTP/2 client connection to the next hop. Against
//!   the TCP relays, per call, it is what parsing and re-encoding each call
//!   costs by itself, whatever else a proxy does.

use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use tokio::net::{TcpListener, TcpStream};
use weft_sim::TestCluster;

/// What a relay does with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayKind {
    /// Copies bytes, to the next hop on a connection of its own.
    Tcp,
    /// Serves HTTP/2 and sends each request on one HTTP/2 connection to
    /// the next hop.
    Http2,
}

/// The first of the relays' ports on each node's address (one per pair of
/// relays started at once).
const FIRST_PORT: u16 = 15990;
/// Connections node A's relay holds ready to node B's.
const AHEAD: usize = 8;

/// `relay PORT TARGET ahead|on-first-byte`: relays each connection
/// accepted on PORT to TARGET, with connections to TARGET made `ahead` or
/// when the accepted one's first bytes arrive. Prints `listening` once
/// bound.
pub fn serve(port: u16, target: SocketAddr, ahead: bool) -> ! {
    on_one_thread(port, async move |listener| {
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
    })
}

/// Runs `relay` with a listener on `port`, on a single-threaded runtime
/// (no hand-over between threads), until it ends: then exits.
fn on_one_thread(port: u16, relay: impl AsyncFnOnce(TcpListener)) -> ! {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(("0.0.0.0", port))
            .await
            .unwrap_or_else(|e| panic!("relay: port {port}: {e}"));
        relay(listener).await
    });
    std::process::exit(1)
}

/// `relay PORT TARGET http2`: serves HTTP/2 (prior knowledge) on PORT and
/// sends every request on one HTTP/2 connection to TARGET, made when the
/// relay starts. Prints `listening` once bound and connected.
pub fn serve_http2(port: u16, target: SocketAddr) -> ! {
    on_one_thread(port, async move |listener| {
        let upstream = TcpStream::connect(target)
            .await
            .unwrap_or_else(|e| panic!("relay: connect {target}: {e}"));
        let _ = upstream.set_nodelay(true);
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(upstream))
                .await
                .unwrap_or_else(|e| panic!("relay: HTTP/2 to {target}: {e}"));
        tokio::spawn(connection);
        println!("listening");
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let sender = sender.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                        let mut sender = sender.clone();
                        async move {
                            match sender.send_request(request).await {
                                Ok(response) => Ok(response.map(http_body_util::Either::Left)),
                                Err(_) => {
                                    let mut refused =
                                        hyper::Response::new(http_body_util::Either::Right(
                                            http_body_util::Empty::<Bytes>::new(),
                                        ));
                                    *refused.status_mut() = hyper::StatusCode::BAD_GATEWAY;
                                    Ok::<_, std::convert::Infallible>(refused)
                                }
                            }
                        }
                    });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(client), service)
                    .await;
            });
        }
    })
}

/// The two relays of a cluster, stopped when dropped.
pub struct Relays {
    children: Vec<Child>,
    /// Where the client connects: node A's relay.
    pub entry: SocketAddr,
}

impl Relays {
    /// Starts node B's relay to `server:port`, then node A's to node B's,
    /// each in its node's namespace, and waits until both listen. `pair`
    /// tells apart pairs that run at the same time (their ports).
    pub fn start(
        cluster: &TestCluster,
        kind: RelayKind,
        pair: u16,
        server: &str,
        port: u16,
    ) -> Relays {
        let node_ip = |n: &str| -> std::net::IpAddr { cluster.state().node(n).unwrap().ip.into() };
        let listen = FIRST_PORT + pair;
        let entry = SocketAddr::new(node_ip("node-a"), listen);
        let exit = SocketAddr::new(node_ip("node-b"), listen);
        let (first, second) = match kind {
            RelayKind::Tcp => ("on-first-byte", "ahead"),
            RelayKind::Http2 => ("http2", "http2"),
        };
        let mut relays = Relays {
            children: Vec::new(),
            entry,
        };
        for (node, target, mode) in [
            ("node-b", format!("{server}:{port}"), first),
            ("node-a", exit.to_string(), second),
        ] {
            let args = ["relay".to_string(), listen.to_string(), target, mode.into()];
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
