//! `cargo xtask dist-test`: each artifact used as a user would. On this machine: lintian on the
//! package, the tarball's binary run from where it unpacks, the image loaded by `podman load`
//! and `ctr import`. In the systemd guest (guest.rs, test.sh): the package under systemd with
//! Prometheus and its alerts, and the image under Podman with the DaemonSet's securityContext.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{guest, oci, Artifacts, IMAGE, TARGET, VERSION};
use crate::run;

pub fn dist_test() -> Result<()> {
    let t = Instant::now();
    let a = super::dist()?;
    let cache = crate::matrix::cache_dir()?;
    // Started first: the first run builds the guest's root file system (minutes), cached after.
    let rootfs = std::thread::spawn({
        let cache = cache.clone();
        move || guest::rootfs(&cache)
    });
    let mut failures = Vec::new();
    for (what, result) in [
        ("lintian", lintian(&a.deb)),
        ("tarball", tarball(&a.tarball)),
        ("podman load", podman_load(&a.image)),
        ("ctr import", ctr_import(&a.image)),
    ] {
        match result {
            Ok(()) => eprintln!("dist-test: {what}: ok"),
            Err(e) => {
                eprintln!("dist-test: {what}: FAILED: {e:#}");
                failures.push(what.to_string());
            }
        }
    }
    let rootfs = rootfs
        .join()
        .map_err(|_| anyhow::anyhow!("building the root file system panicked"))??;
    let listener = listener(&a)?;
    let listener_image = oci::listener_image(&listener, &a.image)?;
    let files = [
        (format!("qtrace_{VERSION}_amd64.deb"), a.deb.clone()),
        ("qtrace-oci.tar".into(), a.image.clone()),
        ("listener-oci.tar".into(), listener_image),
        ("listener".into(), listener),
        (
            "prometheus.yml".into(),
            "deploy/prometheus/prometheus.yml".into(),
        ),
        ("alerts.yml".into(), "deploy/prometheus/alerts.yml".into()),
        (
            "daemonset.yaml".into(),
            "deploy/kubernetes/daemonset.yaml".into(),
        ),
    ];
    let files: Vec<(&str, PathBuf)> = files.iter().map(|(n, p)| (n.as_str(), p.clone())).collect();
    let console = guest::boot(&cache, &rootfs, &files)?;
    let mut done = false;
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        let Some(at) = line.find("@@QTRACE dist ") else {
            continue;
        };
        let marker = &line[at + "@@QTRACE dist ".len()..];
        eprintln!("dist-test: guest: {marker}");
        if let Some(what) = marker.strip_prefix("FAIL ") {
            failures.push(format!("guest: {what}"));
        }
        done |= marker.starts_with("done");
    }
    if !done {
        failures.push("the guest stopped before its test ended".into());
    }
    eprintln!(
        "dist-test: {} in {:.0}s; guest log {}",
        if failures.is_empty() {
            "passed"
        } else {
            "FAILED"
        },
        t.elapsed().as_secs_f64(),
        cache.join("logs/dist-6.12.log").display()
    );
    if !failures.is_empty() {
        bail!("the dist test failed: {}", failures.join("; "));
    }
    Ok(())
}

