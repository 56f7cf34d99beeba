//! Real eBPF, as root: the cgroup programs at the cgroup v2 root, sk_lookup
//! on the enrolled namespace, real sockets in test namespaces.

mod support;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};
use support::*;
use weft_redirector::{
    Netns, PodEnrollment, SKIP_INBOUND_PORTS, SKIP_OUTBOUND_PORTS, original_dst,
};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn outbound_connect_lands_on_proxy_listener_with_original_destination() {
    let pods = PodPair::new();
    let installed = Installed::new();
    let server = listen(&pods.server, "10.99.0.2:8080");
    let proxy = listen(&pods.client, "127.0.0.1:15001");
    installed.enroll(&pods.client, "client-uid", &[]);

    let mut client = connect_from(&pods.client, "10.99.0.2:8080").expect("redirected connect");
    let mut accepted = accept_within(&proxy, TIMEOUT).expect("proxy listener got the connection");
    assert_eq!(original_dst(&accepted).unwrap(), addr("10.99.0.2:8080"));
    // The application still believes it talks to the server.
    assert_eq!(client.peer_addr().unwrap(), addr("10.99.0.2:8080"));
    // And the accepted socket's peer is really that client.
    assert_eq!(accepted.peer_addr().unwrap(), client.local_addr().unwrap());
    assert_bytes_flow(&mut client, &mut accepted, b"GET / HTTP/1.1\r\n");
    assert_nothing_else_reached(&server, &pods.server, "nothing reached the server directly");
}

#[test]
fn inbound_connection_lands_on_15006_with_original_port() {
    let pods = PodPair::new();
    let installed = Installed::new();
    // The enrolled pod is `client` here; `server` plays a non-enrolled peer.
    let app = listen(&pods.client, "0.0.0.0:8080");
    let inbound = listen(&pods.client, "0.0.0.0:15006");
    installed
        .get()
        .register_inbound_listener(&pods.client.netns, &inbound)
        .unwrap();
    installed.enroll(&pods.client, "enrolled-uid", &[]);

    let mut peer = connect_from(&pods.server, "10.99.0.1:8080").expect("inbound connect");
    let mut accepted = accept_within(&inbound, TIMEOUT).expect("15006 got the connection");
    assert_eq!(accepted.local_addr().unwrap(), addr("10.99.0.1:8080"));
    assert_eq!(accepted.peer_addr().unwrap(), peer.local_addr().unwrap());
    assert_bytes_flow(&mut peer, &mut accepted, b"hello app");
    assert_nothing_else_reached(&app, &pods.client, "app was bypassed");

    // IPv6 goes to the IPv6 listener of the same pod.
    let inbound6 = listen(&pods.client, "[::]:15006");
    installed
        .get()
        .register_inbound_listener(&pods.client.netns, &inbound6)
        .unwrap();
    connect_from(&pods.server, "[fd00:99::1]:8080").expect("inbound v6 connect");
    let accepted6 = accept_within(&inbound6, TIMEOUT).expect("[::]:15006 got the v6 connection");
    assert_eq!(accepted6.local_addr().unwrap(), addr("[fd00:99::1]:8080"));

    // 15008 (HBONE) is never steered.
    let hbone = listen(&pods.client, "0.0.0.0:15008");
    connect_from(&pods.server, "10.99.0.1:15008").expect("hbone connect");
    assert!(
        accept_within(&hbone, TIMEOUT).is_some(),
        "15008 reached its own listener"
    );
    assert_nothing_else_reached(&inbound, &pods.client, "nothing reached 15006");
}

#[test]
fn inbound_without_proxy_listener_fails_closed() {
    let pods = PodPair::new();
    let installed = Installed::new();
    let app = listen(&pods.client, "0.0.0.0:8080");
    installed.enroll(&pods.client, "enrolled-uid", &[]);

    // Refused, not dropped: `connect_from` gives up after 2 s with
    // TimedOut, so ConnectionRefused means an answer came at once. (No
    // elapsed-time bound: it would also time entering the namespace on a
    // loaded machine.)
    let err =
        connect_from(&pods.server, "10.99.0.1:8080").expect_err("no plaintext path to the app");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    assert_nothing_else_reached(&app, &pods.client, "nothing reached the app");

    // A proxy that registered its listener and then died: the kernel drops
    // the closed socket from the map, and inbound is refused again.
    let inbound = listen(&pods.client, "0.0.0.0:15006");
    installed
        .get()
        .register_inbound_listener(&pods.client.netns, &inbound)
        .unwrap();
    connect_from(&pods.server, "10.99.0.1:8080").expect("steered while the proxy lives");
    assert!(accept_within(&inbound, TIMEOUT).is_some());
    close_listener(inbound, &pods.client);
    let err =
        connect_from(&pods.server, "10.99.0.1:8080").expect_err("refused after the proxy died");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    assert_nothing_else_reached(&app, &pods.client, "nothing reached the app");
}

#[test]
fn proxy_marked_sockets_go_direct() {
    let pods = PodPair::new();
    let installed = Installed::new();
    let server = listen(&pods.server, "10.99.0.2:8080");
    let proxy = listen(&pods.client, "127.0.0.1:15001");
    installed.enroll(&pods.client, "client-uid", &[]);

    let sock = marked_socket(&pods.client.netns, socket2::Domain::IPV4);
    sock.connect_timeout(&addr("10.99.0.2:8080").into(), Duration::from_secs(2))
        .expect("marked connect");
    let accepted = accept_within(&server, TIMEOUT).expect("server got the proxy's own connection");
    assert_eq!(accepted.peer_addr().unwrap().ip(), addr("10.99.0.1:0").ip());
    assert_nothing_else_reached(&proxy, &pods.client, "nothing reached the proxy listener");
}

