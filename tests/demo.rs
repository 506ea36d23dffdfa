//! `edgecard demo`, as a real process, and every command it prints, run by bash as printed (with
//! `cargo run --release --` standing for the binary under test): the buy example delivers a key,
//! the operator commands work against the demo's coordinator, the printed allocation finds keys
//! in the pool and the printed load test finishes with stock left.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::coordinator::free_port;

struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the demo and returns it with what it printed up to its "Press Ctrl-C" line.
fn start_demo(dir: &std::path::Path) -> (Demo, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgecard"))
        .args(["demo", "--keys", "40", "--dir"])
        .arg(dir)
        .args(["--base-port", &free_port().to_string(), "--coordinator-port", &free_port().to_string()])
        .env_remove("EDGECARD_ADMIN_URL")
        .env_remove("EDGECARD_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, printed) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let demo = Demo(child);
    let mut text = String::new();
    loop {
        let line = printed
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("the demo did not get ready ({e}); it printed:\n{text}"));
        text.push_str(&line);
        text.push('\n');
        if line.starts_with("Press Ctrl-C") {
            return (demo, text);
        }
    }
}

/// The commands of the printed instructions: indented lines, continuation lines joined.
fn printed_commands(text: &str) -> Vec<String> {
    let block = text.split("Buy a key").nth(1).unwrap().split("Machine-readable").next().unwrap();
    let mut commands = Vec::new();
    let mut pending = String::new();
    for line in block.lines() {
        let Some(command) = line.strip_prefix("  ") else { continue };
        pending.push_str(command.trim_start());
        if pending.ends_with('\\') {
            pending.pop();
            pending.push(' ');
            continue;
        }
        commands.push(std::mem::take(&mut pending));
    }
    commands
}

#[test]
fn every_command_the_demo_prints_works_as_printed() {
    let dir = tempfile::tempdir().unwrap();
    let (demo, text) = start_demo(dir.path());
    let commands = printed_commands(&text);
    assert!(commands.len() >= 10, "{commands:?}");
    let binary = env!("CARGO_BIN_EXE_edgecard");
    let script: String = std::iter::once("set -euo pipefail".to_string())
        .chain(commands.iter().map(|c| c.replace("cargo run --release --", &format!("'{binary}'"))))
        .map(|line| line + "\n")
        .collect();
    let output = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env_remove("EDGECARD_ADMIN_URL")
        .env_remove("EDGECARD_ADMIN_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the printed commands failed:\n{script}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
    assert!(stdout.contains(r#""status":"delivered""#), "the buy example delivers a key:\n{stdout}");
    assert!(stdout.contains("DEMO-"), "and shows it:\n{stdout}");
    assert!(stdout.contains("50 keys granted to ap-1"), "the printed allocation finds keys in the pool:\n{stdout}");
    assert!(!stdout.contains("sold_out"), "the printed load test fits the stock:\n{stdout}");
    drop(demo);
}

/// README's copy of the buy example is the demo's, with the placeholders it names.
#[test]
fn the_readme_shows_the_buy_example_the_demo_prints() {
    let readme = squeeze(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (demo, text) = start_demo(dir.path());
    drop(demo);
    for command in printed_commands(&text).iter().take(7).skip(1) {
        // Ports and paths differ; the commands are the same once the URL is the README's.
        let normalised = squeeze(&regex_like_url(command));
        assert!(readme.contains(&normalised), "README lacks the printed command:\n{normalised}");
    }
}

/// The command with the demo's node URL replaced by README's (`https://127.0.0.1:8441`).
fn regex_like_url(command: &str) -> String {
    let Some(start) = command.find("https://127.0.0.1:") else { return command.to_string() };
    let rest = &command[start + "https://127.0.0.1:".len()..];
    let digits = rest.chars().take_while(char::is_ascii_digit).count();
    format!("{}https://127.0.0.1:8441{}", &command[..start], &rest[digits..])
}

/// Continuation lines joined and runs of spaces made one.
fn squeeze(text: &str) -> String {
    let joined = text.replace("\\\n", " ");
    let mut out = String::with_capacity(joined.len());
    for c in joined.chars() {
        if c == ' ' && out.ends_with(' ') {
            continue;
        }
        out.push(c);
    }
    out
}
