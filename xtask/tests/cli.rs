//! The `cargo xtask` program itself, as a shell runs it.

use std::process::{Command, Stdio};

/// `cargo xtask help | head -1`: the reader goes away early; the program
/// ends quietly (as by SIGPIPE), not with a `print!` panic. The pipe is
/// closed before the program starts, so every run hits it.
#[test]
fn a_closed_stdout_ends_xtask_quietly() {
    let run = |stdout: Stdio| {
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .arg("help")
            .stdout(stdout)
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    // Control: with a reader, help prints the usage and succeeds.
    let out = run(Stdio::piped());
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("usage: cargo xtask"),
        "{out:?}"
    );

    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = run(writer.into());
    assert_eq!(
        out.status.code(),
        Some(141),
        "exit as by SIGPIPE; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}
