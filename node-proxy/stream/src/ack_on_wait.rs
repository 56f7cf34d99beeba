//! Acknowledging what was read of a message when the proxy waits for the
//! rest of it: the Nagle × delayed-ACK stall of [`crate::quickack`]
//! avoided at the moment it could happen, not after every read.
//!
//! [`AckOnDemand::every_read`] sets `TCP_QUICKACK` after every read,
//! because on an opaque stream the proxy cannot tell a whole message from
//! a piece. Where
//! the proxy parses HTTP it can: a peer that writes a message in pieces
//! (a head, then the body) waits for the ACK of the first piece only while
//! the proxy waits for the rest. A message that arrived whole is answered
//! (or forwarded, and answered later), and that answer carries the ACK.
//! So the proxy acknowledges at once only when it asks for the next part
//! of a body and it is not there yet: [`AckOnWait::polled`], from the
//! body, through an [`Acker`] of the socket the body is read from.
//!
//! Why it matters: the immediate ACK of every read was the largest single
//! cost of a proxied HTTP/1.1 request (a pure ACK segment, sent and
//! received, per read on both proxies: 12.7% of their CPU in a closed
//! loop; docs/benchmarks.md).
//!
//! A head that arrives in pieces is not acknowledged at once (the proxy's
//! HTTP parser below it is not told apart from a keep-alive read): no
//! common stack writes a head in two writes, and such a peer stalls
//! without the mesh too.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A TCP stream whose reads are acknowledged when its [`Acker`]s ask, or
/// after every read ([`AckOnDemand::every_read`], or once
/// [`Acker::ack_every_read`] was called: a connection upgraded to a byte
/// stream).
#[derive(Debug)]
pub struct AckOnDemand<T: AsFd> {
    inner: T,
    state: Arc<AckState>,
}

#[derive(Debug)]
struct AckState {
    /// The stream's descriptor while the stream is open; `None` from the
    /// moment it is dropped (before it is closed).
    fd: Mutex<Option<RawFd>>,
    every_read: AtomicBool,
}

/// Acknowledges now what was read from an [`AckOnDemand`] stream; does
/// nothing once the stream is gone.
#[derive(Clone, Debug)]
pub struct Acker(Arc<AckState>);

impl<T: AsFd> AckOnDemand<T> {
    /// Acknowledged when an [`Acker`] asks.
    pub fn new(inner: T) -> Self {
        Self::with(inner, false)
    }

    /// Acknowledged after every read ([`crate::quickack`]): a stream the
    /// proxy does not parse.
    pub fn every_read(inner: T) -> Self {
        Self::with(inner, true)
    }

    fn with(inner: T, every_read: bool) -> Self {
        let fd = inner.as_fd().as_raw_fd();
        Self {
            inner,
            state: Arc::new(AckState {
                fd: Mutex::new(Some(fd)),
                every_read: AtomicBool::new(every_read),
            }),
        }
    }