/// The thread that makes in-pod sockets goes back to the proxy's own
/// namespace after each one: staying would keep a deleted pod's namespace
/// (and its interfaces) alive.
#[test]
fn the_socket_thread_leaves_the_pods_namespace() {
    let pods = PodPair::new();
    let sock = marked_socket(&pods.client.netns, socket2::Domain::IPV4);
    // Made in the pod: bound there, it has the pod's address.
    sock.bind(&addr("10.99.0.1:0").into())
        .expect("the pod's address");
    let thread = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim() == "netns-sockets")
        })
        .expect("the socket thread");
    let ns = |p: &std::path::Path| std::fs::read_link(p.join("ns/net")).unwrap();
    assert_eq!(ns(&thread.path()), ns(std::path::Path::new("/proc/self")));
}

/// Sockets made ahead (`make_proxy_tcp_sockets`, the node proxy's stock):
/// several in one visit of the pod's namespace, each the pod's and marked
/// as the proxy's own, handed to the asker on the socket thread.
#[test]
fn sockets_made_ahead_are_the_pods_and_marked() {
    let pods = PodPair::new();
    let (sender, made) = std::sync::mpsc::channel();
    pods.client
        .netns
        .make_proxy_tcp_sockets(socket2::Domain::IPV4, 3, move |m| sender.send(m).unwrap())
        .expect("asked");
    let sockets = made
        .recv_timeout(TIMEOUT)
        .expect("delivered")
        .expect("made");
    assert_eq!(sockets.len(), 3);
    for sock in sockets {
        assert_eq!(sock.mark().unwrap(), weft_redirector::PROXY_SOCKET_MARK);
        sock.bind(&addr("10.99.0.1:0").into())
            .expect("made in the pod: it has the pod's address");
    }
}

#[test]
fn loopback_and_udp_are_untouched() {
    let pods = PodPair::new();
    let installed = Installed::new();
    let proxy = listen(&pods.client, "127.0.0.1:15001");
    let local = listen(&pods.client, "127.0.0.1:9000");
    installed.enroll(&pods.client, "client-uid", &[]);

    // Loopback: the app talking to itself.
    connect_from(&pods.client, "127.0.0.1:9000").expect("loopback connect");
    assert!(
        accept_within(&local, TIMEOUT).is_some(),
        "loopback reached its listener"
    );
    assert_nothing_else_reached(&proxy, &pods.client, "nothing reached the proxy listener");

    // UDP, DNS-like: a query to the server's port 53 and its answer, both
    // with connect() (runs the connect4 hook) and with sendto().
    let dns = pods
        .server
        .netns
        .run(|| UdpSocket::bind("10.99.0.2:53"))
        .unwrap();
    dns.set_read_timeout(Some(TIMEOUT)).unwrap();
    let answered = pods
        .client
        .netns
        .run(|| {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(TIMEOUT))?;
            s.connect("10.99.0.2:53")?;
            s.send(b"query A server")?;
            Ok(s)
        })
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = dns
        .recv_from(&mut buf)
        .expect("query arrived at the DNS server");
    assert_eq!(&buf[..n], b"query A server");
    dns.send_to(b"answer 10.99.0.2", from).unwrap();
    let n = answered.recv(&mut buf).expect("answer arrived");
    assert_eq!(&buf[..n], b"answer 10.99.0.2");
    let unconnected = pods
        .client
        .netns
        .run(|| UdpSocket::bind("0.0.0.0:0"))
        .unwrap();
    unconnected.send_to(b"query AAAA", "10.99.0.2:53").unwrap();
    let (n, _) = dns.recv_from(&mut buf).expect("sendto query arrived");
    assert_eq!(&buf[..n], b"query AAAA");
}

#[test]
fn skip_port_annotations_bypass_capture() {
    let pods = PodPair::new();
    let installed = Installed::new();
    let skipped = listen(&pods.server, "10.99.0.2:5432");
    let proxy = listen(&pods.client, "127.0.0.1:15001");
    let inbound = listen(&pods.client, "0.0.0.0:15006");
    let metrics = listen(&pods.client, "0.0.0.0:9090");
    installed
        .get()
        .register_inbound_listener(&pods.client.netns, &inbound)
        .unwrap();
    installed.enroll(
        &pods.client,
        "client-uid",
        &[
            (SKIP_OUTBOUND_PORTS, "5432, 6379"),
            (SKIP_INBOUND_PORTS, "9090"),
        ],
    );

    connect_from(&pods.client, "10.99.0.2:5432").expect("skipped outbound connect");
    assert!(
        accept_within(&skipped, TIMEOUT).is_some(),
        "5432 went direct"
    );
    connect_from(&pods.client, "10.99.0.2:8080").expect("captured outbound connect");
    let captured = accept_within(&proxy, TIMEOUT).expect("8080 was captured");
    assert_eq!(original_dst(&captured).unwrap(), addr("10.99.0.2:8080"));

    connect_from(&pods.server, "10.99.0.1:9090").expect("skipped inbound connect");
    assert!(
        accept_within(&metrics, TIMEOUT).is_some(),
        "9090 reached the app"
    );
    connect_from(&pods.server, "10.99.0.1:8080").expect("captured inbound connect");
    assert!(
        accept_within(&inbound, TIMEOUT).is_some(),
        "8080 was steered to 15006"
    );
}

