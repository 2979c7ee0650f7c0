//! The deployment files stay valid: the systemd unit, the Prometheus rules (and their unit
//! tests), the scrape config, the Grafana dashboard and the Kubernetes DaemonSet refer only to
//! metrics qtrace exports.
use std::{collections::BTreeSet, path::PathBuf, process::Command};

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (`cargo xtask setup` installs it)"));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Every metric family qtrace exports (see qtrace/src/metrics.rs), as Prometheus names.
const EXPORTED: [&str; 19] = [
    "qtrace_listen_drops_total",
    "qtrace_synack_retransmits_total",
    "qtrace_syncookies_sent_total",
    "qtrace_overflow_resets_total",
    "qtrace_accepted_connections_total",
    "qtrace_syns_queued_total",
    "qtrace_accept_queue_wait_seconds",
    "qtrace_accept_queue_length",
    "qtrace_accept_queue_limit",
    "qtrace_syn_queue_length",
    "qtrace_syn_queue_limit",
    "qtrace_listener_info",
    "qtrace_events_lost_total",
    "qtrace_kernel_map_full_total",
    "qtrace_kernel_read_errors_total",
    "qtrace_listener_series_overflow",
    "qtrace_netns_unreadable",
    "qtrace_probe_info",
    "qtrace_build_info",
];

/// `qtrace_*` names used in a text, histogram suffixes folded into their family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("qtrace_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| f.ends_with("_seconds")))
            .unwrap_or(&name);
        names.insert(family.to_string());
    }
    names
}

fn assert_known(file: &str, names: BTreeSet<String>) {
    let unknown: Vec<_> = names
        .iter()
        .filter(|n| !EXPORTED.contains(&n.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "{file} uses metrics qtrace does not export: {unknown:?}"
    );
}

#[test]
fn prometheus_rules_pass_their_unit_tests() {
    ok(Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(deploy("prometheus/alerts.yml")));
    ok(Command::new("promtool")
        .arg("test")
        .arg("rules")
        .arg(deploy("prometheus/alerts_test.yml")));
    ok(Command::new("promtool")
        .arg("check")
        .arg("config")
        .arg(deploy("prometheus/prometheus.yml")));
    assert_known(
        "alerts.yml",
        metric_names(&std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap()),
    );
}

#[test]
fn grafana_dashboard_queries_exported_metrics() {
    let text = std::fs::read_to_string(deploy("grafana/qtrace.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dash["panels"].as_array().unwrap();
    let exprs: Vec<&str> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .map(|t| t["expr"].as_str().unwrap())
        .collect();
    assert!(exprs.len() >= 8, "{exprs:?}");
    let used = metric_names(&exprs.join("\n"));
    for needed in [
        "qtrace_listen_drops_total",
        "qtrace_accept_queue_wait_seconds",
        "qtrace_listener_info",
    ] {
        assert!(used.contains(needed), "the dashboard lacks {needed}");
    }
    assert_known("qtrace.json", metric_names(&text));
}

#[test]
fn systemd_unit_is_valid_and_hardened() {
    // Verify a copy whose ExecStart names the binary just built (the installed path may be absent).
    let unit = std::fs::read_to_string(deploy("systemd/qtrace.service")).unwrap();
    let dir = std::env::temp_dir().join(format!("qtrace-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("qtrace.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/qtrace", env!("CARGO_BIN_EXE_qtrace")),
    )
    .unwrap();
    let verify = ok(Command::new("systemd-analyze").arg("verify").arg(&copy));
    assert!(verify.trim().is_empty(), "systemd-analyze verify: {verify}");
    let security = ok(Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&copy));
    let _ = std::fs::remove_dir_all(&dir);
    let level: f64 = security
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for qtrace.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .expect("an exposure level");
    assert!(
        level <= 3.0,
        "exposure {level} (deploy/README.md records 2.9)"
    );
    for needed in [
        "CapabilityBoundingSet=CAP_BPF CAP_PERFMON",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(unit.contains(needed), "{needed}");
    }
}

#[test]
fn kubernetes_daemonset_parses_with_least_capabilities() {
    let check = "import sys, yaml; d = yaml.safe_load(open(sys.argv[1])); \
                 c = d['spec']['template']['spec']['containers'][0]['securityContext']['capabilities']; \
                 assert d['kind'] == 'DaemonSet' and c['drop'] == ['ALL'] and 'SYS_ADMIN' not in c['add'], c; \
                 print(' '.join(c['add']))";
    let caps = ok(Command::new("python3")
        .args(["-c", check])
        .arg(deploy("kubernetes/daemonset.yaml")));
    assert_eq!(caps.trim(), "BPF PERFMON SYS_PTRACE DAC_READ_SEARCH");
}

#[test]
fn example_config_is_accepted() {
    // Every key of the example, uncommented, must be one qtrace knows.
    let example = std::fs::read_to_string(deploy("qtrace.toml")).unwrap();
    let config: String = example
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| l.contains(" = ") && !l.contains(':') || l.starts_with("web_listen_address"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(config.lines().count() >= 12, "{config}");
    let path = std::env::temp_dir().join(format!("qtrace-example-{}.toml", std::process::id()));
    std::fs::write(&path, &config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qtrace"))
        .args(["probes", "--config"])
        .arg(&path)
        .args(["--btf", "/nonexistent"])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let err = String::from_utf8_lossy(&out.stderr);
    // It gets as far as loading BTF (given a bad path on purpose): the file itself was fine.
    assert!(
        err.contains("kernel BTF not readable at /nonexistent"),
        "{err}\n{config}"
    );
}
