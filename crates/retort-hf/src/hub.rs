//! Downloading models from the Hugging Face hub into the standard cache layout, so that files shared
//! with `transformers` and `huggingface_hub` are downloaded once:
//!
//! ```text
//! $HF_HUB_CACHE/models--org--name/refs/<revision>           the commit a branch or tag points at
//! $HF_HUB_CACHE/models--org--name/blobs/<etag>              file contents, named by ETag (sha256 for LFS)
//! $HF_HUB_CACHE/models--org--name/snapshots/<commit>/<file> symlinks to the blobs
//! ```
//!
//! Only the files retort needs are fetched: config, tokenizer files and safetensors weights (sharded
//! or not). Downloads resume from a `.incomplete` file with an HTTP range request, sizes are checked,
//! and LFS files (weights) are verified against their sha256. `HF_HUB_OFFLINE=1` uses the cache only.
//! The token (`HF_TOKEN`) goes only to the hub's own host, never to a redirect elsewhere.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Files fetched when the repository has them (besides config.json and the weights).
const OPTIONAL_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "added_tokens.json",
];

/// Why a model could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Not a hub id.
    #[error("`{0}` is not a hub model id; write it as `org/name`")]
    BadId(String),
    /// Offline and not in the cache.
    #[error("`{repo}` at `{revision}` is not in the cache `{}` and HF_HUB_OFFLINE is set", cache.display())]
    NotCached {
        /// The repository.
        repo: String,
        /// The revision.
        revision: String,
        /// The cache.
        cache: PathBuf,
    },
    /// The hub refused access.
    #[error(
        "the hub refused access to `{repo}` (HTTP {status}); it may be gated or private: accept its licence on the hub and set HF_TOKEN to a token with read access"
    )]
    Unauthorized {
        /// The repository.
        repo: String,
        /// HTTP status.
        status: u16,
    },
    /// The repository or revision does not exist.
    #[error("`{repo}` at revision `{revision}` was not found on {endpoint}")]
    NotFound {
        /// The repository.
        repo: String,
        /// The revision.
        revision: String,
        /// The hub address.
        endpoint: String,
    },
    /// The repository has no weights retort can load.
    #[error("`{repo}` has no safetensors weights ({found}); retort does not load pickle (.bin) checkpoints")]
    NoSafetensors {
        /// The repository.
        repo: String,
        /// What it has.
        found: String,
    },
    /// A download failed or a file was corrupt.
    #[error("downloading `{file}` of `{repo}` failed: {reason}")]
    Download {
        /// The repository.
        repo: String,
        /// The file.
        file: String,
        /// What went wrong.
        reason: String,
    },
    /// The cache could not be written.
    #[error("cannot write the cache at `{}`: {source}", path.display())]
    Cache {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Where the hub is and how to talk to it.
#[derive(Debug, Clone)]
pub struct Hub {
    /// Base address, e.g. `https://huggingface.co`.
    pub endpoint: String,
    /// Access token, if any.
    pub token: Option<String>,
    /// The cache directory (`models--org--name` folders live here).
    pub cache: PathBuf,
    /// Use the cache only.
    pub offline: bool,
    /// Attempts per file before giving up (each resumes where the last stopped).
    pub attempts: u32,
    /// Pause before the first retry (doubles each time).
    pub backoff: Duration,
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

impl Hub {
    /// Settings from the environment, as `huggingface_hub` reads them: `HF_ENDPOINT`, `HF_TOKEN` (or
    /// `HUGGING_FACE_HUB_TOKEN`, or the token file in `HF_HOME`), `HF_HUB_CACHE` / `HF_HOME`,
    /// `HF_HUB_OFFLINE`.
    pub fn from_env() -> Hub {
        let home = std::env::var_os("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            base.join("huggingface")
        });
        let cache = std::env::var_os("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| home.join("hub"));
        let token = std::env::var("HF_TOKEN")
            .or_else(|_| std::env::var("HUGGING_FACE_HUB_TOKEN"))
            .ok()
            .or_else(|| {
                let path = std::env::var_os("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| home.join("token"));
                std::fs::read_to_string(path).ok()
            })
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        Hub {
            endpoint: std::env::var("HF_ENDPOINT")
                .unwrap_or_else(|_| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            token,
            cache,
            offline: env_flag("HF_HUB_OFFLINE"),
            attempts: 5,
            backoff: Duration::from_millis(500),
        }
    }

    fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache.join(format!("models--{}", repo.replace('/', "--")))
    }

    /// The local snapshot directory of `repo` at `revision`, downloading what is missing.
    pub fn snapshot(&self, repo: &str, revision: &str) -> Result<PathBuf, HubError> {
        if !is_hub_id(repo) {
            return Err(HubError::BadId(repo.to_string()));
        }
        if self.offline {
            return self.cached(repo, revision).ok_or_else(|| HubError::NotCached {
                repo: repo.into(),
                revision: revision.into(),
                cache: self.cache.clone(),
            });
        }
        let client = Client::new(self)?;
        let info = client.info(repo, revision)?;
        let files = select_files(repo, &info.files, |name| client.fetch_json(repo, &info.commit, name))?;
        let dir = self.repo_dir(repo);
        let snap = dir.join("snapshots").join(&info.commit);
        for file in &files {
            let target = snap.join(file);
            if target.exists() {
                continue;
            }
            client.download(repo, &info.commit, file, &dir, &target)?;
        }
        if revision != info.commit {
            let refs = dir.join("refs").join(revision);
            write_file(&refs, info.commit.as_bytes())?;
        }
        Ok(snap)
    }

    /// The snapshot for `revision` if the cache has one with a config.json.
    pub fn cached(&self, repo: &str, revision: &str) -> Option<PathBuf> {
        let dir = self.repo_dir(repo);
        let commit = if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) {
            revision.to_string()
        } else {
            std::fs::read_to_string(dir.join("refs").join(revision)).ok()?.trim().to_string()
        };
        let snap = dir.join("snapshots").join(commit);
        snap.join("config.json").is_file().then_some(snap)
    }
}

/// True for `org/name` ids.
pub fn is_hub_id(s: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with('.')
    };
    matches!(s.split_once('/'), Some((a, b)) if ok(a) && ok(b))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), HubError> {
    let cache_err = |source| HubError::Cache { path: path.to_path_buf(), source };
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(cache_err)?;
    }
    std::fs::write(path, bytes).map_err(cache_err)
}

