//! Names of a container from its runtime, by the id its cgroup path gives ([`super::workload`]):
//! containerd through its API (the Containers service's labels, which hold the
//! `io.kubernetes.*` labels kubelet sets through the CRI plugin), CRI-O through the CRI API
//! (`ContainerStatus`: the same labels, and the container's name), Docker and Podman from their
//! on-disk state. Docker and Podman are read from disk because Podman has no daemon (its API
//! socket exists only while `podman.socket` is enabled) and Docker's `config.v2.json` is what
//! `dockerd` itself reloads at start, a format unchanged for years; containerd keeps its
//! records in a bolt database that is only safe to read through its API. Each lookup is made
//! by the background task of [`super::names`], never on a scrape or an event.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use serde::Deserialize;

use super::{grpc, protobuf};

/// What a runtime says of a container; each empty where it says nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    /// The container's name: Kubernetes' container name in its pod, else the runtime's name
    /// (Docker, Podman, nerdctl).
    pub container: String,
    pub pod: String,
    pub pod_namespace: String,
}

impl Names {
    fn from_labels<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut n = Names::default();
        let mut runtime_name = String::new();
        for (k, v) in labels {
            match k {
                "io.kubernetes.pod.name" => n.pod = v.to_string(),
                "io.kubernetes.pod.namespace" => n.pod_namespace = v.to_string(),
                "io.kubernetes.container.name" => n.container = v.to_string(),
                "nerdctl/name" => runtime_name = v.to_string(),
                _ => {}
            }
        }
        if n.container.is_empty() {
            n.container = runtime_name;
        }
        n
    }
}

/// Where each runtime is asked; None leaves a runtime out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Runtimes {
    pub containerd_socket: Option<PathBuf>,
    /// A CRI runtime's socket (CRI-O's): asked for CRI-O's containers, and for the kubelet's
    /// cgroupfs layout after containerd.
    pub cri_socket: Option<PathBuf>,
    pub docker_root: Option<PathBuf>,
    pub podman_root: Option<PathBuf>,
}

/// How long one runtime may take to answer one lookup.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// The largest state file read (a Docker `config.v2.json`, Podman's `containers.json`).
const MAX_STATE_BYTES: u64 = 16 << 20;

/// containerd namespaces tried per lookup at most (kubelet's `k8s.io` first).
const MAX_NAMESPACES: usize = 32;

impl Runtimes {
    /// The names of container `id` of `runtime` (as [`super::workload::Container`] names it):
    /// `Ok(None)` when no runtime knows it, an error when one could not be asked.
    pub async fn lookup(&self, runtime: &str, id: &str) -> Result<Option<Names>> {
        // The kubelet's cgroupfs layout does not say which runtime runs the pod.
        let order: &[&str] = match runtime {
            "containerd" => &["containerd"],
            "cri-o" => &["cri"],
            "docker" => &["docker"],
            "podman" => &["podman"],
            "kubepods" => &["containerd", "cri", "docker"],
            _ => &[],
        };
        let asked = |socket: &Option<PathBuf>, what: &'static str| {
            let socket = socket.clone();
            let id = id.to_string();
            async move {
                // A runtime that is not there (the default socket of one this host does not
                // run) has nothing to say; one set but missing was warned about at start.
                let Some(s) = socket.filter(|s| s.exists()) else {
                    return Ok(None);
                };
                let call = async {
                    match what {
                        "containerd" => containerd(&s, &id).await,
                        _ => cri(&s, &id).await,
                    }
                };
                tokio::time::timeout(TIMEOUT, call)
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer in {TIMEOUT:?}")))
                    .with_context(|| format!("{what} at {}", s.display()))
            }
        };
        let mut error = None;
        for r in order {
            let found = match *r {
                "containerd" => asked(&self.containerd_socket, "containerd").await,
                "cri" => asked(&self.cri_socket, "CRI runtime").await,
                "docker" => self
                    .docker_root
                    .as_deref()
                    .map_or(Ok(None), |r| docker(r, id)),
                _ => self
                    .podman_root
                    .as_deref()
                    .map_or(Ok(None), |r| podman(r, id)),
            };
            match found {
                Ok(Some(n)) => return Ok(Some(n)),
                Ok(None) => {}
                Err(e) => error = Some(e),
            }
        }
        error.map_or(Ok(None), Err)
    }
}

