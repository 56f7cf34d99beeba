//! Which protocol a client speaks, from its first bytes.
//!
//! - HTTP/2: the client connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`,
//!   RFC 9113 §3.4), which every HTTP/2 client (gRPC included) sends first
//!   when it speaks cleartext HTTP/2 with prior knowledge.
//! - HTTP/1.x: a request line `METHOD SP target SP HTTP/1.<digit> CRLF`.
//! - Anything else is opaque: a TLS ClientHello (the application's own TLS
//!   cannot be looked into), a binary protocol, or garbage.
//!
//! The decision is made as early as the bytes allow: the first byte that
//! cannot belong to either form settles "opaque" at once, so a binary or TLS
//! client pays no delay; a prefix of a valid form waits for more bytes (up
//! to [`MAX_REQUEST_LINE`] and [`DETECT_TIMEOUT`]).

use bytes::BytesMut;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// How long the proxy waits for a client's first bytes before treating the
/// connection as opaque.
///
/// The trade-off: a client that speaks first (HTTP, gRPC, TLS, most
/// protocols) has its first bytes in flight when the connection is
/// accepted, so any timeout is long enough for it; but a *server*-speaks-first
/// protocol (MySQL, SMTP, FTP, ...) sends nothing from the client, and the
/// proxy cannot connect upstream before it knows the protocol, so such a
/// client waits out the whole timeout before the server's banner arrives.
/// Linkerd waits 10 s and asks operators to mark such ports opaque; Istio's
/// sidecars once used 100 ms, found that a client delayed by CPU contention
/// was then silently demoted to TCP, and now wait indefinitely (0 s = no
/// timeout) unless the port is declared. 500 ms is far beyond the
/// sub-millisecond gap between connect and first write of a real client,
/// even on a loaded node, while a server-first connection on an undeclared
/// port pays a one-off half second instead of stalling; the well-known
/// server-first ports are opaque by default ([`super::opaque`]) and pay
/// nothing.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The longest request line looked at. Longer ones (huge query strings)
/// are proxied as opaque TCP: they still work, without request metrics.
pub const MAX_REQUEST_LINE: usize = 8 * 1024;

/// Longest method token accepted (the longest registered one is 17 bytes).
const MAX_METHOD: usize = 24;

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

impl Protocol {
    /// The token for HBONE's `weft-protocol` header (ALPN-style names).
    pub fn token(self) -> &'static str {
        match self {
            Protocol::Http1 => "http/1.1",
            Protocol::Http2 => "h2",
            Protocol::Opaque => "opaque",
        }
    }

    pub fn from_token(token: &str) -> Option<Self> {
        [Protocol::Http1, Protocol::Http2, Protocol::Opaque]
            .into_iter()
            .find(|p| p.token().eq_ignore_ascii_case(token.trim()))
    }
}

/// The verdict on a byte prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detection {
    Is(Protocol),
    /// Consistent with HTTP so far; more bytes are needed to decide.
    NeedMore,
}

/// Decides from the bytes received so far.
pub fn classify(buf: &[u8]) -> Detection {
    if buf.is_empty() {
        return Detection::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        if buf.len() >= H2_PREFACE.len() {
            return Detection::Is(Protocol::Http2);
        }
        // "PRI * HTTP/2.0" is also a prefix of a (bogus) HTTP/1 request
        // line only up to "HTTP/"; keep reading to tell.
        return Detection::NeedMore;
    }
    http1_request_line(buf)
}

