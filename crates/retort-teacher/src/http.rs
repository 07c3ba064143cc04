//! What the HTTP clients share: the key wrapper, failure classification and error-body reading.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::limiter::RateHeaders;

/// An API key. Its `Debug` never shows it, and it is only ever put in a request header.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key read from the environment.
    pub fn new(key: String) -> ApiKey {
        ApiKey(key)
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// The key, for redacting it from any text that might echo it.
    pub fn redact(&self, text: &str) -> String {
        retort_recipe::secrets::redact(text, std::slice::from_ref(&self.0))
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Why an attempt failed in a way that a later attempt may not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryCause {
    /// 429 Too Many Requests.
    RateLimit,
    /// 503 or 529: the provider is overloaded.
    Overloaded,
    /// 500, 502, 504 and other server errors.
    ServerError,
    /// No answer within `teacher.timeout`.
    Timeout,
    /// The connection failed or was reset.
    Connection,
    /// The body was cut short or was not the JSON the API promises.
    BadResponse,
}

impl RetryCause {
    /// The name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryCause::RateLimit => "rate_limit",
            RetryCause::Overloaded => "overloaded",
            RetryCause::ServerError => "server_error",
            RetryCause::Timeout => "timeout",
            RetryCause::Connection => "connection",
            RetryCause::BadResponse => "bad_response",
        }
    }
}

/// One failed attempt.
#[derive(Debug, Clone)]
pub enum Failure {
    /// Worth another try.
    Retry {
        /// Why.
        cause: RetryCause,
        /// What happened.
        detail: String,
        /// What the provider's headers said.
        headers: Box<RateHeaders>,
    },
    /// Retrying cannot help.
    Fatal {
        /// What happened.
        message: String,
        /// How to fix it.
        hint: String,
    },
}

pub(crate) fn retry(cause: RetryCause, detail: impl Into<String>) -> Failure {
    Failure::Retry { cause, detail: detail.into(), headers: Box::default() }
}

/// Classifies an error from sending a request or reading its body.
pub(crate) fn transport(e: &reqwest::Error, reading_body: bool) -> Failure {
    if e.is_timeout() {
        retry(RetryCause::Timeout, "no answer within `teacher.timeout`")
    } else if reading_body || e.is_body() || e.is_decode() {
        retry(RetryCause::BadResponse, format!("the response body was cut short ({})", root_cause(e)))
    } else {
        retry(RetryCause::Connection, format!("connection failed ({})", root_cause(e)))
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The provider's error message and code from an error body (both APIs nest them under `error`).
pub(crate) fn error_details(body: &[u8]) -> (String, String) {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let e = &v["error"];
    let message = e["message"].as_str().map(str::to_string).unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        text.chars().take(300).collect()
    });
    let code = e["code"].as_str().or_else(|| e["type"].as_str()).unwrap_or("").to_string();
    (message.chars().take(500).collect(), code)
}

