//! `weft-cni`: chained CNI plugin that registers pods with the Weft node agent.

use std::io::Read;
use weft_cni::plugin::{self, CniEnv};

fn main() {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().take(1 << 20).read_to_end(&mut stdin) {
        eprintln!("weft-cni: reading stdin: {e}");
    }
    match plugin::run(&CniEnv::from_process(), &stdin) {
        Ok(out) => {
            if !out.is_empty() {
                println!("{out}");
            }
        }
        Err(err) => {
            // The CNI spec: error object on stdout, non-zero exit.
            println!("{}", serde_json::to_string(&err).expect("errors serialise"));
            eprintln!("weft-cni: {err}");
            std::process::exit(1);
        }
    }
}
