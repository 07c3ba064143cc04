//! The hub client against a local server that answers like huggingface.co: the revision API, files
//! with ETags, LFS files redirected to a CDN on another host (port), range requests. No network.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use retort_hf::{Hub, HubError};
use sha2::{Digest, Sha256};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const REPO: &str = "acme/tiny-llama";

#[derive(Debug, Clone)]
struct Seen {
    port: u16,
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

#[derive(Default)]
struct Behaviour {
    require_token: Option<String>,
    cut_first_cdn_response: bool,
    corrupt_cdn: bool,
    only_pickles: bool,
}

struct Server {
    hub_port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../retort-model/tests/fixtures/llama")
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8], cut: bool) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(if cut { &body[..body.len() / 2] } else { body });
    let _ = stream.flush();
}

type Handler = Arc<dyn Fn(&Seen, &mut TcpStream) + Send + Sync>;

fn serve(listener: TcpListener, handler: Handler, seen: Arc<Mutex<Vec<Seen>>>) {
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let handler = handler.clone();
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut headers = HashMap::new();
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                    }
                }
                let s = Seen {
                    port,
                    path,
                    range: headers.get("range").cloned(),
                    auth: headers.get("authorization").cloned(),
                };
                seen.lock().unwrap().push(s.clone());
                handler(&s, &mut stream);
            });
        }
    });
}

fn start(b: Behaviour) -> Server {
    let files: HashMap<String, Vec<u8>> = ["config.json", "model.safetensors"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(fixture().join(f)).unwrap()))
        .chain([("tokenizer_config.json".to_string(), b"{\"eos_token\": \"</s>\"}".to_vec())])
        .collect();
    let weights = files["model.safetensors"].clone();
    let weights_sha = sha256(&weights);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hub = TcpListener::bind("127.0.0.1:0").unwrap();
    let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
    let (hub_port, cdn_port) = (hub.local_addr().unwrap().port(), cdn.local_addr().unwrap().port());
    let b = Arc::new(b);
    let cut_done = Arc::new(Mutex::new(false));

    let bh = b.clone();
    let sha = weights_sha.clone();
    let size = weights.len();
    serve(
        hub,
        Arc::new(move |s: &Seen, stream: &mut TcpStream| {
            if let Some(t) = &bh.require_token
                && s.auth.as_deref() != Some(&format!("Bearer {t}"))
            {
                return respond(
                    stream,
                    "401 Unauthorized",
                    &[("Content-Length".into(), "0".into())],
                    b"",
                    false,
                );
            }
            if s.path.starts_with(&format!("/api/models/{REPO}/revision/")) {
                let names: Vec<&str> = if bh.only_pickles {
                    vec!["config.json", "pytorch_model.bin"]
                } else {
                    vec!["config.json", "model.safetensors", "tokenizer_config.json", "README.md"]
                };
                let siblings: Vec<_> = names.iter().map(|n| serde_json::json!({"rfilename": n})).collect();
                let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
                return respond(
                    stream,
                    "200 OK",
                    &[("Content-Length".into(), body.len().to_string())],
                    body.as_bytes(),
                    false,
                );
            }
            let prefix = format!("/{REPO}/resolve/{COMMIT}/");
            let Some(file) = s.path.strip_prefix(&prefix) else {
                return respond(
                    stream,
                    "404 Not Found",
                    &[("Content-Length".into(), "0".into())],
                    b"",
                    false,
                );
            };
            if file == "model.safetensors" {
                let headers = vec![
                    ("Location".into(), format!("http://127.0.0.1:{cdn_port}/cdn/{sha}")),
                    ("X-Linked-Etag".into(), format!("\"{sha}\"")),
                    ("X-Linked-Size".into(), size.to_string()),
                    ("Content-Length".into(), "0".into()),
                ];
                return respond(stream, "302 Found", &headers, b"", false);
            }
            let Some(body) = files.get(file) else {
                return respond(
                    stream,
                    "404 Not Found",
                    &[("Content-Length".into(), "0".into())],
                    b"",
                    false,
                );
            };
            let etag = format!("\"{}\"", &sha256(body)[..40]);
            respond(
                stream,
                "200 OK",
                &[("ETag".into(), etag), ("Content-Length".into(), body.len().to_string())],
                body,
                false,
            );
        }),
        seen.clone(),
    );
    let bc = b.clone();
    serve(
        cdn,
        Arc::new(move |s: &Seen, stream: &mut TcpStream| {
            let mut body = weights.clone();
            if bc.corrupt_cdn {
                body[100] ^= 0xff;
            }
            let from: usize = s
                .range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
                .unwrap_or(0);
            let part = &body[from..];
            let status = if from > 0 { "206 Partial Content" } else { "200 OK" };
            let mut cut = false;
            if bc.cut_first_cdn_response {
                let mut done = cut_done.lock().unwrap();
                cut = !*done;
                *done = true;
            }
            respond(stream, status, &[("Content-Length".into(), part.len().to_string())], part, cut);
        }),
        seen.clone(),
    );
    Server { hub_port, seen }
}

fn hub(server: &Server, cache: &Path, token: Option<&str>) -> Hub {
    Hub {
        endpoint: format!("http://127.0.0.1:{}", server.hub_port),
        token: token.map(str::to_string),
        cache: cache.to_path_buf(),
        offline: false,
        attempts: 3,
        backoff: Duration::ZERO,
    }
}