#[test]
fn bad_annotation_is_rejected_and_enrolls_nothing() {
    let pods = PodPair::new();
    let installed = Installed::new();
    let err = installed
        .get()
        .enroll(&PodEnrollment {
            netns: &pods.client.netns,
            pod_uid: "bad".into(),
            annotations: [(SKIP_OUTBOUND_PORTS.to_string(), "postgres".to_string())].into(),
        })
        .unwrap_err();
    assert!(err.to_string().contains(SKIP_OUTBOUND_PORTS), "{err}");
    assert!(installed.get().enrolled().unwrap().is_empty());
}

#[test]
fn unenroll_makes_traffic_go_direct_again() {
    let pods = PodPair::new();
    let installed = Installed::new();
    let server = listen(&pods.server, "10.99.0.2:8080");
    let proxy = listen(&pods.client, "127.0.0.1:15001");
    installed.enroll(&pods.client, "client-uid", &[]);
    let enrolled = installed.get().enrolled().unwrap();
    assert_eq!(enrolled.len(), 1);
    assert_eq!(enrolled[0].pod_uid, "client-uid");
    assert_eq!(
        enrolled[0].netns_cookie,
        pods.client.netns.cookie().unwrap()
    );

    connect_from(&pods.client, "10.99.0.2:8080").unwrap();
    assert!(
        accept_within(&proxy, TIMEOUT).is_some(),
        "captured while enrolled"
    );

    installed.get().unenroll("client-uid").unwrap();
    assert!(installed.get().enrolled().unwrap().is_empty());
    let client = connect_from(&pods.client, "10.99.0.2:8080").unwrap();
    let accepted = accept_within(&server, TIMEOUT).expect("direct after unenroll");
    assert_eq!(accepted.peer_addr().unwrap(), client.local_addr().unwrap());
    assert_nothing_else_reached(&proxy, &pods.client, "nothing reached the proxy listener");
    let err = installed.get().unenroll("client-uid").unwrap_err();
    assert!(
        matches!(err, weft_redirector::Error::NotEnrolled { .. }),
        "{err}"
    );
}

#[test]
fn a_uid_that_is_not_unique_releases_no_neighbour() {
    let pods = PodPair::new();
    let installed = Installed::new();
    // A runtime that gives no uid: both pods enrolled under "".
    installed.enroll(&pods.client, "", &[]);
    installed.enroll(&pods.server, "", &[]);
    let err = installed.get().unenroll("").unwrap_err();
    assert!(
        matches!(err, weft_redirector::Error::AmbiguousUid { count: 2, .. }),
        "{err}"
    );
    assert_eq!(
        installed.get().enrolled().unwrap().len(),
        2,
        "nobody released"
    );
    // Each leaves by its own namespace, and only it.
    installed
        .get()
        .unenroll_cookie(pods.client.netns.cookie().unwrap())
        .unwrap();
    let left = installed.get().enrolled().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].netns_cookie, pods.server.netns.cookie().unwrap());
}

#[test]
fn missing_proxy_listener_refuses_fast_and_sends_nothing() {
    let pods = PodPair::new();
    let installed = Installed::new();
    let server = listen(&pods.server, "10.99.0.2:8080");
    let capture = Capture::start(&pods.server, "eth0");

    // Control: before enrollment the SYN is on the wire, so the capture works.
    connect_from(&pods.client, "10.99.0.2:8080").unwrap();
    assert!(accept_within(&server, TIMEOUT).is_some());
    assert!(capture.syns_to_port(8080) >= 1, "capture sees a direct SYN");

    installed.enroll(&pods.client, "client-uid", &[]);
    // Refused, not dropped: `connect_from` gives up after 2 s with
    // TimedOut, so ConnectionRefused means an answer came at once (no
    // elapsed-time bound, which would also time entering the namespace).
    let err = connect_from(&pods.client, "10.99.0.2:8080").expect_err("no proxy: refused");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    let err6 = connect_from(&pods.client, "[fd00:99::2]:8080").expect_err("no proxy: refused (v6)");
    assert_eq!(err6.kind(), io::ErrorKind::ConnectionRefused, "{err6}");
    // No SYN left the pod: a sentinel connection that goes direct (the
    // proxy's own, marked) is sent after the refused ones; once the capture
    // has its SYN, any earlier SYN would have been captured before it.
    let sentinel = direct_connect_from(&pods.client, "10.99.0.2:8080");
    let mut syns = 0;
    let deadline = Instant::now() + TIMEOUT;
    while syns == 0 && Instant::now() < deadline {
        syns += capture.syns_to_port(8080);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(syns, 1, "only the sentinel's SYN left the pod");
    let first = accept_within(&server, TIMEOUT).expect("the sentinel reaches the server");
    assert_eq!(
        first.peer_addr().unwrap(),
        sentinel.local_addr().unwrap(),
        "nothing but the sentinel reached the server"
    );
}

#[test]
fn ipv6_connects_redirect_the_same_way() {
    let pods = PodPair::new();
    let installed = Installed::new();
    let server = listen(&pods.server, "[fd00:99::2]:8080");
    let proxy6 = listen(&pods.client, "[::1]:15001");
    let proxy4 = listen(&pods.client, "127.0.0.1:15001");
    installed.enroll(&pods.client, "client-uid", &[]);

    let mut client = connect_from(&pods.client, "[fd00:99::2]:8080").expect("v6 connect");
    let mut accepted = accept_within(&proxy6, TIMEOUT).expect("[::1]:15001 got it");
    assert_eq!(original_dst(&accepted).unwrap(), addr("[fd00:99::2]:8080"));
    assert_eq!(client.peer_addr().unwrap(), addr("[fd00:99::2]:8080"));
    assert_bytes_flow(&mut client, &mut accepted, b"v6 bytes");
    assert_nothing_else_reached(&server, &pods.server, "nothing reached the server directly");

    // IPv4-mapped destination on an AF_INET6 socket: stays IPv4, lands on 127.0.0.1:15001.
    let mapped = pods
        .client
        .netns
        .run(|| {
            let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
            s.set_only_v6(false)?;
            s.connect_timeout(
                &addr("[::ffff:10.99.0.2]:8080").into(),
                Duration::from_secs(2),
            )?;
            Ok(TcpStream::from(s))
        })
        .expect("mapped connect");
    let accepted = accept_within(&proxy4, TIMEOUT).expect("127.0.0.1:15001 got the mapped connect");
    assert_eq!(original_dst(&accepted).unwrap(), addr("10.99.0.2:8080"));
    assert_eq!(mapped.peer_addr().unwrap(), addr("[::ffff:10.99.0.2]:8080"));
}

#[test]
fn restarted_proxy_adopts_pinned_state() {
    let pods = PodPair::new();
    let mut installed = Installed::new();
    let proxy = listen(&pods.client, "127.0.0.1:15001");
    installed.enroll(&pods.client, "client-uid", &[]);
    let before = installed.get().installed_objects().unwrap();

    // The proxy process goes away (its fds close) ...
    drop(installed.redirector.take());
    connect_from(&pods.client, "10.99.0.2:8080").unwrap();
    assert!(
        accept_within(&proxy, TIMEOUT).is_some(),
        "capture survives the proxy"
    );

    // ... and a new one finds everything in place.
    installed.redirector = Some(
        weft_redirector::Redirector::install(weft_redirector::RedirectorConfig {
            pin_dir: installed.pin_dir.clone(),
            cgroup_root: None,
        })
        .unwrap(),
    );
    let after = installed.get().installed_objects().unwrap();
    let ids = |o: &weft_redirector::InstalledObjects| {
        let mut v: Vec<u32> = o.links.iter().map(|l| l.1).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&before), ids(&after), "same links, not re-attached");
    assert_eq!(installed.get().enrolled().unwrap()[0].pod_uid, "client-uid");
    let _ = Netns::current();
}

