//! A fake of both providers' APIs on a local port, for tests and benchmarks (feature `mock`).
//!
//! It speaks just enough HTTP/1.1 (keep-alive, `content-length` bodies) to play every failure a
//! real provider can: statuses with `retry-after`, requests that never answer, reset connections,
//! truncated bodies, malformed JSON, cut-off answers and refusals. What it plays is decided per
//! request by a script; every answer is logged so tests can prove nothing was paid twice.

mod batch;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Which API a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST .../chat/completions`.
    OpenAi,
    /// `POST .../v1/messages`.
    Anthropic,
}

/// A request as the script sees it.
#[derive(Debug, Clone)]
pub struct MockRequest {
    /// The API.
    pub api: Api,
    /// The parsed JSON body.
    pub body: Value,
    /// The last user message's text.
    pub user: String,
    /// The system prompt (either API's place for it).
    pub system: String,
    /// How many times this exact body arrived before (0 the first time).
    pub attempt: u32,
    /// The request headers, lowercased names.
    pub headers: HashMap<String, String>,
}

/// What to play.
#[derive(Debug, Clone)]
pub enum Behavior {
    /// A complete answer.
    Answer(String),
    /// An answer cut off at the token limit (`finish_reason = "length"`, `stop_reason = "max_tokens"`).
    Length(String),
    /// A refusal.
    Refuse(String),
    /// An error status with a message and extra headers (e.g. `retry-after`).
    Status(u16, String, Vec<(String, String)>),
    /// Never answer (until the client gives up).
    Hang,
    /// Reset the connection without answering.
    Reset,
    /// Send headers promising a full answer, then half of it, then close.
    Truncate(String),
    /// A 200 whose body is not JSON.
    Malformed,
    /// Wait, then play the inner behaviour.
    Delay(Duration, Box<Behavior>),
}

/// Decides each answer.
pub type Script = Arc<dyn Fn(&MockRequest) -> Behavior + Send + Sync>;

/// Decides, for a request in a provider batch, whether the batch expires before running it.
pub type Expire = Arc<dyn Fn(&MockRequest) -> bool + Send + Sync>;

pub use batch::MockBatch;

/// One answered request in the log.
#[derive(Debug, Clone)]
pub struct Logged {
    /// The API.
    pub api: Api,
    /// The last user message.
    pub user: String,
    /// The HTTP status (0 for hangs, resets and truncations). Logged just before it is sent.
    pub status: u16,
    /// The body's text content when it was an answer.
    pub answer: Option<String>,
}

#[derive(Default)]
struct State {
    log: Vec<Logged>,
    seen: HashMap<String, u32>,
    pending: usize,
    arrivals: VecDeque<Instant>,
    max_per_minute: usize,
    rejected_rpm: u64,
    batches: Vec<batch::Stored>,
    files: HashMap<String, Vec<u8>>,
}

/// Settings of a mock server.
#[derive(Clone)]
pub struct MockConfig {
    /// Decides each answer.
    pub script: Script,
    /// Added before every answer.
    pub latency: Duration,
    /// Enforce this many requests per sliding minute with 429s.
    pub rpm_limit: Option<usize>,
    /// Answers sent with every response: OpenAI-style rate-limit headers.
    pub extra_headers: Vec<(String, String)>,
    /// Provider batches: polls answered "in progress" before a batch ends.
    pub batch_polls: u32,
    /// Provider batches: while this holds `true`, no batch ends.
    pub batch_hold: Option<Arc<AtomicBool>>,
    /// Provider batches: requests for which this returns true are left unrun, and the batch ends
    /// as expired (with the answers of the others).
    pub batch_expire: Option<Expire>,
}

impl MockConfig {
    /// A server that answers every request with `answer(user message)`.
    pub fn answering(answer: impl Fn(&str) -> String + Send + Sync + 'static) -> MockConfig {
        MockConfig {
            script: Arc::new(move |r: &MockRequest| Behavior::Answer(answer(&r.user))),
            latency: Duration::ZERO,
            rpm_limit: None,
            extra_headers: Vec::new(),
            batch_polls: 1,
            batch_hold: None,
            batch_expire: None,
        }
    }

    /// A server playing `script`.
    pub fn scripted(script: impl Fn(&MockRequest) -> Behavior + Send + Sync + 'static) -> MockConfig {
        MockConfig {
            script: Arc::new(script),
            latency: Duration::ZERO,
            rpm_limit: None,
            extra_headers: Vec::new(),
            batch_polls: 1,
            batch_hold: None,
            batch_expire: None,
        }
    }
}

struct Shared {
    config: MockConfig,
    state: Mutex<State>,
    changed: Condvar,
}

/// A running mock server; it stops when dropped.
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl MockServer {
    /// Starts a server on a free loopback port, on its own thread.
    pub fn start(config: MockConfig) -> std::io::Result<MockServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let shared =
            Arc::new(Shared { config, state: Mutex::new(State::default()), changed: Condvar::new() });
        let s = shared.clone();
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, s).await;
                });
            }
        });
        Ok(MockServer { addr, shared, runtime: Some(runtime) })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every response sent, in order.
    pub fn log(&self) -> Vec<Logged> {
        self.lock().log.clone()
    }

    /// Every provider batch created, in order.
    pub fn batches(&self) -> Vec<MockBatch> {
        self.lock().batches.iter().map(batch::Stored::view).collect()
    }

    /// Blocks until `pred(batches created so far)` holds (woken by each create and poll), or
    /// `limit` passes; returns whether it held.
    pub fn wait_batches(&self, limit: Duration, pred: impl Fn(&[MockBatch]) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        let mut st = self.lock();
        loop {
            let views: Vec<MockBatch> = st.batches.iter().map(batch::Stored::view).collect();
            if pred(&views) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = match self.shared.changed.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Requests waiting for an answer right now.
    pub fn pending(&self) -> usize {
        self.lock().pending
    }

    /// Blocks until `pred(pending requests, answered requests)` holds (woken by each change), or
    /// `limit` passes; returns whether it held.
    pub fn wait_until(&self, limit: Duration, pred: impl Fn(usize, usize) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        let mut st = self.lock();
        loop {
            let answered = st.log.iter().filter(|l| l.answer.is_some()).count();
            if pred(st.pending, answered) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = match self.shared.changed.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// The most requests that arrived within any 60-second window, and how many the RPM limit
    /// turned away.
    pub fn rpm_stats(&self) -> (usize, u64) {
        let st = self.lock();
        (st.max_per_minute, st.rejected_rpm)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

pub(crate) fn last_user(api: Api, body: &Value) -> (String, String) {
    let text = |c: &Value| -> String {
        match c {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
            _ => String::new(),
        }
    };
    let msgs = body["messages"].as_array().cloned().unwrap_or_default();
    let user =
        msgs.iter().rev().find(|m| m["role"] == "user").map(|m| text(&m["content"])).unwrap_or_default();
    let system = match api {
        Api::OpenAi => {
            msgs.iter().find(|m| m["role"] == "system").map(|m| text(&m["content"])).unwrap_or_default()
        }
        Api::Anthropic => text(&body["system"]),
    };
    (user, system)
}

pub(crate) fn answer_body(api: Api, content: &str, finish: &str, req_bytes: usize) -> Value {
    let input = (req_bytes / 4) as u64;
    let output = (content.len() / 4 + 1) as u64;
    match api {
        Api::OpenAi => json!({
            "id": "chatcmpl-mock", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output},
        }),
        Api::Anthropic => {
            let stop = match finish {
                "length" => "max_tokens",
                "refusal" => "refusal",
                _ => "end_turn",
            };
            json!({
                "id": "msg_mock", "type": "message", "role": "assistant",
                "content": [{"type": "text", "text": content}],
                "stop_reason": stop,
                "usage": {"input_tokens": input, "output_tokens": output},
            })
        }
    }
}

pub(crate) fn refusal_body(api: Api, text: &str) -> Value {
    match api {
        Api::OpenAi => json!({
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "refusal": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        }),
        Api::Anthropic => answer_body(api, text, "refusal", 4),
    }
}

pub(crate) fn error_body(api: Api, status: u16, message: &str) -> Value {
    match api {
        Api::OpenAi => {
            json!({"error": {"message": message, "type": "error", "code": if status == 429 { "rate_limit_exceeded" } else { "error" }}})
        }
        Api::Anthropic => {
            let kind = match status {
                400 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
    }
}

pub(crate) async fn write_response(
    stream: &mut TcpStream,
    status: u16,
    body: &[u8],
    headers: &[(String, String)],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    stream.write_all(&out).await
}

/// One HTTP request: method, path, headers (lowercased names), body.
type HttpRequest = (String, String, HashMap<String, String>, Vec<u8>);

/// Reads one request. `None` at a clean end of the connection.
async fn read_request(reader: &mut BufReader<&mut TcpStream>) -> std::io::Result<Option<HttpRequest>> {
    let mut line = String::new();
    if reader.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or("GET").to_string();
    let path = words.next().unwrap_or("/").to_string();
    let mut headers = HashMap::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await?;
    Ok(Some((method, path, headers, body)))
}

async fn serve(mut stream: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    loop {
        let req = {
            let mut reader = BufReader::new(&mut stream);
            let r = read_request(&mut reader).await?;
            if !reader.buffer().is_empty() {
                // Pipelining is not something retort does; refuse rather than misparse.
                return Ok(());
            }
            r
        };
        let Some((method, path, headers, body)) = req else { return Ok(()) };
        if let Some((status, reply)) = batch::route(&shared, &method, &path, &headers, &body) {
            write_response(&mut stream, status, &reply, &[]).await?;
            continue;
        }
        let api = if path.ends_with("/chat/completions") {
            Api::OpenAi
        } else if path.ends_with("/messages") {
            Api::Anthropic
        } else if path.ends_with("/stats") {
            let b = {
                let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                json!({
                    "answered": st.log.iter().filter(|l| l.answer.is_some()).count(),
                    "responses": st.log.len(),
                    "max_per_minute": st.max_per_minute,
                    "rejected_rpm": st.rejected_rpm,
                    "batches": st.batches.len(),
                })
            };
            write_response(&mut stream, 200, b.to_string().as_bytes(), &[]).await?;
            continue;
        } else {
            write_response(&mut stream, 404, b"{\"error\":{\"message\":\"no such endpoint\"}}", &[]).await?;
            continue;
        };
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let (user, system) = last_user(api, &json);
        let digest = String::from_utf8_lossy(&body).into_owned();
        let (attempt, over_limit) = {
            let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            let n = st.seen.entry(digest).or_insert(0);
            let attempt = *n;
            *n += 1;
            let now = Instant::now();
            st.arrivals.push_back(now);
            while st.arrivals.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60)) {
                st.arrivals.pop_front();
            }
            let over = shared.config.rpm_limit.is_some_and(|l| st.arrivals.len() > l);
            if over {
                st.rejected_rpm += 1;
                st.arrivals.pop_back();
            }
            st.max_per_minute = st.max_per_minute.max(st.arrivals.len());
            st.pending += 1;
            shared.changed.notify_all();
            (attempt, over)
        };
        let mreq = MockRequest { api, body: json, user: user.clone(), system, attempt, headers };
        let mut behavior = if over_limit {
            Behavior::Status(429, "rate limit".into(), vec![("retry-after-ms".into(), "100".into())])
        } else {
            (shared.config.script)(&mreq)
        };
        if !shared.config.latency.is_zero() {
            tokio::time::sleep(shared.config.latency).await;
        }
        while let Behavior::Delay(d, inner) = behavior {
            tokio::time::sleep(d).await;
            behavior = *inner;
        }
        let finish = |status: u16, answer: Option<String>| {
            let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.pending -= 1;
            st.log.push(Logged { api, user: user.clone(), status, answer });
            shared.changed.notify_all();
        };
        let extra = &shared.config.extra_headers;
        match behavior {
            Behavior::Answer(text) => {
                let b = answer_body(api, &text, "stop", body.len()).to_string();
                finish(200, Some(text));
                write_response(&mut stream, 200, b.as_bytes(), extra).await?;
            }
            Behavior::Length(text) => {
                let b = answer_body(api, &text, "length", body.len()).to_string();
                finish(200, Some(text));
                write_response(&mut stream, 200, b.as_bytes(), extra).await?;
            }
            Behavior::Refuse(text) => {
                let b = refusal_body(api, &text).to_string();
                finish(200, Some(String::new()));
                write_response(&mut stream, 200, b.as_bytes(), extra).await?;
            }
            Behavior::Status(code, message, hdrs) => {
                let b = error_body(api, code, &message).to_string();
                finish(code, None);
                write_response(&mut stream, code, b.as_bytes(), &hdrs).await?;
            }
            Behavior::Malformed => {
                finish(200, None);
                write_response(&mut stream, 200, b"{\"choices\": [{\"message\": ", extra).await?;
            }
            Behavior::Hang => {
                // Hold the request until the client goes away.
                let mut buf = [0u8; 64];
                let _ = stream.read(&mut buf).await;
                finish(0, None);
                return Ok(());
            }
            Behavior::Reset => {
                let _ = stream.set_zero_linger();
                finish(0, None);
                return Ok(());
            }
            Behavior::Truncate(text) => {
                let b = answer_body(api, &text, "stop", body.len()).to_string();
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    b.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&b.as_bytes()[..b.len() / 2]).await;
                let _ = stream.flush().await;
                finish(0, None);
                return Ok(());
            }
            // Unwrapped by the loop above.
            Behavior::Delay(..) => return Ok(()),
        }
    }
}
