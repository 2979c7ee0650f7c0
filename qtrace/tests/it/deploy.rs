//! The service files under deploy/: the systemd unit, the example config, the Prometheus alerts
//! (checked and unit-tested with promtool), the example Prometheus config, the Grafana dashboard
//! (its PromQL compiled by promtool and its metric names checked against what qtrace exports)
//! and the Kubernetes DaemonSet. No kernel programs are loaded here.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use crate::common::{TempDir, EXPORTED_METRICS};
use serde_json::Value;

/// The capabilities the unit and the DaemonSet grant, and no others.
const CAPABILITIES: [&str; 4] = ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"];

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn read(path: &str) -> String {
    let p = deploy(path);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn have(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(command).is_file()))
}

/// A command of a package `cargo xtask setup` installs; missing, the test fails and says so.
fn installed(command: &str, package: &str) -> Command {
    assert!(
        have(command),
        "{command} (Debian package {package}) is missing: run `cargo xtask setup`"
    );
    Command::new(command)
}

fn promtool() -> Command {
    installed("promtool", "prometheus")
}

/// Runs `cmd` to completion (at most two minutes); returns whether it succeeded and its stdout
/// and stderr together.
fn output(cmd: &mut Command) -> (bool, String) {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id() as i32;
    // wait_with_output reads both pipes while it waits: a child writing more than a pipe holds
    // (64 KiB) is never left blocked on one nobody reads.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let out = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            // SAFETY: our child, not reaped until wait_with_output returns.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let out = rx.recv().unwrap().expect("wait");
            panic!(
                "{cmd:?} still running after 2 minutes: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn succeeds(cmd: &mut Command) -> String {
    let (ok, text) = output(cmd);
    assert!(ok, "{cmd:?} failed:\n{text}");
    text
}

/// The `qtrace_*` metric names in a PromQL expression, histogram (`*_seconds`) suffixes
/// stripped.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("qtrace_") {
        let word_start = at == 0 || {
            let c = rest.as_bytes()[at - 1];
            !(c.is_ascii_alphanumeric() || c == b'_')
        };
        let len = rest[at..]
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(rest.len() - at);
        let name = &rest[at..at + len];
        if word_start {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| b.ends_with("_seconds")))
                .unwrap_or(name);
            names.insert(base.to_string());
        }
        rest = &rest[at + len..];
    }
    names
}

fn assert_exported(what: &str, expr: &str) {
    let names = metric_names(expr);
    for name in &names {
        assert!(
            EXPORTED_METRICS.contains(&name.as_str()),
            "{what}: `{name}` is not a metric qtrace exports, in: {expr}"
        );
    }
}

// --- Prometheus ---------------------------------------------------------------------------------

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let out = succeeds(
        promtool()
            .arg("check")
            .arg("rules")
            .arg(deploy("prometheus/alerts.yml")),
    );
    println!("{out}");
    // alerts_test.yml names alerts.yml relative to itself.
    let out = succeeds(promtool().current_dir(deploy("prometheus")).args([
        "test",
        "rules",
        "alerts_test.yml",
    ]));
    println!("{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

/// The client side's families (README "The client side"): per namespace, process or
/// destination rather than per listener.
const CLIENT_SIDE: [&str; 5] = [
    "qtrace_ephemeral_ports_in_use",
    "qtrace_ephemeral_ports_available",
    "qtrace_connect_failures_total",
    "qtrace_close_wait_connections",
    "qtrace_close_wait_oldest_seconds",
];

#[test]
fn every_alert_is_unit_tested_firing_and_silent_and_names_its_listener() {
    let rules = read("prometheus/alerts.yml");
    let tests = read("prometheus/alerts_test.yml");
    let alerts: Vec<&str> = rules.split("- alert: ").skip(1).collect();
    assert!(alerts.len() >= 6, "too few alerts in alerts.yml");
    for block in alerts {
        let name = block.split_whitespace().next().unwrap();
        let expr = block
            .lines()
            .find_map(|l| l.trim().strip_prefix("expr: "))
            .unwrap_or_else(|| panic!("{name}: no one-line expr"));
        assert_exported(name, expr);
        for key in ["severity: ", "summary: ", "description: "] {
            assert!(block.contains(key), "{name} has no {key}");
        }
        let metrics = metric_names(expr);
        // The client side's series name a namespace and a process or destination, not a
        // listener (CLOSE_WAIT owners have no address).
        let client_side =
            !metrics.is_empty() && metrics.iter().all(|m| CLIENT_SIDE.contains(&m.as_str()));
        if client_side {
            assert!(
                block.contains("$labels.netns"),
                "{name}'s annotations lack the netns"
            );
        } else if metrics.iter().any(|m| {
            !matches!(
                m.as_str(),
                "qtrace_probe_info"
                    | "qtrace_events_lost_total"
                    | "qtrace_build_info"
                    | "qtrace_kernel_map_full_total"
                    | "qtrace_bpf_program_recursion_misses_total"
            )
        }) {
            for label in ["$labels.netns", "$labels.addr", "$labels.port"] {
                assert!(block.contains(label), "{name}'s annotations lack {label}");
            }
        }
        // Each alert is evaluated at least once firing and once with nothing firing.
        let cases: Vec<&str> = tests
            .split("- eval_time: ")
            .skip(1)
            .filter(|case| case.contains(&format!("alertname: {name}\n")))
            .collect();
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "{name}: no test case where it stays silent"
        );
        assert!(
            cases.iter().any(|c| c.contains("exp_labels:")),
            "{name}: no test case where it fires"
        );
    }
}

