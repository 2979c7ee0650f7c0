//! `--web.config.file`: TLS and basic auth for the HTTP endpoints, in the Prometheus
//! exporter-toolkit's format (what node_exporter reads), so one file serves both:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: qtrace.crt   # relative paths are relative to this file's directory
//!   key_file: qtrace.key
//!   min_version: TLS12      # TLS12 (default) or TLS13
//! basic_auth_users:
//!   prometheus: $2y$10$...  # bcrypt hashes (htpasswd -nBC 10 USER)
//! ```
//!
//! Other exporter-toolkit keys (client certificates, cipher suites, http_server_config) are
//! refused by name rather than ignored. A bcrypt check costs ~50–100 ms of CPU at cost 10: it
//! runs on the blocking pool, at most [`CONCURRENT_CHECKS`] at a time, and a successful
//! (user, password) pair is remembered (as a salted SHA-256, never the password) so a
//! scraper pays it once, not every scrape. SIGHUP re-reads the file; a bad file then keeps
//! the running settings.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use anyhow::{anyhow, bail, Context, Result};
use axum::http::{header, HeaderMap};
use base64::Engine;
use serde::Deserialize;
use tokio_rustls::{
    rustls::{
        self,
        pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    },
    TlsAcceptor,
};

/// Most bcrypt checks running at once: a flood of wrong passwords takes these threads, never
/// the event loop, and leaves the other cores to the rest of qtrace.
pub const CONCURRENT_CHECKS: usize = 2;
/// Most successful (user, password) pairs remembered; past it the memory starts afresh.
pub const MAX_REMEMBERED: usize = 256;
/// Most bytes of a certificate or key file read.
const MAX_PEM_BYTES: u64 = 1 << 20;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename = "web config")]
struct FileFormat {
    tls_server_config: Option<TlsFormat>,
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename = "tls_server_config")]
struct TlsFormat {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    min_version: Option<String>,
}

/// What one reading of the file gave.
#[derive(Default)]
struct Loaded {
    tls: Option<TlsAcceptor>,
    /// None: no authentication.
    users: Option<BTreeMap<String, String>>,
}

/// The endpoints' TLS and authentication, as the web config file last read says.
pub struct Web {
    path: Option<PathBuf>,
    loaded: RwLock<Arc<Loaded>>,
    /// Salted digests of (user, password, hash) that verified.
    verified: Mutex<HashSet<[u8; 32]>>,
    salt: [u8; 16],
    checks: tokio::sync::Semaphore,
}

impl Web {
    /// Reads `path` (None: plain HTTP, no authentication). Errors name the file and the key.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let loaded = match path {
            Some(p) => read(p)?,
            None => Loaded::default(),
        };
        let mut salt = [0u8; 16];
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut salt)
            .map_err(|_| anyhow!("no random numbers for the password cache"))?;
        Ok(Self {
            path: path.map(Path::to_path_buf),
            loaded: RwLock::new(Arc::new(loaded)),
            verified: Mutex::new(HashSet::new()),
            salt,
            checks: tokio::sync::Semaphore::new(CONCURRENT_CHECKS),
        })
    }

    /// Re-reads the file (SIGHUP); on error the running settings stay. Whether there is a file.
    pub fn reload(&self) -> Result<bool> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let loaded = read(path)?;
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
        crate::recover::lock(&self.verified).clear();
        Ok(true)
    }

    fn current(&self) -> Arc<Loaded> {
        self.loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The TLS acceptor for a new connection; None for plain HTTP.
    pub fn tls(&self) -> Option<TlsAcceptor> {
        self.current().tls.clone()
    }

    pub fn summary(&self) -> &'static str {
        let l = self.current();
        match (l.tls.is_some(), l.users.is_some()) {
            (true, true) => "TLS, basic auth",
            (true, false) => "TLS",
            (false, true) => "plain HTTP, basic auth",
            (false, false) => "plain HTTP",
        }
    }

    /// Whether a request with these headers may be answered.
    pub async fn authorized(&self, headers: &HeaderMap) -> bool {
        let loaded = self.current();
        let Some(users) = &loaded.users else {
            return true;
        };
        let Some((user, password)) = basic_credentials(headers) else {
            return false;
        };
        // An unknown user costs a check too (against some user's hash, then refused), so the
        // time taken does not tell which users exist.
        let (known, hash) = match users.get(&user) {
            Some(h) => (true, h.clone()),
            None => match users.values().next() {
                Some(h) => (false, h.clone()),
                None => return false,
            },
        };
        let key = self.digest(&user, &password, &hash);
        if known && crate::recover::lock(&self.verified).contains(&key) {
            return true;
        }
        let Ok(_slot) = self.checks.acquire().await else {
            return false;
        };
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(&password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false)
                && known;
        if ok {
            let mut verified = crate::recover::lock(&self.verified);
            if verified.len() >= MAX_REMEMBERED {
                verified.clear();
            }
            verified.insert(key);
        }
        ok
    }

    fn digest(&self, user: &str, password: &[u8], hash: &str) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [&self.salt[..], user.as_bytes(), password, hash.as_bytes()] {
            ctx.update(&(part.len() as u64).to_le_bytes());
            ctx.update(part);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

/// `Authorization: Basic base64(user:password)`.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, Vec<u8>)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, decoded[colon + 1..].to_vec()))
}

