//! `--web.config.file` (exporter-toolkit format): TLS and basic auth in front of /metrics and
//! /api/listeners, checked with a real TLS client (curl) against the real daemon, with a
//! self-signed certificate made by openssl. /healthz stays open (README, "Metrics").

use std::{
    io::Read,
    net::TcpStream,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    cli::{one_line_error, qtrace},
    common::{require_root, sh, Qtrace, TempDir},
};

/// The bcrypt hash of `password`, at a low cost to keep the debug build's checks quick.
pub fn bcrypt_hash(password: &str) -> String {
    bcrypt::hash_with_salt(password, 5, [42u8; 16])
        .unwrap()
        .to_string()
}

/// A self-signed certificate for 127.0.0.1 and its key, as `cert.pem` and `key.pem` in `dir`.
pub fn self_signed(dir: &Path) {
    sh(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=qtrace-test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem")));
}

/// `curl` over HTTPS with the test's CA: the status and the whole response (head and body);
/// status 0 when curl could not get a response.
fn curl(dir: &Path, addr: &str, path: &str, user: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-i", "--max-time", "10", "--cacert"])
        .arg(dir.join("cert.pem"));
    if let Some(user) = user {
        cmd.args(["-u", user]);
    }
    let out = cmd.arg(format!("https://{addr}{path}")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[test]
fn tls_and_basic_auth_guard_the_endpoints() {
    require_root();
    let dir = TempDir::new();
    self_signed(&dir);
    // Relative paths: relative to the web config file's directory, as exporter-toolkit reads
    // them (qtrace's working directory is elsewhere).
    let web = dir.file(
        "web.yml",
        &format!(
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  \
             min_version: TLS12\nbasic_auth_users:\n  prometheus: {}\n",
            bcrypt_hash("right")
        ),
    );
    let qtrace = Qtrace::start(&["--web.config.file", web.to_str().unwrap()]);
    let addr = qtrace.web();
    let d: &Path = &dir;

    let (status, text) = curl(d, &addr, "/metrics", Some("prometheus:right"));
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("# TYPE qtrace_build_info"), "{text}");
    for user in [Some("prometheus:wrong"), Some("nobody:right"), None] {
        let (status, text) = curl(d, &addr, "/metrics", user);
        assert_eq!(status, 401, "{user:?}: {text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("www-authenticate: basic realm=\"qtrace\""),
            "{text}"
        );
    }
    assert_eq!(curl(d, &addr, "/api/listeners", None).0, 401);
    let (status, text) = curl(d, &addr, "/api/listeners", Some("prometheus:right"));
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"listeners\""), "{text}");
    // The liveness probe's endpoint needs no credentials.
    assert_eq!(curl(d, &addr, "/healthz", None).0, 200);

    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = qtrace_testkit::scrape::http_get(&addr, "/metrics", None);
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");

    // A client that connects and never sends its ClientHello is cut like a slow header.
    let mut idle = TcpStream::connect(&addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let t = Instant::now();
    let n = idle.read(&mut [0u8; 64]).unwrap_or(0);
    assert_eq!(n, 0, "the server sent bytes to a silent client");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "a silent client held its connection {:?}",
        t.elapsed()
    );

    // SIGHUP re-reads the web config file: a new password works, the old one no longer does.
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n\
             basic_auth_users:\n  prometheus: {}\n",
            bcrypt_hash("new")
        ),
    )
    .unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(qtrace.pid(), libc::SIGHUP) };
    assert!(
        qtrace.logged("reloaded the web config file", Duration::from_secs(10)),
        "{}",
        qtrace.log()
    );
    assert_eq!(curl(d, &addr, "/metrics", Some("prometheus:right")).0, 401);
    assert_eq!(curl(d, &addr, "/metrics", Some("prometheus:new")).0, 200);
    qtrace.stop(libc::SIGTERM);
}

/// `--web.config.file` (and its file key): a missing or bad file, an unknown key, a hash that
/// is not bcrypt, an unreadable certificate: one line naming the file and the key, refused
/// before anything is attached. Here rather than in `cli::` because it needs `openssl`, which
/// the kernel matrix's guests (where `cli::` runs too) do not carry.
#[test]
fn bad_web_config_files_name_the_file_and_the_key() {
    let dir = TempDir::new();
    self_signed(&dir);
    let hash = bcrypt_hash("pw");
    let missing = dir.join("missing.yml");
    let missing = missing.to_str().unwrap();
    let err = one_line_error(&qtrace(&[], &["run", "--web.config.file", missing]), 1);
    assert!(err.contains(&format!("web config file {missing}")), "{err}");
    for (name, text, what) in [
        (
            "unknown.yml",
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  client_ca_file: ca.pem\n"
                .to_string(),
            "unknown field `client_ca_file`",
        ),
        (
            "plain.yml",
            "basic_auth_users:\n  alice: secret\n".to_string(),
            "basic_auth_users.alice: not a bcrypt hash",
        ),
        (
            "nocert.yml",
            format!("tls_server_config:\n  cert_file: nope.pem\n  key_file: key.pem\nbasic_auth_users:\n  alice: {hash}\n"),
            "tls_server_config.cert_file: ",
        ),
        (
            "notpem.yml",
            "tls_server_config:\n  cert_file: unknown.yml\n  key_file: key.pem\n".to_string(),
            "tls_server_config.cert_file: ",
        ),
        (
            "version.yml",
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  min_version: TLS10\n"
                .to_string(),
            "tls_server_config.min_version: TLS10",
        ),
        ("yaml.yml", "tls_server_config: [\n".to_string(), "yaml.yml: "),
    ] {
        let path = dir.file(name, &text);
        let path = path.to_str().unwrap();
        let err = one_line_error(&qtrace(&[], &["run", "--web.config.file", path]), 1);
        assert!(
            err.contains(&format!("web config file {path}: ")) && err.contains(what),
            "{name}: {err}"
        );
        assert!(!err.contains("pw"), "{err}");
    }
    // The same from the config file's key.
    let web = dir.join("plain.yml");
    let config = dir.file(
        "qtrace.toml",
        &format!("web_config_file = {:?}\n", web.to_str().unwrap()),
    );
    let err = one_line_error(
        &qtrace(&[], &["run", "--config", config.to_str().unwrap()]),
        1,
    );
    assert!(err.contains("basic_auth_users.alice"), "{err}");
}
