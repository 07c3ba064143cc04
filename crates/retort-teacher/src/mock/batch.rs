//! The fake's provider batch endpoints: OpenAI's Files and Batch APIs, Anthropic's Message Batches.
//! A batch runs its requests through the same script as online requests when it ends (after
//! `batch_polls` polls, unless held); results come back in reverse order, so clients must match
//! them by `custom_id`.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::{Api, Behavior, Logged, MockRequest, Shared, answer_body, error_body, last_user, refusal_body};

/// A provider batch as the fake saw it.
#[derive(Debug, Clone)]
pub struct MockBatch {
    /// Its id.
    pub id: String,
    /// Which API created it.
    pub api: Api,
    /// Its requests' `custom_id`s, in submission order.
    pub custom_ids: Vec<String>,
    /// Its requests' last user messages, in submission order.
    pub users: Vec<String>,
    /// Polls it answered.
    pub polls: u32,
    /// Whether it has ended.
    pub ended: bool,
}

struct Entry {
    custom_id: String,
    req: MockRequest,
    bytes: usize,
}

pub(super) struct Stored {
    view: MockBatch,
    entries: Vec<Entry>,
    expired: bool,
    counts: (u64, u64, u64),
    output_file: Option<String>,
    error_file: Option<String>,
    results: Vec<u8>,
}

impl Stored {
    pub(super) fn view(&self) -> MockBatch {
        self.view.clone()
    }
}

fn err(status: u16, message: &str) -> Option<(u16, Vec<u8>)> {
    Some((
        status,
        json!({"error": {"message": message, "type": "invalid_request_error"}}).to_string().into_bytes(),
    ))
}

fn ok(v: Value) -> Option<(u16, Vec<u8>)> {
    Some((200, v.to_string().into_bytes()))
}

/// Answers a batch endpoint, or `None` when the path is not one.
pub(super) fn route(
    shared: &Shared,
    method: &str,
    path: &str,
    headers: &HashMap<String, String>,
    body: &[u8],
) -> Option<(u16, Vec<u8>)> {
    let path = path.split('?').next().unwrap_or(path);
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let tail: Vec<&str> = match parts.iter().position(|p| *p == "files" || *p == "batches") {
        Some(i) if parts[i] == "batches" && i > 0 && parts[i - 1] == "messages" => parts[i - 1..].to_vec(),
        Some(i) => parts[i..].to_vec(),
        None => return None,
    };
    match (method, tail.as_slice()) {
        ("POST", ["files"]) => upload(shared, headers, body),
        ("GET", ["files", id, "content"]) => {
            let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            match st.files.get(*id) {
                Some(f) => Some((200, f.clone())),
                None => err(404, "no such file"),
            }
        }
        ("POST", ["batches"]) => {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let Some(file_id) = v["input_file_id"].as_str() else { return err(400, "no input_file_id") };
            if v["completion_window"] != "24h" || v["endpoint"] != "/v1/chat/completions" {
                return err(400, "completion_window must be 24h and endpoint /v1/chat/completions");
            }
            let file = {
                let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                st.files.get(file_id).cloned()
            };
            let Some(file) = file else { return err(404, "no such file") };
            let mut entries = Vec::new();
            for line in file.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let Ok(e) = serde_json::from_slice::<Value>(line) else {
                    return err(400, "a line is not JSON");
                };
                let Some(cid) = e["custom_id"].as_str() else { return err(400, "a line has no custom_id") };
                if e["method"] != "POST" || e["url"] != "/v1/chat/completions" {
                    return err(400, "each line needs method POST and url /v1/chat/completions");
                }
                entries.push((cid.to_string(), e["body"].clone(), line.len()));
            }
            create(shared, Api::OpenAi, entries, headers)
        }
        ("GET", ["batches", id]) => poll(shared, id, headers),
        ("POST", ["messages", "batches"]) => {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let Some(reqs) = v["requests"].as_array() else { return err(400, "no requests") };
            let mut entries = Vec::new();
            for r in reqs {
                let Some(cid) = r["custom_id"].as_str() else {
                    return err(400, "a request has no custom_id");
                };
                if cid.is_empty()
                    || cid.len() > 64
                    || !cid.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return err(400, "custom_id must match ^[a-zA-Z0-9_-]{1,64}$");
                }
                entries.push((cid.to_string(), r["params"].clone(), r.to_string().len()));
            }
            create(shared, Api::Anthropic, entries, headers)
        }
        ("GET", ["messages", "batches", id]) => poll(shared, id, headers),
        ("GET", ["messages", "batches", id, "results"]) => {
            let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            match st.batches.iter().find(|b| b.view.id == *id && b.view.ended) {
                Some(b) => Some((200, b.results.clone())),
                None => err(404, "no ended batch with this id"),
            }
        }
        _ => None,
    }
}

