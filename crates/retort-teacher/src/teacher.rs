//! One teacher: a client behind the cache, the journal, the budget, the rate limiter and retries.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use retort_recipe::schema::teacher::{Provider, Teacher as TeacherSettings};
use serde::Serialize;
use tokio::time::Instant;

use crate::anthropic::Anthropic;
use crate::batch::{BatchOptions, BatchProgress, Batcher};
use crate::completion::Completion;
use crate::error::TeacherError;
use crate::http::{ApiKey, Failure, RetryCause, build_client};
use crate::limiter::{Limiter, RateHeaders};
use crate::openai::OpenAi;
use crate::price::{Budget, Pricing};
use crate::replay::Replay;
use crate::request::ChatRequest;
use crate::store::Store;

/// Backoff between retries: `base * 2^(attempt-1)`, capped at `max`, with jitter (50-100%).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first delay.
    pub base: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { base: Duration::from_millis(500), max: Duration::from_secs(60) }
    }
}

impl Backoff {
    pub(crate) fn delay(&self, attempt: u32, seed: u64) -> Duration {
        let exp = self.base.as_secs_f64() * 2f64.powi(attempt.saturating_sub(1).min(30) as i32);
        let capped = exp.min(self.max.as_secs_f64());
        let jitter = 0.5 + 0.5 * (splitmix(seed ^ u64::from(attempt)) >> 11) as f64 / (1u64 << 53) as f64;
        Duration::from_secs_f64(capped * jitter)
    }
}

/// A 64-bit mix (SplitMix64's finalizer).
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[derive(Debug)]
pub(crate) enum Backend {
    OpenAi(OpenAi),
    Anthropic(Anthropic),
    Replay(Replay),
}

/// Counters for the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Requests answered by the provider in this run.
    pub sent: u64,
    /// Requests answered from the cache (earlier runs, or a duplicate in this one).
    pub cache_hits: u64,
    /// Requests an earlier, killed run had sent without journaling an answer.
    pub unanswered_before_restart: u64,
    /// Retries, by cause.
    pub retries: BTreeMap<String, u64>,
    /// Input tokens billed in this run (not counting cached prompt tokens).
    pub input_tokens: u64,
    /// Prompt tokens served from the provider's prompt cache in this run.
    pub cached_input_tokens: u64,
    /// Output tokens in this run.
    pub output_tokens: u64,
    /// Dollars spent in this run.
    pub cost_usd: f64,
    /// Dollars spent by earlier runs of this data directory.
    pub cost_before_usd: f64,
    /// Provider batches submitted in this run.
    pub batches_submitted: u64,
    /// Provider batches an earlier run submitted that this run polled for their results.
    pub batches_resumed: u64,
}

/// What the teacher said, and whether it came from the cache.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The request's key.
    pub key: String,
    /// The answer.
    pub completion: Completion,
    /// Served from the cache (nothing was sent).
    pub cached: bool,
}

/// Settings that are not in the recipe: for tests and benchmarks.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Retry delays.
    pub backoff: Backoff,
    /// Batch mode: how long to gather requests, how often to poll, batch size limits.
    pub batch: BatchOptions,
}

