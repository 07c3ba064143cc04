//! Provider batch mode (`teacher.batch = true`): requests queue up, go out together through the
//! provider's batch API at its discount, and come back whenever the provider is done, in any
//! order, matched by `custom_id` (each request's cache key).
//!
//! Whoever asks first while no batch work is running becomes the leader: it waits until no new
//! request has queued for [`BatchOptions::linger`], splits the queue by the provider's limits,
//! reserves each batch's worst case against the budget, submits it, and journals (and fsyncs) the
//! batch id with its keys as soon as the provider acknowledges it, before anything else. It then
//! polls, downloads the results, journals every answer, and hands each to whoever asked. A rerun
//! after a crash finds the open batch in the journal and polls it instead of paying again. Requests
//! an expired or cancelled batch never ran, and retryable per-request errors, go into the next
//! batch; only those are sent again.

mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;

use crate::completion::Completion;
use crate::error::TeacherError;
use crate::http::Failure;
use crate::request::ChatRequest;
use crate::store::Record;
use crate::teacher::{Answer, Backend, Teacher, humanize, retry_delay};
pub(crate) use wire::Client;
use wire::{Info, Item};

/// Batch-mode settings that are not in the recipe (tests shorten them).
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// How long the queue must be quiet before a batch is submitted, so that every request of a
    /// pass joins one batch.
    pub linger: Duration,
    /// The first wait between two polls of a batch; it doubles up to `max_poll`.
    pub poll: Duration,
    /// The longest wait between two polls.
    pub max_poll: Duration,
    /// Requests in one batch, when lower than the provider's limit.
    pub max_requests: Option<usize>,
    /// Bytes in one batch, when lower than the provider's limit.
    pub max_bytes: Option<usize>,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            linger: Duration::from_millis(200),
            poll: Duration::from_secs(5),
            max_poll: Duration::from_secs(60),
            max_requests: None,
            max_bytes: None,
        }
    }
}

/// Where the provider batches in flight stand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BatchProgress {
    /// Batches submitted and not yet ended.
    pub batches: u64,
    /// Their requests with a result.
    pub done: u64,
    /// Their requests.
    pub total: u64,
}

type Reply = oneshot::Sender<Result<Completion, TeacherError>>;

#[derive(Default)]
struct Queue {
    /// Keys to submit, in the order they were asked.
    pending: Vec<String>,
    /// The request of every key someone waits for.
    reqs: HashMap<String, ChatRequest>,
    waiters: HashMap<String, Vec<Reply>>,
    /// Keys in a submitted batch that has not ended, and that batch's id.
    open: HashMap<String, String>,
    /// Times a key went into a batch that gave it no answer.
    attempts: HashMap<String, u32>,
    leading: bool,
    last_enqueue: Option<Instant>,
}

/// The queue of one batch-mode teacher.
pub(crate) struct Batcher {
    opts: BatchOptions,
    queue: Mutex<Queue>,
    wake: Notify,
    progress: watch::Sender<BatchProgress>,
}