/// `token SP target SP HTTP/1.d CRLF`, judged incrementally.
fn http1_request_line(buf: &[u8]) -> Detection {
    let opaque = Detection::Is(Protocol::Opaque);
    // Method: 1*tchar.
    let method_len = buf.iter().take_while(|b| is_tchar(**b)).count();
    if method_len > MAX_METHOD {
        return opaque;
    }
    let Some(&after_method) = buf.get(method_len) else {
        return Detection::NeedMore;
    };
    if method_len == 0 || after_method != b' ' {
        return opaque;
    }
    // Target: visible characters (no SP, no controls).
    let rest = &buf[method_len + 1..];
    let target_len = rest.iter().take_while(|b| is_target_byte(**b)).count();
    let Some(&after_target) = rest.get(target_len) else {
        return within_limit(buf);
    };
    if target_len == 0 || after_target != b' ' {
        return opaque;
    }
    // Version and CRLF.
    const VERSION: &[u8] = b"HTTP/1.";
    let tail = &rest[target_len + 1..];
    let n = tail.len().min(VERSION.len());
    if tail[..n] != VERSION[..n] {
        return opaque;
    }
    if tail.len() <= VERSION.len() {
        return Detection::NeedMore;
    }
    if !tail[VERSION.len()].is_ascii_digit() {
        return opaque;
    }
    let eol = &tail[VERSION.len() + 1..];
    let n = eol.len().min(2);
    if eol[..n] != b"\r\n"[..n] {
        return opaque;
    }
    if eol.len() < 2 {
        return Detection::NeedMore;
    }
    Detection::Is(Protocol::Http1)
}

fn within_limit(buf: &[u8]) -> Detection {
    if buf.len() >= MAX_REQUEST_LINE {
        Detection::Is(Protocol::Opaque)
    } else {
        Detection::NeedMore
    }
}

/// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What a request target may contain (RFC 9112: no whitespace or controls).
fn is_target_byte(b: u8) -> bool {
    (0x21..0x7f).contains(&b) || b >= 0x80
}

/// The outcome of detection: the protocol, and every byte read to find it
/// out (to be replayed to whoever handles the connection next).
#[derive(Debug)]
pub struct Detected {
    pub protocol: Protocol,
    pub prefix: BytesMut,
    /// The client sent nothing (or too little to decide) within the timeout.
    pub timed_out: bool,
}