/// Classifies a non-success HTTP status. `provider` names the API in messages; `key_env` names the
/// key's variable in hints.
pub(crate) fn status_failure(
    status: u16,
    headers: RateHeaders,
    body: &[u8],
    provider: &str,
    model: &str,
    key_env: Option<&str>,
) -> Failure {
    let (message, code) = error_details(body);
    let said = if message.is_empty() { String::new() } else { format!(": {message}") };
    let lower = format!("{message} {code}").to_ascii_lowercase();
    let quota = lower.contains("insufficient_quota")
        || lower.contains("credit balance")
        || lower.contains("spend limit")
        || lower.contains("usage limit")
        || lower.contains("billing");
    if quota && matches!(status, 400 | 402 | 403 | 429) {
        return Failure::Fatal {
            message: format!("{provider} refused the request for lack of quota or credit (HTTP {status}{said})"),
            hint: "add credit or raise the spend limit in your provider account, then run the same command again (answered requests are saved)".into(),
        };
    }
    let key_hint = match key_env {
        Some(env) => format!(
            "check the key in `{env}` (the variable named by `teacher.api_key_env`) and that it may use `{model}`"
        ),
        None => {
            "this server wants a key: set `teacher.api_key_env` to the name of a variable holding it".into()
        }
    };
    match status {
        401 => Failure::Fatal { message: format!("{provider} rejected the API key (HTTP 401{said})"), hint: key_hint },
        403 => Failure::Fatal { message: format!("{provider} denied access (HTTP 403{said})"), hint: key_hint },
        404 => Failure::Fatal {
            message: format!("{provider} does not know the model `{model}` or the URL is wrong (HTTP 404{said})"),
            hint: "check `teacher.model` (spelled as the provider lists it) and `teacher.base_url`".into(),
        },
        408 => Failure::Retry { cause: RetryCause::Timeout, detail: format!("HTTP 408{said}"), headers: Box::new(headers) },
        409 | 425 => Failure::Retry { cause: RetryCause::ServerError, detail: format!("HTTP {status}{said}"), headers: Box::new(headers) },
        429 => Failure::Retry { cause: RetryCause::RateLimit, detail: format!("HTTP 429{said}"), headers: Box::new(headers) },
        503 | 529 => Failure::Retry { cause: RetryCause::Overloaded, detail: format!("HTTP {status}{said}"), headers: Box::new(headers) },
        500..=599 => Failure::Retry { cause: RetryCause::ServerError, detail: format!("HTTP {status}{said}"), headers: Box::new(headers) },
        _ if code == "model_not_found" || lower.contains("model_not_found") => Failure::Fatal {
            message: format!("{provider} does not know the model `{model}` (HTTP {status}{said})"),
            hint: "check `teacher.model`, spelled as the provider lists it".into(),
        },
        _ => Failure::Fatal {
            message: format!("{provider} rejected the request (HTTP {status}{said})"),
            hint: "the request itself is wrong for this API: check `teacher.model`, `teacher.max_tokens`, `teacher.temperature` and the output schema".into(),
        },
    }
}

/// Builds the shared HTTP client (rustls with the ring provider).
pub(crate) fn build_client(max_concurrency: u32) -> Result<reqwest::Client, String> {
    // reqwest is built without a crypto provider; install ring once per process (a second call, or
    // a provider installed by the host program, is fine).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .pool_max_idle_per_host(max_concurrency as usize)
        .connect_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .user_agent(concat!("retort/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        let h = RateHeaders::default;
        let f = |s: u16, body: &str| status_failure(s, h(), body.as_bytes(), "OpenAI", "m", Some("K"));
        assert!(matches!(f(401, "{}"), Failure::Fatal { .. }));
        assert!(matches!(
            f(429, r#"{"error":{"message":"slow down","code":"rate_limit_exceeded"}}"#),
            Failure::Retry { cause: RetryCause::RateLimit, .. }
        ));
        match f(429, r#"{"error":{"message":"You exceeded your current quota","code":"insufficient_quota"}}"#)
        {
            Failure::Fatal { message, .. } => assert!(message.contains("quota"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(f(529, ""), Failure::Retry { cause: RetryCause::Overloaded, .. }));
        assert!(matches!(f(500, "oops"), Failure::Retry { cause: RetryCause::ServerError, .. }));
        match f(400, r#"{"error":{"message":"The model `x` does not exist","code":"model_not_found"}}"#) {
            Failure::Fatal { message, .. } => {
                assert!(message.contains("does not know the model"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        match f(
            400,
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low"}}"#,
        ) {
            Failure::Fatal { hint, .. } => assert!(hint.contains("credit"), "{hint}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keys_never_show_in_debug_output() {
        let k = ApiKey::new("sk-abcdefghijklmnopqrstuvwxyz".into());
        assert_eq!(format!("{k:?}"), "ApiKey(<redacted>)");
        assert_eq!(k.redact("bad key sk-abcdefghijklmnopqrstuvwxyz"), "bad key <redacted>");
    }
}