/// A teacher ready to answer requests.
pub struct Teacher {
    pub(crate) backend: Backend,
    provider: Provider,
    pub(crate) model: String,
    pub(crate) max_retries: u32,
    pub(crate) stall_timeout: Duration,
    pub(crate) backoff: Backoff,
    pub(crate) pricing: Pricing,
    limiter: Limiter,
    pub(crate) store: Arc<Store>,
    pub(crate) budget: Budget,
    batcher: Option<Batcher>,
    stats: Mutex<Stats>,
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    last_success: Mutex<Instant>,
    halted: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Teacher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Teacher")
            .field("provider", &self.provider)
            .field("model", &self.model)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Teacher {
    /// A teacher for the recipe's `[teacher]`. `api_key` is the value of `api_key_env` (read by the
    /// caller from the environment); `store` is the cache and journal.
    pub fn new(
        t: &TeacherSettings,
        api_key: Option<String>,
        store: Arc<Store>,
        options: Options,
    ) -> Result<Teacher, TeacherError> {
        // The recipe check refuses `batch` for providers without a batch API; were it set anyway,
        // requests go online and are priced in full.
        let batch = t.batch && t.provider.has_batch_api();
        let pricing = Pricing::resolve(t.provider, &t.model, t.price.as_ref(), batch, t.budget_usd)?;
        let key = api_key.filter(|k| !k.is_empty()).map(ApiKey::new);
        let key_env = t.api_key_env.clone();
        let base_url = || {
            t.base_url.clone().or_else(|| t.provider.default_base_url().map(str::to_string)).ok_or_else(
                || TeacherError::Config {
                    message: format!("`provider = \"{}\"` needs `teacher.base_url`", t.provider.as_str()),
                    hint: "e.g. `base_url = \"http://localhost:8000/v1\"`".into(),
                },
            )
        };
        let client = || {
            build_client(t.max_concurrency).map_err(|message| TeacherError::Config {
                message,
                hint: "this is a bug in retort's TLS set-up; please report it".into(),
            })
        };
        let needs_key = |k: &Option<ApiKey>| -> Result<(), TeacherError> {
            match (k, &key_env) {
                (None, Some(env)) => Err(TeacherError::MissingKey { env: env.clone() }),
                _ => Ok(()),
            }
        };
        let backend = match t.provider {
            Provider::Openai | Provider::OpenaiCompatible => {
                needs_key(&key)?;
                Backend::OpenAi(OpenAi {
                    client: client()?,
                    base_url: base_url()?,
                    key,
                    key_env: key_env.clone(),
                    official: t.provider == Provider::Openai,
                    timeout: t.timeout.0,
                })
            }
            Provider::Anthropic => {
                needs_key(&key)?;
                Backend::Anthropic(Anthropic {
                    client: client()?,
                    base_url: base_url()?,
                    key,
                    key_env: key_env.clone(),
                    timeout: t.timeout.0,
                })
            }
            Provider::Replay => {
                let path = t.transcript.clone().ok_or_else(|| TeacherError::Config {
                    message: "`provider = \"replay\"` needs `teacher.transcript`".into(),
                    hint: "add `transcript = \"path/to/transcript.jsonl\"`".into(),
                })?;
                Backend::Replay(Replay::load(&path)?)
            }
        };
        let stats = Stats {
            unanswered_before_restart: store.unanswered_at_open() as u64,
            cost_before_usd: store.spent_at_open(),
            ..Stats::default()
        };
        let batcher = batch.then(|| Batcher::new(options.batch.clone(), store.open_batches()));
        Ok(Teacher {
            batcher,
            backend,
            provider: t.provider,
            model: t.model.clone(),
            max_retries: t.max_retries,
            stall_timeout: t.stall_timeout.0,
            backoff: options.backoff,
            pricing,
            limiter: Limiter::new(t.max_concurrency, t.requests_per_minute, t.tokens_per_minute),
            budget: Budget::new(t.budget_usd, store.spent_at_open()),
            store,
            stats: Mutex::new(stats),
            inflight: Mutex::new(HashMap::new()),
            last_success: Mutex::new(Instant::now()),
            halted: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The provider.
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// The model.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Prices in force.
    pub fn pricing(&self) -> &Pricing {
        &self.pricing
    }

    /// The budget.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// The cache and journal.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The cache key of a request.
    pub fn key(&self, req: &ChatRequest) -> String {
        req.key(self.provider.as_str())
    }

    /// True when the answer is cached (asking costs nothing).
    pub fn is_cached(&self, req: &ChatRequest) -> bool {
        self.store.contains(&self.key(req))
    }

    /// Stops sending: requests not yet sent fail with [`TeacherError::Halted`]. Called after an
    /// error that ends the run, so no more money is spent on it.
    pub fn halt(&self) {
        self.halted.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(b) = &self.batcher {
            b.wake();
        }
    }

    pub(crate) fn is_halted(&self) -> bool {
        self.halted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// True when requests go through the provider's batch API.
    pub fn is_batch(&self) -> bool {
        self.batcher.is_some()
    }

    /// Batch mode: where the provider batches in flight stand, updated at every poll.
    pub fn batch_progress(&self) -> Option<tokio::sync::watch::Receiver<BatchProgress>> {
        self.batcher.as_ref().map(Batcher::subscribe)
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn stat(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Answers a request: from the cache when it can, else from the provider, within the budget and
    /// the rate limits, retrying what can be retried. Identical requests in flight are sent once.
    pub async fn ask(&self, req: &ChatRequest) -> Result<Answer, TeacherError> {
        let key = self.key(req);
        if let Backend::Replay(r) = &self.backend {
            // Replayed answers are free and the transcript is the truth: nothing is cached, so an
            // edited transcript takes effect at once.
            let c = r.answer(req)?;
            self.stat(|s| s.sent += 1);
            return Ok(Answer { key, completion: c, cached: false });
        }
        if let Some(c) = self.store.get(&key) {
            self.stat(|s| s.cache_hits += 1);
            return Ok(Answer { key, completion: c, cached: true });
        }
        if let Some(b) = &self.batcher {
            return self.ask_batched(b, req, &key).await;
        }
        let gate = {
            let mut m = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            m.entry(key.clone()).or_default().clone()
        };
        let guard = gate.lock().await;
        let result = match self.store.get(&key) {
            Some(c) => {
                self.stat(|s| s.cache_hits += 1);
                Ok(Answer { key: key.clone(), completion: c, cached: true })
            }
            None => {
                self.send(req, &key).await.map(|c| Answer { key: key.clone(), completion: c, cached: false })
            }
        };
        drop(guard);
        self.inflight.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        result
    }

    async fn send(&self, req: &ChatRequest, key: &str) -> Result<Completion, TeacherError> {
        if self.is_halted() {
            return Err(TeacherError::Halted);
        }
        let worst = self.pricing.worst_case(req.worst_case_input_tokens(), req.max_tokens);
        self.budget.reserve(worst)?;
        let result = self.send_reserved(req, key).await;
        self.budget.settle(worst, result.as_ref().ok().map(|c| c.cost_usd));
        result
    }

    async fn send_reserved(&self, req: &ChatRequest, key: &str) -> Result<Completion, TeacherError> {
        let est_tokens = req.estimated_input_tokens() + u64::from(req.max_tokens);
        let seed = u64::from_str_radix(&key[..16.min(key.len())], 16).unwrap_or(0);
        let mut attempt = 0u32;
        let mut journaled = false;
        loop {
            let grant = self.limiter.acquire(est_tokens).await;
            if self.is_halted() {
                return Err(TeacherError::Halted);
            }
            if !journaled {
                self.store.record_sent(key)?;
                journaled = true;
            }
            let outcome = match &self.backend {
                Backend::OpenAi(c) => c.send(req).await,
                Backend::Anthropic(c) => c.send(req).await,
                Backend::Replay(_) => {
                    return Err(TeacherError::Config {
                        message: "replay sends nothing".into(),
                        hint: String::new(),
                    });
                }
            };
            match outcome {
                Ok((mut c, headers)) => {
                    self.limiter.observe(&headers);
                    c.cost_usd = self.pricing.cost(&c.usage);
                    self.limiter.settle_tokens(grant.tokens, c.usage.input_tokens + c.usage.output_tokens);
                    self.store.record_done(key, &c)?;
                    drop(grant);
                    *self.last_success.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                    self.stat(|s| {
                        s.sent += 1;
                        s.input_tokens += c.usage.input_tokens;
                        s.cached_input_tokens += c.usage.cached_input_tokens;
                        s.output_tokens += c.usage.output_tokens;
                        s.cost_usd += c.cost_usd;
                    });
                    return Ok(c);
                }
                Err(Failure::Fatal { message, hint }) => {
                    self.halt();
                    return Err(TeacherError::Fatal { message, hint });
                }
                Err(Failure::Retry { cause, detail, headers }) => {
                    drop(grant);
                    self.limiter.observe(&headers);
                    self.stat(|s| *s.retries.entry(cause.as_str().to_string()).or_default() += 1);
                    attempt += 1;
                    tracing::debug!(request = %req.describe(), cause = cause.as_str(), %detail, attempt, "retrying");
                    if attempt > self.max_retries {
                        return Err(TeacherError::RetriesExhausted {
                            request: req.describe(),
                            attempts: attempt,
                            last: detail,
                        });
                    }
                    let since = self.last_success.lock().unwrap_or_else(|e| e.into_inner()).elapsed();
                    if since >= self.stall_timeout {
                        return Err(TeacherError::Stalled { waited: humanize(since), last: detail });
                    }
                    let delay = retry_delay(&headers, cause, self.backoff.delay(attempt, seed));
                    if cause == RetryCause::RateLimit {
                        // Everyone waits: the limit is shared.
                        self.limiter.pause_for(delay);
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

pub(crate) fn retry_delay(h: &RateHeaders, cause: RetryCause, backoff: Duration) -> Duration {
    match (h.retry_after, cause) {
        (Some(d), _) => d,
        (None, RetryCause::RateLimit) => backoff.max(h.reset_requests.unwrap_or_default()),
        (None, _) => backoff,
    }
}

pub(crate) fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 120 { format!("{} minutes", s / 60) } else { format!("{}s", s.max(1)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let b = Backoff { base: Duration::from_millis(100), max: Duration::from_secs(1) };
        let d1 = b.delay(1, 7).as_secs_f64();
        let d3 = b.delay(3, 7).as_secs_f64();
        assert!((0.05..=0.1).contains(&d1), "{d1}");
        assert!((0.2..=0.4).contains(&d3), "{d3}");
        assert!(b.delay(20, 7) <= Duration::from_secs(1));
        assert_ne!(b.delay(2, 1), b.delay(2, 2));
    }

    #[test]
    fn retry_after_wins_over_backoff() {
        let h = RateHeaders { retry_after: Some(Duration::from_millis(5)), ..RateHeaders::default() };
        assert_eq!(retry_delay(&h, RetryCause::Overloaded, Duration::from_secs(9)), Duration::from_millis(5));
        assert_eq!(
            retry_delay(&RateHeaders::default(), RetryCause::Timeout, Duration::from_secs(2)),
            Duration::from_secs(2)
        );
    }
}
