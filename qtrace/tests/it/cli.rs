//! Bad input and missing privileges: one line saying what is wrong and what to do, a non-zero
//! exit, and nothing left attached.

use std::process::{Command, Output};

use crate::common::{require_root, TempDir};

pub fn qtrace(prefix: &[&str], args: &[&str]) -> Output {
    let (cmd, rest) = match prefix.split_first() {
        Some((cmd, rest)) => (*cmd, [rest, &[env!("CARGO_BIN_EXE_qtrace")]].concat()),
        None => (env!("CARGO_BIN_EXE_qtrace"), vec![]),
    };
    Command::new(cmd).args(rest).args(args).output().unwrap()
}

/// The error line, after checking there is exactly one and the exit code.
pub fn one_line_error(out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line expected: {stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing on stdout: {:?}", out.stdout);
    stderr
}

#[test]
fn unprivileged_user_is_told_which_capabilities() {
    require_root();
    let out = qtrace(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        &["run"],
    );
    let err = one_line_error(&out, 1);
    assert!(
        err.starts_with("qtrace: error: qtrace lacks CAP_BPF and CAP_PERFMON: run it as root"),
        "{err}"
    );
}

#[test]
fn missing_btf_names_the_file_and_the_remedy() {
    let out = qtrace(&[], &["run", "--btf", "/nonexistent/vmlinux"]);
    let err = one_line_error(&out, 1);
    assert!(
        err.contains("kernel BTF not readable at /nonexistent/vmlinux"),
        "{err}"
    );
    assert!(err.contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
}

#[test]
fn a_file_that_is_not_btf_is_rejected() {
    let out = qtrace(&[], &["probes", "--btf", "/proc/self/cmdline"]);
    let err = one_line_error(&out, 1);
    assert!(
        err.contains("kernel BTF not readable at /proc/self/cmdline"),
        "{err}"
    );
}

#[test]
fn bad_option_values_name_the_option() {
    // Values of the wrong type: clap's usage error (exit 2) names the flag.
    for (args, what) in [
        (&["run", "--attach", "uprobe"][..], "--attach"),
        (&["run", "--interval", "soon"][..], "--interval"),
        (&["run", "--event-rate", "many"][..], "--event-rate"),
    ] {
        let out = qtrace(&[], args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.lines().next().unwrap().contains(what),
            "{args:?}: {stderr}"
        );
    }
    // Values out of range: one line naming the setting, its flag and the rule.
    for (args, what) in [
        (
            &["run", "--ringbuf-kib", "3"][..],
            "invalid ringbuf_kib (--ringbuf-kib): 3: must be a power of two",
        ),
        (
            &["run", "--event-rate", "0"][..],
            "invalid event_rate (--event-rate): 0",
        ),
        (
            &["run", "--client-slots", "1000"][..],
            "invalid client_slots (--client-slots): 1000: must be a power of two",
        ),
        (
            &["run", "--web.listen-address", "localhost"][..],
            "invalid web_listen_address (--web.listen-address)",
        ),
    ] {
        let err = one_line_error(&qtrace(&[], args), 1);
        assert!(err.contains(what), "{args:?}: {err}");
    }
}

/// A config file holding `text`, removed (with its directory) on drop.
struct ConfigFile {
    _dir: TempDir,
    path: String,
}

impl ConfigFile {
    fn arg(&self) -> &str {
        &self.path
    }
}

fn config_file(text: &str) -> ConfigFile {
    let dir = TempDir::new();
    let path = dir.file("qtrace.toml", text).to_str().unwrap().to_string();
    ConfigFile { _dir: dir, path }
}

#[test]
fn config_file_errors_name_the_file_and_the_key() {
    let unknown = config_file("event_rate = 10\nmax_listner_series = 5\n");
    let err = one_line_error(&qtrace(&[], &["run", "--config", unknown.arg()]), 1);
    assert!(
        err.contains(unknown.arg()) && err.contains("unknown key `max_listner_series`"),
        "{err}"
    );
    let bad = config_file("event_rate = \"fast\"\n");
    let err = one_line_error(&qtrace(&[], &["run", "--config", bad.arg()]), 1);
    assert!(
        err.contains(bad.arg()) && err.contains("event_rate"),
        "{err}"
    );
    let range = config_file("ringbuf_kib = 5\n");
    let err = one_line_error(&qtrace(&[], &["run", "--config", range.arg()]), 1);
    assert!(err.contains("invalid ringbuf_kib"), "{err}");
    let err = one_line_error(
        &qtrace(&[], &["run", "--config", "/nonexistent/qtrace.toml"]),
        1,
    );
    assert!(
        err.contains("read config file /nonexistent/qtrace.toml"),
        "{err}"
    );
}

/// The other commands read --config as `run` does: a missing or bad file is the same one-line
/// error naming it, and what the file says is used.
#[test]
fn every_command_honours_its_config_file() {
    let commands: [&[&str]; 6] = [
        &["events"],
        &["events", "--standalone"],
        &["top", "--once"],
        &["top", "--once", "--standalone"],
        &["doctor"],
        &["probes"],
    ];
    let range = config_file("ringbuf_kib = 5\n");
    let unknown = config_file("max_listner_series = 5\n");
    for cmd in commands {
        let run = |file: &str| qtrace(&[], &[cmd, &["--config", file]].concat());
        let err = one_line_error(&run("/nonexistent/qtrace.toml"), 1);
        assert!(
            err.contains("read config file /nonexistent/qtrace.toml"),
            "{cmd:?}: {err}"
        );
        let err = one_line_error(&run(range.arg()), 1);
        assert!(
            err.contains(&format!("config file {}: invalid ringbuf_kib", range.arg())),
            "{cmd:?}: {err}"
        );
        let err = one_line_error(&run(unknown.arg()), 1);
        assert!(
            err.contains(unknown.arg()) && err.contains("unknown key `max_listner_series`"),
            "{cmd:?}: {err}"
        );
    }
    // The daemon's socket, and the BTF of the probes a command attaches itself.
    let elsewhere = config_file(
        "events_socket = \"/nonexistent/config.sock\"\nbtf = \"/nonexistent/config-vmlinux\"\n",
    );
    let no_daemon = "no qtrace daemon at /nonexistent/config.sock";
    let no_btf = "kernel BTF not readable at /nonexistent/config-vmlinux";
    for (cmd, what) in commands[..4]
        .iter()
        .zip([no_daemon, no_btf, no_daemon, no_btf])
    {
        let out = qtrace(&[], &[*cmd, &["--config", elsewhere.arg()]].concat());
        let err = one_line_error(&out, 1);
        assert!(err.contains(what), "{cmd:?}: {err}");
    }
    let out = qtrace(&[], &["probes", "--config", elsewhere.arg()]);
    assert!(one_line_error(&out, 1).contains(no_btf));
    // doctor goes on without a daemon, and says why its own probes could not attach.
    let out = qtrace(&[], &["doctor", "--json", "--config", elsewhere.arg()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["probes"]["error"]
            .as_str()
            .is_some_and(|e| e.contains(no_btf)),
        "{report}"
    );
}

#[test]
fn a_taken_listen_address_fails_before_attaching() {
    require_root();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = one_line_error(&qtrace(&[], &["run", "--web.listen-address", &addr]), 1);
    assert!(
        err.contains(&format!("listen on {addr}")) && err.contains("in use"),
        "{err}"
    );
}

/// `--version` says what the binary is, as node_exporter's does: version, git revision, build
/// date, compiler.
#[test]
fn version_names_revision_build_date_and_compiler() {
    let out = qtrace(&[], &["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("qtrace {} (revision: ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    let revision = text
        .split("revision: ")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    assert!(
        revision.len() == 12 && revision.bytes().all(|b| b.is_ascii_hexdigit()),
        "a git revision: {text}"
    );
    assert!(text.contains("build date:       20"), "{text}");
    assert!(text.contains("rustc version:    rustc 1."), "{text}");
}

/// A probe name `--probes` does not know is refused before anything attaches.
#[test]
fn an_unknown_probe_is_refused_in_one_line() {
    require_root();
    let out = qtrace(&[], &["probes", "--probes=-sin"]);
    let err = one_line_error(&out, 1);
    assert!(err.contains("unknown probe \"sin\""), "{err}");
    assert!(err.contains("syn, ack, synack, accept"), "{err}");
    let out = qtrace(&[], &["probes", "--probes=syn"]);
    let err = one_line_error(&out, 1);
    assert!(err.contains("write -NAME"), "{err}");
}
