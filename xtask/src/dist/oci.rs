//! The OCI image, written as an OCI image layout by hand (no base image: one layer holding the
//! static binary and the directories its mounts need) and archived as one tar that `podman
//! load`, `skopeo copy oci-archive:...` and `ctr import` read.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::{copy, reproducible_tar, IMAGE, VERSION};

pub fn build(binary: &Path, out: &Path, epoch: u64) -> Result<PathBuf> {
    let archive = out.join(format!("qtrace-{VERSION}-oci.tar"));
    let image = Image {
        name: IMAGE,
        files: &[(binary, "usr/bin/qtrace")],
        // Mount points of the DaemonSet's volumes, and an empty /tmp: the root file system
        // is read-only.
        dirs: &[
            "sys/kernel/btf",
            "sys/kernel/tracing",
            "sys/fs/cgroup",
            "run/qtrace",
            "proc",
            "dev",
            "etc",
            "tmp",
        ],
        entrypoint: "/usr/bin/qtrace",
        cmd: &["run"],
        port: Some(9860),
        description: "eBPF tracer of TCP listen-queue drops per listening socket",
    };
    write(&image, &out.join("stage/oci"), &archive, epoch)?;
    Ok(archive)
}

/// The dist test's second image: the static listener (listener.c) alone, beside `qtrace`'s
/// archive.
pub fn listener_image(listener: &Path, qtrace_image: &Path) -> Result<PathBuf> {
    let out = qtrace_image.parent().unwrap();
    let archive = out.join("qtrace-test-listener-oci.tar");
    let image = Image {
        name: "qtrace-test-listener:latest",
        files: &[(listener, "listener")],
        dirs: &["proc", "dev", "etc", "tmp"],
        entrypoint: "/listener",
        cmd: &["8080", "1"],
        port: None,
        description: "listen(port, backlog) and never accept (qtrace's dist test)",
    };
    write(
        &image,
        &out.join("stage/oci-listener"),
        &archive,
        super::source_date_epoch()?,
    )?;
    Ok(archive)
}

struct Image<'a> {
    /// name:tag
    name: &'a str,
    /// (file here, path in the image)
    files: &'a [(&'a Path, &'a str)],
    dirs: &'a [&'a str],
    entrypoint: &'a str,
    cmd: &'a [&'a str],
    port: Option<u16>,
    description: &'a str,
}

fn write(image: &Image, stage: &Path, archive: &Path, epoch: u64) -> Result<()> {
    let _ = fs::remove_dir_all(stage);
    let rootfs = stage.join("rootfs");
    for (from, to) in image.files {
        copy(from, &rootfs.join(to), 0o755)?;
    }
    for d in image.dirs {
        fs::create_dir_all(rootfs.join(d))?;
    }
    let layout = stage.join("layout");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let layer_tar = stage.join("layer.tar");
    reproducible_tar(&rootfs, &["."], &layer_tar, epoch)?;
    let diff_id = sha256(&fs::read(&layer_tar)?)?;
    let layer_gz = stage.join("layer.tar.gz");
    reproducible_tar(&rootfs, &["."], &layer_gz, epoch)?;
    let layer = blob(&blobs, fs::read(&layer_gz)?)?;

    let created = String::from_utf8(
        Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ", "-d"])
            .arg(format!("@{epoch}"))
            .output()?
            .stdout,
    )?
    .trim()
    .to_string();
    let (repo, tag) = image
        .name
        .split_once(':')
        .context("an image name has no tag")?;
    let labels = json!({
        "org.opencontainers.image.title": repo,
        "org.opencontainers.image.description": image.description,
        "org.opencontainers.image.version": VERSION,
        "org.opencontainers.image.licenses": "(MIT OR Apache-2.0) AND (MIT OR GPL-2.0-only)",
        "org.opencontainers.image.created": created,
    });
    let mut config = json!({
        "Entrypoint": [image.entrypoint],
        "Cmd": image.cmd,
        "Env": ["PATH=/usr/bin:/bin"],
        "Labels": labels,
    });
    if let Some(port) = image.port {
        config["ExposedPorts"] = json!({ format!("{port}/tcp"): {} });
    }
    let config = json!({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
        "history": [{"created": created, "created_by": "cargo xtask dist"}],
    });
    let config = blob(&blobs, serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &layer)],
        "annotations": labels,
    });
    let manifest = blob(&blobs, serde_json::to_vec(&manifest)?)?;
    // The reference: the whole name as OCI's ref.name (podman load names the image from it),
    // and the name containerd and Kubernetes resolve it to (`ctr import`).
    let mut m = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    m["annotations"] = json!({
        "org.opencontainers.image.ref.name": format!("{repo}:{tag}"),
        "io.containerd.image.name": format!("docker.io/library/{repo}:{tag}"),
    });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [m],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    reproducible_tar(
        &layout,
        &["oci-layout", "index.json", "blobs"],
        archive,
        epoch,
    )
}

/// (digest, size) of a blob written into `blobs`.
fn blob(blobs: &Path, data: Vec<u8>) -> Result<(String, usize)> {
    let digest = sha256(&data)?;
    fs::write(blobs.join(&digest), &data)?;
    Ok((digest, data.len()))
}

fn descriptor(media_type: &str, (digest, size): &(String, usize)) -> Value {
    json!({"mediaType": media_type, "digest": format!("sha256:{digest}"), "size": size})
}

fn sha256(data: &[u8]) -> Result<String> {
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    Ok(String::from_utf8(out.stdout)?
        .split_whitespace()
        .next()
        .context("sha256sum printed nothing")?
        .to_string())
}
