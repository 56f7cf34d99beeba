//! `WEFT_BENCH_PART=throughput`: one TCP connection's throughput through
//! the mesh against the direct path, and the node proxies' CPU per GB
//! moved (issue #18; targets: ≥ 0.45× direct, ≤ 3 CPU-s/GB for both
//! proxies together).
//!
//! A cluster of two nodes: a client pod on node-a, iperf3 servers on
//! node-b, once outside the mesh (direct) and once enrolled, where port
//! 5201 takes the default path (protocol detection finds opaque TCP) and
//! 5202 is declared opaque (`weft.io/opaque-ports`: no detection, L4 only).
//! Each round runs `iperf3 -t SECONDS` on the three paths in turn, so the
//! machine's drift hits them alike; the table gives medians of the rounds
//! [min-max]. CPU is the two node proxies' utime + stime
//! (`/proc/PID/stat`) around each transfer, divided by the bytes iperf3
//! reports received.
//!
//! - `WEFT_BENCH_THROUGHPUT_ROUNDS` (default 5), `..._SECONDS` (default 4);
//! - `WEFT_BENCH_THROUGHPUT_BUILDS="label=DIR,..."` adds builds (directories
//!   holding the three mesh binaries): each gets its own cluster, the
//!   builds alternate in `..._PASSES` passes (default 1; rounds are split
//!   between them), so a change is compared with its baseline in one run;
//! - `WEFT_BENCH_PART=handshake`: only the in-process handshake bench
//!   (also printed after the throughput table): handshakes per second with
//!   each crypto provider, with and without X25519MLKEM768;
//! - `WEFT_BENCH_PROFILE=throughput`: only the mesh path, 30 s transfers
//!   after the proxies' pids are printed, for `perf record -g -p PID,PID`.

use super::{median, proxies_cpu_seconds};
use std::time::Duration;
use weft_sim::TestCluster;
use weft_sim::mesh::{Component, Mesh, MeshBinaries};