fn bpftool_has(kind: &str, id: u32) -> bool {
    std::process::Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn uninstall_removes_every_program_link_pin_and_map() {
    let pods = PodPair::new();
    let mut installed = Installed::new();
    installed.enroll(&pods.client, "client-uid", &[]);
    let objects = installed.get().installed_objects().unwrap();
    assert_eq!(
        objects.links.len(),
        7,
        "6 cgroup links + 1 sk_lookup: {objects:?}"
    );
    assert_eq!(objects.maps.len(), 5, "{objects:?}");
    for (_, link, prog) in &objects.links {
        assert!(bpftool_has("link", *link));
        assert!(bpftool_has("prog", *prog));
    }

    installed.uninstall();
    assert!(!installed.pin_dir.exists(), "pin dir removed");
    // Links and programs go synchronously; maps are freed by a kernel work
    // item once their last reference is gone, so allow a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<String> = objects
            .links
            .iter()
            .flat_map(|(_, l, p)| [("link", *l), ("prog", *p)])
            .chain(objects.maps.iter().map(|(_, m)| ("map", *m)))
            .filter(|(k, id)| bpftool_has(k, *id))
            .map(|(k, id)| format!("{k} {id}"))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still present after uninstall: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And the capture is really gone: a connect from the pod goes direct.
    let server = listen(&pods.server, "10.99.0.2:8080");
    connect_from(&pods.client, "10.99.0.2:8080").unwrap();
    assert!(accept_within(&server, TIMEOUT).is_some());
}

#[test]
fn discovery_finds_processes_already_running_in_a_pod_netns() {
    let pods = PodPair::new();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let sleeper = Kill(
        std::process::Command::new("ip")
            .args(["netns", "exec", &pods.client.name, "sleep", "30"])
            .spawn()
            .unwrap(),
    );
    let pid = sleeper.0.id();
    let host_inode =
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata("/proc/self/ns/net").unwrap());
    let want = pods.client.netns.cookie().unwrap();
    // `ip netns exec` execs `sleep` in place; give it a moment to switch namespace.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let found = weft_redirector::discovery::scan_host().unwrap();
        let hit = found.iter().find(|d| d.pid == pid);
        if let Some(d) = hit {
            let netns = Netns::open(&d.netns_path).unwrap();
            assert_eq!(netns.cookie().unwrap(), want, "{d:?}");
            assert!(
                found.iter().all(|d| d.netns_inode != host_inode),
                "host netns is never listed"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} not found in {found:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// getsockopt with an explicit buffer length: (return code or -errno, optlen, bytes).
fn raw_getsockopt(fd: i32, level: i32, name: i32, buf_len: usize) -> (i32, usize, Vec<u8>) {
    let mut buf = vec![0u8; buf_len];
    let mut len = buf_len as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `buf`.
    let rc = unsafe { libc::getsockopt(fd, level, name, buf.as_mut_ptr().cast(), &mut len) };
    let rc = if rc == 0 {
        0
    } else {
        -io::Error::last_os_error().raw_os_error().unwrap()
    };
    buf.truncate(len as usize);
    (rc, len as usize, buf)
}

#[test]
fn getsockopt_hook_leaves_other_options_alone_and_respects_optlen() {
    use std::os::fd::AsRawFd;
    let pods = PodPair::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let fd = other.as_raw_fd();
    let probes = |fd| {
        [
            raw_getsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 4),
            raw_getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, 4),
            // Larger than a page: the kernel gives programs only PAGE_SIZE.
            {
                // TCP_INFO bytes change between calls (timers): compare rc and length.
                let (rc, len, _) = raw_getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, 8192);
                (rc, len, Vec::new())
            },
            raw_getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_CONGESTION, 16),
            raw_getsockopt(fd, libc::SOL_IP, 80, 16),
            raw_getsockopt(fd, libc::SOL_IPV6, 80, 28),
        ]
    };
    let before = probes(fd);
    let installed = Installed::new();
    let proxy = listen(&pods.client, "127.0.0.1:15001");
    installed.enroll(&pods.client, "client-uid", &[]);
    assert_eq!(
        probes(fd),
        before,
        "other sockets see exactly the kernel's answers"
    );

    let _client = connect_from(&pods.client, "10.99.0.2:8080").unwrap();
    let accepted = accept_within(&proxy, TIMEOUT).unwrap();
    let afd = accepted.as_raw_fd();
    let (rc, len, bytes) = raw_getsockopt(afd, libc::SOL_IP, 80, 16);
    assert_eq!((rc, len), (0, 16));
    assert_eq!(
        &bytes[2..8],
        &[0x1f, 0x90, 10, 99, 0, 2],
        "port 8080, 10.99.0.2"
    );
    // A huge buffer (beyond a page) still gets the 16-byte answer.
    let (rc, len, _) = raw_getsockopt(afd, libc::SOL_IP, 80, 65536);
    assert_eq!((rc, len), (0, 16));
    // Too small for a sockaddr_in: the kernel's own error stands.
    let (rc, _, _) = raw_getsockopt(afd, libc::SOL_IP, 80, 8);
    assert!(rc < 0, "short buffer is not answered");
    // The IPv6 option on an IPv4 destination is not ours to answer.
    let (rc, _, _) = raw_getsockopt(afd, libc::SOL_IPV6, 80, 28);
    assert!(rc < 0);
}

