//! `cargo xtask bench identity`: how fast the CA issues certificates.
//!
//! Runs the real CA (gRPC over TLS on loopback, local-mode authentication
//! and authorization from a state file) and measures `Certify` from a client
//! in the same process — on a 2-core machine client and CA share the CPU,
//! as a node proxy and the CA would not, so these numbers are a floor.
//!
//! Baseline, measured in the same run: signing alone (`Authority::certify`,
//! the CSR checks and the ECDSA signature, no network), so the report can
//! say what the RPC, TLS and authorization add.
//!
//! CSRs are generated before timing starts (on a node the key and CSR are
//! made by the proxy, not the CA).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};
use weft_identity::authority::LeafPolicy;
use weft_identity::testing::{LocalCa, TestPod};
use weft_identity_api::SpiffeId;

const ID: &str = "spiffe://cluster.local/ns/bench/sa/workload";
const ROUNDS: usize = 7;
const PER_ROUND: usize = 2000;
const CONCURRENCY: usize = 8;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let mut policy = LeafPolicy::new("cluster.local");
    policy.ttl = Duration::from_secs(24 * 3600);
    let ca = LocalCa::start(
        policy,
        &[TestPod::new("bench", "w-0", "workload", "node-a")],
    )
    .await
    .expect("CA starts");
    let token = ca.token("node-a");
    let csrs: Vec<Vec<u8>> = (0..64).map(|_| common::p256_csr(ID).1).collect();
    let identity: SpiffeId = ID.parse().unwrap();

    let authority = ca.running().unwrap().authority.clone();
    let mut client = common::connect(ca.addr(), &ca.anchors_pem(), "localhost").await;
    for i in 0..200 {
        // Warm-up: connection, caches, CPU frequency.
        common::certify(&mut client, Some(&token), ID, csrs[i % csrs.len()].clone())
            .await
            .unwrap();
    }
    let mut sign_rates = Vec::new();
    let mut seq_latencies = Vec::new();
    let mut seq_rates = Vec::new();
    let mut conc_latencies = Vec::new();
    let mut conc_rates = Vec::new();
    // Each round measures all three back to back, so a noisy neighbour on
    // this shared machine hurts all of them alike and the ratios hold.
    for _ in 0..ROUNDS {
        // Baseline: signing alone (CSR checks + ECDSA signature).
        let start = Instant::now();
        for i in 0..PER_ROUND {
            authority.certify(&identity, &csrs[i % csrs.len()]).unwrap();
        }
        sign_rates.push(PER_ROUND as f64 / start.elapsed().as_secs_f64());

        // One request at a time: latency without queueing.
        let start = Instant::now();
        for i in 0..PER_ROUND {
            let t = Instant::now();
            common::certify(&mut client, Some(&token), ID, csrs[i % csrs.len()].clone())
                .await
                .unwrap();
            seq_latencies.push(t.elapsed());
        }
        seq_rates.push(PER_ROUND as f64 / start.elapsed().as_secs_f64());

        // CONCURRENCY callers on one HTTP/2 connection: throughput.
        let start = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..CONCURRENCY {
            let mut client = client.clone();
            let token = token.clone();
            let csrs = csrs.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                for i in 0..PER_ROUND / CONCURRENCY {
                    let t = Instant::now();
                    common::certify(
                        &mut client,
                        Some(&token),
                        ID,
                        csrs[(w + i) % csrs.len()].clone(),
                    )
                    .await
                    .unwrap();
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        for t in tasks {
            conc_latencies.extend(t.await.unwrap());
        }
        conc_rates
            .push((PER_ROUND / CONCURRENCY * CONCURRENCY) as f64 / start.elapsed().as_secs_f64());
    }
    seq_latencies.sort();
    conc_latencies.sort();
    let range = |v: &[f64]| {
        let min = v.iter().cloned().fold(f64::MAX, f64::min);
        let max = v.iter().cloned().fold(f64::MIN, f64::max);
        format!("{min:.0}–{max:.0}")
    };
    let sign_median = median(&mut sign_rates.clone());
    let seq_median = median(&mut seq_rates.clone());
    let conc_median = median(&mut conc_rates.clone());

    println!(
        "identity CA benchmark: {ROUNDS} rounds; P-256 leaves, gRPC over TLS 1.3 on loopback, client in-process"
    );
    println!();
    println!("| measurement | median | range over rounds |");
    println!("|---|---|---|");
    println!(
        "| baseline: signing only (no RPC), certs/s | {sign_median:.0} | {} |",
        range(&sign_rates)
    );
    println!(
        "| Certify, 1 in flight, certs/s | {seq_median:.0} | {} |",
        range(&seq_rates)
    );
    println!(
        "| Certify, {CONCURRENCY} in flight, certs/s | {conc_median:.0} | {} |",
        range(&conc_rates)
    );
    println!();
    println!("| Certify latency | p50 | p99 | samples |");
    println!("|---|---|---|---|");
    println!(
        "| 1 in flight | {:.2} ms | {:.2} ms | {} |",
        ms(percentile(&seq_latencies, 0.5)),
        ms(percentile(&seq_latencies, 0.99)),
        seq_latencies.len()
    );
    println!(
        "| {CONCURRENCY} in flight | {:.2} ms | {:.2} ms | {} |",
        ms(percentile(&conc_latencies, 0.5)),
        ms(percentile(&conc_latencies, 0.99)),
        conc_latencies.len()
    );
    println!();
    println!(
        "ratio to signing only: Certify 1 in flight {:.2}, {CONCURRENCY} in flight {:.2}",
        seq_median / sign_median,
        conc_median / sign_median
    );
}
