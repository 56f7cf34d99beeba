//! The threads connections run on.
//!
//! A request through the proxy crosses several tasks: the client's
//! connection, the upstream connection it is sent on, the tunnel's or the
//! application's connection on the other side. On a work-stealing runtime
//! those tasks land on different worker threads, and every hop between
//! them is a wake-up through the kernel (a futex, a context switch): on a
//! 2-core machine that cost a gRPC request 32% more proxy CPU and 100 µs
//! at the median (docs/benchmarks.md). So each local pod's connections run
//! on one thread of their own, a single-threaded runtime: its listeners,
//! everything they accept and everything those start (upstream and tunnel
//! connections are pooled per pod, so they are the pod's too). Pods are
//! dealt out over the threads in turn, so a node's pods use every thread.
//! The cost: one pod's traffic never uses more than one thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::runtime::Handle;

#[derive(Clone)]
pub struct ConnectionThreads {
    handles: Arc<[Handle]>,
    next: Arc<AtomicUsize>,
}

impl ConnectionThreads {
    /// Everything on the caller's runtime (tests, and proxies that want
    /// no threads of their own).
    pub fn current() -> Self {
        Self {
            handles: Arc::from([Handle::current()]),
            next: Arc::default(),
        }
    }

    /// `count` threads, each running a single-threaded runtime until the
    /// process exits.
    pub fn start(count: usize) -> std::io::Result<Self> {
        let mut handles = Vec::with_capacity(count);
        for i in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            std::thread::Builder::new()
                .name(format!("weft-conn-{i}"))
                .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
        }
        Ok(Self {
            handles: handles.into(),
            next: Arc::default(),
        })
    }

    /// The thread for the next pod captured, in turn.
    pub fn next_for_pod(&self) -> Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_name() -> String {
        std::thread::current()
            .name()
            .unwrap_or_default()
            .to_string()
    }

    #[tokio::test]
    async fn pods_are_dealt_out_in_turn_and_what_their_tasks_start_stays_on_their_thread() {
        let threads = ConnectionThreads::start(2).unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let pod = threads.next_for_pod();
            // A listener's task, and a task it starts (a connection's).
            let names = pod
                .spawn(async {
                    let outer = thread_name();
                    let inner = tokio::spawn(async { thread_name() }).await.unwrap();
                    (outer, inner)
                })
                .await
                .unwrap();
            seen.push(names);
        }
        let outer: Vec<&str> = seen.iter().map(|(o, _)| o.as_str()).collect();
        assert_eq!(
            outer,
            ["weft-conn-0", "weft-conn-1", "weft-conn-0", "weft-conn-1"]
        );
        assert!(seen.iter().all(|(o, i)| o == i), "{seen:?}");
    }
}
