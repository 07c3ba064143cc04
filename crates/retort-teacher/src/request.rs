//! What is asked of a teacher, and its canonical hash: the key of the cache and the journal.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with this role.
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message { role: role.to_string(), content: content.into() }
    }
}

/// One request to the teacher. It never holds credentials: those live in the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The model as the provider spells it.
    pub model: String,
    /// The conversation; a leading `system` message is the system prompt.
    pub messages: Vec<Message>,
    /// Sampling temperature.
    pub temperature: f64,
    /// Most tokens the answer may have.
    pub max_tokens: u32,
    /// A JSON Schema the answer must follow (structured output), when the recipe gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    /// Makes otherwise identical requests distinct (several samples of one prompt).
    #[serde(default)]
    pub sample: u32,
}

/// Orders every object's keys so that equal JSON values serialize to equal bytes.
pub fn canonical_json(v: &Value) -> Value {
    match v {
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            let mut out = Map::new();
            for k in keys {
                out.insert(k.clone(), canonical_json(&o[k]));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical_json).collect()),
        other => other.clone(),
    }
}

impl ChatRequest {
    /// The cache key: a SHA-256 over the provider and every field that changes the answer, in a fixed
    /// order. Hex, 64 characters.
    pub fn key(&self, provider: &str) -> String {
        let canonical = json!({
            "provider": provider,
            "model": self.model,
            "messages": self.messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "schema": self.schema.as_ref().map(canonical_json),
            "sample": self.sample,
        });
        let mut h = Sha256::new();
        h.update(canonical.to_string().as_bytes());
        hex(&h.finalize())
    }

    /// The system prompt, if the first message is one.
    pub fn system(&self) -> Option<&str> {
        self.messages.first().filter(|m| m.role == "system").map(|m| m.content.as_str())
    }

    /// The messages after the system prompt.
    pub fn turns(&self) -> &[Message] {
        if self.system().is_some() { &self.messages[1..] } else { &self.messages }
    }

    /// The last user message, shortened, to name a request in messages.
    pub fn describe(&self) -> String {
        let text = self.messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.as_str());
        let text = text.unwrap_or("");
        let mut short: String = text.chars().take(60).collect();
        if short.len() < text.len() {
            short.push_str("...");
        }
        format!("{short:?}")
    }

    /// UTF-8 bytes of all message text: an upper bound on input tokens for byte-level BPE
    /// tokenizers (every token is at least one byte), plus a few tokens of framing per message.
    pub fn worst_case_input_tokens(&self) -> u64 {
        self.messages.iter().map(|m| m.content.len() as u64 + 8).sum::<u64>()
            + self.schema.as_ref().map_or(0, |s| s.to_string().len() as u64)
    }

    /// A typical input token count (four bytes a token), for estimates and rate limits.
    pub fn estimated_input_tokens(&self) -> u64 {
        self.worst_case_input_tokens().div_ceil(4)
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> ChatRequest {
        ChatRequest {
            model: "m".into(),
            messages: vec![Message::new("system", "s"), Message::new("user", "u")],
            temperature: 0.7,
            max_tokens: 100,
            schema: Some(json!({"type": "object", "properties": {"b": {}, "a": {}}})),
            sample: 0,
        }
    }

    #[test]
    fn the_key_depends_on_what_changes_the_answer_and_not_on_key_order() {
        let a = req();
        let mut b = req();
        b.schema = Some(json!({"properties": {"a": {}, "b": {}}, "type": "object"}));
        assert_eq!(a.key("openai"), b.key("openai"));
        assert_eq!(a.key("openai").len(), 64);
        assert_ne!(a.key("openai"), a.key("anthropic"));
        for change in [
            |r: &mut ChatRequest| r.sample = 1,
            |r: &mut ChatRequest| r.temperature = 0.0,
            |r: &mut ChatRequest| r.max_tokens = 5,
            |r: &mut ChatRequest| r.model = "n".into(),
            |r: &mut ChatRequest| r.messages[1].content = "v".into(),
            |r: &mut ChatRequest| r.schema = None,
        ] {
            let mut c = req();
            change(&mut c);
            assert_ne!(a.key("openai"), c.key("openai"));
        }
    }

    #[test]
    fn system_and_turns() {
        let r = req();
        assert_eq!(r.system(), Some("s"));
        assert_eq!(r.turns().len(), 1);
        assert_eq!(r.describe(), "\"u\"");
    }
}
