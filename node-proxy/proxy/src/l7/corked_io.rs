//! An HTTP/2 client connection's writes, held while its task is polled and
//! written together at the end of the poll (as `TCP_CORK` holds segments).
//!
//! Why: h2 opens a stream it initiates (a request) only in its
//! connection's next poll, and gives the stream no send capacity before
//! that; that poll writes and flushes the HEADERS; the request body's DATA,
//! though already in hand, waits for the capacity and goes out in a second
//! write. Every request with a body crossed the proxy as two writes, which
//! the next hop (the destination's proxy, the application) read and woke
//! up for twice. With the connection's futures all polled on one task
//! ([`super::connection_tasks`]), the end of that task's poll is the point
//! where nothing more will be written without a wake-up: writes made
//! before it are held ([`CorkedIo`]) and written at once there
//! ([`Cork::uncork`]).
//!
//! Only small writes are held (together at most [`HOLD_AT_MOST`]): a large
//! body's DATA goes through as before, without a copy.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes held for the end of a poll.
pub const HOLD_AT_MOST: usize = 16 * 1024;

/// The connection's side: what hyper reads from and writes to.
pub struct CorkedIo<IO> {
    shared: Arc<Mutex<Shared<IO>>>,
}

/// The task's side: corks the connection for the length of a poll.
pub struct Cork<IO> {
    shared: Arc<Mutex<Shared<IO>>>,
}

struct Shared<IO> {
    io: IO,
    held: Vec<u8>,
    /// The task is being polled: flushes wait for its end.
    corked: bool,
    /// Writing what was held at the end of a poll failed: the connection's
    /// next read or write gets the error, so h2 closes it.
    failed: Option<io::Error>,
}

/// `io` for hyper, and the cork its connection's task is driven with.
pub fn cork<IO>(io: IO) -> (CorkedIo<IO>, Cork<IO>) {
    let shared = Arc::new(Mutex::new(Shared {
        io,
        held: Vec::new(),
        corked: false,
        failed: None,
    }));
    (
        CorkedIo {
            shared: shared.clone(),
        },
        Cork { shared },
    )
}

fn lock<IO>(shared: &Mutex<Shared<IO>>) -> MutexGuard<'_, Shared<IO>> {
    // Nothing panics while holding it; a poisoned lock still has
    // consistent bytes.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

impl<IO: AsyncWrite + Unpin> Shared<IO> {
    fn failure(&self) -> io::Result<()> {
        match &self.failed {
            Some(e) => Err(io::Error::new(e.kind(), e.to_string())),
            None => Ok(()),
        }
    }

    /// Writes out what is held.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        Poll::Ready(Ok(()))
    }

    /// Whether `len` more bytes are held rather than written now.
    fn holds(&self, len: usize) -> bool {
        self.corked && self.held.len() + len <= HOLD_AT_MOST
    }
}

impl<IO: AsyncWrite + Unpin> Cork<IO> {
    /// The task's poll begins: the connection's flushes wait for its end.
    pub fn cork(&self) {
        lock(&self.shared).corked = true;
    }