fn upload(shared: &Shared, headers: &HashMap<String, String>, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    let ct = headers.get("content-type").map(String::as_str).unwrap_or("");
    let Some(boundary) = ct.split("boundary=").nth(1) else { return err(400, "not multipart") };
    let delim = format!("--{boundary}");
    let mut purpose = None;
    let mut file = None;
    for part in split(body, delim.as_bytes()) {
        let Some(h) = find(part, b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&part[..h]).to_ascii_lowercase();
        let content = part[h + 4..].strip_suffix(b"\r\n").unwrap_or(&part[h + 4..]);
        if head.contains("name=\"purpose\"") {
            purpose = Some(String::from_utf8_lossy(content).into_owned());
        } else if head.contains("name=\"file\"") {
            file = Some(content.to_vec());
        }
    }
    if purpose.as_deref() != Some("batch") {
        return err(400, "purpose must be batch");
    }
    let Some(file) = file else { return err(400, "no file part") };
    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let id = format!("file-in{}", st.files.len());
    st.files.insert(id.clone(), file);
    ok(json!({"id": id, "object": "file", "purpose": "batch"}))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn split<'a>(mut hay: &'a [u8], delim: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    while let Some(i) = find(hay, delim) {
        out.push(&hay[..i]);
        hay = &hay[i + delim.len()..];
    }
    out.push(hay);
    out
}

fn create(
    shared: &Shared,
    api: Api,
    entries: Vec<(String, Value, usize)>,
    headers: &HashMap<String, String>,
) -> Option<(u16, Vec<u8>)> {
    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let id = match api {
        Api::OpenAi => format!("batch_{}", st.batches.len()),
        Api::Anthropic => format!("msgbatch_{}", st.batches.len()),
    };
    let mut list = Vec::new();
    for (custom_id, body, bytes) in entries {
        let (user, system) = last_user(api, &body);
        let n = st.seen.entry(body.to_string()).or_insert(0);
        let attempt = *n;
        *n += 1;
        let req = MockRequest { api, body, user, system, attempt, headers: headers.clone() };
        list.push(Entry { custom_id, req, bytes });
    }
    let view = MockBatch {
        id: id.clone(),
        api,
        custom_ids: list.iter().map(|e| e.custom_id.clone()).collect(),
        users: list.iter().map(|e| e.req.user.clone()).collect(),
        polls: 0,
        ended: false,
    };
    st.batches.push(Stored {
        view,
        entries: list,
        expired: false,
        counts: (0, 0, 0),
        output_file: None,
        error_file: None,
        results: Vec::new(),
    });
    shared.changed.notify_all();
    let b = st.batches.last().map(|b| status_json(b, headers));
    drop(st);
    b.and_then(ok)
}

fn status_json(b: &Stored, headers: &HashMap<String, String>) -> Value {
    let (done, failed, unrun) = b.counts;
    let total = b.entries.len() as u64;
    match b.view.api {
        Api::OpenAi => {
            let status = match (b.view.ended, b.expired) {
                (false, _) => "in_progress",
                (true, false) => "completed",
                (true, true) => "expired",
            };
            json!({
                "id": b.view.id, "object": "batch", "endpoint": "/v1/chat/completions", "status": status,
                "completion_window": "24h",
                "output_file_id": b.output_file, "error_file_id": b.error_file,
                "request_counts": {"total": total, "completed": done, "failed": failed + unrun},
            })
        }
        Api::Anthropic => {
            let host = headers.get("host").cloned().unwrap_or_default();
            let ended = b.view.ended;
            json!({
                "id": b.view.id, "type": "message_batch",
                "processing_status": if ended { "ended" } else { "in_progress" },
                "request_counts": {
                    "processing": if ended { 0 } else { total }, "succeeded": done, "errored": failed,
                    "canceled": 0, "expired": unrun,
                },
                "results_url": if ended { json!(format!("http://{host}/v1/messages/batches/{}/results", b.view.id)) } else { Value::Null },
            })
        }
    }
}

