//! `[teacher]`: the frontier model that writes and grades the training data.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::types::Duration;

/// Who serves the teacher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    /// OpenAI's API (Chat Completions; Batch API with `batch = true`).
    Openai,
    /// Anthropic's Messages API (Message Batches with `batch = true`).
    Anthropic,
    /// Any server speaking OpenAI Chat Completions: vLLM, Ollama, llama.cpp server, OpenRouter,
    /// Together, Groq. Needs `base_url`.
    OpenaiCompatible,
    /// Replays a recorded transcript (`transcript`) instead of calling an API; fails on any request it
    /// does not hold. For offline runs and tests.
    Replay,
}

impl Provider {
    /// The provider's API base URL, when it has a fixed one.
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            Provider::Openai => Some("https://api.openai.com/v1"),
            Provider::Anthropic => Some("https://api.anthropic.com"),
            Provider::OpenaiCompatible | Provider::Replay => None,
        }
    }

    /// The environment variable that conventionally holds the provider's key.
    pub fn default_api_key_env(self) -> Option<&'static str> {
        match self {
            Provider::Openai => Some("OPENAI_API_KEY"),
            Provider::Anthropic => Some("ANTHROPIC_API_KEY"),
            Provider::OpenaiCompatible | Provider::Replay => None,
        }
    }

    /// True when the provider has a batch API retort can use.
    pub fn has_batch_api(self) -> bool {
        matches!(self, Provider::Openai | Provider::Anthropic)
    }

    /// The recipe spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::Anthropic => "anthropic",
            Provider::OpenaiCompatible => "openai-compatible",
            Provider::Replay => "replay",
        }
    }
}

/// Prices in US dollars per million tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Price {
    /// Input (prompt) tokens.
    pub input_per_mtok: f64,
    /// Output (completion) tokens.
    pub output_per_mtok: f64,
    /// Input tokens served from the provider's prompt cache. Default: the input price.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_input_per_mtok: Option<f64>,
    /// Fraction of the price charged for batch requests (0.5 = half price, as OpenAI and Anthropic do).
    pub batch_discount: f64,
}

impl Default for Price {
    fn default() -> Self {
        Price { input_per_mtok: 0.0, output_per_mtok: 0.0, cached_input_per_mtok: None, batch_discount: 0.5 }
    }
}

/// `[teacher]`: the model that writes the examples. Keys never go here: name the environment variable
/// that holds one with `api_key_env`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Teacher {
    /// Who serves the model.
    pub provider: Provider,
    /// Required (except for `replay`). The model name as the provider spells it (`gpt-5-mini`,
    /// `claude-sonnet-4-5`, `Qwen/Qwen2.5-72B-Instruct` on vLLM).
    pub model: String,
    /// API base URL. Default: `https://api.openai.com/v1` for `openai`, `https://api.anthropic.com` for
    /// `anthropic`; required for `openai-compatible` (e.g. `http://localhost:8000/v1` for vLLM,
    /// `http://localhost:11434/v1` for Ollama).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// The name of the environment variable holding the API key (never the key itself). Default:
    /// `OPENAI_API_KEY` for `openai`, `ANTHROPIC_API_KEY` for `anthropic`, none for local servers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// With `provider = "replay"`: the recorded transcript (JSONL of requests and responses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transcript: Option<PathBuf>,
    /// Most requests in flight at once.
    pub max_concurrency: u32,
    /// Requests per minute to stay under. Default: none set; the provider's rate-limit headers still
    /// slow retort down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    /// Tokens per minute (input + output) to stay under. Default: none set; headers still apply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u32>,
    /// Time limit for one request; a request over it is retried.
    pub timeout: Duration,
    /// Retries of one request after 429, 5xx, timeouts or dropped connections, with exponential backoff
    /// and jitter (`retry-after` is honoured). Errors retrying cannot fix (401, 403, unknown model,
    /// exhausted quota) stop the run at once.
    pub max_retries: u32,
    /// Stop with an error after this long without a single successful response, instead of hanging.
    pub stall_timeout: Duration,
    /// Use the provider's batch API: half price, results within 24 hours. `openai` and `anthropic` only.
    /// Survives restarts: batch ids are journaled.
    pub batch: bool,
    /// Hard spending cap in US dollars for this recipe's teacher requests (all stages, cached ones
    /// free). Checked before every request against its worst case (`max_tokens`); reaching it stops
    /// cleanly with exit code 4, and a rerun with a higher cap resumes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_usd: Option<f64>,
    /// Prices for cost reports and the budget. Default: retort's table for known models; required with
    /// `budget_usd` for models retort does not know.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price: Option<Price>,
    /// Sampling temperature for the teacher's answers. Lower is more consistent; generated inputs use
    /// `distill.inputs.temperature`.
    pub temperature: f64,
    /// Most tokens the teacher may write in one answer. An answer cut off at this limit is rejected,
    /// never kept.
    pub max_tokens: u32,
}

impl Default for Teacher {
    fn default() -> Self {
        Teacher {
            provider: Provider::Openai,
            model: String::new(),
            base_url: None,
            api_key_env: None,
            transcript: None,
            max_concurrency: 16,
            requests_per_minute: None,
            tokens_per_minute: None,
            timeout: Duration(std::time::Duration::from_secs(120)),
            max_retries: 8,
            stall_timeout: Duration(std::time::Duration::from_secs(600)),
            batch: false,
            budget_usd: None,
            price: None,
            temperature: 0.7,
            max_tokens: 1024,
        }
    }
}
