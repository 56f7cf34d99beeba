//! tcpdump inside a network namespace the test's cluster made: the wire as
//! an operator would look at it, to prove what crossed it and what did not.
//!
//! A capture is only evidence of absence if it lost nothing: the kernel
//! drops packets when tcpdump falls behind (a 4 MiB echo over veths with
//! segmentation offload arrives as 64 KiB packets, faster than a 2 MiB
//! default buffer drains on two busy cores). So the buffer is large, and
//! [`Capture::stop`] fails the test if tcpdump reports any drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The kernel buffer tcpdump asks for, in KiB: more than all the traffic
/// of any one test, so a capture never depends on tcpdump's scheduling.
const BUFFER_KIB: &str = "131072";

pub struct Capture {
    child: Child,
    file: PathBuf,
    err: PathBuf,
    _dir: tempfile::TempDir,
}

impl Capture {
    /// All TCP on the fabric bridge, inside the fabric namespace.
    pub fn fabric(fabric_netns: &str) -> Self {
        Self::start(fabric_netns, "br0", "tcp")
    }

    /// A capture of `filter` on `iface` inside the network namespace `netns`;
    /// returns once tcpdump listens.
    pub fn start(netns: &str, iface: &str, filter: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("capture.pcap");
        let err = dir.path().join("tcpdump.err");
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .args([
                "tcpdump", "-i", iface, "-U", "-n", "-s", "0", "-B", BUFFER_KIB,
            ])
            .arg("-w")
            .arg(&file)
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("tcpdump (cargo xtask setup installs it)");
        let mut capture = Self {
            child,
            file,
            err,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = capture.diagnostics();
            if text.contains("listening on") {
                return capture;
            }
            if let Ok(Some(status)) = capture.child.try_wait() {
                panic!("tcpdump exited ({status}): {text}");
            }
            assert!(Instant::now() < deadline, "tcpdump did not start: {text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn diagnostics(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// The pcap written so far (tcpdump writes each packet as it dequeues it).
    pub fn pcap(&self) -> Vec<u8> {
        std::fs::read(&self.file).unwrap_or_default()
    }

    /// Whether the capture so far holds `needle` anywhere.
    pub fn contains(&self, needle: &str) -> bool {
        contains(&self.pcap(), needle.as_bytes())
    }

    /// Polls the file (bounded) until `done` says it has what is expected.
    pub fn wait_for(&self, done: impl Fn(&[u8], &Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if done(&self.pcap(), self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the capture did not see the expected traffic within 10s");
    }

    /// Stops the capture and returns the whole pcap; panics if tcpdump did
    /// not end cleanly or the kernel dropped a packet, since a check for
    /// what is absent from an incomplete capture would prove nothing.
    pub fn stop(&mut self) -> Vec<u8> {
        // SAFETY: SIGINT to the ip-netns-exec process we started (it execs
        // tcpdump, same pid), so tcpdump flushes, reports and exits.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = self.child.wait().unwrap();
        let report = self.diagnostics();
        assert!(status.success(), "tcpdump ended with {status}: {report}");
        let dropped = report
            .lines()
            .find_map(|l| l.strip_suffix(" packets dropped by kernel"))
            .and_then(|n| n.trim().parse::<u64>().ok());
        assert_eq!(
            dropped,
            Some(0),
            "the capture is incomplete, so it proves nothing: {report}"
        );
        self.pcap()
    }

    /// TCP payload bytes in the capture matching a tcpdump filter. Bytes,
    /// not packets: with segmentation offload a packet on a veth or bridge
    /// carries up to 64 KiB, so how many packets 4 MiB makes varies from
    /// run to run.
    pub fn payload_bytes(&self, filter: &str) -> usize {
        let out = Command::new("tcpdump")
            .arg("-r")
            .arg(&self.file)
            .args(["-n", filter])
            .output()
            .unwrap();
        // Each TCP line ends with ", length N" (the payload).
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.rsplit_once("length ")?.1.trim().parse::<usize>().ok())
            .sum()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