    /// The task's poll ends: writes and flushes what was held. If the
    /// socket cannot take it all now, the rest stays held and `cx` is
    /// woken when it can.
    pub fn uncork(&self, cx: &mut Context<'_>) {
        let mut shared = lock(&self.shared);
        shared.corked = false;
        if shared.held.is_empty() {
            return;
        }
        let flushed = match shared.poll_write_held(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut shared.io).poll_flush(cx),
            other => other,
        };
        if let Poll::Ready(Err(e)) = flushed {
            shared.held.clear();
            shared.failed = Some(e);
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for CorkedIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.shared);
        shared.failure()?;
        Pin::new(&mut shared.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for CorkedIo<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut shared = lock(&self.shared);
        shared.failure()?;
        if shared.holds(buf.len()) {
            shared.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        ready!(shared.poll_write_held(cx))?;
        Pin::new(&mut shared.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut shared = lock(&self.shared);
        shared.failure()?;
        let len = bufs.iter().map(|b| b.len()).sum();
        if shared.holds(len) {
            for b in bufs {
                shared.held.extend_from_slice(b);
            }
            return Poll::Ready(Ok(len));
        }
        ready!(shared.poll_write_held(cx))?;
        Pin::new(&mut shared.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        lock(&self.shared).io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.shared);
        shared.failure()?;
        if shared.corked && !shared.held.is_empty() {
            // Flushed by the cork at the end of the task's poll.
            return Poll::Ready(Ok(()));
        }
        ready!(shared.poll_write_held(cx))?;
        Pin::new(&mut shared.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.shared);
        shared.failure()?;
        ready!(shared.poll_write_held(cx))?;
        Pin::new(&mut shared.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l7::body::proxy_body;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;

    /// The bytes of every write the client connection made to its socket.
    type Writes = Arc<Mutex<Vec<Vec<u8>>>>;

    /// An IO that records each write it is given.
    struct Recorded<IO> {
        io: IO,
        writes: Writes,
    }

    impl<IO: AsyncRead + Unpin> AsyncRead for Recorded<IO> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl<IO: AsyncWrite + Unpin> AsyncWrite for Recorded<IO> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
            self.writes.lock().unwrap().push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// The HTTP/2 frames (type, stream) a write carries, if it holds whole
    /// frames (the connection preface is skipped).
    fn frames(mut write: &[u8]) -> Vec<(u8, u32)> {
        const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        write = write.strip_prefix(PREFACE).unwrap_or(write);
        let mut frames = Vec::new();
        while write.len() >= 9 {
            let len = u32::from_be_bytes([0, write[0], write[1], write[2]]) as usize;
            let stream = u32::from_be_bytes([write[5], write[6], write[7], write[8]]) & 0x7fff_ffff;
            frames.push((write[3], stream));
            write = &write[(9 + len).min(write.len())..];
        }
        frames
    }

    const HEADERS: u8 = 0x1;
    const DATA: u8 = 0x0;

    /// An HTTP/2 server that answers each request with its body's length.
    fn length_server(io: tokio::io::DuplexStream) {
        let service =
            hyper::service::service_fn(|request: http::Request<hyper::body::Incoming>| async {
                let body = request.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from(
                    body.len().to_string(),
                ))))
            });
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(TokioIo::new(io), service),
        );
    }

    async fn post(
        send: &mut hyper::client::conn::http2::SendRequest<crate::l7::body::ProxyBody>,
        body: Vec<u8>,
    ) -> String {
        let request = http::Request::post("http://app/upload")
            .body(proxy_body(Full::new(Bytes::from(body))))
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        String::from_utf8(
            response
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap()
    }

    /// A request whose body is in hand leaves in one write, HEADERS and
    /// DATA together (without the cork: two writes, the HEADERS flushed
    /// first); a body larger than what is held still arrives whole.
    #[tokio::test]
    async fn a_requests_headers_and_data_leave_in_one_write() {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        length_server(server_io);
        let writes = Writes::default();
        let io = Recorded {
            io: client_io,
            writes: writes.clone(),
        };
        let mut send = crate::l7::upstream::handshake_h2(io, "127.0.0.1:1".parse().unwrap())
            .await
            .unwrap();
        for stream in [1u32, 3, 5] {
            assert_eq!(post(&mut send, vec![b'x'; 100]).await, "100");
            let writes = writes.lock().unwrap();
            let carrying: Vec<Vec<(u8, u32)>> = writes
                .iter()
                .map(|w| frames(w))
                .filter(|f| {
                    f.iter()
                        .any(|(kind, id)| *id == stream && (*kind == HEADERS || *kind == DATA))
                })
                .collect();
            assert!(
                carrying.len() == 1
                    && carrying[0].contains(&(HEADERS, stream))
                    && carrying[0].contains(&(DATA, stream)),
                "stream {stream}'s HEADERS and DATA in one write: {carrying:?}"
            );
        }
        let large = HOLD_AT_MOST * 4;
        assert_eq!(post(&mut send, vec![b'y'; large]).await, large.to_string());
    }
}
