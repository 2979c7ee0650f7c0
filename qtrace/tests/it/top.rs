//! `qtrace top` driven in a real terminal (tmux): the overflowing listener is at the top.

use std::{process::Command, time::Duration};

use crate::common::{connect, listener, listener_on, require_root, sh, wait_until, Netns, Qtrace};

/// This namespace's two rows in the order the pane shows them (other namespaces may
/// interleave). The ports lie below the ephemeral range (32768–60999), so no other test's
/// listener on an ephemeral port shares them: top shows no namespace column.
fn rows_of(pane: &str) -> Vec<&str> {
    pane.lines()
        .filter(|l| l.starts_with("127.0.0.1:20001 ") || l.starts_with("127.0.0.1:20002 "))
        .collect()
}

fn capture(session: &str) -> String {
    sh(Command::new("tmux").args(["capture-pane", "-p", "-t", session]))
}

#[test]
fn the_overflowing_listener_is_on_top() {
    require_root();
    let q = Qtrace::start(&[]);
    let ns = Netns::new();
    // Both accept queues end up full (2/1), so only the drops can put the busy one first; the
    // quiet listener has the lower port, so plain key order would list it first.
    let _quiet = listener_on(&ns, "127.0.0.1", 20001, 1);
    let _busy = listener_on(&ns, "127.0.0.1", 20002, 1);
    let session = format!("qtrace-top-{}", std::process::id());
    let top = format!(
        "{} top --socket {} --interval 5s",
        env!("CARGO_BIN_EXE_qtrace"),
        q.events_socket()
    );
    sh(Command::new("tmux").args([
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "200",
        "-y",
        "30",
        &top,
    ]));
    // Two handshakes held back, the accept queue filled, then their ACKs overflow it.
    let before = ns.tcp_ext();
    ns.drop_final_acks(&[20002]);
    let _held = connect(&ns, "127.0.0.1", 20002, 2);
    ns.allow_acks();
    let _fill = connect(&ns, "127.0.0.1", 20002, 2);
    let _quiet_fill = connect(&ns, "127.0.0.1", 20001, 2);
    ns.wait_for(&before, "ListenOverflows", 2, Duration::from_secs(10));
    // The first table that counts the drops.
    let mut pane = capture(&session);
    wait_until(Duration::from_secs(15), || {
        pane = capture(&session);
        rows_of(&pane)
            .first()
            .is_some_and(|r| r.starts_with("127.0.0.1:20002 "))
    });
    // `r` reverses the table at once, not at the next refresh 5 s later.
    sh(Command::new("tmux").args(["send-keys", "-t", &session, "r"]));
    let mut reversed = capture(&session);
    // Well within the 5 s refresh.
    wait_until(Duration::from_secs(2), || {
        reversed = capture(&session);
        reversed.contains("(reversed)")
    });
    // Ctrl-C quits (in raw mode it arrives as a key, not as SIGINT): the session ends with it.
    sh(Command::new("tmux").args(["send-keys", "-t", &session, "C-c"]));
    let quit = wait_until(Duration::from_secs(3), || {
        !Command::new("tmux")
            .args(["has-session", "-t", &session])
            .status()
            .is_ok_and(|s| s.success())
    });
    let after_ctrl_c = if quit {
        String::new()
    } else {
        capture(&session)
    };
    let _ = Command::new("tmux")
        .args(["kill-session", "-t", &session])
        .status();
    q.stop(libc::SIGTERM);
    println!("--- qtrace top, captured from tmux ---\n{pane}\n--- after `r` ---\n{reversed}");
    assert!(quit, "top still runs 3 s after Ctrl-C:\n{after_ctrl_c}");
    let rows = rows_of(&pane);
    assert_eq!(rows.len(), 2, "{pane}");
    assert!(
        rows[0].starts_with("127.0.0.1:20002 "),
        "the listener with drops first:\n{pane}"
    );
    for row in &rows {
        assert!(
            row.contains(" 2/1 ") && row.contains("200"),
            "both accept queues 2/1, 200% full:\n{pane}"
        );
    }
    assert!(pane.contains("q quit, s sort, r reverse"), "{pane}");
    let rows = rows_of(&reversed);
    assert!(
        reversed.contains("(reversed)")
            && rows
                .first()
                .is_some_and(|r| r.starts_with("127.0.0.1:20001 ")),
        "reversed at once:\n{reversed}"
    );
}

/// A zero interval would make every rate a division by zero (NaN): it is refused up front.
#[test]
fn a_zero_interval_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_qtrace"))
        .args(["top", "--once", "--interval", "0s"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("must be more than 0"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("NaN"));
}

#[test]
fn once_prints_one_plain_table() {
    require_root();
    let q = Qtrace::start(&[]);
    let ns = Netns::new();
    let (_server, port) = listener(&ns, "127.0.0.1", 2);
    let _clients = connect(&ns, "127.0.0.1", port, 3); // the kernel holds 3 with backlog 2
    let out = Command::new(env!("CARGO_BIN_EXE_qtrace"))
        .args([
            "top",
            "--once",
            "--interval",
            "200ms",
            "--socket",
            &q.events_socket(),
        ])
        .output()
        .unwrap();
    q.stop(libc::SIGTERM);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("LISTENER "), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with(&format!("127.0.0.1:{port} ")))
        .unwrap_or_else(|| panic!("no row for port {port}:\n{text}"));
    assert!(
        row.contains(" 3/2 "),
        "accept queue 3/2 as the kernel holds it: {row}"
    );
    assert!(
        !text.contains('\x1b'),
        "no terminal escapes in --once output"
    );
}