/// containerd: the container's labels, in whichever namespace holds it.
async fn containerd(socket: &Path, id: &str) -> Result<Option<Names>> {
    let list = grpc::unary(
        socket,
        "/containerd.services.namespaces.v1.Namespaces/List",
        &[],
        &[],
    )
    .await?
    .unwrap_or_default();
    let mut namespaces = protobuf::repeated(&list, 1)?
        .into_iter()
        .map(|n| protobuf::string_of(n, 1))
        .collect::<Result<Vec<_>>>()?;
    namespaces.sort_by_key(|n| n != "k8s.io");
    namespaces.truncate(MAX_NAMESPACES);
    let mut request = Vec::new();
    protobuf::put_string(&mut request, 1, id);
    for ns in namespaces {
        let got = grpc::unary(
            socket,
            "/containerd.services.containers.v1.Containers/Get",
            &[("containerd-namespace", &ns)],
            &request,
        )
        .await?;
        if let Some(response) = got {
            return Ok(Some(from_containerd(&response)?));
        }
    }
    Ok(None)
}

/// containerd's `GetContainerResponse { Container container = 1 }`, of which the container's
/// `labels` (field 2).
fn from_containerd(response: &[u8]) -> Result<Names> {
    let container = protobuf::bytes_of(response, 1)?.unwrap_or_default();
    let labels = protobuf::string_map(container, 2)?;
    Ok(Names::from_labels(
        labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    ))
}

/// A CRI runtime (CRI-O): `RuntimeService/ContainerStatus` of the container.
async fn cri(socket: &Path, id: &str) -> Result<Option<Names>> {
    let mut request = Vec::new();
    protobuf::put_string(&mut request, 1, id);
    let got = grpc::unary(
        socket,
        "/runtime.v1.RuntimeService/ContainerStatus",
        &[],
        &request,
    )
    .await?;
    got.map(|r| from_cri(&r)).transpose()
}

/// CRI's `ContainerStatusResponse { ContainerStatus status = 1 }`: the status's `labels`
/// (field 12, where kubelet's `io.kubernetes.*` are) and, for the container's name where
/// they lack it, its `metadata` (field 2) `name` (field 1).
fn from_cri(response: &[u8]) -> Result<Names> {
    let status = protobuf::bytes_of(response, 1)?.unwrap_or_default();
    let labels = protobuf::string_map(status, 12)?;
    let mut n = Names::from_labels(labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if n.container.is_empty() {
        let metadata = protobuf::bytes_of(status, 2)?.unwrap_or_default();
        n.container = protobuf::string_of(metadata, 1)?;
    }
    Ok(n)
}

/// Docker: `<root>/containers/<id>/config.v2.json`'s `Name` and labels.
fn docker(root: &Path, id: &str) -> Result<Option<Names>> {
    #[derive(Deserialize)]
    struct Config {
        #[serde(rename = "Name", default)]
        name: String,
        #[serde(rename = "Config", default)]
        config: Option<Inner>,
    }
    #[derive(Deserialize)]
    struct Inner {
        #[serde(rename = "Labels", default)]
        labels: Option<std::collections::HashMap<String, String>>,
    }
    let path = root.join("containers").join(id).join("config.v2.json");
    if !path.exists() {
        return Ok(None);
    }
    let bytes = crate::inputs::read_regular(&path, MAX_STATE_BYTES)?;
    let c: Config =
        serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))?;
    let labels = c.config.and_then(|c| c.labels).unwrap_or_default();
    let mut n = Names::from_labels(labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if n.container.is_empty() {
        n.container = c.name.trim_start_matches('/').to_string();
    }
    Ok(Some(n))
}