#[test]
fn prometheus_example_config_is_valid() {
    let out = succeeds(
        promtool()
            .arg("check")
            .arg("config")
            .arg(deploy("prometheus/prometheus.yml")),
    );
    println!("{out}");
    // qtrace's default address: loopback only.
    assert!(read("prometheus/prometheus.yml").contains("\"127.0.0.1:9860\""));
}

// --- Grafana ------------------------------------------------------------------------------------

/// Grafana's variables replaced by values that make each query plain PromQL.
fn without_variables(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 1..];
        let (name, after) = match tail.strip_prefix('{') {
            Some(braced) => {
                let end = braced.find('}').expect("closing brace of ${...}");
                (&braced[..end], &braced[end + 1..])
            }
            None => {
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                (&tail[..end], &tail[end..])
            }
        };
        out.push_str(match name {
            "__rate_interval" | "__interval" | "__range" => "5m",
            _ => ".*",
        });
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Every string under a key named `key`, anywhere in `v`.
fn strings_under<'a>(v: &'a Value, key: &str, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                match child {
                    Value::String(s) if k == key => out.push(s),
                    _ => strings_under(child, key, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| strings_under(i, key, out)),
        _ => {}
    }
}

#[test]
fn grafana_dashboard_parses_and_queries_only_exported_metrics() {
    let text = read("grafana/qtrace.json");
    let dash: Value = serde_json::from_str(&text).expect("deploy/grafana/qtrace.json is not JSON");
    assert!(dash["schemaVersion"].as_u64().unwrap_or(0) >= 36);

    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for var in ["DS_PROMETHEUS", "instance", "netns", "port"] {
        assert!(vars.contains(&var), "no template variable {var}: {vars:?}");
    }

    let panels = dash["panels"].as_array().expect("panels");
    let mut titles = Vec::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().expect("panel title");
        titles.push(title);
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {title}: data source"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
            assert!(
                !metric_names(t["expr"].as_str().expect("expr")).is_empty(),
                "panel {title} queries no qtrace metric"
            );
        }
    }
    for kind in ["timeseries", "heatmap", "table"] {
        assert!(panels.iter().any(|p| p["type"] == kind), "no {kind} panel");
    }
    for wanted in [
        "Drops by listener and reason",
        "Accept queue fill",
        "Accept queue wait",
        "SYN-ACK retransmits",
        "Syncookies sent",
        "Overflow resets",
        "Listener owners",
        "Probe tiers",
    ] {
        assert!(titles.contains(&wanted), "no panel {wanted:?}: {titles:?}");
    }

    // Every query: panel targets, and the variables' label_values(selector, label).
    let mut exprs = Vec::new();
    strings_under(&dash, "expr", &mut exprs);
    let mut queries = Vec::new();
    strings_under(&dash["templating"], "definition", &mut queries);
    for q in queries {
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query is not label_values(...): {q}"));
        exprs.push(&inner[..inner.rfind(',').expect("label_values(selector, label)")]);
    }
    assert!(exprs.len() >= 10, "too few queries: {exprs:?}");
    let mut used = BTreeSet::new();
    for expr in &exprs {
        assert_exported("grafana/qtrace.json", expr);
        used.extend(metric_names(expr));
    }
    for needed in [
        "qtrace_listen_drops_total",
        "qtrace_accept_queue_length",
        "qtrace_accept_queue_limit",
        "qtrace_accept_queue_wait_seconds",
        "qtrace_synack_retransmits_total",
        "qtrace_listener_info",
        "qtrace_probe_info",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard never queries {needed}"
        );
    }

    // And every query is valid PromQL: promtool compiles them as recording rules.
    let dir = TempDir::new();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let expr = serde_json::to_string(&without_variables(expr)).unwrap();
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {expr}\n"
        ));
    }
    let file = dir.join("dashboard-queries.yml");
    fs::write(&file, rules).unwrap();
    let out = succeeds(promtool().arg("check").arg("rules").arg(&file));
    println!("dashboard queries: {out}");
}

