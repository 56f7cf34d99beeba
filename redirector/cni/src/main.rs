//! `weft-cni`: chained CNI plugin that registers pods with the Weft node agent.

use std::io::{Read, Write};
use weft_cni::plugin::{self, CniEnv};

/// The exit status a shell reports for a tool ended by SIGPIPE (128 + 13):
/// a runtime that stopped reading our stdout gets a quiet exit, not a
/// `println!` panic.
const CLOSED_PIPE: i32 = 141;

fn main() {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().take(1 << 20).read_to_end(&mut stdin) {
        eprintln!("weft-cni: reading stdin: {e}");
    }
    let (text, code) = match plugin::run(&CniEnv::from_process(), &stdin) {
        Ok(out) => (out, 0),
        Err(err) => {
            eprintln!("weft-cni: {err}");
            // The CNI spec: error object on stdout, non-zero exit.
            (serde_json::to_string(&err).expect("errors serialise"), 1)
        }
    };
    if !text.is_empty() {
        match writeln!(std::io::stdout(), "{text}") {
            Ok(()) => {}
            // A failure stays a failure; a success the reader did not
            // take says so like other tools do.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                std::process::exit(if code == 0 { CLOSED_PIPE } else { code })
            }
            Err(e) => {
                eprintln!("weft-cni: writing the result: {e}");
                std::process::exit(1);
            }
        }
    }
    std::process::exit(code);
}
