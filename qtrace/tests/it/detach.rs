//! After qtrace exits — on SIGINT, on SIGTERM, or on a startup error — none of its BPF
//! programs, links or maps remain in the kernel (`bpftool` is the witness).

use std::{
    collections::BTreeSet,
    process::Command,
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use crate::common::{require_root, sh, Qtrace};

/// The tests compare kernel-wide object sets, so they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const KINDS: [&str; 3] = ["prog", "map", "link"];

/// Ids and names of every BPF program, map and link in the kernel.
fn bpf_objects() -> BTreeSet<(&'static str, u64, String)> {
    let mut all = BTreeSet::new();
    for kind in KINDS {
        let json = sh(Command::new("bpftool").args(["-j", kind, "show"]));
        let list: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
        for o in list {
            let name = o["name"].as_str().unwrap_or_default().to_string();
            all.insert((kind, o["id"].as_u64().unwrap(), name));
        }
    }
    all
}

/// The kernel frees programs and links after an RCU grace period: wait for it, bounded.
fn assert_gone(ours: &BTreeSet<(&'static str, u64, String)>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<_> = bpf_objects().intersection(ours).cloned().collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind after qtrace exited: {left:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn stops_cleanly_on(signal: i32) {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = bpf_objects();
    let qtrace = Qtrace::start(&[]);
    let ours: BTreeSet<_> = bpf_objects().difference(&before).cloned().collect();
    for kind in KINDS {
        assert!(
            ours.iter().any(|o| o.0 == kind),
            "no {kind} of qtrace's found while it runs: {ours:?}"
        );
    }
    assert!(
        ours.iter().any(|o| o.0 == "prog" && o.2.starts_with("qt_")),
        "{ours:?}"
    );
    qtrace.stop(signal);
    assert_gone(&ours);
}

#[test]
fn nothing_left_after_sigint() {
    stops_cleanly_on(libc::SIGINT);
}

#[test]
fn nothing_left_after_sigterm() {
    stops_cleanly_on(libc::SIGTERM);
}

/// Without CAP_PERFMON the maps are created but no program loads: qtrace must say what is
/// missing in one line, exit non-zero and leave the maps it made behind it.
#[test]
fn nothing_left_after_startup_error() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = bpf_objects();
    let out = Command::new("setpriv")
        .args([
            "--bounding-set",
            "-perfmon,-sys_admin",
            env!("CARGO_BIN_EXE_qtrace"),
            "run",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    assert!(
        stderr.starts_with("qtrace: error: qtrace lacks CAP_PERFMON"),
        "{stderr}"
    );
    let ours: BTreeSet<_> = bpf_objects().difference(&before).cloned().collect();
    assert_gone(&ours);
}
