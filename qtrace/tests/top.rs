//! `qtrace top` driven in a real terminal (tmux): the overflowing listener is at the top.
mod common;

use std::{process::Command, thread, time::Duration};

use common::{connect, require_root, sh, Netns, Qtrace};
use socket2::{Domain, Socket, Type};

fn listen(ns: &Netns, port: u16, backlog: i32) -> Socket {
    ns.run(move || {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
            .unwrap();
        s.listen(backlog).unwrap();
        s
    })
}

#[test]
fn the_overflowing_listener_is_on_top() {
    require_root();
    let q = Qtrace::start(&[]);
    let ns = Netns::new();
    // The quiet listener has the lower port: plain key order would list it first.
    let _quiet = listen(&ns, 40001, 128);
    let _busy = listen(&ns, 40002, 1);
    let session = format!("qtrace-top-{}", std::process::id());
    let top = format!(
        "{} top --socket {} --interval 1s",
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
    ns.drop_final_acks(&[40002]);
    let _held = connect(&ns, "127.0.0.1", 40002, 2);
    ns.allow_acks();
    let _fill = connect(&ns, "127.0.0.1", 40002, 2);
    let _ok = connect(&ns, "127.0.0.1", 40001, 1);
    thread::sleep(Duration::from_millis(3500));
    let pane = sh(Command::new("tmux").args(["capture-pane", "-p", "-t", &session]));
    let _ = Command::new("tmux")
        .args(["kill-session", "-t", &session])
        .status();
    q.stop(libc::SIGTERM);
    println!("--- qtrace top, captured from tmux ---\n{pane}");
    let rows: Vec<&str> = pane
        .lines()
        .filter(|l| l.starts_with("127.0.0.1:4000"))
        .collect();
    // Listeners of this namespace only, in the order shown (other namespaces may interleave).
    assert_eq!(rows.len(), 2, "{pane}");
    assert!(
        rows[0].starts_with("127.0.0.1:40002"),
        "the full listener first:\n{pane}"
    );
    assert!(
        rows[0].contains("2/1") && rows[0].contains("200"),
        "accept queue 2/1, 200% full:\n{pane}"
    );
    assert!(pane.contains("q quit, s sort, r reverse"), "{pane}");
}

#[test]
fn once_prints_one_plain_table() {
    require_root();
    let q = Qtrace::start(&[]);
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
    assert!(
        !text.contains('\x1b'),
        "no terminal escapes in --once output"
    );
}
