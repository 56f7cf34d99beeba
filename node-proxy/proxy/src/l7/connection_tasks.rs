//! The futures hyper starts for an HTTP/2 connection, run on the
//! connection's own task.
//!
//! hyper hands every stream of an HTTP/2 server connection (the service
//! call and the response body), and every request body and the connection
//! driver of an HTTP/2 client, to an executor. With Tokio's, each is a task
//! of its own, and a request crosses from the connection's task to its
//! stream's and back: a wake-up of another task, often on the other worker
//! thread, at every step. [`ConnectionTasks`] is an executor that gives
//! those futures to [`ConnectionTasks::drive`], which polls them together
//! with the connection on one task.
//!
//! The cost: the streams of one connection share one thread at a time. A
//! connection's work was never spread much anyway (its frames are read and
//! written in order by one task); many connections still spread over the
//! workers.

use super::corked_io::Cork;
use futures::stream::{FuturesUnordered, StreamExt};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor given to hyper's HTTP/2 builders (cheap to clone).
#[derive(Clone)]
pub struct ConnectionTasks {
    tx: mpsc::UnboundedSender<Task>,
}

/// What [`ConnectionTasks`] was given, to be driven with its connection.
pub struct Started {
    rx: mpsc::UnboundedReceiver<Task>,
}

impl ConnectionTasks {
    pub fn new() -> (Self, Started) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, Started { rx })
    }
}

impl<F> hyper::rt::Executor<F> for ConnectionTasks
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        if let Err(mpsc::error::SendError(orphan)) = self.tx.send(Box::pin(fut)) {
            // The connection's task has ended; whatever hyper still starts
            // (nothing, normally) runs on its own.
            tokio::spawn(orphan);
        }
    }
}

/// Rounds of [`Started::drive`] in one poll while the connection keeps
/// starting futures.
const TURNS: usize = 16;

impl Started {
    /// Polls `connection` and every future started for it until the
    /// connection has ended and so has each of them (a stream still
    /// sending its response when the connection ends finishes first,
    /// as a task of its own would).
    pub async fn drive<T>(self, connection: impl Future<Output = T>) -> T {
        self.drive_around(connection, ()).await
    }

    /// [`Self::drive`], with the connection's writes held during each poll
    /// and written at its end ([`super::corked_io`]): `cork` is the other
    /// side of the connection's IO.
    pub async fn drive_corked<T, IO: AsyncWrite + Unpin>(
        self,
        connection: impl Future<Output = T>,
        cork: Cork<IO>,
    ) -> T {
        self.drive_around(connection, cork).await
    }

    async fn drive_around<T>(
        self,
        connection: impl Future<Output = T>,
        around: impl AroundPoll,
    ) -> T {
        let Started { mut rx } = self;
        let mut tasks: FuturesUnordered<Task> = FuturesUnordered::new();
        // Dropped as soon as it ends: it holds senders, and the receiver
        // reports closed only once they are all gone.
        let mut connection = Some(Box::pin(connection));
        let mut output = None;
        let mut open = true;
        std::future::poll_fn(move |cx| {
            around.begin();
            let polled = (|| {
                // Bounded, so that a connection that keeps starting streams
                // lets the worker's other tasks run.
                for _ in 0..TURNS {
                    while open {
                        match rx.poll_recv(cx) {
                            Poll::Ready(Some(task)) => tasks.push(task),
                            Poll::Ready(None) => open = false,
                            Poll::Pending => break,
                        }
                    }
                    while let Poll::Ready(Some(())) = tasks.poll_next_unpin(cx) {}
                    let mut ended = false;
                    if let Some(c) = connection.as_mut()
                        && let Poll::Ready(out) = c.as_mut().poll(cx)
                    {
                        output = Some(out);
                        connection = None;
                        ended = true;
                    }
                    if connection.is_none() && !open && tasks.is_empty() {
                        return Poll::Ready(output.take().expect("the connection's output, once"));
                    }
                    // What polling the connection started (a stream it just
                    // accepted) runs now rather than after another turn of
                    // the scheduler; and its end dropped senders: look at
                    // the receiver again.
                    if !ended && (!open || rx.is_empty()) {
                        return Poll::Pending;
                    }
                }
                cx.waker().wake_by_ref();
                Poll::Pending
            })();
            around.end(cx);
            polled
        })
        .await
    }
}

/// What [`Started`] does around each poll of a connection's task.
trait AroundPoll {
    fn begin(&self);
    fn end(&self, cx: &mut Context<'_>);
}

impl AroundPoll for () {
    fn begin(&self) {}
    fn end(&self, _: &mut Context<'_>) {}
}

impl<IO: AsyncWrite + Unpin> AroundPoll for Cork<IO> {
    fn begin(&self) {
        self.cork()
    }

    fn end(&self, cx: &mut Context<'_>) {
        self.uncork(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::server::conn::http2;
    use hyper_util::rt::TokioIo;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An HTTP/2 server and client, both on [`ConnectionTasks`]: concurrent
    /// requests with bodies are answered, every stream's future runs on
    /// the connection's task (no task of its own), and the server's drive
    /// returns once the client has gone and every stream has finished.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_run_on_their_connections_task() {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        let tasks_before = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        let served = Arc::new(AtomicUsize::new(0));
        let counter = served.clone();
        let server = tokio::spawn(async move {
            let (exec, started) = ConnectionTasks::new();
            let service =
                hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let counter = counter.clone();
                    async move {
                        let body = request.into_body().collect().await?.to_bytes();
                        counter.fetch_add(1, Ordering::SeqCst);
                        // Alive: this server's task and the client's.
                        let alive = tokio::runtime::Handle::current()
                            .metrics()
                            .num_alive_tasks();
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from(format!(
                            "{} {alive}",
                            body.len()
                        )))))
                    }
                });
            let conn = http2::Builder::new(exec).serve_connection(TokioIo::new(server_io), service);
            started.drive(conn).await
        });
        let (exec, started) = ConnectionTasks::new();
        let (send, conn) = hyper::client::conn::http2::Builder::new(exec)
            .handshake::<_, Full<Bytes>>(TokioIo::new(client_io))
            .await
            .unwrap();
        let client = tokio::spawn(started.drive(conn));
        let requests = (0..20).map(|i| {
            let mut send = send.clone();
            async move {
                let request = http::Request::post("http://x/")
                    .body(Full::new(Bytes::from(vec![b'x'; 1000 * i])))
                    .unwrap();
                let response = send.send_request(request).await.unwrap();
                String::from_utf8(response.collect().await.unwrap().to_bytes().to_vec()).unwrap()
            }
        });
        let answers = futures::future::join_all(requests).await;
        for (i, answer) in answers.iter().enumerate() {
            let (len, alive) = answer.split_once(' ').unwrap();
            assert_eq!(len, (1000 * i).to_string());
            let alive: usize = alive.parse().unwrap();
            assert_eq!(
                alive,
                tasks_before + 2,
                "a stream or a connection driver ran as a task of its own"
            );
        }
        assert_eq!(served.load(Ordering::SeqCst), 20);
        drop(send);
        client.await.unwrap().unwrap();
        server.await.unwrap().unwrap();
    }
}
