//! The two providers' batch APIs on the wire: OpenAI's Batch API (a JSONL file uploaded to
//! `/v1/files`, then `/v1/batches`) and Anthropic's Message Batches (`/v1/messages/batches`).

use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::anthropic::{self, Anthropic};
use crate::completion::Completion;
use crate::http::{ApiKey, Failure, RetryCause, retry, status_failure, transport};
use crate::limiter::RateHeaders;
use crate::openai::{self, OpenAi, redact};
use crate::request::{ChatRequest, hex};

/// OpenAI: at most 50,000 requests and 200 MB in one batch input file.
pub(crate) const OPENAI_LIMITS: Limits = Limits { max_requests: 50_000, max_bytes: 200 * 1000 * 1000 };
/// Anthropic: at most 100,000 requests or 256 MB in one Message Batch, whichever comes first.
pub(crate) const ANTHROPIC_LIMITS: Limits = Limits { max_requests: 100_000, max_bytes: 256 * 1000 * 1000 };

/// Room left for the envelope around the entries (multipart framing, `{"requests": [...]}`).
const ENVELOPE: usize = 4096;

/// How much one batch may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub max_requests: usize,
    pub max_bytes: usize,
}

/// A batch's state as the provider reports it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Info {
    /// No more results will come (completed, expired, cancelled, ended).
    pub ended: bool,
    /// The provider's word for the state.
    pub status: String,
    /// Requests with a result so far.
    pub done: u64,
    /// Requests in the batch.
    pub total: u64,
    /// OpenAI: the file of answers.
    pub output_file: Option<String>,
    /// OpenAI: the file of failed and unfinished requests.
    pub error_file: Option<String>,
    /// Anthropic: where the results stream is.
    pub results_url: Option<String>,
    /// OpenAI: the batch failed as a whole (validation, a limit), so none of it ran.
    pub refused: Option<Failure>,
}

/// What a batch said about one request.
#[derive(Debug, Clone)]
pub(crate) enum Item {
    /// An answer (cost not yet set).
    Answer(Completion),
    /// The request failed inside the batch.
    Failed(Failure),
    /// The batch ended (expired, cancelled) before the request ran.
    Unfinished(String),
}