/// The files of a snapshot to fetch, given the repository listing.
fn select_files(
    repo: &str,
    listing: &[String],
    index: impl Fn(&str) -> Result<serde_json::Value, HubError>,
) -> Result<Vec<String>, HubError> {
    let has = |f: &str| listing.iter().any(|x| x == f);
    if !has("config.json") {
        return Err(HubError::Download {
            repo: repo.into(),
            file: "config.json".into(),
            reason: "the repository has no config.json".into(),
        });
    }
    let mut files = vec!["config.json".to_string()];
    if has("model.safetensors.index.json") {
        files.push("model.safetensors.index.json".into());
        let idx = index("model.safetensors.index.json")?;
        let mut shards: Vec<String> = idx
            .get("weight_map")
            .and_then(|m| m.as_object())
            .map(|m| m.values().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        if shards.is_empty() {
            return Err(HubError::Download {
                repo: repo.into(),
                file: "model.safetensors.index.json".into(),
                reason: "its weight_map is empty".into(),
            });
        }
        files.extend(shards);
    } else if has("model.safetensors") {
        files.push("model.safetensors".into());
    } else {
        let pickles: Vec<&String> =
            listing.iter().filter(|f| f.ends_with(".bin") || f.ends_with(".pth")).collect();
        let found = if pickles.is_empty() {
            "no weight files".to_string()
        } else {
            format!("{} .bin/.pth files", pickles.len())
        };
        return Err(HubError::NoSafetensors { repo: repo.into(), found });
    }
    files.extend(OPTIONAL_FILES.iter().filter(|f| has(f)).map(|f| f.to_string()));
    Ok(files)
}

struct Info {
    commit: String,
    files: Vec<String>,
}

struct Client<'a> {
    hub: &'a Hub,
    http: reqwest::blocking::Client,
    host: Option<String>,
}

fn etag(h: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    let v = h.get(name)?.to_str().ok()?;
    Some(v.trim_start_matches("W/").trim_matches('"').to_string())
}

fn header_u64(h: &reqwest::header::HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.parse().ok()
}