fn poll(shared: &Shared, id: &str, headers: &HashMap<String, String>) -> Option<(u16, Vec<u8>)> {
    let config = &shared.config;
    let held = config.batch_hold.as_ref().is_some_and(|h| h.load(std::sync::atomic::Ordering::SeqCst));
    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let Some(i) = st.batches.iter().position(|b| b.view.id == id) else { return err(404, "no such batch") };
    st.batches[i].view.polls += 1;
    if !st.batches[i].view.ended && !held && st.batches[i].view.polls > config.batch_polls {
        let mut logged = Vec::new();
        let mut output = Vec::new();
        let mut errors = Vec::new();
        let b = &mut st.batches[i];
        let api = b.view.api;
        let mut counts = (0u64, 0u64, 0u64);
        // Reverse order: results never come back in submission order.
        for e in b.entries.iter().rev() {
            if config.batch_expire.as_ref().is_some_and(|f| f(&e.req)) {
                counts.2 += 1;
                errors.push(match api {
                    Api::OpenAi => json!({"id": format!("batch_req_{}", e.custom_id), "custom_id": e.custom_id, "response": null,
                        "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}}),
                    Api::Anthropic => json!({"custom_id": e.custom_id, "result": {"type": "expired"}}),
                });
                continue;
            }
            let mut behavior = (config.script)(&e.req);
            while let Behavior::Delay(_, inner) = behavior {
                behavior = *inner;
            }
            let (status, body, answer) = match behavior {
                Behavior::Answer(t) => (200, answer_body(api, &t, "stop", e.bytes), Some(t)),
                Behavior::Length(t) => (200, answer_body(api, &t, "length", e.bytes), Some(t)),
                Behavior::Refuse(t) => (200, refusal_body(api, &t), Some(String::new())),
                Behavior::Status(code, m, _) => (code, error_body(api, code, &m), None),
                _ => (500, error_body(api, 500, "the fake failed this request"), None),
            };
            logged.push(Logged { api, user: e.req.user.clone(), status, answer });
            let line = match (api, status) {
                (Api::OpenAi, _) => {
                    json!({"id": format!("batch_req_{}", e.custom_id), "custom_id": e.custom_id,
                    "response": {"status_code": status, "request_id": "req_mock", "body": body}, "error": null})
                }
                (Api::Anthropic, 200) => {
                    json!({"custom_id": e.custom_id, "result": {"type": "succeeded", "message": body}})
                }
                (Api::Anthropic, _) => {
                    json!({"custom_id": e.custom_id, "result": {"type": "errored", "error": body}})
                }
            };
            if status == 200 {
                counts.0 += 1;
                output.push(line);
            } else {
                counts.1 += 1;
                errors.push(line);
            }
        }
        b.view.ended = true;
        b.expired = counts.2 > 0;
        b.counts = counts;
        let jsonl = |lines: &[Value]| lines.iter().map(|l| format!("{l}\n")).collect::<String>().into_bytes();
        match api {
            Api::OpenAi => {
                let n = b.view.id.clone();
                if !output.is_empty() {
                    b.output_file = Some(format!("file-out-{n}"));
                }
                if !errors.is_empty() {
                    b.error_file = Some(format!("file-err-{n}"));
                }
                let files = [(b.output_file.clone(), jsonl(&output)), (b.error_file.clone(), jsonl(&errors))];
                for (name, content) in files {
                    if let Some(name) = name {
                        st.files.insert(name, content);
                    }
                }
            }
            Api::Anthropic => {
                let mut all = output;
                all.extend(errors);
                b.results = jsonl(&all);
            }
        }
        st.log.extend(logged);
        shared.changed.notify_all();
    }
    let v = status_json(&st.batches[i], headers);
    drop(st);
    shared.changed.notify_all();
    ok(v)
}
