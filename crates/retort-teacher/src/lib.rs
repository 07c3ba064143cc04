//! Teacher clients for retort: the frontier models that write and grade training data.
//!
//! This crate sends chat requests to OpenAI's Chat Completions API (and every server that speaks it:
//! vLLM, Ollama, llama.cpp server, OpenRouter, Together, Groq), to Anthropic's Messages API, or
//! answers them from a recorded transcript (`replay`). Around the clients it keeps the promises a
//! long, paid run needs: a cache and journal so no answered request is paid twice, even across a
//! `kill -9` ([`Store`]); a hard budget checked before every send against the request's worst case
//! ([`Budget`]); rate limits seeded from the recipe and corrected from response headers
//! ([`Limiter`]); retries with backoff for what can pass and immediate, explained failure for what
//! cannot; a stall timeout instead of a hang. API keys are only ever read from the environment
//! variable the recipe names, and never logged, cached or shown.
//!
//! It is not the distillation pipeline (templates, filters, splits live in `retort-distill`), and it
//! does not stream tokens or call tools: one request, one complete answer.

mod anthropic;
mod batch;
mod completion;
mod error;
mod http;
mod limiter;
#[cfg(feature = "mock")]
pub mod mock;
mod openai;
mod price;
mod replay;
mod request;
mod store;
mod teacher;

pub use batch::{BatchOptions, BatchProgress};
pub use completion::{Completion, Finish, Usage};
pub use error::TeacherError;
pub use http::{ApiKey, RetryCause};
pub use limiter::{Limiter, RateHeaders};
pub use price::{Budget, Pricing, builtin_price};
pub use replay::Replay;
pub use request::{ChatRequest, Message, canonical_json};
pub use store::{Record, Store};
pub use teacher::{Answer, Backoff, Options, Stats, Teacher, splitmix};

/// Wire formats, exposed for tests and the mock server.
pub mod wire {
    pub use crate::anthropic::{ANTHROPIC_VERSION, body as anthropic_body, parse as anthropic_parse};
    pub use crate::openai::{body as openai_body, parse as openai_parse};
}