/// The client of one provider's batch API.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Client<'a> {
    OpenAi(&'a OpenAi),
    Anthropic(&'a Anthropic),
}

/// Long transfers (a 200 MB upload, a results file) get at least this long.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);

impl Client<'_> {
    pub fn limits(&self) -> Limits {
        match self {
            Client::OpenAi(_) => OPENAI_LIMITS,
            Client::Anthropic(_) => ANTHROPIC_LIMITS,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Client::OpenAi(_) => "OpenAI",
            Client::Anthropic(_) => "Anthropic",
        }
    }

    fn key(&self) -> Option<&ApiKey> {
        match self {
            Client::OpenAi(c) => c.key.as_ref(),
            Client::Anthropic(c) => c.key.as_ref(),
        }
    }

    fn key_env(&self) -> Option<&str> {
        match self {
            Client::OpenAi(c) => c.key_env.as_deref(),
            Client::Anthropic(c) => c.key_env.as_deref(),
        }
    }

    fn timeout(&self) -> Duration {
        match self {
            Client::OpenAi(c) => c.timeout,
            Client::Anthropic(c) => c.timeout,
        }
    }

    /// One request as an entry of a batch (an input-file line for OpenAI, with its newline).
    pub fn entry(&self, key: &str, req: &ChatRequest) -> Vec<u8> {
        match self {
            Client::OpenAi(c) => {
                let line = json!({
                    "custom_id": key,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": openai::body(req, c.official),
                });
                let mut b = line.to_string().into_bytes();
                b.push(b'\n');
                b
            }
            Client::Anthropic(_) => {
                json!({"custom_id": key, "params": anthropic::body(req)}).to_string().into_bytes()
            }
        }
    }

    /// The most entry bytes one batch may carry.
    pub fn max_entry_bytes(&self, limits: Limits) -> usize {
        limits.max_bytes.saturating_sub(ENVELOPE).max(1)
    }

    fn request(&self, method: reqwest::Method, url: &str, timeout: Duration) -> reqwest::RequestBuilder {
        match self {
            Client::OpenAi(c) => {
                let rb = c.client.request(method, url).timeout(timeout);
                match &c.key {
                    Some(k) => rb.bearer_auth(k.expose()),
                    None => rb,
                }
            }
            Client::Anthropic(c) => c.authed(c.client.request(method, url).timeout(timeout)),
        }
    }

    fn url(&self, path: &str) -> String {
        match self {
            Client::OpenAi(c) => format!("{}/{path}", c.base_url.trim_end_matches('/')),
            Client::Anthropic(c) => format!("{}/v1/{path}", c.base_url.trim_end_matches('/')),
        }
    }

    /// Sends and reads the whole body; a non-success status becomes a classified failure, except
    /// 404, which comes back as `Ok(None)` (the caller knows what a missing thing means).
    async fn call(&self, rb: reqwest::RequestBuilder, what: &str) -> Result<Option<Vec<u8>>, Failure> {
        let resp = rb.send().await.map_err(|e| transport(&e, false))?;
        let status = resp.status().as_u16();
        let headers = RateHeaders::parse(resp.headers());
        let bytes = resp.bytes().await.map_err(|e| transport(&e, true))?;
        if status == 404 {
            return Ok(None);
        }
        if !(200..300).contains(&status) {
            let f = status_failure(status, headers, &bytes, self.name(), "(batch)", self.key_env());
            let f = match f {
                Failure::Fatal { message, hint } => {
                    Failure::Fatal { message: format!("{what}: {message}"), hint }
                }
                Failure::Retry { cause, detail, headers } => {
                    Failure::Retry { cause, detail: format!("{what}: {detail}"), headers }
                }
            };
            return Err(redact(f, self.key()));
        }
        Ok(Some(bytes.to_vec()))
    }

    fn json(bytes: &[u8], what: &str) -> Result<Value, Failure> {
        serde_json::from_slice(bytes)
            .map_err(|e| retry(RetryCause::BadResponse, format!("{what}: the response is not JSON ({e})")))
    }

    fn missing(&self, what: &str) -> Failure {
        Failure::Fatal {
            message: format!("{what}: {} answered 404 Not Found", self.name()),
            hint: "check `teacher.base_url`, and that the key in `teacher.api_key_env` belongs to the account that owns the batch".into(),
        }
    }

    /// Submits entries as one batch; returns the provider's batch id.
    pub async fn submit(&self, entries: &[Vec<u8>]) -> Result<String, Failure> {
        match self {
            Client::OpenAi(_) => {
                let file_id = self.upload(entries).await?;
                let body = json!({
                    "input_file_id": file_id,
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                    "metadata": {"created_by": "retort"},
                });
                let rb =
                    self.request(reqwest::Method::POST, &self.url("batches"), self.timeout()).json(&body);
                let what = "creating the batch";
                let bytes = self.call(rb, what).await?.ok_or_else(|| self.missing(what))?;
                id_of(&Self::json(&bytes, what)?, what)
            }
            Client::Anthropic(_) => {
                let mut body = Vec::with_capacity(entries.iter().map(Vec::len).sum::<usize>() + 16);
                body.extend_from_slice(b"{\"requests\":[");
                for (i, e) in entries.iter().enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(e);
                }
                body.extend_from_slice(b"]}");
                let rb = self
                    .request(
                        reqwest::Method::POST,
                        &self.url("messages/batches"),
                        self.timeout().max(TRANSFER_TIMEOUT),
                    )
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body);
                let what = "creating the message batch";
                let bytes = self.call(rb, what).await?.ok_or_else(|| self.missing(what))?;
                id_of(&Self::json(&bytes, what)?, what)
            }
        }
    }

    /// OpenAI: uploads the JSONL input file (`purpose=batch`); returns its id.
    async fn upload(&self, entries: &[Vec<u8>]) -> Result<String, Failure> {
        // A boundary made from a hash of the content cannot occur in that content.
        let mut h = Sha256::new();
        for e in entries {
            h.update(e);
        }
        let boundary = format!("retort-{}", &hex(&h.finalize())[..32]);
        let mut body = Vec::with_capacity(entries.iter().map(Vec::len).sum::<usize>() + 512);
        body.extend_from_slice(
            format!("--{boundary}\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(
            format!(
                "--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"retort-batch.jsonl\"\r\ncontent-type: application/jsonl\r\n\r\n"
            )
            .as_bytes(),
        );
        for e in entries {
            body.extend_from_slice(e);
        }
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let rb = self
            .request(reqwest::Method::POST, &self.url("files"), self.timeout().max(TRANSFER_TIMEOUT))
            .header(reqwest::header::CONTENT_TYPE, format!("multipart/form-data; boundary={boundary}"))
            .body(body);
        let what = "uploading the batch input file";
        let bytes = self.call(rb, what).await?.ok_or_else(|| self.missing(what))?;
        id_of(&Self::json(&bytes, what)?, what)
    }

    /// The batch's state; `Ok(None)` when the provider does not know the batch.
    pub async fn poll(&self, id: &str) -> Result<Option<Info>, Failure> {
        let path = match self {
            Client::OpenAi(_) => format!("batches/{id}"),
            Client::Anthropic(_) => format!("messages/batches/{id}"),
        };
        let what = format!("checking batch `{id}`");
        let rb = self.request(reqwest::Method::GET, &self.url(&path), self.timeout());
        let Some(bytes) = self.call(rb, &what).await? else { return Ok(None) };
        let v = Self::json(&bytes, &what)?;
        let s = |k: &str| v[k].as_str().filter(|s| !s.is_empty()).map(str::to_string);
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        Ok(Some(match self {
            Client::OpenAi(_) => {
                let status = s("status").unwrap_or_default();
                let refused = (status == "failed").then(|| openai_failed(&v, id));
                let c = &v["request_counts"];
                Info {
                    ended: matches!(status.as_str(), "completed" | "expired" | "cancelled" | "failed"),
                    refused,
                    status,
                    done: n(&c["completed"]) + n(&c["failed"]),
                    total: n(&c["total"]),
                    output_file: s("output_file_id"),
                    error_file: s("error_file_id"),
                    results_url: None,
                }
            }
            Client::Anthropic(_) => {
                let status = s("processing_status").unwrap_or_default();
                let c = &v["request_counts"];
                let finished = n(&c["succeeded"]) + n(&c["errored"]) + n(&c["canceled"]) + n(&c["expired"]);
                Info {
                    ended: status == "ended",
                    status,
                    done: finished,
                    total: finished + n(&c["processing"]),
                    output_file: None,
                    error_file: None,
                    results_url: s("results_url"),
                    refused: None,
                }
            }
        }))
    }

    /// Every result of an ended batch: (custom_id, what happened), in the provider's order.
    pub async fn results(&self, id: &str, info: &Info) -> Result<Vec<(String, Item)>, Failure> {
        let mut out = Vec::new();
        match self {
            Client::OpenAi(_) => {
                for file in [&info.output_file, &info.error_file].into_iter().flatten() {
                    let what = format!("downloading file `{file}` of batch `{id}`");
                    let rb = self.request(
                        reqwest::Method::GET,
                        &self.url(&format!("files/{file}/content")),
                        self.timeout().max(TRANSFER_TIMEOUT),
                    );
                    let bytes = self.call(rb, &what).await?.ok_or_else(|| self.missing(&what))?;
                    for (i, line) in lines(&bytes).enumerate() {
                        out.push(openai_item(line).map_err(|m| bad_line(&what, i, &m))?);
                    }
                }
            }
            Client::Anthropic(c) => {
                // The key goes only to the API's own host.
                let fallback = self.url(&format!("messages/batches/{id}/results"));
                let url = match &info.results_url {
                    Some(u) if same_origin(u, &c.base_url) => u.clone(),
                    _ => fallback,
                };
                let what = format!("downloading the results of batch `{id}`");
                let rb = self.request(reqwest::Method::GET, &url, self.timeout().max(TRANSFER_TIMEOUT));
                let bytes = self.call(rb, &what).await?.ok_or_else(|| self.missing(&what))?;
                for (i, line) in lines(&bytes).enumerate() {
                    out.push(anthropic_item(line).map_err(|m| bad_line(&what, i, &m))?);
                }
            }
        }
        Ok(out)
    }
}

fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    bytes.split(|b| *b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace))
}

fn bad_line(what: &str, i: usize, message: &str) -> Failure {
    retry(RetryCause::BadResponse, format!("{what}: line {}: {message}", i + 1))
}

fn id_of(v: &Value, what: &str) -> Result<String, Failure> {
    v["id"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .ok_or_else(|| retry(RetryCause::BadResponse, format!("{what}: the response has no `id`")))
}

fn same_origin(url: &str, base: &str) -> bool {
    let origin = |u: &str| -> String {
        let rest = u.split_once("://").map_or(u, |(_, r)| r);
        let host = rest.split('/').next().unwrap_or("");
        format!("{}://{host}", u.split_once("://").map_or("", |(s, _)| s))
    };
    origin(url) == origin(base)
}

/// A failed OpenAI batch: refused as a whole. Limits on enqueued tokens pass with time; anything
/// else is a mistake in the input.
fn openai_failed(v: &Value, id: &str) -> Failure {
    let errors: Vec<String> = v["errors"]["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    let line = e["line"].as_u64().map(|l| format!(" (input line {l})")).unwrap_or_default();
                    format!(
                        "{}{line}: {}",
                        e["code"].as_str().unwrap_or("error"),
                        e["message"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let said = if errors.is_empty() { "no reason given".to_string() } else { errors.join("; ") };
    if said.contains("limit") {
        return retry(RetryCause::RateLimit, format!("OpenAI failed batch `{id}`: {said}"));
    }
    Failure::Fatal {
        message: format!("OpenAI refused batch `{id}`: {said}"),
        hint: "the batch input is wrong for this model: check `teacher.model` (it must support the Batch API), `teacher.max_tokens` and the output schema".into(),
    }
}

fn openai_item(line: &[u8]) -> Result<(String, Item), String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON ({e})"))?;
    let id = v["custom_id"].as_str().ok_or("no `custom_id`")?.to_string();
    let err = &v["error"];
    if !err.is_null() {
        let code = err["code"].as_str().unwrap_or("");
        let message = err["message"].as_str().unwrap_or("").to_string();
        let item = if matches!(code, "batch_expired" | "batch_cancelled") {
            Item::Unfinished(format!("{code}: {message}"))
        } else {
            Item::Failed(retry(RetryCause::ServerError, format!("{code}: {message}")))
        };
        return Ok((id, item));
    }
    let status = v["response"]["status_code"].as_u64().unwrap_or(0) as u16;
    let body = v["response"]["body"].to_string();
    if status != 200 {
        let f = status_failure(status, RateHeaders::default(), body.as_bytes(), "OpenAI", "(batch)", None);
        return Ok((id, Item::Failed(f)));
    }
    let item = match openai::parse(body.as_bytes()) {
        Ok(c) => Item::Answer(c),
        Err(f) => Item::Failed(f),
    };
    Ok((id, item))
}

fn anthropic_item(line: &[u8]) -> Result<(String, Item), String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON ({e})"))?;
    let id = v["custom_id"].as_str().ok_or("no `custom_id`")?.to_string();
    let r = &v["result"];
    let item = match r["type"].as_str().unwrap_or("") {
        "succeeded" => match anthropic::parse_value(&r["message"]) {
            Ok(c) => Item::Answer(c),
            Err(f) => Item::Failed(f),
        },
        "errored" => {
            // `error` is the API's error envelope: {"type": "error", "error": {"type", "message"}}.
            let inner = if r["error"]["error"].is_object() { &r["error"]["error"] } else { &r["error"] };
            let status = match inner["type"].as_str().unwrap_or("") {
                "invalid_request_error" => 400,
                "authentication_error" => 401,
                "permission_error" => 403,
                "not_found_error" => 404,
                "rate_limit_error" => 429,
                "overloaded_error" => 529,
                _ => 500,
            };
            let body = json!({"error": inner}).to_string();
            Item::Failed(status_failure(
                status,
                RateHeaders::default(),
                body.as_bytes(),
                "Anthropic",
                "(batch)",
                None,
            ))
        }
        kind @ ("canceled" | "expired") => Item::Unfinished(format!("the batch {kind} this request")),
        other => return Err(format!("unknown result type `{other}`")),
    };
    Ok((id, item))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::completion::Finish;

    #[test]
    fn openai_output_and_error_lines_are_read() {
        let ok = br#"{"id":"r1","custom_id":"a","response":{"status_code":200,"body":{"choices":[{"message":{"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}},"error":null}"#;
        let (id, item) = openai_item(ok).unwrap();
        assert_eq!(id, "a");
        assert!(matches!(item, Item::Answer(c) if c.content == "hi" && c.finish == Finish::Stop));
        let expired = br#"{"id":"r2","custom_id":"b","response":null,"error":{"code":"batch_expired","message":"too late"}}"#;
        assert!(
            matches!(openai_item(expired).unwrap().1, Item::Unfinished(m) if m.contains("batch_expired"))
        );
        let bad = br#"{"id":"r3","custom_id":"c","response":{"status_code":400,"body":{"error":{"message":"bad schema","code":"invalid"}}},"error":null}"#;
        assert!(
            matches!(openai_item(bad).unwrap().1, Item::Failed(Failure::Fatal { message, .. }) if message.contains("bad schema"))
        );
        let busy = br#"{"id":"r4","custom_id":"d","response":{"status_code":500,"body":{"error":{"message":"oops"}}},"error":null}"#;
        assert!(matches!(openai_item(busy).unwrap().1, Item::Failed(Failure::Retry { .. })));
        assert!(openai_item(b"{}").is_err());
    }

    #[test]
    fn anthropic_results_are_read() {
        let ok = br#"{"custom_id":"a","result":{"type":"succeeded","message":{"content":[{"type":"text","text":"x"}],"stop_reason":"end_turn","usage":{"input_tokens":2,"output_tokens":1}}}}"#;
        assert!(matches!(anthropic_item(ok).unwrap().1, Item::Answer(c) if c.content == "x"));
        let err = br#"{"custom_id":"b","result":{"type":"errored","error":{"type":"error","error":{"type":"overloaded_error","message":"busy"}}}}"#;
        assert!(matches!(
            anthropic_item(err).unwrap().1,
            Item::Failed(Failure::Retry { cause: RetryCause::Overloaded, .. })
        ));
        let bad = br#"{"custom_id":"c","result":{"type":"errored","error":{"type":"error","error":{"type":"invalid_request_error","message":"no"}}}}"#;
        assert!(matches!(anthropic_item(bad).unwrap().1, Item::Failed(Failure::Fatal { .. })));
        let exp = br#"{"custom_id":"d","result":{"type":"expired"}}"#;
        assert!(matches!(anthropic_item(exp).unwrap().1, Item::Unfinished(_)));
        assert!(anthropic_item(br#"{"custom_id":"e","result":{"type":"mystery"}}"#).is_err());
    }

    #[test]
    fn results_urls_on_another_host_never_get_the_key() {
        assert!(same_origin(
            "https://api.anthropic.com/v1/messages/batches/x/results",
            "https://api.anthropic.com"
        ));
        assert!(!same_origin("https://evil.example/results", "https://api.anthropic.com"));
        assert!(same_origin("http://127.0.0.1:5/v1/x", "http://127.0.0.1:5"));
    }
}