/// Podman (root): containers/storage's `<driver>-containers/containers.json`, whose `names`
/// are the names Podman gave.
fn podman(root: &Path, id: &str) -> Result<Option<Names>> {
    #[derive(Deserialize)]
    struct Record {
        id: String,
        #[serde(default)]
        names: Vec<String>,
    }
    let Ok(dirs) = std::fs::read_dir(root) else {
        return Ok(None);
    };
    for dir in dirs.flatten() {
        if !dir.file_name().to_string_lossy().ends_with("-containers") {
            continue;
        }
        let path = dir.path().join("containers.json");
        if !path.exists() {
            continue;
        }
        let bytes = crate::inputs::read_regular(&path, MAX_STATE_BYTES)?;
        let records: Vec<Record> =
            serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))?;
        if let Some(r) = records.into_iter().find(|r| r.id == id) {
            return Ok(Some(Names {
                container: r.names.into_iter().next().unwrap_or_default(),
                ..Names::default()
            }));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c0b1e2d3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";

    #[test]
    fn kubelet_labels_name_the_pod() {
        let n = Names::from_labels([
            ("io.kubernetes.pod.name", "checkout-7d9f"),
            ("io.kubernetes.pod.namespace", "shop"),
            ("io.kubernetes.container.name", "api"),
            ("io.cri-containerd.kind", "container"),
        ]);
        assert_eq!(
            n,
            Names {
                container: "api".into(),
                pod: "checkout-7d9f".into(),
                pod_namespace: "shop".into(),
            }
        );
        assert_eq!(
            Names::from_labels([("nerdctl/name", "web")]).container,
            "web"
        );
    }

    /// A message of length-delimited fields, encoded as a runtime would.
    fn message(fields: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, b) in fields {
            // Each field as a string of its bytes: the wire form of any length-delimited one.
            protobuf::put_string(&mut out, *n, std::str::from_utf8(b).unwrap());
        }
        out
    }

    fn entry(k: &str, v: &str) -> Vec<u8> {
        message(&[(1, k.into()), (2, v.into())])
    }

    #[test]
    fn containerd_and_cri_answers_decode_to_names() {
        let labels = [
            (2, entry("io.kubernetes.pod.name", "checkout-7d9f")),
            (2, entry("io.kubernetes.pod.namespace", "shop")),
            (2, entry("io.kubernetes.container.name", "api")),
        ];
        let mut container = vec![(1, ID.as_bytes().to_vec())];
        container.extend(labels.iter().cloned());
        let got = from_containerd(&message(&[(1, message(&container))])).unwrap();
        assert_eq!(
            (
                got.pod.as_str(),
                got.pod_namespace.as_str(),
                got.container.as_str()
            ),
            ("checkout-7d9f", "shop", "api")
        );
        // CRI: labels at field 12; without the container-name label, the metadata's name.
        let status = message(&[
            (1, ID.as_bytes().to_vec()),
            (2, message(&[(1, b"sidecar".to_vec())])),
            (12, entry("io.kubernetes.pod.name", "web-1")),
            (12, entry("io.kubernetes.pod.namespace", "default")),
        ]);
        let got = from_cri(&message(&[(1, status)])).unwrap();
        assert_eq!(
            (
                got.pod.as_str(),
                got.pod_namespace.as_str(),
                got.container.as_str()
            ),
            ("web-1", "default", "sidecar")
        );
        assert!(from_cri(&[0x0a, 0x09, 1]).is_err());
    }

    fn rt(dir: &Path) -> Runtimes {
        Runtimes {
            containerd_socket: None,
            cri_socket: None,
            docker_root: Some(dir.join("docker")),
            podman_root: Some(dir.join("storage")),
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn docker_and_podman_state_on_disk() {
        let dir = std::env::temp_dir().join(format!("qtrace-runtimes-{}", std::process::id()));
        let d = dir.join("docker/containers").join(ID);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("config.v2.json"),
            r#"{"Name":"/web","Config":{"Labels":{"a":"b"}},"State":{}}"#,
        )
        .unwrap();
        let p = dir.join("storage/vfs-containers");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(
            p.join("containers.json"),
            format!(r#"[{{"id":"{ID}","names":["db"],"image":"x"}}]"#),
        )
        .unwrap();
        let r = rt(&dir);
        let name = |runtime| {
            block_on(r.lookup(runtime, ID))
                .unwrap()
                .map(|n| n.container)
        };
        assert_eq!(name("docker").as_deref(), Some("web"));
        assert_eq!(name("podman").as_deref(), Some("db"));
        assert_eq!(name("cri-o"), None);
        assert_eq!(block_on(r.lookup("docker", &"0".repeat(64))).unwrap(), None);
        // Garbage is an error (warned about by the caller), not a name.
        std::fs::write(p.join("containers.json"), "{not json").unwrap();
        assert!(block_on(r.lookup("podman", ID)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_socket_knows_nothing_and_a_dead_one_is_an_error_naming_it() {
        let r = Runtimes {
            containerd_socket: Some("/nonexistent/containerd.sock".into()),
            cri_socket: Some("/nonexistent/crio.sock".into()),
            ..Runtimes::default()
        };
        assert_eq!(block_on(r.lookup("kubepods", ID)).unwrap(), None);
        // A socket file nobody listens on (a runtime that died).
        let path = std::env::temp_dir().join(format!("qtrace-dead-{}.sock", std::process::id()));
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let r = Runtimes {
            cri_socket: Some(path.clone()),
            ..Runtimes::default()
        };
        let e = block_on(r.lookup("cri-o", ID)).unwrap_err();
        assert!(
            format!("{e:#}").contains(&path.display().to_string()),
            "{e:#}"
        );
        std::fs::remove_file(&path).unwrap();
    }
}
