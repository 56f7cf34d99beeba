//! The bodies of Weft's fuzz targets: one function per parser that takes
//! untrusted bytes. Each takes any bytes, must never panic, hang or allocate
//! without bound, and asserts the parser's own properties where it has some.
//!
//! The same functions run in two places (docs/testing.md, "Fuzzing"):
//! - `fuzz/` (cargo-fuzz, nightly): `cargo xtask fuzz` explores new inputs;
//! - `tests/replay.rs` (stable, part of `cargo xtask test`): every seed in
//!   `fuzz/corpus/<target>/` and every crash kept in
//!   `fuzz/regressions/<target>/` is run again.

use std::path::Path;
use std::time::Duration;

/// A fuzz target: its name (the directory names under `fuzz/corpus` and
/// `fuzz/regressions`, and the cargo-fuzz binary) and its body.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    /// Longest input worth trying (`-max_len`): past it a parser only
    /// refuses by size, or reads no further.
    pub max_len: usize,
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "detect",
        run: detect,
        max_len: weft_stream::detect::MAX_REQUEST_LINE + 256,
    },
    Target {
        name: "hbone_connect",
        run: hbone_connect,
        max_len: 16 * 1024,
    },
    Target {
        name: "hbone_authority",
        run: hbone_authority,
        max_len: 512,
    },
    Target {
        name: "registration",
        run: registration,
        max_len: 8 * 1024,
    },
    Target {
        name: "csr",
        run: csr,
        max_len: weft_identity_api::MAX_CSR_BYTES + 64,
    },
    Target {
        name: "manifests",
        run: manifests,
        max_len: 16 * 1024,
    },
    Target {
        name: "normalize_path",
        run: normalize_path,
        max_len: 1024,
    },
];

pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Inputs are cut to the target's `max_len`, so the replay test and the
/// fuzzer agree whatever a regression file's size.
fn bounded<'a>(name: &str, data: &'a [u8]) -> &'a [u8] {
    let max = target(name).map_or(data.len(), |t| t.max_len);
    &data[..data.len().min(max)]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

/// Protocol detection (`weft_stream::detect`): `detect` reads the bytes
/// from a client that sends them in pieces (their size taken from the first
/// byte) and then closes. However they are cut, it must reach the verdict
/// `classify` gives on all of them (a closed client that left it undecided
/// is opaque), read no more than it needs, and replay what it read.
pub fn detect(data: &[u8]) {
    use weft_stream::detect::{Detection, MAX_REQUEST_LINE, Protocol, classify};
    let data = bounded("detect", data);
    let Some((&piece, bytes)) = data.split_first() else {
        return;
    };
    let piece = usize::from(piece % 64) + 1;
    let mut client = Pieces { bytes, piece };
    let detected = runtime().block_on(async {
        tokio::time::timeout(
            Duration::from_secs(5),
            weft_stream::detect(&mut client, Duration::from_secs(2)),
        )
        .await
        .expect("detection over an in-memory client never hangs")
    });
    assert!(!detected.timed_out, "a client that closed is not a timeout");
    assert!(detected.prefix.len() <= MAX_REQUEST_LINE);
    assert!(
        bytes.starts_with(&detected.prefix),
        "read bytes are replayed"
    );
    if bytes.len() < MAX_REQUEST_LINE {
        let expected = match classify(bytes) {
            Detection::Is(p) => p,
            Detection::NeedMore => Protocol::Opaque,
        };
        assert_eq!(detected.protocol, expected, "cut in pieces of {piece}");
    }
    if detected.protocol != Protocol::Opaque {
        assert_eq!(classify(&detected.prefix), Detection::Is(detected.protocol));
    }
}

/// A client that sends its bytes `piece` at a time, then closes.
struct Pieces<'a> {
    bytes: &'a [u8],
    piece: usize,
}

impl tokio::io::AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = self.piece.min(self.bytes.len()).min(buf.remaining());
        let (now, later) = self.bytes.split_at(n);
        buf.put_slice(now);
        self.bytes = later;
        std::task::Poll::Ready(Ok(()))
    }
}

