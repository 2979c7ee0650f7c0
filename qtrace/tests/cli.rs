//! Bad input and missing privileges: one line saying what is wrong and what to do, a non-zero
//! exit, and nothing left attached.
mod common;

use std::process::{Command, Output};

use common::require_root;

fn qtrace(prefix: &[&str], args: &[&str]) -> Output {
    let (cmd, rest) = match prefix.split_first() {
        Some((cmd, rest)) => (*cmd, [rest, &[env!("CARGO_BIN_EXE_qtrace")]].concat()),
        None => (env!("CARGO_BIN_EXE_qtrace"), vec![]),
    };
    Command::new(cmd).args(rest).args(args).output().unwrap()
}

/// The error line, after checking there is exactly one and the exit code.
fn one_line_error(out: &Output, code: i32) -> String {
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
    for (args, what) in [
        (&["run", "--ringbuf-kib", "3"][..], "--ringbuf-kib"),
        (&["run", "--event-rate", "0"][..], "--event-rate"),
        (&["run", "--attach", "uprobe"][..], "--attach"),
        (&["run", "--interval", "soon"][..], "--interval"),
    ] {
        let out = qtrace(&[], args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.lines().next().unwrap().contains(what),
            "{args:?}: {stderr}"
        );
    }
}
