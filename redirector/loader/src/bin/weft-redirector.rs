//! `weft-redirector`: operator commands for the redirector on one node.
//!
//! The node proxy installs and enrolls by itself; this tool checks a node,
//! shows what is installed, and removes it (the DaemonSet's uninstall step:
//! nothing of ours stays attached after Weft is removed).

use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use weft_redirector::{DEFAULT_PIN_DIR, Redirector, RedirectorConfig};

#[derive(Parser)]
#[command(version, about = "Weft eBPF redirector: check, status, uninstall")]
struct Cli {
    /// bpffs directory holding our pins.
    #[arg(long, global = true, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// cgroup v2 root (default: found in /proc/self/mountinfo).
    #[arg(long, global = true)]
    cgroup_root: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this kernel and host can run the redirector.
    Check,
    /// Show links, programs, maps and enrolled pods.
    Status,
    /// Remove every program, link, pin and map under --pin-dir.
    Uninstall,
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Redirector(#[from] weft_redirector::Error),
    #[error("writing to stdout: {0}")]
    Stdout(#[from] std::io::Error),
}

/// `println!` panics when stdout is a pipe whose reader has gone
/// (`weft-redirector status | head`); this returns the error instead, and
/// `main` ends quietly on it, as Unix tools do.
macro_rules! out {
    ($($arg:tt)*) => { writeln!(std::io::stdout(), $($arg)*) };
}

/// The exit status a shell reports for a tool ended by SIGPIPE (128 + 13).
const CLOSED_PIPE: u8 = 141;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Stdout(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::from(CLOSED_PIPE)
        }
        Err(e) => {
            eprintln!("weft-redirector: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    let config = RedirectorConfig {
        pin_dir: cli.pin_dir.clone(),
        cgroup_root: cli.cgroup_root,
    };
    match cli.command {
        Command::Check => {
            weft_redirector::check_kernel()?;
            let root = match &config.cgroup_root {
                Some(r) => r.clone(),
                None => weft_redirector::find_cgroup2_root()?,
            };
            out!("kernel: ok ({})", nix_release())?;
            out!("cgroup v2 root: {}", root.display())?;
        }
        Command::Status => {
            let r = Redirector::open(config)?;
            let objects = r.installed_objects()?;
            out!("pin dir: {}", r.pin_dir().display())?;
            out!("cgroup root: {}", r.cgroup_root().display())?;
            for (pin, link, prog) in &objects.links {
                out!("link {link:>6} prog {prog:>6}  {}", pin.display())?;
            }
            for (name, id) in &objects.maps {
                out!("map  {id:>6}              {name}")?;
            }
            for e in r.enrolled()? {
                out!(
                    "enrolled pod {} (netns cookie {})",
                    e.pod_uid,
                    e.netns_cookie
                )?;
            }
        }
        Command::Uninstall => {
            weft_redirector::uninstall_at(&cli.pin_dir)?;
            out!("removed everything under {}", cli.pin_dir.display())?;
        }
    }
    Ok(())
}

fn nix_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