#[test]
fn operator_cli_shows_status_and_uninstalls() {
    let pods = PodPair::new();
    let mut installed = Installed::new();
    installed.enroll(&pods.client, "cli-pod-uid", &[]);
    let ids = installed.get().installed_objects().unwrap();
    drop(installed.redirector.take()); // as if the proxy were gone
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft-redirector"))
            .args(args)
            .arg("--pin-dir")
            .arg(&installed.pin_dir)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = cli(&["check"]);
    assert!(ok && out.contains("cgroup v2 root"), "{out}");
    // `weft-redirector check | head -1`: the reader went away (closed
    // before the program starts, so its first write fails every run). It
    // ends quietly, as by SIGPIPE, not with a `println!` panic.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft-redirector"))
        .arg("check")
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert_eq!(stderr, "");
    let (ok, out) = cli(&["status"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("weft_connect4") && out.contains("cli-pod-uid"),
        "{out}"
    );
    assert!(
        out.contains(&format!("link {:>6}", ids.links[0].1)),
        "{out}"
    );
    let (ok, out) = cli(&["uninstall"]);
    assert!(ok, "{out}");
    assert!(!installed.pin_dir.exists());
    let (ok, out) = cli(&["status"]);
    assert!(!ok && out.contains("not installed"), "{out}");
    for (_, link, _) in &ids.links {
        assert!(!bpftool_has("link", *link), "link {link} left");
    }
}

#[test]
fn redirector_is_shareable_across_tasks() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<weft_redirector::Redirector>();
}

#[test]
fn host_namespace_is_never_enrolled() {
    let installed = Installed::new();
    let host = Netns::open("/proc/self/ns/net").unwrap();
    let err = installed
        .get()
        .enroll(&PodEnrollment {
            netns: &host,
            pod_uid: "oops".into(),
            annotations: Default::default(),
        })
        .unwrap_err();
    assert!(
        matches!(err, weft_redirector::Error::HostNetns { .. }),
        "{err}"
    );
    assert!(installed.get().enrolled().unwrap().is_empty());
}

#[test]
fn proxy_delivers_inbound_to_the_app_without_looping() {
    // The real inbound flow: accepted on 15006, the proxy connects (marked,
    // from inside the pod) to the app at podIP:8080; neither hook may steer
    // that connection back to the proxy.
    let pods = PodPair::new();
    let installed = Installed::new();
    let app = listen(&pods.client, "0.0.0.0:8080");
    let inbound = listen(&pods.client, "0.0.0.0:15006");
    let outbound = listen(&pods.client, "127.0.0.1:15001");
    installed
        .get()
        .register_inbound_listener(&pods.client.netns, &inbound)
        .unwrap();
    installed.enroll(&pods.client, "client-uid", &[]);

    let mut peer = connect_from(&pods.server, "10.99.0.1:8080").unwrap();
    let mut from_peer = accept_within(&inbound, TIMEOUT).expect("steered to 15006");
    let to = from_peer.local_addr().unwrap();
    let sock = marked_socket(&pods.client.netns, socket2::Domain::IPV4);
    sock.connect_timeout(&to.into(), Duration::from_secs(2))
        .expect("proxy -> app");
    let mut to_app = TcpStream::from(sock);
    let mut at_app = accept_within(&app, TIMEOUT).expect("the app got the proxy's connection");
    assert_nothing_else_reached(&inbound, &pods.client, "no loop via 15006");
    assert_nothing_else_reached(&outbound, &pods.client, "no loop via 15001");
    assert_bytes_flow(&mut peer, &mut from_peer, b"request");
    assert_bytes_flow(&mut to_app, &mut at_app, b"request");
}