#[test]
fn downloads_into_the_hf_cache_layout_and_reuses_it() {
    let server = start(Behaviour::default());
    let cache = tempfile::tempdir().unwrap();
    let snap = hub(&server, cache.path(), None).snapshot(REPO, "main").unwrap();
    let repo = cache.path().join("models--acme--tiny-llama");
    assert_eq!(snap, repo.join("snapshots").join(COMMIT));
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), COMMIT);
    for f in ["config.json", "model.safetensors", "tokenizer_config.json"] {
        let link = std::fs::read_link(snap.join(f)).unwrap();
        assert!(link.starts_with("../../blobs/"), "{f}: {}", link.display());
    }
    assert!(!snap.join("README.md").exists(), "only the files retort needs");
    assert_eq!(
        std::fs::read(snap.join("model.safetensors")).unwrap(),
        std::fs::read(fixture().join("model.safetensors")).unwrap()
    );
    // The snapshot is a loadable model directory.
    let cfg = retort_hf::ModelConfig::load(&snap).unwrap();
    let ckpt = retort_hf::Checkpoint::open(&snap).unwrap();
    assert!(retort_hf::LoadReport::check(&retort_hf::names::tensors(&cfg), &ckpt).is_complete());

    // A second call lists the revision and downloads nothing.
    let before = server.seen.lock().unwrap().len();
    hub(&server, cache.path(), None).snapshot(REPO, "main").unwrap();
    let after: Vec<Seen> = server.seen.lock().unwrap()[before..].to_vec();
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(after[0].path.starts_with("/api/models/"));

    // Offline: the cache alone, by branch or by commit.
    let offline = Hub { offline: true, ..hub(&server, cache.path(), None) };
    assert_eq!(offline.snapshot(REPO, "main").unwrap(), snap);
    assert_eq!(offline.snapshot(REPO, COMMIT).unwrap(), snap);
    let empty = tempfile::tempdir().unwrap();
    let e = Hub { offline: true, ..hub(&server, empty.path(), None) }.snapshot(REPO, "main").unwrap_err();
    assert!(matches!(e, HubError::NotCached { .. }), "{e}");
}

#[test]
fn an_interrupted_download_resumes_with_a_range_request() {
    let server = start(Behaviour { cut_first_cdn_response: true, ..Behaviour::default() });
    let cache = tempfile::tempdir().unwrap();
    let snap = hub(&server, cache.path(), None).snapshot(REPO, "main").unwrap();
    assert_eq!(
        std::fs::read(snap.join("model.safetensors")).unwrap(),
        std::fs::read(fixture().join("model.safetensors")).unwrap()
    );
    let ranges: Vec<String> = server.seen.lock().unwrap().iter().filter_map(|s| s.range.clone()).collect();
    assert_eq!(ranges.len(), 1, "one resumed request");
    let total = std::fs::metadata(fixture().join("model.safetensors")).unwrap().len();
    assert_eq!(ranges[0], format!("bytes={}-", total / 2));
}

#[test]
fn a_corrupt_download_is_refused_and_removed() {
    let server = start(Behaviour { corrupt_cdn: true, ..Behaviour::default() });
    let cache = tempfile::tempdir().unwrap();
    let e = hub(&server, cache.path(), None).snapshot(REPO, "main").unwrap_err().to_string();
    assert!(e.contains("sha256") && e.contains("model.safetensors"), "{e}");
    let blobs = cache.path().join("models--acme--tiny-llama/blobs");
    let left: Vec<String> = std::fs::read_dir(blobs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!left.iter().any(|n| n.len() == 64 || n.ends_with(".incomplete")), "{left:?}");
}

#[test]
fn tokens_go_to_the_hub_only_and_are_required_for_gated_models() {
    let server = start(Behaviour { require_token: Some("hf_secret".into()), ..Behaviour::default() });
    let cache = tempfile::tempdir().unwrap();
    let e = hub(&server, cache.path(), None).snapshot(REPO, "main").unwrap_err();
    assert!(matches!(e, HubError::Unauthorized { status: 401, .. }), "{e}");
    assert!(e.to_string().contains("HF_TOKEN"));
    hub(&server, cache.path(), Some("hf_secret")).snapshot(REPO, "main").unwrap();
    let seen = server.seen.lock().unwrap();
    let cdn: Vec<&Seen> = seen.iter().filter(|s| s.path.starts_with("/cdn/")).collect();
    assert!(!cdn.is_empty() && cdn.iter().all(|s| s.auth.is_none()), "the token never reaches the CDN host");
    assert!(seen.iter().any(|s| s.port == server.hub_port && s.auth.as_deref() == Some("Bearer hf_secret")));
}

#[test]
fn pickle_only_repositories_are_refused_with_a_reason() {
    let server = start(Behaviour { only_pickles: true, ..Behaviour::default() });
    let cache = tempfile::tempdir().unwrap();
    let e = hub(&server, cache.path(), None).snapshot(REPO, "main").unwrap_err().to_string();
    assert!(e.contains("no safetensors weights") && e.contains(".bin"), "{e}");
    let e = hub(&server, cache.path(), None).snapshot("not-an-id", "main").unwrap_err().to_string();
    assert!(e.contains("org/name"), "{e}");
}