const MANIFEST: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: direct}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: mesh}
spec: {nodeName: node-a, containers: [{name: main, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: mesh, annotations: {weft.io/opaque-ports: "5202"}}
spec:
  nodeName: node-b
  containers:
  - {name: iperf, command: [iperf3, -s, -p, "5201"], ports: [{containerPort: 5201}]}
  - {name: iperf-opaque, command: [iperf3, -s, -p, "5202"], ports: [{containerPort: 5202}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: direct}
spec: {nodeName: node-a, containers: [{name: main, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: direct}
spec:
  nodeName: node-b
  containers:
  - {name: iperf, command: [iperf3, -s, -p, "5201"], ports: [{containerPort: 5201}]}
"#;

/// The paths compared: (label, namespace, port).
const PATHS: [(&str, &str, u16); 3] = [
    ("direct", "direct", 5201),
    ("mesh (default)", "mesh", 5201),
    ("mesh L4 (opaque)", "mesh", 5202),
];

/// One transfer: Gbit/s received, and node proxy CPU seconds per GB.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    pub gbps: f64,
    pub cpu_s_per_gb: f64,
}

/// Per path, the transfers of every round.
pub type Results = Vec<Vec<Transfer>>;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn iperf3(cluster: &TestCluster, mesh: &Mesh, ns: &str, port: u16, seconds: u32) -> Transfer {
    let server = cluster.pod(&format!("{ns}/server")).ip.to_string();
    let before = proxies_cpu_seconds(mesh);
    let out = cluster.exec_ok(
        &format!("{ns}/client"),
        &[
            "iperf3",
            "-c",
            &server,
            "-p",
            &port.to_string(),
            "-t",
            &seconds.to_string(),
            "-J",
        ],
    );
    let cpu = proxies_cpu_seconds(mesh) - before;
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    let received = &v["end"]["sum_received"];
    let bytes = received["bytes"].as_f64().unwrap_or(f64::NAN);
    Transfer {
        gbps: received["bits_per_second"].as_f64().unwrap_or(f64::NAN) / 1e9,
        cpu_s_per_gb: cpu / (bytes / 1e9),
    }
}

fn up(binaries: &MeshBinaries) -> (TestCluster, std::sync::Arc<Mesh>) {
    let mesh = std::sync::Arc::new(Mesh::new(binaries.clone()));
    let cluster = TestCluster::up_with(&[("c.yaml", MANIFEST)], |o| {
        o.node_agents = Some(mesh.clone());
        o.ready_timeout = Duration::from_secs(60);
    })
    .expect("cluster with the mesh");
    (cluster, mesh)
}

/// `rounds` rounds of the three paths on a fresh cluster of `binaries`.
pub fn measure(binaries: &MeshBinaries, rounds: usize, seconds: u32, into: &mut Results) {
    let (cluster, mesh) = up(binaries);
    into.resize(PATHS.len(), Vec::new());
    for round in 0..rounds {
        for (i, (label, ns, port)) in PATHS.iter().enumerate() {
            let t = iperf3(&cluster, &mesh, ns, *port, seconds);
            eprintln!(
                "throughput round {round} {label}: {:.2} Gbit/s, {:.2} proxy CPU-s/GB",
                t.gbps, t.cpu_s_per_gb
            );
            into[i].push(t);
        }
    }
    drop(cluster);
    mesh.reap();
}

fn cell(v: &[f64], digits: usize) -> String {
    let mut s = v.to_vec();
    let m = median(&mut s);
    let (min, max) = (s[0], s[s.len() - 1]);
    format!("{m:.digits$} [{min:.digits$}-{max:.digits$}]")
}

/// Prints the table of one build's results.
pub fn print(label: &str, results: &Results) {
    let gbps = |i: usize| results[i].iter().map(|t| t.gbps).collect::<Vec<_>>();
    let direct = median(&mut gbps(0));
    println!(
        "single-connection throughput{label}: iperf3, {} rounds, paths alternating (median [min-max]); CPU: both node proxies, utime+stime per GB received",
        results[0].len()
    );
    println!(
        "{:<20} {:>22} {:>8} {:>22}",
        "", "Gbit/s", "ratio", "proxy CPU-s/GB"
    );
    for (i, (path, _, _)) in PATHS.iter().enumerate() {
        let cpu: Vec<f64> = results[i].iter().map(|t| t.cpu_s_per_gb).collect();
        let (g, c) = (gbps(i), if i == 0 { "-".into() } else { cell(&cpu, 2) });
        println!(
            "{path:<20} {:>22} {:>8.2} {c:>22}",
            cell(&g, 2),
            median(&mut g.clone()) / direct
        );
    }
}

/// The mesh path alone, long transfers, for a profiler.
fn profile(binaries: &MeshBinaries) {
    let (cluster, mesh) = up(binaries);
    let pids: Vec<String> = ["node-a", "node-b"]
        .iter()
        .filter_map(|n| mesh.pid(&Component::NodeProxy(n.to_string())))
        .map(|p| p.to_string())
        .collect();
    eprintln!("node proxy pids: {}", pids.join(","));
    let port = env_or("WEFT_BENCH_PORT", 5201u16);
    for _ in 0..env_or("WEFT_BENCH_THROUGHPUT_ROUNDS", 2usize) {
        let t = iperf3(&cluster, &mesh, "mesh", port, 30);
        eprintln!(
            "mesh port {port}: {:.2} Gbit/s, {:.2} proxy CPU-s/GB",
            t.gbps, t.cpu_s_per_gb
        );
    }
    drop(cluster);
    mesh.reap();
}

pub fn bench(binaries: MeshBinaries) {
    if std::env::var("WEFT_BENCH_PART").as_deref() == Ok("handshake") {
        return handshake_bench();
    }
    if std::env::var("WEFT_BENCH_PROFILE").as_deref() == Ok("throughput") {
        return profile(&binaries);
    }
    let rounds = env_or("WEFT_BENCH_THROUGHPUT_ROUNDS", 5usize);
    let seconds = env_or("WEFT_BENCH_THROUGHPUT_SECONDS", 4u32);
    let passes = env_or("WEFT_BENCH_THROUGHPUT_PASSES", 1usize).max(1);
    let mut builds = vec![("this build".to_string(), binaries)];
    for spec in std::env::var("WEFT_BENCH_THROUGHPUT_BUILDS")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
    {
        let (label, dir) = spec.split_once('=').unwrap_or((spec, spec));
        let b = MeshBinaries::in_dir(std::path::Path::new(dir)).unwrap_or_else(|e| {
            eprintln!("mesh-bench: {e}");
            std::process::exit(2)
        });
        builds.push((label.to_string(), b));
    }
    let mut results: Vec<Results> = vec![Vec::new(); builds.len()];
    let per_pass = rounds.div_ceil(passes);
    for pass in 0..passes {
        for (b, (label, binaries)) in builds.iter().enumerate() {
            eprintln!("throughput pass {pass}, build {label}");
            measure(binaries, per_pass, seconds, &mut results[b]);
        }
    }
    for ((label, _), r) in builds.iter().zip(&results) {
        let label = if builds.len() > 1 {
            format!(" ({label})")
        } else {
            String::new()
        };
        print(&label, r);
    }
    handshake_bench();
}

/// The mesh's TLS handshake in process, for a crypto provider and key
/// exchange: mutual TLS 1.3 with ECDSA P-256 certificates (as the mesh's),
/// client and server in memory. Returns full handshakes per second (both
/// ends' CPU on this thread) and the bytes the client's first flight took.
fn handshakes(
    provider: &rustls::crypto::CryptoProvider,
    kx: &[&'static dyn rustls::crypto::SupportedKxGroup],
    certs: &TestCerts,
    duration: Duration,
) -> (f64, usize) {
    use rustls::{ClientConnection, ServerConnection};
    let (client, server) = configs(provider, kx, certs);
    let name = rustls_pki_types::ServerName::try_from("server.test").expect("name");
    let mut first_flight = 0;
    let start = std::time::Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        let mut c = ClientConnection::new(client.clone(), name.clone()).expect("client");
        let mut s = ServerConnection::new(server.clone()).expect("server");
        let flights = handshake(&mut c, &mut s);
        first_flight = flights;
        n += 1;
    }
    (n as f64 / start.elapsed().as_secs_f64(), first_flight)
}

/// Moves TLS bytes from one end to the other until neither has any to
/// send. Returns the bytes moved.
fn exchange(
    from: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl rustls::SideData>>,
    to: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl rustls::SideData>>,
    buf: &mut Vec<u8>,
) -> usize {
    buf.clear();
    while from.wants_write() {
        from.write_tls(buf).expect("writes");
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).expect("reads");
        to.process_new_packets().expect("TLS");
    }
    buf.len()
}

/// Runs a handshake in memory; returns the size of the client's first
/// flight (its ClientHello).
fn handshake(c: &mut rustls::ClientConnection, s: &mut rustls::ServerConnection) -> usize {
    let mut buf = Vec::new();
    let first = exchange(c, s, &mut buf);
    for _ in 0..10 {
        if !c.is_handshaking() && !s.is_handshaking() {
            return first;
        }
        exchange(s, c, &mut buf);
        exchange(c, s, &mut buf);
    }
    panic!("handshake does not finish")
}

/// The record layer alone: MB/s of application data from client to server
/// through rustls in memory (encrypt, copy, decrypt), 64 KiB writes.
fn record_layer(
    provider: &rustls::crypto::CryptoProvider,
    certs: &TestCerts,
    duration: Duration,
) -> f64 {
    use std::io::{Read, Write};
    let kx = provider.kx_groups.clone();
    let (client, server) = configs(provider, &kx, certs);
    let name = rustls_pki_types::ServerName::try_from("server.test").expect("name");
    let mut c = rustls::ClientConnection::new(client, name).expect("client");
    let mut s = rustls::ServerConnection::new(server).expect("server");
    handshake(&mut c, &mut s);
    let chunk = vec![7u8; 64 * 1024];
    let mut sink = vec![0u8; 64 * 1024];
    let mut buf = Vec::new();
    let start = std::time::Instant::now();
    let mut moved = 0u64;
    while start.elapsed() < duration {
        for _ in 0..64 {
            c.writer().write_all(&chunk).expect("plaintext in");
            buf.clear();
            while c.wants_write() {
                c.write_tls(&mut buf).expect("writes");
            }
            // The receiver's plaintext is read as it is decrypted (rustls
            // holds a bounded amount).
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).expect("reads");
                s.process_new_packets().expect("TLS");
                loop {
                    match s.reader().read(&mut sink) {
                        Ok(0) => break,
                        Ok(n) => moved += n as u64,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("plaintext out: {e}"),
                    }
                }
            }
        }
    }
    moved as f64 / 1e6 / start.elapsed().as_secs_f64()
}

type Configs = (
    std::sync::Arc<rustls::ClientConfig>,
    std::sync::Arc<rustls::ServerConfig>,
);

/// The mesh's settings (TLS 1.3 only, mutual, no resumption) with
/// `provider` and key exchange groups `kx`.
fn configs(
    provider: &rustls::crypto::CryptoProvider,
    kx: &[&'static dyn rustls::crypto::SupportedKxGroup],
    certs: &TestCerts,
) -> Configs {
    let mut provider = provider.clone();
    provider.kx_groups = kx.to_vec();
    let provider = std::sync::Arc::new(provider);
    let roots = std::sync::Arc::new({
        let mut r = rustls::RootCertStore::empty();
        r.add(certs.ca.clone()).expect("CA");
        r
    });
    let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .expect("client verifier");
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(vec![certs.server.clone()], certs.server_key.clone_key())
        .expect("server cert");
    server.session_storage = std::sync::Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![certs.client.clone()], certs.client_key.clone_key())
        .expect("client cert");
    client.resumption = rustls::client::Resumption::disabled();
    (std::sync::Arc::new(client), std::sync::Arc::new(server))
}

/// A CA, and a server and a client certificate it signed (ECDSA P-256).
struct TestCerts {
    ca: rustls_pki_types::CertificateDer<'static>,
    server: rustls_pki_types::CertificateDer<'static>,
    server_key: rustls_pki_types::PrivateKeyDer<'static>,
    client: rustls_pki_types::CertificateDer<'static>,
    client_key: rustls_pki_types::PrivateKeyDer<'static>,
}

fn test_certs() -> TestCerts {
    use rcgen::{CertificateParams, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256};
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |name: &str| {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("leaf");
        (
            cert.der().clone(),
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    };
    let (server, server_key) = leaf("server.test");
    let (client, client_key) = leaf("client.test");
    TestCerts {
        ca: ca.der().clone(),
        server,
        server_key,
        client,
        client_key,
    }
}

/// Handshakes per second with and without the hybrid post-quantum key
/// exchange (X25519MLKEM768), and with each provider, rounds alternating;
/// then the record layer's speed with each. The mesh uses ring (X25519);
/// rustls' ring provider has no ML-KEM, so the hybrid is measured with
/// aws-lc-rs (a dev-dependency feature: only this benchmark has it).
pub fn handshake_bench() {
    use rustls::crypto::{aws_lc_rs, ring};
    let certs = test_certs();
    let rounds = env_or("WEFT_BENCH_HANDSHAKE_ROUNDS", 5usize);
    let (ring_p, aws_p) = (ring::default_provider(), aws_lc_rs::default_provider());
    let cases: [(
        &str,
        &rustls::crypto::CryptoProvider,
        Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
    ); 3] = [
        ("ring, X25519", &ring_p, vec![ring::kx_group::X25519]),
        (
            "aws-lc-rs, X25519",
            &aws_p,
            vec![aws_lc_rs::kx_group::X25519],
        ),
        (
            "aws-lc-rs, X25519MLKEM768",
            &aws_p,
            vec![
                aws_lc_rs::kx_group::X25519MLKEM768,
                aws_lc_rs::kx_group::X25519,
            ],
        ),
    ];
    let mut rates = vec![Vec::new(); cases.len()];
    let mut flights = vec![0; cases.len()];
    for _ in 0..rounds {
        for (i, (_, provider, kx)) in cases.iter().enumerate() {
            let (rate, flight) = handshakes(provider, kx, &certs, Duration::from_millis(1000));
            rates[i].push(rate);
            flights[i] = flight;
        }
    }
    // The record layer with each provider's default cipher suite order
    // (AES-256-GCM first) and with AES-128-GCM alone.
    let aes128 = |p: &rustls::crypto::CryptoProvider, suite| {
        let mut p = p.clone();
        p.cipher_suites = vec![suite];
        p
    };
    let record_cases = [
        ("ring, AES-256-GCM", ring_p.clone()),
        (
            "ring, AES-128-GCM",
            aes128(&ring_p, ring::cipher_suite::TLS13_AES_128_GCM_SHA256),
        ),
        ("aws-lc-rs, AES-256-GCM", aws_p.clone()),
        (
            "aws-lc-rs, AES-128-GCM",
            aes128(&aws_p, aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256),
        ),
    ];
    let mut mbps = vec![Vec::new(); record_cases.len()];
    for _ in 0..rounds {
        for (i, (_, p)) in record_cases.iter().enumerate() {
            mbps[i].push(record_layer(p, &certs, Duration::from_millis(1000)));
        }
    }
    println!(
        "mTLS 1.3 handshakes in process (client and server on one thread, ECDSA P-256), {rounds} rounds of 1 s alternating (median [min-max]):"
    );
    // Against what the mesh uses (ring, X25519).
    let base = median(&mut rates[0].clone());
    for (i, (label, _, _)) in cases.iter().enumerate() {
        let m = median(&mut rates[i].clone());
        println!(
            "{label:<28} {:>22} handshakes/s  {:>5.2}x ring X25519  ({:.0} us each; ClientHello {} B)",
            cell(&rates[i], 0),
            m / base,
            1e6 / m,
            flights[i]
        );
    }
    println!(
        "TLS record layer in process (rustls, client to server, 64 KiB writes, encrypt + decrypt on one thread), {rounds} rounds of 1 s alternating:"
    );
    for (i, (label, _)) in record_cases.iter().enumerate() {
        println!("{label:<28} {:>22} MB/s", cell(&mbps[i], 0));
    }
}
