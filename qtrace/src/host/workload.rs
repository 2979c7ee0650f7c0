//! What a process's cgroup path says about the workload it belongs to: the innermost systemd
//! unit, and the container (runtime and id) for the layouts of Docker, Podman, containerd (its
//! CRI plugin included), CRI-O and the kubelet's cgroupfs driver, on cgroup v2 and v1. What no
//! pattern knows stays empty rather than guessed.

/// A container as its cgroup path names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// `docker`, `podman`, `containerd`, `cri-o`, or `kubepods` (the kubelet's cgroupfs driver,
    /// which does not name the runtime).
    pub runtime: &'static str,
    /// The runtime's full container id.
    pub id: String,
}

/// The workload of one cgroup path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// The innermost systemd unit (`nginx.service`, a container's `docker-<id>.scope`); empty
    /// outside systemd's tree.
    pub unit: String,
    pub container: Option<Container>,
}

/// systemd scope prefixes of container runtimes, and the runtime each names. A runtime's
/// monitor (`libpod-conmon-…`, `crio-conmon-…`) is not the container.
const SCOPES: [(&str, &str); 4] = [
    ("docker-", "docker"),
    ("libpod-", "podman"),
    ("cri-containerd-", "containerd"),
    ("crio-", "cri-o"),
];

/// cgroupfs directories whose child is a container id.
const PARENTS: [(&str, &str); 2] = [("docker", "docker"), ("libpod_parent", "podman")];

pub fn of_path(path: &str) -> Workload {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let unit = parts
        .iter()
        .rev()
        .find(|p| p.ends_with(".service") || p.ends_with(".scope"))
        .map_or(String::new(), |p| p.to_string());
    Workload {
        unit,
        container: container(&parts),
    }
}

fn container(parts: &[&str]) -> Option<Container> {
    // Innermost first: a container nested in another's cgroup is the inner one.
    for (i, part) in parts.iter().enumerate().rev() {
        if let Some(scope) = part.strip_suffix(".scope") {
            for (prefix, runtime) in SCOPES {
                if let Some(id) = scope.strip_prefix(prefix) {
                    if is_id(id) {
                        return Some(Container {
                            runtime,
                            id: id.to_string(),
                        });
                    }
                }
            }
        }
        let parent = i.checked_sub(1).map(|p| parts[p]);
        if let Some(parent) = parent {
            if let Some((_, runtime)) = PARENTS.iter().find(|(dir, _)| *dir == parent) {
                let id = part.strip_prefix("libpod-").unwrap_or(part);
                if is_id(id) {
                    return Some(Container {
                        runtime,
                        id: id.to_string(),
                    });
                }
            }
            // kubepods[/<qos>]/pod<uid>/<id>
            if parent.starts_with("pod") && parts[..i].contains(&"kubepods") && is_id(part) {
                return Some(Container {
                    runtime: "kubepods",
                    id: part.to_string(),
                });
            }
        }
    }
    None
}

/// A container id as the runtimes write them: 64 hex digits.
fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c0b1e2d3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";

    fn container_of(path: &str) -> Option<(&'static str, String)> {
        of_path(path).container.map(|c| (c.runtime, c.id))
    }

    #[test]
    fn the_innermost_systemd_unit() {
        assert_eq!(of_path("/system.slice/nginx.service").unit, "nginx.service");
        assert_eq!(
            of_path("/user.slice/user-1000.slice/user@1000.service/app.slice/api.service").unit,
            "api.service"
        );
        assert_eq!(
            of_path("/user.slice/user-1000.slice/session-3.scope").unit,
            "session-3.scope"
        );
        assert_eq!(of_path("/system.slice").unit, "");
        assert_eq!(of_path("/").unit, "");
        assert_eq!(of_path("/717e104c7d3d19be10e14e524a3a1ed6").unit, "");
    }

    #[test]
    fn containers_under_systemd() {
        let cases = [
            (format!("/system.slice/docker-{ID}.scope"), "docker"),
            (format!("/machine.slice/libpod-{ID}.scope"), "podman"),
            (
                format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"),
                "podman",
            ),
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0d3c_9f.slice/cri-containerd-{ID}.scope"),
                "containerd",
            ),
            (
                format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/crio-{ID}.scope"),
                "cri-o",
            ),
        ];
        for (path, runtime) in cases {
            assert_eq!(
                container_of(&path),
                Some((runtime, ID.to_string())),
                "{path}"
            );
        }
        assert_eq!(
            of_path(&format!("/system.slice/docker-{ID}.scope")).unit,
            format!("docker-{ID}.scope")
        );
        // A runtime's monitor process is not the container.
        assert_eq!(
            container_of(&format!("/machine.slice/libpod-conmon-{ID}.scope")),
            None
        );
    }

    #[test]
    fn containers_under_cgroupfs_and_v1() {
        assert_eq!(
            container_of(&format!("/docker/{ID}")),
            Some(("docker", ID.to_string()))
        );
        assert_eq!(
            container_of(&format!("/libpod_parent/libpod-{ID}")),
            Some(("podman", ID.to_string()))
        );
        assert_eq!(
            container_of(&format!("/kubepods/burstable/pod0d3c-9f/{ID}")),
            Some(("kubepods", ID.to_string()))
        );
    }

    #[test]
    fn what_no_pattern_knows_stays_empty() {
        for path in [
            "/",
            "/system.slice/cron.service",
            "/default/web",
            "/docker/not-an-id",
            "/system.slice/docker-123.scope",
            "/kubepods/burstable/pod0d3c-9f",
        ] {
            assert_eq!(container_of(path), None, "{path}");
        }
    }
}