/// The file, checked whole: `web config file PATH: KEY: reason` on error.
fn read(path: &Path) -> Result<Loaded> {
    let context = || format!("web config file {}", path.display());
    let text = crate::inputs::read_regular(path, crate::inputs::MAX_CONFIG_BYTES)
        .and_then(|b| String::from_utf8(b).context("not UTF-8 text"))
        .with_context(context)?;
    parse(&text, path.parent().unwrap_or(Path::new("."))).with_context(context)
}

fn parse(text: &str, dir: &Path) -> Result<Loaded> {
    let file: FileFormat = if text.trim().is_empty() {
        FileFormat::default()
    } else {
        // Errors name the key (`tls_server_config: unknown field …`); each line clipped.
        serde_yaml_ng::from_str::<Option<FileFormat>>(text)
            .map_err(|e| anyhow!(crate::inputs::clip_to(&e.to_string(), 300)))?
            .unwrap_or_default()
    };
    let users = match file.basic_auth_users {
        None => None,
        Some(users) => {
            for (user, hash) in &users {
                let key = format!("basic_auth_users.{}", crate::inputs::clip(user));
                if user.contains(':') {
                    bail!("{key}: a user name cannot contain ':'");
                }
                if !hash.starts_with("$2") || hash.parse::<bcrypt::HashParts>().is_err() {
                    bail!("{key}: not a bcrypt hash (make one with `htpasswd -nBC 10 USER`)");
                }
            }
            (!users.is_empty()).then_some(users)
        }
    };
    let tls = file
        .tls_server_config
        .map(|t| tls_config(&t, dir))
        .transpose()?;
    Ok(Loaded { tls, users })
}

fn tls_config(t: &TlsFormat, dir: &Path) -> Result<TlsAcceptor> {
    let file = |key: &str, p: &Option<PathBuf>| -> Result<(PathBuf, Vec<u8>)> {
        let p = p
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| anyhow!("tls_server_config.{key}: missing"))?;
        let full = dir.join(p);
        let bytes = crate::inputs::read_regular(&full, MAX_PEM_BYTES)
            .with_context(|| format!("tls_server_config.{key}: {}", full.display()))?;
        Ok((full, bytes))
    };
    let (cert_path, certs) = file("cert_file", &t.cert_file)?;
    let (key_path, key) = file("key_file", &t.key_file)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&certs)
        .collect::<Result<_, _>>()
        .ok()
        .filter(|c: &Vec<_>| !c.is_empty())
        .ok_or_else(|| {
            anyhow!(
                "tls_server_config.cert_file: {}: no PEM certificate in it",
                cert_path.display()
            )
        })?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
        anyhow!(
            "tls_server_config.key_file: {}: no PEM private key in it ({e})",
            key_path.display()
        )
    })?;
    let versions: &[&rustls::SupportedProtocolVersion] = match t.min_version.as_deref() {
        None | Some("TLS12") => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Some("TLS13") => &[&rustls::version::TLS13],
        Some(v) => bail!(
            "tls_server_config.min_version: {}: qtrace offers TLS12 or TLS13",
            crate::inputs::clip(v)
        ),
    };
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .context("tls_server_config.min_version")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| anyhow!("tls_server_config.key_file: {}: {e}", key_path.display()))?;
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        h.insert(
            header::AUTHORIZATION,
            format!("Basic {token}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn errors_name_the_key() {
        let dir = Path::new("/nonexistent");
        let err = |text: &str| format!("{:#}", parse(text, dir).err().unwrap());
        let e = err("tls_server_config:\n  cert_file: a\n  client_ca_file: b\n");
        assert!(e.contains("unknown field `client_ca_file`"), "{e}");
        let e = err("basic_auth_users:\n  alice: secret\n");
        assert!(
            e.starts_with("basic_auth_users.alice: not a bcrypt hash"),
            "{e}"
        );
        let e = err("tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n");
        assert!(
            e.starts_with("tls_server_config.cert_file: /nonexistent/c.pem"),
            "{e}"
        );
        let e = err("tls_server_config:\n  key_file: k.pem\n");
        assert!(e.starts_with("tls_server_config.cert_file: missing"), "{e}");
        let e = err("http_server_config: {}\n");
        assert!(e.contains("unknown field `http_server_config`"), "{e}");
        assert!(parse("", dir).unwrap().users.is_none());
    }

    #[tokio::test]
    async fn passwords_are_checked_once_then_remembered() {
        let hash = bcrypt::hash_with_salt("right", 4, [7u8; 16])
            .unwrap()
            .to_string();
        let web = Web::load(None).unwrap();
        *web.loaded.write().unwrap() = Arc::new(Loaded {
            tls: None,
            users: Some([("alice".to_string(), hash)].into()),
        });
        assert!(!web.authorized(&HeaderMap::new()).await);
        assert!(!web.authorized(&basic("alice", "wrong")).await);
        assert!(!web.authorized(&basic("bob", "right")).await);
        assert!(crate::recover::lock(&web.verified).is_empty());
        assert!(web.authorized(&basic("alice", "right")).await);
        assert_eq!(crate::recover::lock(&web.verified).len(), 1);
        // The second time is a lookup: no check slot is needed.
        let _all = web.checks.acquire_many(CONCURRENT_CHECKS as u32).await;
        assert!(web.authorized(&basic("alice", "right")).await);
    }
}
