//! Protocol detection: what an application speaks on a connection the
//! proxy just accepted, from the first bytes the client sends.
//!
//! - [`detect`]: the pure decision over a byte prefix (unit-tested);
//! - [`prefixed`]: a stream that replays the bytes detection consumed;
//! - [`opaque`]: which destination ports skip detection altogether.
//!
//! The proxy *reads* (rather than `MSG_PEEK`s) the first bytes: a peek
//! cannot wait for "more than what is there already" without spinning, and a
//! request line often arrives in pieces. What was read is replayed to the
//! upstream by [`prefixed::Prefixed`], so an opaque connection gets exactly
//! the bytes the client sent.

pub mod detect;
pub mod opaque;
pub mod prefixed;

pub use detect::{DETECT_TIMEOUT, Detected, Protocol, detect};
pub use prefixed::Prefixed;