// --- Kubernetes ---------------------------------------------------------------------------------

const DAEMONSET_CHECK: &str = r#"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
ds = [d for d in docs if d.get("kind") == "DaemonSet"]
assert len(ds) == 1, "one DaemonSet"
ds = ds[0]
assert ds["apiVersion"] == "apps/v1"
assert "namespace" not in ds["metadata"], "namespace-agnostic"
spec = ds["spec"]["template"]["spec"]
assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
assert spec["hostNetwork"] is True and spec["hostPID"] is True
(c,) = spec["containers"]
sc = c["securityContext"]
assert sorted(sc["capabilities"]["add"]) == sorted(sys.argv[2].split(",")), sc
assert sc["capabilities"]["drop"] == ["ALL"]
assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
assert sc.get("privileged", False) is False
assert c["args"][0] == "run"
# The node's own address (hostNetwork: the pod's address), where Prometheus scrapes it;
# qtrace's default is loopback only.
assert "--web.listen-address=$(NODE_IP):9860" in c["args"], c["args"]
env = {e["name"]: e for e in c["env"]}
assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP", env
assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
assert c["resources"]["requests"] and c["resources"]["limits"]
ann = ds["spec"]["template"]["metadata"]["annotations"]
assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "9860"
mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
vols = {v["name"]: v for v in spec["volumes"]}
for path, ro in [("/sys/kernel/btf", True), ("/sys/kernel/tracing", True),
                 ("/sys/fs/cgroup", True), ("/run/qtrace", False),
                 ("/run/containerd", True), ("/run/netns", True)]:
    m = mounts[path]
    assert m.get("readOnly", False) is ro, m
    assert vols[m["name"]]["hostPath"]["path"] == path
print("daemonset: ok")
"#;

