//! Anthropic's Messages API.

use std::time::Duration;

use serde_json::{Value, json};

use crate::completion::{Completion, Finish, Usage};
use crate::http::{ApiKey, Failure, RetryCause, retry, status_failure, transport};
use crate::limiter::RateHeaders;
use crate::openai::redact;
use crate::request::ChatRequest;

/// The API version retort speaks.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// A Messages endpoint.
#[derive(Debug, Clone)]
pub struct Anthropic {
    pub(crate) client: reqwest::Client,
    pub(crate) base_url: String,
    pub(crate) key: Option<ApiKey>,
    pub(crate) key_env: Option<String>,
    pub(crate) timeout: Duration,
}

/// The request body for one request (also the `params` of a batch entry).
pub fn body(req: &ChatRequest) -> Value {
    let messages: Vec<Value> = req
        .turns()
        .iter()
        .map(|m| json!({"role": m.role, "content": [{"type": "text", "text": m.content}]}))
        .collect();
    let mut b = json!({
        "model": req.model,
        "max_tokens": req.max_tokens,
        "messages": messages,
        "temperature": req.temperature,
    });
    if let Some(s) = req.system() {
        b["system"] = json!(s);
    }
    if let Some(schema) = &req.schema {
        b["output_config"] = json!({"format": {"type": "json_schema", "schema": schema}});
    }
    b
}

/// Reads a Messages response body (also a batch result's `message`).
pub fn parse_value(v: &Value) -> Result<Completion, Failure> {
    let blocks = v["content"]
        .as_array()
        .ok_or_else(|| retry(RetryCause::BadResponse, "the response has no `content`"))?;
    let content: String =
        blocks.iter().filter(|b| b["type"] == "text").filter_map(|b| b["text"].as_str()).collect();
    let stop = v["stop_reason"].as_str().unwrap_or("end_turn");
    let finish = Finish::from_anthropic(stop);
    if content.is_empty() && finish == Finish::Stop {
        return Err(retry(RetryCause::BadResponse, "the answer is empty"));
    }
    let u = &v["usage"];
    let usage = Usage {
        input_tokens: u["input_tokens"].as_u64().unwrap_or(0)
            + u["cache_creation_input_tokens"].as_u64().unwrap_or(0),
        output_tokens: u["output_tokens"].as_u64().unwrap_or(0),
        cached_input_tokens: u["cache_read_input_tokens"].as_u64().unwrap_or(0),
    };
    let refusal = (finish == Finish::Refusal).then(|| content.clone()).filter(|s| !s.is_empty());
    Ok(Completion { content, finish, usage, refusal, cost_usd: 0.0 })
}

/// Reads a Messages response body.
pub fn parse(body: &[u8]) -> Result<Completion, Failure> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| retry(RetryCause::BadResponse, format!("the response is not JSON ({e})")))?;
    parse_value(&v)
}

impl Anthropic {
    pub(crate) fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let rb = rb.header("anthropic-version", ANTHROPIC_VERSION);
        match &self.key {
            Some(k) => rb.header("x-api-key", k.expose()),
            None => rb,
        }
    }

    /// Sends one request.
    pub async fn send(&self, req: &ChatRequest) -> Result<(Completion, RateHeaders), Failure> {
        let url = format!("{}/v1/messages", self.base_url.trim_end_matches('/'));
        let rb = self.authed(self.client.post(&url).timeout(self.timeout).json(&body(req)));
        let resp = rb.send().await.map_err(|e| transport(&e, false))?;
        let status = resp.status().as_u16();
        let headers = RateHeaders::parse(resp.headers());
        let bytes = resp.bytes().await.map_err(|e| transport(&e, true))?;
        if !(200..300).contains(&status) {
            let f = status_failure(status, headers, &bytes, "Anthropic", &req.model, self.key_env.as_deref());
            return Err(redact(f, self.key.as_ref()));
        }
        parse(&bytes).map(|c| (c, headers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Message;

    #[test]
    fn the_system_prompt_moves_to_the_top_level() {
        let req = ChatRequest {
            model: "claude-sonnet-4-5".into(),
            messages: vec![Message::new("system", "s"), Message::new("user", "u")],
            temperature: 0.2,
            max_tokens: 10,
            schema: Some(json!({"type": "object"})),
            sample: 0,
        };
        let b = body(&req);
        assert_eq!(b["system"], "s");
        assert_eq!(b["messages"].as_array().unwrap().len(), 1);
        assert_eq!(b["messages"][0]["content"][0]["text"], "u");
        assert_eq!(b["output_config"]["format"]["type"], "json_schema");
    }

    #[test]
    fn responses_parse_with_stop_reasons_and_cache_usage() {
        let c = parse(br#"{"content":[{"type":"text","text":"a"},{"type":"text","text":"b"}],"stop_reason":"end_turn","usage":{"input_tokens":5,"output_tokens":2,"cache_creation_input_tokens":1,"cache_read_input_tokens":7}}"#).unwrap();
        assert_eq!(c.content, "ab");
        assert_eq!(c.usage, Usage { input_tokens: 6, output_tokens: 2, cached_input_tokens: 7 });
        let r = parse(br#"{"content":[{"type":"text","text":"I won't"}],"stop_reason":"refusal"}"#).unwrap();
        assert_eq!(r.finish, Finish::Refusal);
        assert!(r.failure().is_some());
        let l = parse(br#"{"content":[{"type":"text","text":"cu"}],"stop_reason":"max_tokens"}"#).unwrap();
        assert_eq!(l.finish, Finish::Length);
    }
}
