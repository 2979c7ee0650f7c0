//! Names of a container from its runtime, by the id its cgroup path gives ([`super::workload`]):
//! containerd through its API (the Containers service's labels, which hold the
//! `io.kubernetes.*` labels kubelet sets through the CRI plugin), Docker and Podman from their
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
            "docker" => &["docker"],
            "podman" => &["podman"],
            "kubepods" => &["containerd", "docker"],
            _ => &[],
        };
        let mut error = None;
        for r in order {
            let found = match *r {
                "containerd" => match &self.containerd_socket {
                    Some(s) => tokio::time::timeout(TIMEOUT, containerd(s, id))
                        .await
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer in {TIMEOUT:?}")))
                        .with_context(|| format!("containerd at {}", s.display())),
                    None => Ok(None),
                },
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
        let Some(response) = got else { continue };
        let container = protobuf::bytes_of(&response, 1)?.unwrap_or_default();
        let labels = protobuf::string_map(container, 2)?;
        return Ok(Some(Names::from_labels(
            labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )));
    }
    Ok(None)
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

    fn rt(dir: &Path) -> Runtimes {
        Runtimes {
            containerd_socket: None,
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
    fn a_missing_containerd_socket_is_an_error_naming_it() {
        let r = Runtimes {
            containerd_socket: Some("/nonexistent/containerd.sock".into()),
            ..Runtimes::default()
        };
        let e = block_on(r.lookup("containerd", ID)).unwrap_err();
        assert!(
            format!("{e:#}").contains("/nonexistent/containerd.sock"),
            "{e:#}"
        );
    }
}