#[test]
fn kubernetes_daemonset_is_well_formed() {
    let text = read("kubernetes/daemonset.yaml");
    assert!(!text.contains('\t'), "tabs in YAML");
    for needle in [
        "kind: DaemonSet",
        "hostNetwork: true",
        "hostPID: true",
        "readOnlyRootFilesystem: true",
        "drop: [ALL]",
        "path: /healthz",
        "mountPath: /sys/kernel/btf",
        "mountPath: /sys/kernel/tracing",
        "mountPath: /sys/fs/cgroup",
        "mountPath: /run/qtrace",
        "mountPath: /run/containerd",
        "mountPath: /run/netns",
        "prometheus.io/scrape",
        "--web.listen-address=$(NODE_IP):9860",
        "fieldPath: status.hostIP",
    ] {
        assert!(text.contains(needle), "daemonset.yaml lacks {needle:?}");
    }
    assert!(
        text.contains(&format!("add: [{}]", CAPABILITIES.join(", "))),
        "daemonset.yaml must add exactly {CAPABILITIES:?}"
    );
    let python_has_yaml = have("python3")
        && Command::new("python3")
            .args(["-c", "import yaml"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !python_has_yaml {
        println!("note: python3 with PyYAML not found; daemonset.yaml checked by text only");
        return;
    }
    let out = succeeds(
        Command::new("python3")
            .args(["-c", DAEMONSET_CHECK])
            .arg(deploy("kubernetes/daemonset.yaml"))
            .arg(CAPABILITIES.join(",")),
    );
    println!("{out}");
}

// --- systemd ------------------------------------------------------------------------------------

fn directives<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn systemd_unit_is_hardened() {
    let unit = read("systemd/qtrace.service");
    let caps: Vec<String> = CAPABILITIES.iter().map(|c| format!("CAP_{c}")).collect();
    let caps = caps.join(" ");
    assert_eq!(directives(&unit, "CapabilityBoundingSet"), [caps.as_str()]);
    assert_eq!(directives(&unit, "AmbientCapabilities"), [caps.as_str()]);
    // Root only because its capabilities are bounded to those four.
    assert_eq!(directives(&unit, "User"), ["root"]);
    assert_eq!(
        directives(&unit, "ExecStart"),
        ["/usr/local/bin/qtrace run --config /etc/qtrace/qtrace.toml"]
    );
    for setting in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictNamespaces=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "LockPersonality=yes",
        "MemoryDenyWriteExecute=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service bpf perf_event_open",
        "RuntimeDirectory=qtrace",
        "Restart=on-failure",
    ] {
        assert!(
            unit.lines().any(|l| l == setting),
            "qtrace.service lacks {setting}"
        );
    }
    for bound in ["MemoryMax", "TasksMax"] {
        assert_eq!(directives(&unit, bound).len(), 1, "no {bound}");
    }
    // Listener attribution reads other processes' /proc entries.
    for hiding in [
        "ProtectProc=invisible",
        "ProcSubset=pid",
        "PrivateUsers=yes",
    ] {
        assert!(!unit.lines().any(|l| l == hiding), "{hiding} breaks qtrace");
    }

    let netns = read("systemd/other-netns.conf");
    assert_eq!(
        directives(&netns, "CapabilityBoundingSet"),
        ["CAP_SYS_ADMIN"]
    );
    assert_eq!(directives(&netns, "AmbientCapabilities"), ["CAP_SYS_ADMIN"]);
    assert_eq!(directives(&netns, "RestrictNamespaces"), ["", "net"]);
    let user = read("systemd/dedicated-user.conf");
    assert_eq!(directives(&user, "User"), ["qtrace"]);
    assert_eq!(directives(&user, "Group"), ["qtrace"]);
}

/// The drop-ins, in the order the README's exposure table lists their combinations.
const DROPIN_COMBINATIONS: [&[&str]; 4] = [
    &[],
    &["dedicated-user.conf"],
    &["other-netns.conf"],
    &["dedicated-user.conf", "other-netns.conf"],
];

/// The unit with `dropins`, ExecStart pointing at the binary cargo built, in a unit directory
/// of its own.
fn unit_dir(dropins: &[&str]) -> TempDir {
    let dir = TempDir::new();
    let unit = read("systemd/qtrace.service")
        .replace("/usr/local/bin/qtrace", env!("CARGO_BIN_EXE_qtrace"));
    fs::write(dir.join("qtrace.service"), unit).unwrap();
    fs::create_dir(dir.join("qtrace.service.d")).unwrap();
    for d in dropins {
        fs::copy(
            deploy(&format!("systemd/{d}")),
            dir.join("qtrace.service.d").join(d),
        )
        .unwrap();
    }
    dir
}

/// "→ Overall exposure level for qtrace.service: 2.6 OK 🙂" → "2.6 OK".
fn exposure(out: &str) -> String {
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level for qtrace.service: "))
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{out}"));
    let rest = line.split(": ").nth(1).unwrap();
    rest.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn systemd_analyze_verifies_the_unit_and_rates_it_as_the_readme_says() {
    let analyze = || installed("systemd-analyze", "systemd");
    let readme = read("README.md");
    // The unit file itself, as the README shows the command.
    let out = succeeds(
        analyze()
            .args(["security", "--offline=true"])
            .arg(deploy("systemd/qtrace.service")),
    );
    let recorded = format!(
        "Overall exposure level for qtrace.service: {}",
        exposure(&out)
    );
    assert!(
        readme.contains(&recorded),
        "deploy/README.md does not record `{recorded}`"
    );
    for dropins in DROPIN_COMBINATIONS {
        let dir = unit_dir(dropins);
        // SYSTEMD_UNIT_PATH with a trailing colon: this directory, then the usual ones.
        let unit_path = format!("{}:", dir.display());
        let in_dir = || {
            let mut c = analyze();
            c.env("SYSTEMD_UNIT_PATH", &unit_path);
            c
        };
        let out = succeeds(in_dir().args(["verify", "qtrace.service"]));
        assert!(
            out.trim().is_empty(),
            "systemd-analyze verify (drop-ins {dropins:?}) complains:\n{out}"
        );
        let out = succeeds(in_dir().args(["security", "--offline=true", "qtrace.service"]));
        let level = exposure(&out);
        println!("exposure with drop-ins {dropins:?}: {level}");
        let value: f64 = level.split(' ').next().unwrap().parse().unwrap();
        assert!(value <= 3.0, "exposure {level} got worse:\n{out}");
        let unit = if dropins.is_empty() {
            "qtrace.service".to_string()
        } else {
            dropins
                .iter()
                .map(|d| format!("+ {d}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let row = format!("| {unit} | {level} |");
        assert!(
            readme.lines().any(|l| l == row),
            "deploy/README.md's exposure table lacks `{row}`"
        );
    }
}

#[test]
fn sysusers_entry_creates_the_qtrace_user() {
    if !have("systemd-sysusers") {
        println!("note: systemd-sysusers not found; skipping");
        return;
    }
    let root = TempDir::new();
    fs::create_dir(root.join("etc")).unwrap();
    succeeds(
        Command::new("systemd-sysusers")
            .arg(format!("--root={}", root.display()))
            .arg(deploy("systemd/qtrace.sysusers.conf")),
    );
    let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
    let group = fs::read_to_string(root.join("etc/group")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("qtrace:"))
        .unwrap_or_else(|| panic!("no user qtrace:\n{passwd}"));
    assert!(user.ends_with(":/:/usr/sbin/nologin"), "{user}");
    assert!(group.lines().any(|l| l.starts_with("qtrace:")), "{group}");
}

// --- Config example ---------------------------------------------------------------------------

/// The keys `qtrace run` knows, from its own refusal of an unknown one.
fn known_config_keys() -> BTreeSet<String> {
    let dir = TempDir::new();
    let file = dir.join("unknown.toml");
    fs::write(&file, "no_such_key = 1\n").unwrap();
    let (ok, out) = output(
        Command::new(env!("CARGO_BIN_EXE_qtrace"))
            .args(["run", "--config"])
            .arg(&file),
    );
    assert!(!ok, "an unknown key was accepted:\n{out}");
    let list = out
        .split("known keys: ")
        .nth(1)
        .unwrap_or_else(|| panic!("no list of known keys in:\n{out}"));
    list.lines()
        .next()
        .unwrap()
        .split(", ")
        .map(|k| k.trim().to_string())
        .collect()
}

#[test]
fn example_config_documents_every_key_with_valid_values() {
    let example = read("qtrace.toml");
    // Settings are commented out as `#key = value`; prose comments start with `# `.
    assert!(
        !example
            .lines()
            .any(|l| l.starts_with(|c: char| c.is_ascii_lowercase())),
        "the example config must set nothing by default"
    );
    let settings: Vec<&str> = example
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .filter(|l| l.starts_with(|c: char| c.is_ascii_lowercase()))
        .collect();
    let documented: BTreeSet<String> = settings
        .iter()
        .map(|l| l.split('=').next().unwrap().trim().to_string())
        .collect();
    assert_eq!(documented.len(), settings.len(), "a key documented twice");
    assert_eq!(
        documented,
        known_config_keys(),
        "deploy/qtrace.toml must document exactly the keys qtrace knows"
    );

    // All of them set at once is a valid file: the run stops only at the flag made invalid on
    // purpose, which is resolved after the file's values are checked.
    let dir = TempDir::new();
    let file = dir.join("all.toml");
    fs::write(&file, settings.join("\n")).unwrap();
    let (ok, out) = output(
        Command::new(env!("CARGO_BIN_EXE_qtrace"))
            .args(["run", "--events-reader-queue", "0", "--config"])
            .arg(&file),
    );
    assert!(!ok, "qtrace run accepted --events-reader-queue 0:\n{out}");
    assert!(
        out.contains("invalid events_reader_queue"),
        "the example config's values are refused:\n{out}"
    );
}

#[test]
fn metric_names_are_extracted_and_suffixes_stripped() {
    let names = metric_names(
        r#"sum(rate(qtrace_accept_queue_wait_seconds_bucket{x="qtrace_no"}[5m])) / my_qtrace_x
           + qtrace_accepted_connections_count"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "qtrace_accept_queue_wait_seconds",
            "qtrace_accepted_connections_count",
            "qtrace_no"
        ]
    );
    assert_eq!(
        without_variables(r#"rate(a{i=~"$instance",p=~"${port}"}[$__rate_interval])"#),
        r#"rate(a{i=~".*",p=~".*"}[5m])"#
    );
}