impl<'a> Client<'a> {
    fn new(hub: &'a Hub) -> Result<Client<'a>, HubError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::blocking::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(30))
            .timeout(None)
            .user_agent(concat!("retort/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| HubError::Download {
                repo: String::new(),
                file: String::new(),
                reason: e.to_string(),
            })?;
        let host = reqwest::Url::parse(&hub.endpoint)
            .ok()
            .and_then(|u| u.host_str().map(|h| format!("{h}:{}", u.port_or_known_default().unwrap_or(0))));
        Ok(Client { hub, http, host })
    }

    fn same_host(&self, url: &reqwest::Url) -> bool {
        url.host_str().map(|h| format!("{h}:{}", url.port_or_known_default().unwrap_or(0))) == self.host
    }

    fn get(
        &self,
        url: &reqwest::Url,
        range_from: Option<u64>,
    ) -> reqwest::Result<reqwest::blocking::Response> {
        let mut req = self.http.get(url.clone());
        if let (Some(t), true) = (&self.hub.token, self.same_host(url)) {
            req = req.bearer_auth(t);
        }
        if let Some(from) = range_from.filter(|f| *f > 0) {
            req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
        }
        req.send()
    }

    fn check_status(
        &self,
        repo: &str,
        revision: &str,
        file: &str,
        status: reqwest::StatusCode,
    ) -> Result<(), HubError> {
        match status.as_u16() {
            200..=399 => Ok(()),
            401 | 403 => Err(HubError::Unauthorized { repo: repo.into(), status: status.as_u16() }),
            404 => Err(HubError::NotFound {
                repo: repo.into(),
                revision: revision.into(),
                endpoint: self.hub.endpoint.clone(),
            }),
            s => {
                Err(HubError::Download { repo: repo.into(), file: file.into(), reason: format!("HTTP {s}") })
            }
        }
    }

    fn url(&self, path: &str) -> Result<reqwest::Url, HubError> {
        reqwest::Url::parse(&format!("{}{path}", self.hub.endpoint)).map_err(|e| HubError::Download {
            repo: String::new(),
            file: path.into(),
            reason: e.to_string(),
        })
    }

    fn info(&self, repo: &str, revision: &str) -> Result<Info, HubError> {
        let url = self.url(&format!("/api/models/{repo}/revision/{}", revision.replace('/', "%2F")))?;
        let fail = |reason: String| HubError::Download {
            repo: repo.into(),
            file: "(repository listing)".into(),
            reason,
        };
        let resp = self.get(&url, None).map_err(|e| fail(e.to_string()))?;
        self.check_status(repo, revision, "(repository listing)", resp.status())?;
        let v: serde_json::Value = resp.json().map_err(|e| fail(e.to_string()))?;
        let commit = v
            .get("sha")
            .and_then(|s| s.as_str())
            .ok_or_else(|| fail("the answer has no `sha`".into()))?
            .to_string();
        let files = v
            .get("siblings")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|f| f.get("rfilename")?.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        Ok(Info { commit, files })
    }

    fn fetch_json(&self, repo: &str, commit: &str, file: &str) -> Result<serde_json::Value, HubError> {
        let url = self.url(&format!("/{repo}/resolve/{commit}/{file}"))?;
        let fail = |reason: String| HubError::Download { repo: repo.into(), file: file.into(), reason };
        let mut resp = self.get(&url, None).map_err(|e| fail(e.to_string()))?;
        self.check_status(repo, commit, file, resp.status())?;
        if resp.status().is_redirection() {
            let loc =
                resp.headers().get(reqwest::header::LOCATION).and_then(|l| l.to_str().ok()).unwrap_or("");
            let next = url.join(loc).map_err(|e| fail(e.to_string()))?;
            resp = self.get(&next, None).map_err(|e| fail(e.to_string()))?;
        }
        resp.json().map_err(|e| fail(e.to_string()))
    }

    /// Downloads one file into the blob store and links it into the snapshot, resuming and retrying.
    fn download(
        &self,
        repo: &str,
        commit: &str,
        file: &str,
        repo_dir: &Path,
        target: &Path,
    ) -> Result<(), HubError> {
        let mut last = String::new();
        for attempt in 0..self.hub.attempts.max(1) {
            if attempt > 0 {
                std::thread::sleep(self.hub.backoff * 2u32.pow(attempt - 1));
            }
            match self.try_download(repo, commit, file, repo_dir, target) {
                Ok(()) => return Ok(()),
                // Only transport problems are worth another try.
                Err(Retry::Again(reason)) => last = reason,
                Err(Retry::Fatal(e)) => return Err(e),
            }
        }
        Err(HubError::Download {
            repo: repo.into(),
            file: file.into(),
            reason: format!("{last} (after {} attempts)", self.hub.attempts),
        })
    }

    fn try_download(
        &self,
        repo: &str,
        commit: &str,
        file: &str,
        repo_dir: &Path,
        target: &Path,
    ) -> Result<(), Retry> {
        let again = |e: &dyn std::fmt::Display| Retry::Again(e.to_string());
        let fatal = |reason: String| {
            Retry::Fatal(HubError::Download { repo: repo.into(), file: file.into(), reason })
        };
        let url = self.url(&format!("/{repo}/resolve/{commit}/{file}")).map_err(Retry::Fatal)?;
        let first = self.get(&url, None).map_err(|e| again(&e))?;
        let status = first.status();
        if status.is_server_error() {
            return Err(Retry::Again(format!("HTTP {status}")));
        }
        self.check_status(repo, commit, file, status).map_err(Retry::Fatal)?;
        let h = first.headers().clone();
        let tag = etag(&h, "x-linked-etag")
            .or_else(|| etag(&h, "etag"))
            .ok_or_else(|| fatal("the hub sent no ETag".into()))?;
        if tag.is_empty() || tag.contains(['/', '\\']) || tag.starts_with('.') {
            return Err(fatal(format!("unusable ETag `{tag}`")));
        }
        let size = header_u64(&h, "x-linked-size");
        let blobs = repo_dir.join("blobs");
        std::fs::create_dir_all(&blobs)
            .map_err(|e| Retry::Fatal(HubError::Cache { path: blobs.clone(), source: e }))?;
        let blob = blobs.join(&tag);
        if !blob.is_file() {
            let partial = blobs.join(format!("{tag}.incomplete"));
            let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            let source = if status.is_redirection() {
                let loc = h.get(reqwest::header::LOCATION).and_then(|l| l.to_str().ok()).unwrap_or("");
                url.join(loc).map_err(|e| fatal(e.to_string()))?
            } else {
                url.clone()
            };
            drop(first);
            let mut resp = self.get(&source, Some(have)).map_err(|e| again(&e))?;
            let st = resp.status();
            if st.is_server_error() {
                return Err(Retry::Again(format!("HTTP {st}")));
            }
            self.check_status(repo, commit, file, st).map_err(Retry::Fatal)?;
            let total = size.or_else(|| {
                if st.as_u16() == 206 { None } else { header_u64(resp.headers(), "content-length") }
            });
            let append = st.as_u16() == 206 && have > 0;
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(append)
                .write(true)
                .truncate(!append)
                .open(&partial)
                .map_err(|e| Retry::Fatal(HubError::Cache { path: partial.clone(), source: e }))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = resp.read(&mut buf).map_err(|e| again(&e))?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])
                    .map_err(|e| Retry::Fatal(HubError::Cache { path: partial.clone(), source: e }))?;
            }
            out.sync_all().map_err(|e| Retry::Fatal(HubError::Cache { path: partial.clone(), source: e }))?;
            let got = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            if let Some(t) = total {
                if got < t {
                    return Err(Retry::Again(format!("connection closed after {got} of {t} bytes")));
                }
                if got > t {
                    let _ = std::fs::remove_file(&partial);
                    return Err(fatal(format!("got {got} bytes, expected {t}")));
                }
            }
            // LFS files are named by their sha256: check the contents.
            if tag.len() == 64 && tag.chars().all(|c| c.is_ascii_hexdigit()) {
                let digest = sha256_file(&partial)
                    .map_err(|e| Retry::Fatal(HubError::Cache { path: partial.clone(), source: e }))?;
                if digest != tag.to_ascii_lowercase() {
                    let _ = std::fs::remove_file(&partial);
                    return Err(fatal(format!(
                        "sha256 is {digest}, the hub says {tag}; the partial file was removed, run again"
                    )));
                }
            }
            std::fs::rename(&partial, &blob)
                .map_err(|e| Retry::Fatal(HubError::Cache { path: blob.clone(), source: e }))?;
        }
        let snap = repo_dir.join("snapshots").join(commit);
        link(&blob, &snap, file)
            .map_err(|e| Retry::Fatal(HubError::Cache { path: target.to_path_buf(), source: e }))
    }
}

enum Retry {
    Again(String),
    Fatal(HubError),
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Links `snapshots/<commit>/<file>` to `blobs/<etag>` with a relative symlink, as huggingface_hub does;
/// copies where symlinks are unavailable.
fn link(blob: &Path, snap: &Path, file: &str) -> std::io::Result<()> {
    let target = snap.join(file);
    if let Some(p) = target.parent() {
        std::fs::create_dir_all(p)?;
    }
    #[cfg(unix)]
    {
        // From the directory holding the file up to the repo directory: one `..` per component of
        // `file` (its own directories, then <commit>), plus one for `snapshots`.
        let depth = Path::new(file).components().count() + 1;
        let rel: PathBuf = std::iter::repeat_n("..", depth)
            .collect::<PathBuf>()
            .join("blobs")
            .join(blob.file_name().unwrap_or_default());
        let _ = std::fs::remove_file(&target);
        std::os::unix::fs::symlink(rel, &target)
    }
    #[cfg(not(unix))]
    {
        std::fs::copy(blob, &target).map(|_| ())
    }
}
