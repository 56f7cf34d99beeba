use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use weft_sim::state::State;

/// `replica_load.py` running in a pod; killed on drop.
pub struct Load {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Load {
    /// `replica_load.py ARGS…` in `pod` (`namespace/name`).
    pub fn start(state: &State, pod: &str, args: &[&str]) -> Self {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let mut child = weft_sim::cluster::pod_command(state, pod, "./replica_load.py", &args)
            .expect("command in the pod")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("replica_load.py starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Lines until one equal to `until`; panics after `within`.
    pub fn read_until(&self, until: &str, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == until => return seen,
                Ok(line) => seen.push(line),
                Err(e) => panic!("no {until:?} from replica_load.py ({e}); saw {seen:?}"),
            }
        }
    }

    /// The lines printed so far, without waiting.
    pub fn read_now(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