    pub fn acker(&self) -> Acker {
        Acker(self.state.clone())
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsFd> Drop for AckOnDemand<T> {
    fn drop(&mut self) {
        // Before `inner` closes the descriptor (fields drop after this):
        // no acker may use the number once it can be reused.
        *self.state.fd.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Acker {
    /// Sends the pending ACK of what was read, if any, now.
    pub fn ack_now(&self) {
        let fd = self.0.fd.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = *fd {
            // SAFETY: `fd` is the stream's own descriptor, cleared under
            // this lock before the stream closes it: it is open while the
            // lock is held.
            let socket = unsafe { BorrowedFd::borrow_raw(fd) };
            // Best effort, as in `quickack::poll_read`.
            let _ = socket2::SockRef::from(&socket).set_tcp_quickack(true);
        }
    }

    /// From now on every read is acknowledged at once, as with
    /// [`AckOnDemand::every_read`]: the stream carries bytes the proxy no
    /// longer parses (an HTTP/1.1 upgrade).
    pub fn ack_every_read(&self) {
        self.0.every_read.store(true, Ordering::Relaxed);
    }
}

/// Kept by a body read from an [`AckOnDemand`] stream: acknowledges once
/// each time the body's next part is asked for and not there yet.
#[derive(Debug, Default)]
pub struct AckOnWait {
    acker: Option<Acker>,
    waiting: bool,
}

impl AckOnWait {
    /// `None`: a body whose peer never waits for an ACK (another node
    /// proxy, which writes with `TCP_NODELAY`).
    pub fn new(acker: Option<Acker>) -> Self {
        Self {
            acker,
            waiting: false,
        }
    }

    /// Notes a poll of the body for its next part.
    pub fn polled<T>(&mut self, poll: &Poll<T>) {
        match poll {
            Poll::Pending if !self.waiting => {
                self.waiting = true;
                if let Some(acker) = &self.acker {
                    acker.ack_now();
                }
            }
            Poll::Pending => {}
            Poll::Ready(_) => self.waiting = false,
        }
    }

    pub fn acker(&self) -> Option<&Acker> {
        self.acker.as_ref()
    }
}

impl<T: AsFd + AsyncRead + Unpin> AsyncRead for AckOnDemand<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.state.every_read.load(Ordering::Relaxed) {
            crate::quickack::poll_read(&mut this.inner, cx, buf)
        } else {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        }
    }
}

impl<T: AsFd + AsyncWrite + Unpin> AsyncWrite for AckOnDemand<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A connection in ping-pong mode (the kernel delays its ACKs), the
    /// server side read through the [`AckOnDemand`] `wrap` makes, and
    /// `TCP_QUICKACK` cleared so the flag shows what the wrapper did.
    async fn interactive(
        wrap: fn(TcpStream) -> AckOnDemand<TcpStream>,
    ) -> (TcpStream, AckOnDemand<TcpStream>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let mut s = wrap(s);
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(b"pong").await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        quickack(&s, false);
        (c, s)
    }

    fn quickack(s: &AckOnDemand<TcpStream>, on: bool) {
        socket2::SockRef::from(s.get_ref())
            .set_tcp_quickack(on)
            .unwrap();
    }

    /// `c` writes `msg`; it is read, unchanged, through `s`.
    async fn crosses(c: &mut TcpStream, s: &mut AckOnDemand<TcpStream>, msg: &[u8; 4]) {
        let mut buf = [0u8; 4];
        c.write_all(msg).await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, msg);
    }

    fn in_quickack_mode(s: &AckOnDemand<TcpStream>) -> bool {
        socket2::SockRef::from(s.get_ref()).tcp_quickack().unwrap()
    }

    /// A wait for the body's next part acknowledges, once per wait; after
    /// an upgrade every read does.
    #[tokio::test]
    async fn reads_are_acknowledged_when_the_proxy_waits_for_the_rest() {
        let (mut c, mut s) = interactive(AckOnDemand::new).await;
        let mut buf = [0u8; 4];
        c.write_all(b"head").await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        // (Whether the read alone left ping-pong mode is not asserted: the
        // kernel's delayed-ACK timer leaves it by itself after 40 ms, which
        // a loaded machine may take between two statements.)

        let mut body = AckOnWait::new(Some(s.acker()));
        body.polled(&Poll::<()>::Pending);
        assert!(in_quickack_mode(&s), "the wait for the body acknowledged");
        quickack(&s, false);
        body.polled(&Poll::<()>::Pending);
        assert!(!in_quickack_mode(&s), "once per wait");
        body.polled(&Poll::Ready(()));
        body.polled(&Poll::<()>::Pending);
        assert!(in_quickack_mode(&s), "the next wait acknowledges again");

        quickack(&s, false);
        s.acker().ack_every_read();
        crosses(&mut c, &mut s, b"byte").await;
        assert!(in_quickack_mode(&s), "upgraded: every read acknowledged");
    }

    /// Reading through [`AckOnDemand::every_read`] leaves the socket in
    /// quick-ACK mode (the kernel reports the one-shot flag as set until
    /// its next ping-pong exchange), and the bytes arrive unchanged.
    #[tokio::test]
    async fn a_read_rearms_quickack() {
        let (mut c, mut s) = interactive(AckOnDemand::every_read).await;
        crosses(&mut c, &mut s, b"next").await;
        assert!(in_quickack_mode(&s), "quick-ACK mode after a read");
    }

    /// An acker outliving its stream forgets the descriptor before the
    /// stream closes it (its number may be another socket's next).
    #[tokio::test]
    async fn an_acker_of_a_closed_stream_holds_no_descriptor() {
        let (_c, s) = interactive(AckOnDemand::new).await;
        let acker = s.acker();
        assert!(acker.0.fd.lock().unwrap().is_some());
        drop(s);
        assert!(acker.0.fd.lock().unwrap().is_none());
        acker.ack_now();
    }
}