#[test]
fn re_enrolling_updates_skip_ports() {
    let pods = PodPair::new();
    let installed = Installed::new();
    let server = listen(&pods.server, "10.99.0.2:5432");
    let proxy = listen(&pods.client, "127.0.0.1:15001");
    installed.enroll(&pods.client, "client-uid", &[(SKIP_OUTBOUND_PORTS, "5432")]);
    connect_from(&pods.client, "10.99.0.2:5432").unwrap();
    assert!(
        accept_within(&server, TIMEOUT).is_some(),
        "skipped at first"
    );

    installed.enroll(&pods.client, "client-uid", &[]);
    assert_eq!(
        installed.get().enrolled().unwrap().len(),
        1,
        "still one pod"
    );
    connect_from(&pods.client, "10.99.0.2:5432").unwrap();
    assert!(
        accept_within(&proxy, TIMEOUT).is_some(),
        "captured after the annotation went away"
    );
}

#[test]
fn pods_whose_namespace_vanished_are_removed_as_stale() {
    let installed = Installed::new();
    let pods = PodPair::new();
    installed.enroll(&pods.client, "gone-uid", &[]);
    installed.enroll(&pods.server, "alive-uid", &[]);
    assert!(
        installed.get().remove_stale().unwrap().is_empty(),
        "both alive"
    );

    // The pod is deleted without a CNI DEL reaching us.
    let PodPair { client, server } = pods;
    drop(client);
    // Namespace teardown is asynchronous in the kernel: poll, bounded.
    let deadline = Instant::now() + TIMEOUT;
    let removed = loop {
        let removed = installed.get().remove_stale().unwrap();
        if !removed.is_empty() || Instant::now() > deadline {
            break removed;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(removed[0].pod_uid, "gone-uid");
    let left: Vec<String> = installed
        .get()
        .enrolled()
        .unwrap()
        .into_iter()
        .map(|e| e.pod_uid)
        .collect();
    assert_eq!(left, vec!["alive-uid".to_string()]);
    drop(server);
}

#[test]
fn cni_add_and_del_enroll_and_release_the_pod() {
    use weft_cni::plugin::{self, CniEnv};
    use weft_redirector::PodRegistrationListener;
    use weft_registration::PodEvent;

    let pods = PodPair::new();
    let installed = Installed::new();
    let server = listen(&pods.server, "10.99.0.2:8080");
    let proxy = listen(&pods.client, "127.0.0.1:15001");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"net","type":"weft-cni","agent_socket":"{}","prevResult":{{"cniVersion":"1.0.0"}}}}"#,
        socket.display()
    );
    let env = |command: &str| CniEnv {
        command: command.into(),
        container_id: "sandbox-1".into(),
        netns: pods.client.path().display().to_string(),
        args: "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=client;K8S_POD_UID=uid-cni".into(),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut agent = PodRegistrationListener::bind(&socket).unwrap();
        // What the node agent does with each registration (minus opening
        // the proxy's listeners, which the test did above).
        for command in ["ADD", "DEL"] {
            let (env, conf) = (env(command), conf.clone());
            let cni = tokio::task::spawn_blocking(move || plugin::run(&env, conf.as_bytes()));
            let req = agent.next().await.unwrap();
            let result = match &req.event {
                PodEvent::Add { pod, netns, .. } => Netns::open(netns)
                    .and_then(|ns| {
                        installed.get().enroll(&PodEnrollment {
                            netns: &ns,
                            pod_uid: pod.uid.clone(),
                            annotations: Default::default(),
                        })
                    })
                    .map(drop),
                PodEvent::Del { pod, .. } => installed.get().unenroll(&pod.uid),
            };
            match result {
                Ok(()) => req.ack(),
                Err(e) => req.reject(e),
            }
            cni.await.unwrap().expect("CNI command succeeded");
            if command == "ADD" {
                assert_eq!(installed.get().enrolled().unwrap()[0].pod_uid, "uid-cni");
                connect_from(&pods.client, "10.99.0.2:8080").unwrap();
                assert!(
                    accept_within(&proxy, TIMEOUT).is_some(),
                    "captured after CNI ADD"
                );
            }
        }
    });
    assert!(
        installed.get().enrolled().unwrap().is_empty(),
        "released by CNI DEL"
    );
    connect_from(&pods.client, "10.99.0.2:8080").unwrap();
    assert!(
        accept_within(&server, TIMEOUT).is_some(),
        "direct after CNI DEL"
    );
}

#[test]
fn mptcp_connects_are_captured_too() {
    // MPTCP (IPPROTO_MPTCP sockets, e.g. Go listeners/dialers that opt in)
    // must not be a way around capture.
    let pods = PodPair::new();
    let installed = Installed::new();
    let server = listen(&pods.server, "10.99.0.2:8080");
    let proxy = listen(&pods.client, "127.0.0.1:15001");
    installed.enroll(&pods.client, "client-uid", &[]);
    let result = pods.client.netns.run(|| {
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::MPTCP),
        )?;
        s.connect_timeout(&addr("10.99.0.2:8080").into(), Duration::from_secs(2))?;
        Ok(TcpStream::from(s))
    });
    assert_nothing_else_reached(&server, &pods.server, "no direct MPTCP connection");
    match result {
        Ok(_client) => {
            let accepted = accept_within(&proxy, TIMEOUT).expect("MPTCP connect captured");
            assert_eq!(original_dst(&accepted).unwrap(), addr("10.99.0.2:8080"));
            // Known limit (docs/redirector.md): the connect hook runs on the
            // MPTCP subflow, getpeername on the MPTCP socket, so the app's
            // getpeername shows 127.0.0.1:15001.
        }
        Err(e) => panic!("MPTCP connect failed: {e}"),
    }
}

