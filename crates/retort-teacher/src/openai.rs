//! OpenAI Chat Completions, as spoken by OpenAI and by OpenAI-compatible servers (vLLM, Ollama,
//! llama.cpp server, OpenRouter, Together, Groq).

use std::time::Duration;

use serde_json::{Value, json};

use crate::completion::{Completion, Finish, Usage};
use crate::http::{ApiKey, Failure, RetryCause, retry, status_failure, transport};
use crate::limiter::RateHeaders;
use crate::request::ChatRequest;

/// A Chat Completions endpoint.
#[derive(Debug, Clone)]
pub struct OpenAi {
    pub(crate) client: reqwest::Client,
    pub(crate) base_url: String,
    pub(crate) key: Option<ApiKey>,
    pub(crate) key_env: Option<String>,
    /// OpenAI itself (`max_completion_tokens`) rather than a compatible server (`max_tokens`).
    pub(crate) official: bool,
    pub(crate) timeout: Duration,
}

/// The request body for one request.
pub fn body(req: &ChatRequest, official: bool) -> Value {
    let mut b = json!({
        "model": req.model,
        "messages": req.messages,
        "temperature": req.temperature,
    });
    // OpenAI's reasoning models only take `max_completion_tokens`; many compatible servers only
    // know `max_tokens`.
    let limit_key = if official { "max_completion_tokens" } else { "max_tokens" };
    b[limit_key] = json!(req.max_tokens);
    if let Some(schema) = &req.schema {
        b["response_format"] = json!({
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": true},
        });
    }
    b
}

/// Reads a Chat Completions response body.
pub fn parse(body: &[u8]) -> Result<Completion, Failure> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| retry(RetryCause::BadResponse, format!("the response is not JSON ({e})")))?;
    let choice =
        v["choices"].get(0).ok_or_else(|| retry(RetryCause::BadResponse, "the response has no `choices`"))?;
    let msg = &choice["message"];
    let refusal = msg["refusal"].as_str().filter(|s| !s.is_empty()).map(str::to_string);
    let content = match &msg["content"] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        // Some servers return content parts.
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join(""),
        _ => return Err(retry(RetryCause::BadResponse, "`message.content` is neither text nor null")),
    };
    let finish = choice["finish_reason"].as_str().map_or(Finish::Stop, Finish::from_openai);
    if content.is_empty() && refusal.is_none() && finish == Finish::Stop {
        return Err(retry(RetryCause::BadResponse, "the answer is empty"));
    }
    let u = &v["usage"];
    let prompt = u["prompt_tokens"].as_u64().unwrap_or(0);
    let cached = u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0).min(prompt);
    let usage = Usage {
        input_tokens: prompt - cached,
        output_tokens: u["completion_tokens"].as_u64().unwrap_or(0),
        cached_input_tokens: cached,
    };
    Ok(Completion { content, finish, usage, refusal, cost_usd: 0.0 })
}

impl OpenAi {
    /// Sends one request.
    pub async fn send(&self, req: &ChatRequest) -> Result<(Completion, RateHeaders), Failure> {
        let url = format!("{}/chat/completions", self.base_url.trim_end_matches('/'));
        let mut rb = self.client.post(&url).timeout(self.timeout).json(&body(req, self.official));
        if let Some(k) = &self.key {
            rb = rb.bearer_auth(k.expose());
        }
        let resp = rb.send().await.map_err(|e| transport(&e, false))?;
        let status = resp.status().as_u16();
        let headers = RateHeaders::parse(resp.headers());
        let bytes = resp.bytes().await.map_err(|e| transport(&e, true))?;
        if !(200..300).contains(&status) {
            let name = if self.official { "OpenAI" } else { "the OpenAI-compatible server" };
            let f = status_failure(status, headers, &bytes, name, &req.model, self.key_env.as_deref());
            return Err(redact(f, self.key.as_ref()));
        }
        parse(&bytes).map(|c| (c, headers))
    }
}

/// Removes the key from any message a server echoed it into.
pub(crate) fn redact(f: Failure, key: Option<&ApiKey>) -> Failure {
    let Some(k) = key else { return f };
    match f {
        Failure::Retry { cause, detail, headers } => {
            Failure::Retry { cause, detail: k.redact(&detail), headers }
        }
        Failure::Fatal { message, hint } => Failure::Fatal { message: k.redact(&message), hint },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Message;

    #[test]
    fn bodies_carry_the_schema_and_the_right_token_limit() {
        let req = ChatRequest {
            model: "gpt-5-mini".into(),
            messages: vec![Message::new("system", "s"), Message::new("user", "u")],
            temperature: 1.0,
            max_tokens: 50,
            schema: Some(json!({"type": "object"})),
            sample: 3,
        };
        let b = body(&req, true);
        assert_eq!(b["max_completion_tokens"], 50);
        assert_eq!(b["response_format"]["json_schema"]["strict"], true);
        assert_eq!(b["messages"][0]["role"], "system");
        assert!(b.get("sample").is_none());
        assert_eq!(body(&req, false)["max_tokens"], 50);
    }

    #[test]
    fn responses_parse_with_refusals_and_cached_tokens() {
        let c = parse(br#"{"choices":[{"message":{"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":4}}}"#).unwrap();
        assert_eq!(c.content, "hi");
        assert_eq!(c.usage, Usage { input_tokens: 6, output_tokens: 2, cached_input_tokens: 4 });
        let r = parse(
            br#"{"choices":[{"message":{"content":null,"refusal":"I can't help"},"finish_reason":"stop"}]}"#,
        )
        .unwrap();
        assert!(r.failure().unwrap().contains("I can't help"));
        let l = parse(br#"{"choices":[{"message":{"content":"cut"},"finish_reason":"length"}]}"#).unwrap();
        assert_eq!(l.finish, Finish::Length);
        assert!(matches!(
            parse(b"{\"choices\": [").unwrap_err(),
            Failure::Retry { cause: RetryCause::BadResponse, .. }
        ));
        assert!(matches!(parse(b"{}").unwrap_err(), Failure::Retry { cause: RetryCause::BadResponse, .. }));
    }
}
