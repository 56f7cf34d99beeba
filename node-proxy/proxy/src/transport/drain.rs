//! Shutdown, one mechanism: a [`Drain`] tells every connection and server
//! to finish (HBONE GOAWAY, HTTP/2 GOAWAY, HTTP/1.1 `Connection: close`
//! after the request in flight, the admin servers to stop), and waits for
//! each of them to be done, up to a deadline. What must finish holds a
//! [`DrainWatch`]; dropping it is how it says it is done.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct Drain {
    signal: Arc<watch::Sender<bool>>,
}

/// Held by a connection (or server) until it is done; tells it when the
/// drain starts.
#[derive(Debug)]
pub struct DrainWatch(watch::Receiver<bool>);

impl Default for Drain {
    fn default() -> Self {
        Self {
            signal: Arc::new(watch::Sender::new(false)),
        }
    }
}

impl Drain {
    /// A watch for something that must finish before the proxy exits.
    pub fn watch(&self) -> DrainWatch {
        DrainWatch(self.signal.subscribe())
    }

    /// Tells every watch holder to finish.
    pub fn start(&self) {
        self.signal.send_replace(true);
    }

    /// Watches still held (connections and servers not done yet).
    pub fn open(&self) -> usize {
        self.signal.receiver_count()
    }

    /// Starts the drain and waits until every watch is dropped, or until
    /// `deadline`. Returns how many were still open then.
    pub async fn finish(&self, deadline: Duration) -> usize {
        self.start();
        let _ = tokio::time::timeout(deadline, self.signal.closed()).await;
        self.open()
    }
}

impl DrainWatch {
    /// Completes when the drain starts (at once if it has).
    pub async fn signaled(&mut self) {
        let _ = self.0.wait_for(|d| *d).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn finish_waits_for_every_watch_up_to_the_deadline() {
        let drain = Drain::default();
        let mut quick = drain.watch();
        let slow = drain.watch();
        let quick_task = tokio::spawn(async move {
            quick.signaled().await;
        });
        let slow_task = tokio::spawn(async move {
            let _slow = slow;
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        // The quick one finishes on the signal, the slow one outlives the
        // deadline.
        assert_eq!(drain.finish(Duration::from_secs(5)).await, 1);
        quick_task.await.unwrap();
        slow_task.abort();
        let _ = slow_task.await;
        assert_eq!(drain.open(), 0);
        assert_eq!(drain.finish(Duration::from_secs(5)).await, 0);
    }
}