/// Accepts, without waiting, whatever is queued on `l`.
fn drain_queue(l: &TcpListener) -> Vec<TcpStream> {
    std::iter::from_fn(|| accept_within(l, Duration::ZERO)).collect()
}

/// The rollout hand-over at the kernel level (docs/node-proxy.md): a second
/// proxy's 15006 listener joins the first's address (SO_REUSEPORT) and
/// replaces it in the steering map; the first then closes. No inbound
/// connection is refused at any step, and a connection the first accepted
/// keeps working after its listener is gone.
#[test]
fn inbound_steering_hands_over_between_two_listeners() {
    let pods = PodPair::new();
    let installed = Installed::new();
    let old = listen(&pods.client, "0.0.0.0:15006");
    installed
        .get()
        .register_inbound_listener(&pods.client.netns, &old)
        .unwrap();
    installed.enroll(&pods.client, "enrolled-uid", &[]);
    let mut peer = connect_from(&pods.server, "10.99.0.1:8080").expect("inbound connect");
    let mut kept = accept_within(&old, TIMEOUT).expect("the old listener got it");

    // The new listener binds the same address and takes the map entry.
    let new = listen(&pods.client, "0.0.0.0:15006");
    installed
        .get()
        .register_inbound_listener(&pods.client.netns, &new)
        .unwrap();
    // While both listen: every connection is accepted by one of them. The
    // socket in the map heads a reuseport group, and `bpf_sk_assign`
    // without BPF_SK_LOOKUP_F_NO_REUSEPORT lets the kernel pick in it.
    let (mut to_old, mut to_new) = (0, 0);
    let mut peers = Vec::new();
    for _ in 0..20 {
        peers.push(
            connect_from(&pods.server, "10.99.0.1:8080").expect("not refused while both listen"),
        );
        to_old += drain_queue(&old).len();
        to_new += drain_queue(&new).len();
    }
    let deadline = Instant::now() + TIMEOUT;
    while to_old + to_new < 20 && Instant::now() < deadline {
        to_old += drain_queue(&old).len();
        to_new += drain_queue(&new).len();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(to_old + to_new, 20, "old {to_old}, new {to_new}");
    assert!(
        to_old > 0 && to_new > 0,
        "spread over the group: old {to_old}, new {to_new}"
    );

    // The old one closes: the new one takes everything.
    close_listener(old, &pods.client);
    for _ in 0..20 {
        connect_from(&pods.server, "10.99.0.1:8080").expect("not refused after the old closed");
        accept_within(&new, TIMEOUT).expect("the new listener got it");
    }
    // And the connection accepted before the hand-over still carries bytes.
    assert_bytes_flow(&mut peer, &mut kept, b"still here");
    assert_bytes_flow(&mut kept, &mut peer, b"and back");
}

/// A new version of the programs, loaded by a new proxy, replaces the
/// attached ones in place (`BPF_LINK_UPDATE`): the same links, the new
/// programs, and while it happens no connect of the enrolled pod misses
/// the redirect (each one lands on the proxy listener, none reaches the
/// server directly, none fails).
#[test]
fn a_new_program_version_replaces_the_attached_one_in_place_under_traffic() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use weft_redirector::bench_support::{attach_previous_version, linked_program_tag};

    let pods = PodPair::new();
    let mut installed = Installed::new();
    let server = listen(&pods.server, "10.99.0.2:8080");
    let proxy = listen(&pods.client, "127.0.0.1:15001");
    installed.enroll(&pods.client, "client-uid", &[]);
    let connect4 = installed.pin_dir.join("links/weft_connect4");
    let current = linked_program_tag(&connect4).unwrap();
    let links = |r: &weft_redirector::Redirector| {
        let mut v: Vec<(std::path::PathBuf, u32)> = r
            .installed_objects()
            .unwrap()
            .links
            .into_iter()
            .map(|(pin, link, _)| (pin, link))
            .collect();
        v.sort();
        v
    };
    let before = links(installed.get());

    // The previous version is attached (in place, too) and redirects.
    let replaced = attach_previous_version(&installed.pin_dir).unwrap();
    assert_eq!(replaced, vec!["weft_connect4"], "only connect4 differs");
    let previous = linked_program_tag(&connect4).unwrap();
    assert_ne!(previous, current);
    connect_from(&pods.client, "10.99.0.2:8080").expect("redirected by the previous version");
    accept_within(&proxy, TIMEOUT).expect("the previous version redirects");

    // Traffic: connects one after another from the pod, each accepted by
    // the proxy listener, while a new proxy adopts and upgrades.
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU32::new(0));
    let traffic = {
        let (stop, count) = (stop.clone(), count.clone());
        let client = pods.client.netns.path().to_path_buf();
        let proxy = proxy.try_clone().unwrap();
        std::thread::spawn(move || {
            let ns = weft_redirector::Netns::open(&client).unwrap();
            let (mut made, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) && made < 5000 {
                made += 1;
                let connected = ns.run(|| {
                    TcpStream::connect_timeout(&addr("10.99.0.2:8080"), Duration::from_secs(2))
                });
                match connected {
                    Ok(_client) => {
                        if accept_within(&proxy, TIMEOUT).is_none() {
                            failed.push(format!("connect {made} was not redirected"));
                        }
                    }
                    Err(e) => failed.push(format!("connect {made}: {e}")),
                }
                count.store(made, Ordering::Relaxed);
            }
            (made, failed)
        })
    };
    // Some connects before, some after the upgrade.
    let wait_for = |n: u32| {
        let deadline = Instant::now() + TIMEOUT;
        while count.load(Ordering::Relaxed) < n && !traffic.is_finished() {
            assert!(Instant::now() < deadline, "the traffic stalled at {n}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for(20);
    drop(installed.redirector.take());
    installed.redirector = Some(
        weft_redirector::Redirector::install(weft_redirector::RedirectorConfig {
            pin_dir: installed.pin_dir.clone(),
            cgroup_root: None,
        })
        .unwrap(),
    );
    assert_eq!(
        linked_program_tag(&connect4).unwrap(),
        current,
        "the current version runs again"
    );
    wait_for(count.load(Ordering::Relaxed) + 20);
    stop.store(true, Ordering::Relaxed);
    let (made, failed) = traffic.join().unwrap();
    assert!(made > 10, "the traffic ran: {made} connects");
    assert!(failed.is_empty(), "{} of {made}: {failed:?}", failed.len());
    assert_eq!(
        links(installed.get()),
        before,
        "the same links, updated in place"
    );
    assert_nothing_else_reached(&server, &pods.server, "a connect went around the proxy");
    eprintln!("{made} connects during the upgrade, all redirected");
}

/// Two node proxies (a rollout's old and new one) enrolling the same pod
/// at the same moment both succeed: the one that loses the race to pin
/// the pod's sk_lookup link finds it pinned by the other.
#[test]
fn two_proxies_enrolling_one_pod_at_once_both_succeed() {
    let pods = PodPair::new();
    let installed = Installed::new();
    let other = weft_redirector::Redirector::install(weft_redirector::RedirectorConfig {
        pin_dir: installed.pin_dir.clone(),
        cgroup_root: None,
    })
    .unwrap();
    let enrollment = PodEnrollment {
        netns: &pods.client.netns,
        pod_uid: "client-uid".into(),
        annotations: Default::default(),
    };
    for round in 0..10 {
        let barrier = std::sync::Barrier::new(2);
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| {
                barrier.wait();
                installed.get().enroll(&enrollment)
            });
            let b = s.spawn(|| {
                barrier.wait();
                other.enroll(&enrollment)
            });
            (a.join().unwrap(), b.join().unwrap())
        });
        assert!(a.is_ok() && b.is_ok(), "round {round}: {a:?} / {b:?}");
        installed.get().unenroll("client-uid").unwrap();
    }
}