/// Reads from `io` until [`classify`] decides, the client closes its side,
/// or `timeout` passes (then: opaque). Read errors end detection as opaque
/// too: the caller's splice meets the same error and reports it.
pub async fn detect<IO: AsyncRead + Unpin>(io: &mut IO, timeout: Duration) -> Detected {
    let mut prefix = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match classify(&prefix) {
            Detection::Is(protocol) => {
                return Detected {
                    protocol,
                    prefix,
                    timed_out: false,
                };
            }
            Detection::NeedMore => {}
        }
        // Never read past the longest request line: what follows belongs
        // to the protocol handler.
        let room = MAX_REQUEST_LINE - prefix.len();
        let mut chunk = vec![0u8; room.min(4096)];
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Detected {
                    protocol: Protocol::Opaque,
                    prefix,
                    timed_out: false,
                };
            }
            Ok(Ok(n)) => prefix.extend_from_slice(&chunk[..n]),
            Err(_elapsed) => {
                return Detected {
                    protocol: Protocol::Opaque,
                    prefix,
                    timed_out: true,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn http2_preface_is_http2_and_its_prefixes_wait() {
        assert_eq!(classify(H2_PREFACE), Detection::Is(Protocol::Http2));
        let mut with_settings = H2_PREFACE.to_vec();
        with_settings.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(classify(&with_settings), Detection::Is(Protocol::Http2));
        for n in 1..H2_PREFACE.len() {
            assert_eq!(classify(&H2_PREFACE[..n]), Detection::NeedMore, "{n} bytes");
        }
        // Diverging from the preface after "PRI * HTTP/": not HTTP/2, and
        // "HTTP/2.0" is not an HTTP/1 version either.
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"),
            Detection::Is(Protocol::Opaque)
        );
    }

    #[test]
    fn protocol_tokens_round_trip() {
        for p in [Protocol::Http1, Protocol::Http2, Protocol::Opaque] {
            assert_eq!(Protocol::from_token(p.token()), Some(p));
        }
        assert_eq!(Protocol::from_token("H2"), Some(Protocol::Http2));
        assert_eq!(Protocol::from_token("spdy"), None);
    }

    #[test]
    fn http1_request_lines() {
        for line in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /api/v1/things?x=1 HTTP/1.0\r\nHost: a\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\n",
            b"PROPFIND /dav/ HTTP/1.1\r\n",
        ] {
            assert_eq!(
                classify(line),
                Detection::Is(Protocol::Http1),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn every_prefix_of_a_request_line_waits_for_more() {
        let line = b"GET /index.html HTTP/1.1\r\n";
        for n in 0..line.len() {
            assert_eq!(classify(&line[..n]), Detection::NeedMore, "{n} bytes");
        }
    }

    #[test]
    fn garbage_tls_and_binary_protocols_are_opaque_at_once() {
        // A TLS 1.2/1.3 ClientHello record header.
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02, 0x00]),
            Detection::Is(Protocol::Opaque)
        );
        assert_eq!(classify(&[0x16]), Detection::Is(Protocol::Opaque));
        // Redis RESP, a PostgreSQL startup message, random bytes.
        assert_eq!(
            classify(b"*1\r\n$4\r\nPING\r\n"),
            Detection::Is(Protocol::Opaque)
        );
        assert_eq!(
            classify(&[0, 0, 0, 8, 4, 210, 22, 47]),
            Detection::Is(Protocol::Opaque)
        );
        for bad in [
            &b" GET / HTTP/1.1\r\n"[..], // no method
            b"GET  / HTTP/1.1\r\n",      // empty target
            b"GET / HTTP/2.0\r\n",       // not an HTTP/1 version
            b"GET / HTTP/1.x\r\n",
            b"GET / HTTP/1.1\n", // bare LF
            b"GET /a\tb HTTP/1.1\r\n",
            b"hello world\n",
        ] {
            assert_eq!(
                classify(bad),
                Detection::Is(Protocol::Opaque),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A method token longer than any real one.
        assert_eq!(
            classify(&[b'A'; MAX_METHOD + 1]),
            Detection::Is(Protocol::Opaque)
        );
    }

    #[test]
    fn an_endless_request_line_gives_up_at_the_limit() {
        let mut line = b"GET /".to_vec();
        line.resize(MAX_REQUEST_LINE - 1, b'a');
        assert_eq!(classify(&line), Detection::NeedMore);
        line.push(b'a');
        assert_eq!(classify(&line), Detection::Is(Protocol::Opaque));
    }

    #[tokio::test]
    async fn detects_across_partial_reads_and_keeps_every_byte() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let sender = tokio::spawn(async move {
            for piece in [
                &b"GE"[..],
                b"T /pa",
                b"th HTTP/1",
                b".1\r",
                b"\nHost: x\r\n\r\n",
            ] {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let d = detect(&mut server, Duration::from_secs(5)).await;
        assert_eq!(d.protocol, Protocol::Http1);
        assert!(!d.timed_out);
        assert!(d.prefix.starts_with(b"GET /path HTTP/1.1\r\n"));
        drop(sender.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_opaque_after_the_timeout() {
        let (_client, mut server) = tokio::io::duplex(64);
        let started = tokio::time::Instant::now();
        let d = detect(&mut server, DETECT_TIMEOUT).await;
        assert_eq!(d.protocol, Protocol::Opaque);
        assert!(d.timed_out);
        assert!(d.prefix.is_empty());
        assert_eq!(started.elapsed(), DETECT_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_mid_line_is_opaque_with_its_bytes() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET /slo").await.unwrap();
        let d = detect(&mut server, DETECT_TIMEOUT).await;
        assert_eq!(d.protocol, Protocol::Opaque);
        assert!(d.timed_out);
        assert_eq!(&d.prefix[..], b"GET /slo");
    }

    #[tokio::test]
    async fn a_client_that_closes_early_is_opaque_with_its_bytes() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"PRI * HT").await.unwrap();
        drop(client);
        let d = detect(&mut server, Duration::from_secs(5)).await;
        assert_eq!(d.protocol, Protocol::Opaque);
        assert!(!d.timed_out);
        assert_eq!(&d.prefix[..], b"PRI * HT");
    }

    #[tokio::test]
    async fn http2_is_detected_and_the_settings_frame_is_kept() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let mut sent = H2_PREFACE.to_vec();
        sent.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        client.write_all(&sent).await.unwrap();
        let d = detect(&mut server, Duration::from_secs(5)).await;
        assert_eq!(d.protocol, Protocol::Http2);
        assert_eq!(&d.prefix[..], &sent[..], "nothing read is lost");
    }
}