impl Batcher {
    /// A queue that knows the batches an earlier run left open.
    pub(crate) fn new(opts: BatchOptions, open_batches: Vec<(String, Vec<String>)>) -> Batcher {
        let mut q = Queue::default();
        for (id, keys) in open_batches {
            for k in keys {
                q.open.insert(k, id.clone());
            }
        }
        Batcher {
            opts,
            queue: Mutex::new(q),
            wake: Notify::new(),
            progress: watch::Sender::new(BatchProgress::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<BatchProgress> {
        self.progress.subscribe()
    }
}

/// A batch this run waits on.
struct Tracked {
    id: String,
    keys: Vec<String>,
    /// Budget reserved for it (0 for a batch an earlier run submitted).
    reserved: f64,
    next_poll: Instant,
    interval: Duration,
    last_ok: Instant,
    info: Info,
}

impl Teacher {
    fn batch_client(&self) -> Option<Client<'_>> {
        match &self.backend {
            Backend::OpenAi(c) => Some(Client::OpenAi(c)),
            Backend::Anthropic(c) => Some(Client::Anthropic(c)),
            Backend::Replay(_) => None,
        }
    }

    /// Answers a request through a provider batch: joins the queue (or the open batch that already
    /// holds it) and waits for its result.
    pub(crate) async fn ask_batched(
        &self,
        b: &Batcher,
        req: &ChatRequest,
        key: &str,
    ) -> Result<Answer, TeacherError> {
        if self.is_halted() {
            return Err(TeacherError::Halted);
        }
        let (rx, lead) = {
            let mut q = b.lock();
            // Checked under the lock: the leader journals an answer before it takes the waiters.
            if let Some(c) = self.store.get(key) {
                drop(q);
                self.stat(|s| s.cache_hits += 1);
                return Ok(Answer { key: key.to_string(), completion: c, cached: true });
            }
            let (tx, rx) = oneshot::channel();
            let waiters = q.waiters.entry(key.to_string()).or_default();
            let first = waiters.is_empty();
            waiters.push(tx);
            if first {
                q.reqs.insert(key.to_string(), req.clone());
                if !q.open.contains_key(key) {
                    q.pending.push(key.to_string());
                }
            }
            q.last_enqueue = Some(Instant::now());
            let lead = !q.leading;
            q.leading = true;
            (rx, lead)
        };
        b.wake();
        if lead {
            self.lead(b).await;
        }
        let c = rx.await.unwrap_or(Err(TeacherError::Halted))?;
        Ok(Answer { key: key.to_string(), completion: c, cached: false })
    }

    /// Runs batches until nobody waits for anything.
    async fn lead(&self, b: &Batcher) {
        let Some(client) = self.batch_client() else {
            self.fail_all(
                b,
                &[],
                TeacherError::Config {
                    message: "the replay provider has no batch API".into(),
                    hint: "set `teacher.batch = false`".into(),
                },
            );
            return;
        };
        let mut tracked: Vec<Tracked> = Vec::new();
        loop {
            // Let the queue fill: every request of a pass joins one batch.
            loop {
                let last = b.lock().last_enqueue;
                match last {
                    Some(t) if t.elapsed() < b.opts.linger => {
                        tokio::time::sleep_until(t + b.opts.linger).await
                    }
                    _ => break,
                }
            }
            if self.is_halted() {
                self.fail_all(b, &tracked, TeacherError::Halted);
                return;
            }
            self.adopt(b, &mut tracked);
            let pending: Vec<(String, ChatRequest)> = {
                let mut q = b.lock();
                let keys = std::mem::take(&mut q.pending);
                keys.into_iter().filter_map(|k| q.reqs.get(&k).cloned().map(|r| (k, r))).collect()
            };
            if !pending.is_empty() {
                self.submit_all(client, b, pending, &mut tracked).await;
            }
            if tracked.is_empty() {
                let mut q = b.lock();
                if q.pending.is_empty() {
                    q.leading = false;
                    drop(q);
                    b.progress.send_replace(BatchProgress::default());
                    return;
                }
                continue;
            }
            let mut ended = false;
            let mut i = 0;
            while i < tracked.len() {
                if tracked[i].next_poll > Instant::now() {
                    i += 1;
                    continue;
                }
                if self.poll_one(client, b, &mut tracked[i]).await {
                    tracked.remove(i);
                    ended = true;
                } else {
                    i += 1;
                }
            }
            b.progress.send_replace(BatchProgress {
                batches: tracked.len() as u64,
                done: tracked.iter().map(|t| t.info.done).sum(),
                total: tracked.iter().map(|t| t.info.total.max(t.keys.len() as u64)).sum(),
            });
            if ended || tracked.is_empty() {
                continue;
            }
            let next = tracked.iter().map(|t| t.next_poll).min().unwrap_or_else(Instant::now);
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = b.wake.notified() => {}
            }
        }
    }

    /// Tracks the batches an earlier run submitted that hold a request someone waits for. Their
    /// worst case is committed against the budget (they are paid for whatever this run does), as
    /// far as it is known: requests of theirs that nobody asks for again count like those that are.
    fn adopt(&self, b: &Batcher, tracked: &mut Vec<Tracked>) {
        let wanted: HashSet<String> = {
            let q = b.lock();
            q.waiters.keys().filter_map(|k| q.open.get(k).cloned()).collect()
        };
        for (id, keys) in self.store.open_batches() {
            if wanted.contains(&id) && !tracked.iter().any(|t| t.id == id) {
                tracing::info!(batch = %id, requests = keys.len(), "resuming a batch submitted by an earlier run");
                self.stat(|s| s.batches_resumed += 1);
                let known: Vec<f64> = {
                    let q = b.lock();
                    keys.iter()
                        .filter_map(|k| q.reqs.get(k))
                        .map(|r| self.pricing.worst_case(r.worst_case_input_tokens(), r.max_tokens))
                        .collect()
                };
                let mean = known.iter().sum::<f64>() / known.len().max(1) as f64;
                let worst = mean * keys.len() as f64;
                self.budget.commit(worst);
                tracked.push(self.track(id, keys, worst));
            }
        }
    }

    fn track(&self, id: String, keys: Vec<String>, reserved: f64) -> Tracked {
        let now = Instant::now();
        Tracked {
            id,
            keys,
            reserved,
            next_poll: now,
            interval: Duration::ZERO,
            last_ok: now,
            info: Info::default(),
        }
    }

    /// Splits the queue by the provider's limits and submits each part within the budget.
    async fn submit_all(
        &self,
        client: Client<'_>,
        b: &Batcher,
        pending: Vec<(String, ChatRequest)>,
        tracked: &mut Vec<Tracked>,
    ) {
        let limits = client.limits();
        let max_requests = b.opts.max_requests.unwrap_or(limits.max_requests).clamp(1, limits.max_requests);
        let max_bytes = client.max_entry_bytes(limits).min(b.opts.max_bytes.unwrap_or(usize::MAX)).max(1);
        let mut chunks: Vec<Vec<(String, ChatRequest, Vec<u8>)>> = Vec::new();
        let mut bytes = 0usize;
        for (key, req) in pending {
            let entry = client.entry(&key, &req);
            if entry.len() + 1 > max_bytes {
                let e = TeacherError::Config {
                    message: format!(
                        "the request {} is {} bytes, more than one {} batch may hold ({max_bytes} bytes)",
                        req.describe(),
                        entry.len(),
                        client.name()
                    ),
                    hint: "shorten the prompt or the inputs, or set `teacher.batch = false`".into(),
                };
                self.deliver_err(b, &key, e);
                continue;
            }
            // One byte more an entry: the comma between Anthropic's entries.
            let size = entry.len() + 1;
            let fits = chunks.last().is_some_and(|c| c.len() < max_requests && bytes + size <= max_bytes);
            if !fits {
                chunks.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            if let Some(c) = chunks.last_mut() {
                c.push((key, req, entry));
            }
        }
        for mut chunk in chunks {
            if self.is_halted() {
                for (k, ..) in &chunk {
                    self.deliver_err(b, k, TeacherError::Halted);
                }
                continue;
            }
            let worst: Vec<f64> = chunk
                .iter()
                .map(|(_, r, _)| self.pricing.worst_case(r.worst_case_input_tokens(), r.max_tokens))
                .collect();
            let (fit, reserved, refusal) = self.budget.reserve_prefix(&worst);
            if let Some(e) = refusal {
                for (k, ..) in chunk.drain(fit..) {
                    self.deliver_err(b, &k, e.clone());
                }
            }
            if chunk.is_empty() {
                continue;
            }
            let entries: Vec<Vec<u8>> = chunk.iter().map(|(_, _, e)| e.clone()).collect();
            let keys: Vec<String> = chunk.iter().map(|(k, ..)| k.clone()).collect();
            let submitted = self.with_retries(|| client.submit(&entries), &chunk[0].1).await;
            let journaled = submitted.and_then(|id| {
                // The batch exists and is paid for: journal it before anything else can go wrong.
                self.store.append(&Record::Batch { id: id.clone(), keys: keys.clone() })?;
                self.store.sync()?;
                Ok(id)
            });
            match journaled {
                Ok(id) => {
                    tracing::info!(batch = %id, requests = keys.len(), "submitted a {} batch", client.name());
                    self.stat(|s| s.batches_submitted += 1);
                    {
                        let mut q = b.lock();
                        for k in &keys {
                            q.open.insert(k.clone(), id.clone());
                        }
                    }
                    tracked.push(self.track(id, keys, reserved));
                }
                Err(e) => {
                    self.budget.settle(reserved, None);
                    if matches!(e, TeacherError::Fatal { .. } | TeacherError::Journal { .. }) {
                        self.halt();
                    }
                    for k in &keys {
                        self.deliver_err(b, k, e.clone());
                    }
                }
            }
        }
    }

    /// Runs a batch API call, retrying what can pass with backoff.
    async fn with_retries<T, F, Fut>(&self, f: F, req: &ChatRequest) -> Result<T, TeacherError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut attempt = 0u32;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal { message, hint }) => return Err(TeacherError::Fatal { message, hint }),
                Err(Failure::Retry { cause, detail, headers }) => {
                    self.count_retry(cause.as_str());
                    attempt += 1;
                    if attempt > self.max_retries {
                        return Err(TeacherError::RetriesExhausted {
                            request: req.describe(),
                            attempts: attempt,
                            last: detail,
                        });
                    }
                    let delay = retry_delay(&headers, cause, self.backoff.delay(attempt, u64::from(attempt)));
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn count_retry(&self, cause: &str) {
        self.stat(|s| *s.retries.entry(cause.to_string()).or_default() += 1);
    }

    /// Polls one batch; true when it is done with (ended and absorbed, or given up on).
    async fn poll_one(&self, client: Client<'_>, b: &Batcher, t: &mut Tracked) -> bool {
        let now = Instant::now();
        let step = |t: &mut Tracked| {
            t.interval =
                if t.interval.is_zero() { b.opts.poll } else { (t.interval * 2).min(b.opts.max_poll) };
            t.next_poll = Instant::now() + t.interval;
        };
        match client.poll(&t.id).await {
            Ok(Some(info)) => {
                t.last_ok = now;
                tracing::info!(batch = %t.id, status = %info.status, done = info.done, total = info.total, "batch progress");
                t.info = info.clone();
                if !info.ended {
                    step(t);
                    return false;
                }
                if let Some(refused) = info.refused {
                    let wait = matches!(refused, Failure::Retry { .. });
                    self.absorb(b, t, Vec::new(), Some(refused));
                    if wait {
                        // A limit on queued work (OpenAI's enqueued tokens) passes as other
                        // batches finish: wait before the resubmission.
                        tokio::time::sleep(self.backoff.max).await;
                    }
                    return true;
                }
                let first_req = self.request_of(b, &t.keys);
                match self.with_retries(|| client.results(&t.id, &info), &first_req).await {
                    Ok(items) => {
                        self.absorb(b, t, items, None);
                        true
                    }
                    Err(TeacherError::Fatal { message, hint }) => {
                        self.give_up(b, t, TeacherError::Fatal { message, hint });
                        true
                    }
                    Err(e) => {
                        // Results stay with the provider; the next poll fetches them again.
                        tracing::warn!(batch = %t.id, error = %e, "cannot download the batch results yet");
                        if t.last_ok.elapsed() >= self.stall_timeout {
                            self.give_up(
                                b,
                                t,
                                TeacherError::Stalled {
                                    waited: humanize(t.last_ok.elapsed()),
                                    last: e.to_string(),
                                },
                            );
                            return true;
                        }
                        step(t);
                        false
                    }
                }
            }
            Ok(None) => {
                tracing::warn!(batch = %t.id, "{} does not know this batch; its requests go into a new one", client.name());
                self.absorb(b, t, Vec::new(), None);
                true
            }
            Err(Failure::Fatal { message, hint }) => {
                self.give_up(b, t, TeacherError::Fatal { message, hint });
                true
            }
            Err(Failure::Retry { cause, detail, .. }) => {
                self.count_retry(cause.as_str());
                if t.last_ok.elapsed() >= self.stall_timeout {
                    self.give_up(
                        b,
                        t,
                        TeacherError::Stalled { waited: humanize(t.last_ok.elapsed()), last: detail },
                    );
                    return true;
                }
                step(t);
                false
            }
        }
    }

    fn request_of(&self, b: &Batcher, keys: &[String]) -> ChatRequest {
        let q = b.lock();
        keys.iter().find_map(|k| q.reqs.get(k).cloned()).unwrap_or(ChatRequest {
            model: self.model.clone(),
            messages: Vec::new(),
            temperature: 0.0,
            max_tokens: 0,
            schema: None,
            sample: 0,
        })
    }

    /// Stops waiting on a batch that cannot be followed now; it stays open in the journal, so a
    /// rerun picks it up.
    fn give_up(&self, b: &Batcher, t: &Tracked, e: TeacherError) {
        if matches!(e, TeacherError::Fatal { .. }) {
            self.halt();
        }
        self.budget.settle(t.reserved, None);
        let mut q = b.lock();
        for k in &t.keys {
            q.open.remove(k);
        }
        drop(q);
        for k in &t.keys {
            self.deliver_err(b, k, e.clone());
        }
    }

    /// Takes an ended batch's results: journals every answer, closes the batch, and queues what it
    /// did not answer (expired, cancelled, retryable errors) for the next one.
    fn absorb(&self, b: &Batcher, t: &Tracked, items: Vec<(String, Item)>, refused: Option<Failure>) {
        let mine: HashSet<&str> = t.keys.iter().map(String::as_str).collect();
        let mut got: HashMap<String, Item> = HashMap::new();
        for (k, item) in items {
            if mine.contains(k.as_str()) {
                got.insert(k, item);
            } else {
                tracing::warn!(batch = %t.id, custom_id = %k, "a result for a request retort did not put in this batch; ignored");
            }
        }
        let mut cost = 0.0;
        let mut answers: Vec<(String, Completion)> = Vec::new();
        let mut again: Vec<(String, String, String)> = Vec::new();
        let mut fatal: Vec<(String, TeacherError)> = Vec::new();
        let mut journal_error = None;
        for key in &t.keys {
            let item = match (&refused, got.remove(key)) {
                (Some(f), _) => Item::Failed(f.clone()),
                (None, Some(i)) => i,
                (None, None) => Item::Unfinished("the batch ended without a result for it".into()),
            };
            match item {
                Item::Answer(mut c) => {
                    c.cost_usd = self.pricing.cost(&c.usage);
                    cost += c.cost_usd;
                    if let Err(e) = self.store.record_done(key, &c) {
                        journal_error = Some(e);
                    }
                    self.stat(|s| {
                        s.sent += 1;
                        s.input_tokens += c.usage.input_tokens;
                        s.cached_input_tokens += c.usage.cached_input_tokens;
                        s.output_tokens += c.usage.output_tokens;
                        s.cost_usd += c.cost_usd;
                    });
                    answers.push((key.clone(), c));
                }
                Item::Failed(Failure::Retry { cause, detail, .. }) => {
                    again.push((key.clone(), cause.as_str().to_string(), detail));
                }
                Item::Failed(Failure::Fatal { message, hint }) => {
                    let message = self.redact(&message);
                    fatal.push((key.clone(), TeacherError::Fatal { message, hint }));
                }
                Item::Unfinished(why) => {
                    let cause = if why.contains("cancel") { "batch_cancelled" } else { "batch_expired" };
                    again.push((key.clone(), cause.to_string(), why));
                }
            }
        }
        let closed =
            self.store.append(&Record::BatchClosed { id: t.id.clone() }).and_then(|()| self.store.sync());
        if let Err(e) = closed {
            journal_error.get_or_insert(e);
        }
        self.budget.settle(t.reserved, Some(cost));
        tracing::info!(batch = %t.id, answered = answers.len(), again = again.len(), failed = fatal.len(), "batch ended");
        let mut q = b.lock();
        for k in &t.keys {
            q.open.remove(k);
        }
        for (k, c) in answers {
            q.reqs.remove(&k);
            q.attempts.remove(&k);
            for tx in q.waiters.remove(&k).unwrap_or_default() {
                let _ = tx.send(Ok(c.clone()));
            }
        }
        let mut exhausted = Vec::new();
        for (k, cause, detail) in again {
            if !q.waiters.contains_key(&k) {
                continue; // an earlier run's request nobody asks for now
            }
            self.count_retry(&cause);
            let n = q.attempts.entry(k.clone()).or_insert(0);
            *n += 1;
            if *n > self.max_retries {
                let attempts = *n;
                let request = q.reqs.get(&k).map(ChatRequest::describe).unwrap_or_default();
                exhausted.push((k, TeacherError::RetriesExhausted { request, attempts, last: detail }));
            } else {
                q.pending.push(k);
                q.last_enqueue = Some(Instant::now());
            }
        }
        drop(q);
        if let Some(e) = journal_error {
            self.halt();
            for k in &t.keys {
                self.deliver_err(b, k, e.clone());
            }
        }
        if !fatal.is_empty() {
            self.halt();
        }
        for (k, e) in fatal.into_iter().chain(exhausted) {
            self.deliver_err(b, &k, e);
        }
    }

    fn redact(&self, text: &str) -> String {
        match &self.backend {
            Backend::OpenAi(c) => c.key.as_ref().map_or_else(|| text.to_string(), |k| k.redact(text)),
            Backend::Anthropic(c) => c.key.as_ref().map_or_else(|| text.to_string(), |k| k.redact(text)),
            Backend::Replay(_) => text.to_string(),
        }
    }

    fn deliver_err(&self, b: &Batcher, key: &str, e: TeacherError) {
        let mut q = b.lock();
        q.reqs.remove(key);
        q.pending.retain(|k| k != key);
        for tx in q.waiters.remove(key).unwrap_or_default() {
            let _ = tx.send(Err(e.clone()));
        }
    }

    /// Ends batch work: everyone still waiting gets `e`. Open batches stay in the journal.
    fn fail_all(&self, b: &Batcher, tracked: &[Tracked], e: TeacherError) {
        for t in tracked {
            self.budget.settle(t.reserved, None);
        }
        let mut q = b.lock();
        q.pending.clear();
        q.reqs.clear();
        q.leading = false;
        let waiters: Vec<Reply> = q.waiters.drain().flat_map(|(_, v)| v).collect();
        drop(q);
        for tx in waiters {
            let _ = tx.send(Err(e.clone()));
        }
        b.progress.send_replace(BatchProgress::default());
    }
}
