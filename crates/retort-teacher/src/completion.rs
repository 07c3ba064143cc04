//! What a teacher answered.

use serde::{Deserialize, Serialize};

/// Why the teacher stopped writing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// A complete answer.
    Stop,
    /// Cut off at `max_tokens`.
    Length,
    /// Withheld by the provider's content filter.
    ContentFilter,
    /// The model declined to answer.
    Refusal,
    /// Anything else the provider reported (tool calls, pauses), spelled as it did.
    Other(String),
}

impl Finish {
    /// From OpenAI's `finish_reason` (also what replay transcripts use).
    pub fn from_openai(s: &str) -> Finish {
        match s {
            "stop" => Finish::Stop,
            "length" => Finish::Length,
            "content_filter" => Finish::ContentFilter,
            "refusal" => Finish::Refusal,
            other => Finish::Other(other.to_string()),
        }
    }

    /// From Anthropic's `stop_reason`.
    pub fn from_anthropic(s: &str) -> Finish {
        match s {
            "end_turn" | "stop_sequence" => Finish::Stop,
            "max_tokens" | "model_context_window_exceeded" => Finish::Length,
            "refusal" => Finish::Refusal,
            other => Finish::Other(other.to_string()),
        }
    }
}

/// Tokens a request used, as the provider counted them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens billed at the input price (not counting cached ones).
    pub input_tokens: u64,
    /// Answer tokens.
    pub output_tokens: u64,
    /// Prompt tokens served from the provider's prompt cache (cheaper), including Anthropic's
    /// cache writes, which are billed like input.
    #[serde(default)]
    pub cached_input_tokens: u64,
}

/// The teacher's answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// The answer text (empty when refused).
    pub content: String,
    /// Why it stopped.
    pub finish: Finish,
    /// Token counts.
    pub usage: Usage,
    /// The provider's refusal text, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// What it cost in US dollars (0 when the price is unknown or the answer was replayed).
    #[serde(default)]
    pub cost_usd: f64,
}

impl Completion {
    /// Why this answer must not become a training example, if it must not: cut off, filtered or
    /// refused.
    pub fn failure(&self) -> Option<String> {
        match &self.finish {
            Finish::Stop if self.refusal.is_none() => None,
            Finish::Stop | Finish::Refusal => Some(match &self.refusal {
                Some(r) => format!("the teacher refused: {}", short(r)),
                None => "the teacher refused".into(),
            }),
            Finish::Length => Some("the answer was cut off at `teacher.max_tokens`".into()),
            Finish::ContentFilter => Some("the provider's content filter withheld the answer".into()),
            Finish::Other(s) => Some(format!("the teacher stopped with `{s}` instead of an answer")),
        }
    }
}

fn short(s: &str) -> String {
    let t: String = s.chars().take(120).collect();
    if t.len() < s.len() { format!("{t}...") } else { t }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(finish: Finish, refusal: Option<&str>) -> Completion {
        Completion {
            content: "x".into(),
            finish,
            usage: Usage::default(),
            refusal: refusal.map(str::to_string),
            cost_usd: 0.0,
        }
    }

    #[test]
    fn only_a_complete_unrefused_answer_is_usable() {
        assert_eq!(c(Finish::Stop, None).failure(), None);
        assert!(c(Finish::Stop, Some("no")).failure().unwrap().contains("refused: no"));
        assert!(c(Finish::Length, None).failure().unwrap().contains("max_tokens"));
        assert!(c(Finish::ContentFilter, None).failure().unwrap().contains("content filter"));
        assert!(c(Finish::Refusal, None).failure().is_some());
        assert!(c(Finish::from_openai("tool_calls"), None).failure().unwrap().contains("tool_calls"));
        assert_eq!(Finish::from_anthropic("end_turn"), Finish::Stop);
        assert_eq!(Finish::from_anthropic("max_tokens"), Finish::Length);
        assert_eq!(Finish::from_anthropic("refusal"), Finish::Refusal);
    }
}