/// lintian at its default level (errors and warnings fail), its output shown.
fn lintian(deb: &Path) -> Result<()> {
    let out = Command::new("lintian")
        .args(["--fail-on", "error,warning", "--display-info"])
        .arg(deb)
        .output()
        .context("lintian (apt package lintian)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "dist-test: lintian {}:\n{}{}",
        deb.file_name().unwrap().to_string_lossy(),
        text,
        if text.trim().is_empty() {
            "  (no tags)\n"
        } else {
            ""
        }
    );
    if !out.status.success() {
        bail!("lintian: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Unpacked as a user would, the binary tells its version and finds its probes on this kernel;
/// every file the README names is there.
fn tarball(tarball: &Path) -> Result<()> {
    let dir = super::dist_dir()?.join("unpacked");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(tarball)
        .arg("-C")
        .arg(&dir))?;
    let top = dir.join(format!("qtrace-{VERSION}-{TARGET}"));
    for f in [
        "qtrace",
        "qtrace.service",
        "qtrace.sysusers.conf",
        "qtrace.toml",
        "completions/qtrace.bash",
        "completions/_qtrace",
        "completions/qtrace.fish",
        "man/qtrace.1",
        "man/qtrace-run.1",
        "LICENSE-MIT",
    ] {
        anyhow::ensure!(top.join(f).exists(), "{f} missing from the tarball");
    }
    let version = Command::new(top.join("qtrace")).arg("--version").output()?;
    anyhow::ensure!(
        String::from_utf8_lossy(&version.stdout).contains(VERSION),
        "qtrace --version: {}",
        String::from_utf8_lossy(&version.stdout)
    );
    let probes = Command::new(top.join("qtrace"))
        .args(["probes", "--json"])
        .output()?;
    let report: serde_json::Value = serde_json::from_slice(&probes.stdout)
        .with_context(|| format!("qtrace probes: {}", String::from_utf8_lossy(&probes.stderr)))?;
    eprintln!(
        "dist-test: the tarball's qtrace on this kernel: {}",
        report["probes"]
    );
    Ok(())
}

/// `podman load` into private storage: the image is named as the DaemonSet names it.
fn podman_load(image: &Path) -> Result<()> {
    let store = super::dist_dir()?.join("podman");
    let podman = |args: &[&str]| {
        Command::new("podman")
            .arg("--root")
            .arg(store.join("root"))
            .arg("--runroot")
            .arg(store.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
    };
    let load = podman(&["load", "-i", &image.display().to_string()])?;
    let said =
        String::from_utf8_lossy(&load.stdout).to_string() + &String::from_utf8_lossy(&load.stderr);
    anyhow::ensure!(load.status.success(), "podman load: {said}");
    eprintln!("dist-test: podman load: {}", said.trim());
    let inspect = podman(&[
        "image",
        "inspect",
        "--format",
        "{{.Config.Entrypoint}} {{.Config.Cmd}}",
        IMAGE,
    ])?;
    let config = String::from_utf8_lossy(&inspect.stdout);
    anyhow::ensure!(
        config.trim() == "[/usr/bin/qtrace] [run]",
        "podman image inspect {IMAGE}: {config}{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let _ = fs::remove_dir_all(&store);
    Ok(())
}

/// `ctr import` into a private containerd: named docker.io/library/qtrace:0.1.0, which is what
/// Kubernetes resolves the DaemonSet's `image: qtrace:0.1.0` to, and unpacked.
fn ctr_import(image: &Path) -> Result<()> {
    let dir = super::dist_dir()?.join("containerd");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let socket = dir.join("containerd.sock");
    let config = dir.join("config.toml");
    fs::write(&config, "version = 2\n")?;
    let mut daemon = qtrace_testkit::containerd_command(&dir, &config)
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("containerd.log"))?)
        .spawn()
        .context("containerd (apt package containerd)")?;
    let result = (|| {
        let ctr = |args: &[&str]| {
            Command::new("ctr")
                .arg("--address")
                .arg(&socket)
                .args(["--namespace", "k8s.io"])
                .args(args)
                .output()
        };
        let t = Instant::now();
        while !socket.exists() && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let import = ctr(&[
            "images",
            "import",
            "--snapshotter",
            "native",
            &image.display().to_string(),
        ])?;
        let said = String::from_utf8_lossy(&import.stdout).to_string()
            + &String::from_utf8_lossy(&import.stderr);
        anyhow::ensure!(import.status.success(), "ctr import: {said}");
        let list = ctr(&["images", "ls", "-q"])?;
        let names = String::from_utf8_lossy(&list.stdout);
        eprintln!("dist-test: ctr import: {}", names.trim());
        let want = format!("docker.io/library/{IMAGE}");
        anyhow::ensure!(
            names.lines().any(|l| l == want),
            "ctr images ls: no {want} in {names}"
        );
        Ok(())
    })();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = fs::remove_dir_all(&dir);
    result
}

/// The guest's listener (listener.c), static.
fn listener(a: &Artifacts) -> Result<PathBuf> {
    let out = a.binary.parent().unwrap().join("dist-test-listener");
    run(Command::new("cc")
        .args(["-static", "-Os", "-s", "-o"])
        .arg(&out)
        .arg("xtask/src/dist/listener.c"))?;
    Ok(out)
}