/// The HBONE server (`weft_hbone::serve_connection`): the bytes are what a
/// client sends on an (already authenticated) connection, HTTP/2 frames
/// with CONNECT requests. Every stream it hands over is accepted, its body
/// read (bounded) and answered. The connection must end once the client has
/// sent everything and closed.
pub fn hbone_connect(data: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let data = bounded("hbone_connect", data).to_vec();
    let handler_panicked = runtime().block_on(async move {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        // Handlers run on their own tasks, whose panics tokio keeps to
        // itself: a guard notes them so that this function fails too.
        let handler_panicked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = handler_panicked.clone();
        let served = tokio::spawn(weft_hbone::serve_connection(
            server,
            move |request| {
                let guard = PanicGuard(flag.clone());
                async move {
                    let _guard = guard;
                    assert_eq!(
                        request.target.to_string().parse::<std::net::SocketAddr>(),
                        Ok(request.target)
                    );
                    if request.target.port() % 2 == 0 {
                        request.reject(http::StatusCode::FORBIDDEN);
                        return;
                    }
                    let Ok(mut stream) = request.accept() else {
                        return;
                    };
                    let mut body = [0u8; 1024];
                    let mut total = 0;
                    while let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_millis(100), stream.read(&mut body))
                            .await
                    {
                        total += n;
                        if n == 0 || total > 64 * 1024 {
                            break;
                        }
                    }
                    let _ = stream.write_all(b"pong").await;
                    let _ = stream.shutdown().await;
                }
            },
            std::future::pending(),
        ));
        let (mut from_server, mut to_server) = tokio::io::split(&mut client);
        let talk = async {
            let _ = to_server.write_all(&data).await;
            // Let the server take in what it was sent, hand streams over and
            // answer them, as a client that does not hang up at once would
            // (everything is in memory: yielding is all it needs).
            for _ in 0..64 {
                tokio::task::yield_now().await;
            }
            let _ = to_server.shutdown().await;
        };
        let drain = async {
            let mut sink = vec![0u8; 16 * 1024];
            while let Ok(n) = from_server.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            let served = tokio::join!(talk, drain, served).2;
            // Every handler holds a clone of the flag until it ends: wait
            // for them, so that their panics are seen whatever the timing.
            while std::sync::Arc::strong_count(&handler_panicked) > 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            served
        })
        .await;
        let served =
            ended.expect("the HBONE server and its streams end once the client has closed");
        match served {
            // An HTTP/2 protocol error is the expected answer to garbage.
            Ok(_) => {}
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("the HBONE server task failed: {e}"),
        }
        handler_panicked
    });
    assert!(
        !handler_panicked.load(std::sync::atomic::Ordering::SeqCst),
        "a stream handler panicked"
    );
}

/// Notes, when dropped during a panic, that its task panicked.
struct PanicGuard(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// The CONNECT target: any request-target the `http` crate accepts, then
/// `weft_hbone::connect_target`, which takes `ip:port` only.
pub fn hbone_authority(data: &[u8]) {
    let data = bounded("hbone_authority", data);
    let Ok(uri) = http::Uri::try_from(data) else {
        return;
    };
    if let Some(target) = weft_hbone::connect_target(&uri) {
        let authority = uri.authority().expect("a target comes from the authority");
        assert_eq!(authority.port_u16(), Some(target.port()));
        assert_eq!(
            target.to_string().parse::<std::net::SocketAddr>(),
            Ok(target)
        );
    }
}

/// The pod registration protocol (`weft_registration`): a line as the node
/// agent reads it from the CNI plugin, and a reply line as the plugin reads
/// it. A message that parses serialises and parses back to itself.
pub fn registration(data: &[u8]) {
    let data = bounded("registration", data);
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(message) = weft_registration::Message::parse(line.trim_end()) {
        let again = serde_json::to_string(&message).expect("messages serialise");
        assert_eq!(
            weft_registration::Message::parse(&again).as_ref(),
            Ok(&message)
        );
    }
    let _ = serde_json::from_str::<weft_registration::Reply>(line.trim_end());
}

/// The identity CA's CSR check (`weft_identity::csr::check`), for a fixed
/// identity. An accepted request yields an uncompressed P-256 point.
pub fn csr(data: &[u8]) {
    let data = bounded("csr", data);
    let identity: weft_identity_api::SpiffeId = "spiffe://cluster.local/ns/demo/sa/client"
        .parse()
        .expect("a valid SPIFFE ID");
    if let Ok(key) = weft_identity::csr::check(data, &identity) {
        assert_eq!(key.point.len(), 65);
        assert_eq!(key.point[0], 0x04);
    }
}

/// Manifest files of the local source (`weft_destination::source::manifests`):
/// YAML (several documents) and JSON, every Kubernetes object (policy and
/// route objects included) validated by the destination's model.
pub fn manifests(data: &[u8]) {
    use weft_destination::source::manifests::parse;
    let data = bounded("manifests", data);
    for file in ["fuzz.yaml", "fuzz.json"] {
        let _ = parse(Path::new(file), data);
    }
}

/// Path normalisation (`weft_destination_api::routing::normalize_path`): a
/// normalised path is normal (normalising it again changes nothing), has no
/// `//` and no `.` or `..` segment.
pub fn normalize_path(data: &[u8]) {
    use weft_destination_api::routing::normalize_path;
    let data = bounded("normalize_path", data);
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(normal) = normalize_path(path) else {
        return;
    };
    if !path.starts_with('/') {
        assert_eq!(normal, path, "only absolute paths are rewritten");
        return;
    }
    assert!(normal.starts_with('/'), "{path:?} -> {normal:?}");
    assert!(!normal.contains("//"), "{path:?} -> {normal:?}");
    assert!(
        normal[1..].split('/').all(|s| s != "." && s != ".."),
        "{path:?} -> {normal:?}"
    );
    assert_eq!(
        normalize_path(&normal).as_deref(),
        Ok(&*normal),
        "{path:?} -> {normal:?} is not a fixed point"
    );
}