/// A marked (never redirected) connect from `ns` that may fail.
fn marked_connect(ns: &TestNetns, to: &str) -> io::Result<TcpStream> {
    let to: SocketAddr = to.parse().unwrap();
    let sock = marked_socket(&ns.netns, socket2::Domain::IPV4);
    sock.connect_timeout(&to.into(), Duration::from_secs(2))?;
    Ok(TcpStream::from(sock))
}

/// Every sk_lookup instance comes from the one loader of the process with
/// its pod's cookie written into a copy of the object: each pod's inbound
/// goes to its own 15006 listener, a pod without one fails closed rather
/// than reaching another pod's, and the instances run the same code.
#[test]
fn each_enrolled_pod_steers_inbound_to_its_own_listener() {
    let pods = PodPair::new();
    let installed = Installed::new();
    let client_app = listen(&pods.client, "0.0.0.0:8080");
    let server_app = listen(&pods.server, "0.0.0.0:8080");
    installed.enroll(&pods.client, "client-uid", &[]);
    installed.enroll(&pods.server, "server-uid", &[]);
    let server_inbound = listen(&pods.server, "0.0.0.0:15006");
    installed
        .get()
        .register_inbound_listener(&pods.server.netns, &server_inbound)
        .unwrap();

    let _to_server = direct_connect_from(&pods.client, "10.99.0.2:8080");
    let accepted = accept_within(&server_inbound, TIMEOUT).expect("the server pod's 15006");
    assert_eq!(accepted.local_addr().unwrap(), addr("10.99.0.2:8080"));
    // The client pod has no listener yet: refused, not steered across.
    let err =
        marked_connect(&pods.server, "10.99.0.1:8080").expect_err("no listener in the client pod");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    assert_nothing_else_reached(&server_inbound, &pods.server, "server pod's 15006");
    assert_nothing_else_reached(&client_app, &pods.client, "client app");

    let client_inbound = listen(&pods.client, "0.0.0.0:15006");
    installed
        .get()
        .register_inbound_listener(&pods.client.netns, &client_inbound)
        .unwrap();
    let _to_client = direct_connect_from(&pods.server, "10.99.0.1:8080");
    let accepted = accept_within(&client_inbound, TIMEOUT).expect("the client pod's 15006");
    assert_eq!(accepted.local_addr().unwrap(), addr("10.99.0.1:8080"));
    assert_nothing_else_reached(&server_inbound, &pods.server, "server pod's 15006");
    assert_nothing_else_reached(&server_app, &pods.server, "server app");

    let pod_links: Vec<(std::path::PathBuf, u32, u32)> = installed
        .get()
        .installed_objects()
        .unwrap()
        .links
        .into_iter()
        .filter(|(pin, _, _)| pin.starts_with(installed.pin_dir.join("pods")))
        .collect();
    assert_eq!(pod_links.len(), 2, "{pod_links:?}");
    assert_ne!(
        pod_links[0].2, pod_links[1].2,
        "one program instance per pod"
    );
    let tag =
        |pin: &std::path::Path| weft_redirector::bench_support::linked_program_tag(pin).unwrap();
    assert_eq!(tag(&pod_links[0].0), tag(&pod_links[1].0), "the same code");
}
