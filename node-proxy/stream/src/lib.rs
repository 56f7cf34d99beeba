//! Byte-stream helpers of the node proxy, with no knowledge of the mesh:
//!
//! - [`splice`]: joining two streams with half-close and byte counts;
//! - [`detect`]: what an application speaks on a connection, from the first
//!   bytes the client sends (HTTP/1, HTTP/2, or opaque TCP);
//! - [`Prefixed`]: a stream that replays the bytes detection consumed;
//! - [`AckOnDemand`]: acknowledging what is read at once (no Nagle ×
//!   delayed-ACK stall when a peer writes in pieces; [`quickack`]), after
//!   every read or only when the proxy waits for the rest of a message it
//!   parses;
//! - [`reset`]: refusing a TCP connection the way a closed port does.
//!
//! The proxy *reads* (rather than `MSG_PEEK`s) the first bytes: a peek
//! cannot wait for "more than what is there already" without spinning, and a
//! request line often arrives in pieces. What was read is replayed to the
//! upstream by [`Prefixed`], so an opaque connection gets exactly the bytes
//! the client sent.
//!
//! Layering: a leaf. It imports nothing of Weft's.

pub mod ack_on_wait;
pub mod detect;
mod prefixed;
pub mod quickack;
pub mod splice;

pub use ack_on_wait::{AckOnDemand, AckOnWait, Acker};
pub use detect::{DETECT_TIMEOUT, Detected, Protocol, detect};
pub use prefixed::Prefixed;
pub use splice::{Counted, Transferred, splice, splice_until};

/// Refuses an accepted TCP connection the way a closed port would: a reset
/// (SO_LINGER 0 makes close() send RST instead of FIN), so the client sees
/// "connection reset" at once rather than an orderly end it might mistake
/// for an empty answer.
pub fn reset(stream: tokio::net::TcpStream) {
    reset_on_close(&stream);
    drop(stream);
}

/// Makes the socket's close, whoever closes it later, a reset (SO_LINGER
/// 0). For a socket already inside a server (hyper) that the caller can
/// only reach through a second handle.
pub fn reset_on_close(socket: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(std::time::Duration::ZERO));
}
