//! Client-side rate limiting: a concurrency cap, requests-per-minute spacing and a tokens-per-minute
//! bucket, seeded from the recipe and corrected from the providers' rate-limit headers, plus a
//! shared pause that a `retry-after` or an exhausted quota window imposes on every worker.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use tokio::sync::{Semaphore, SemaphorePermit};

/// Requests are spaced this much wider than the limit allows, so that a server counting over a
/// sliding minute never sees one request too many even when sends jitter.
const RPM_MARGIN: f64 = 0.99;

/// What a response's headers say about the provider's limits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateHeaders {
    /// Requests allowed per window.
    pub limit_requests: Option<u64>,
    /// Requests left in the window.
    pub remaining_requests: Option<u64>,
    /// When the request window resets.
    pub reset_requests: Option<Duration>,
    /// Tokens allowed per window.
    pub limit_tokens: Option<u64>,
    /// Tokens left in the window.
    pub remaining_tokens: Option<u64>,
    /// When the token window resets.
    pub reset_tokens: Option<Duration>,
    /// `retry-after` / `retry-after-ms`.
    pub retry_after: Option<Duration>,
}

impl RateHeaders {
    /// Reads OpenAI's `x-ratelimit-*` and Anthropic's `anthropic-ratelimit-*` headers.
    pub fn parse(h: &reqwest::header::HeaderMap) -> RateHeaders {
        let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let num = |name: &str| get(name).and_then(|v| v.parse::<u64>().ok());
        let reset = |name: &str| get(name).and_then(parse_reset);
        let first = |a: Option<u64>, b: Option<u64>| a.or(b);
        let first_d = |a: Option<Duration>, b: Option<Duration>| a.or(b);
        let retry_after = get("retry-after-ms")
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|ms| ms.is_finite() && *ms >= 0.0)
            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
            .or_else(|| {
                get("retry-after")
                    .and_then(|v| v.parse::<f64>().ok())
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(|s| Duration::from_secs_f64(s.min(3600.0)))
            });
        RateHeaders {
            limit_requests: first(
                num("x-ratelimit-limit-requests"),
                num("anthropic-ratelimit-requests-limit"),
            ),
            remaining_requests: first(
                num("x-ratelimit-remaining-requests"),
                num("anthropic-ratelimit-requests-remaining"),
            ),
            reset_requests: first_d(
                reset("x-ratelimit-reset-requests"),
                reset("anthropic-ratelimit-requests-reset"),
            ),
            limit_tokens: first(num("x-ratelimit-limit-tokens"), num("anthropic-ratelimit-tokens-limit")),
            remaining_tokens: first(
                num("x-ratelimit-remaining-tokens"),
                num("anthropic-ratelimit-tokens-remaining"),
            ),
            reset_tokens: first_d(
                reset("x-ratelimit-reset-tokens"),
                reset("anthropic-ratelimit-tokens-reset"),
            ),
            retry_after,
        }
    }
}

/// A reset time: OpenAI's durations (`1s`, `6m0s`, `20ms`) or Anthropic's RFC 3339 instants.
pub fn parse_reset(v: &str) -> Option<Duration> {
    if v.contains('T') {
        let at = parse_rfc3339(v)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs_f64();
        return Some(Duration::from_secs_f64((at - now).clamp(0.0, 3600.0)));
    }
    let mut total = 0.0;
    let mut rest = v.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..u];
        rest = &rest[u..];
        total += value
            * match unit {
                "h" => 3600.0,
                "m" => 60.0,
                "s" | "" => 1.0,
                "ms" => 0.001,
                _ => return None,
            };
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total.min(3600.0)))
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.fff](Z|+HH:MM)`.
fn parse_rfc3339(s: &str) -> Option<f64> {
    let s = s.trim();
    let (date, time) = s.split_once(['T', 't'])?;
    let mut d = date.split('-');
    let (y, mo, da): (i64, i64, i64) =
        (d.next()?.parse().ok()?, d.next()?.parse().ok()?, d.next()?.parse().ok()?);
    let (clock, offset) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
        (c, 0.0)
    } else {
        let i = time.rfind(['+', '-'])?;
        let (c, o) = time.split_at(i);
        let sign = if o.starts_with('-') { -1.0 } else { 1.0 };
        let (oh, om) = o[1..].split_once(':')?;
        (c, sign * (oh.parse::<f64>().ok()? * 3600.0 + om.parse::<f64>().ok()? * 60.0))
    };
    let mut t = clock.split(':');
    let (h, mi, sec): (f64, f64, f64) =
        (t.next()?.parse().ok()?, t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((mo + 9) % 12) + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + mi * 60.0 + sec - offset)
}

#[derive(Debug)]
struct State {
    /// Seconds between two sends (0: no requests-per-minute cap).
    interval: f64,
    next_slot: Instant,
    tokens_per_s: f64,
    token_capacity: f64,
    tokens: f64,
    refilled: Instant,
    paused_until: Option<Instant>,
}

enum Step {
    Wait(Duration),
    Go(Instant),
}

/// The limits one teacher runs under.
#[derive(Debug)]
pub struct Limiter {
    concurrency: Semaphore,
    state: Mutex<State>,
}

/// Permission to send one request; dropping it frees the concurrency slot.
pub struct Grant<'a> {
    _permit: SemaphorePermit<'a>,
    /// The tokens taken from the bucket for this request.
    pub tokens: u64,
}

impl Limiter {
    /// A limiter for `max_concurrency` requests in flight and optional per-minute caps.
    pub fn new(max_concurrency: u32, rpm: Option<u32>, tpm: Option<u32>) -> Limiter {
        let now = Instant::now();
        let interval = rpm.map_or(0.0, |r| 60.0 / (f64::from(r.max(1)) * RPM_MARGIN));
        let tokens_per_s = tpm.map_or(0.0, |t| f64::from(t) / 60.0);
        // Ten seconds of tokens may go out at once: a burst small enough for any per-minute window.
        let token_capacity = tokens_per_s * 10.0;
        Limiter {
            concurrency: Semaphore::new(max_concurrency.max(1) as usize),
            state: Mutex::new(State {
                interval,
                next_slot: now,
                tokens_per_s,
                token_capacity,
                tokens: token_capacity,
                refilled: now,
                paused_until: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a concurrency slot, the shared pause, a request slot and `tokens` tokens.
    pub async fn acquire(&self, tokens: u64) -> Grant<'_> {
        let permit = match self.concurrency.acquire().await {
            Ok(p) => p,
            // The semaphore is never closed; if it were, sending without a slot beats hanging.
            Err(_) => return self.acquire_unbounded(tokens).await,
        };
        self.wait_turn(tokens).await;
        Grant { _permit: permit, tokens }
    }

    async fn acquire_unbounded(&self, tokens: u64) -> Grant<'_> {
        self.wait_turn(tokens).await;
        let permit = Box::pin(self.concurrency.acquire()).await;
        match permit {
            Ok(p) => Grant { _permit: p, tokens },
            Err(_) => std::future::pending().await,
        }
    }

    async fn wait_turn(&self, tokens: u64) {
        loop {
            match self.step(tokens) {
                Step::Wait(w) => tokio::time::sleep(w.max(Duration::from_millis(1))).await,
                Step::Go(slot) => {
                    if slot > Instant::now() {
                        tokio::time::sleep_until(slot).await;
                    }
                    return;
                }
            }
        }
    }

    /// One look at the limits: wait this long, or go at this instant (the request slot is taken).
    fn step(&self, tokens: u64) -> Step {
        let mut s = self.lock();
        let now = Instant::now();
        if let Some(p) = s.paused_until.filter(|p| *p > now) {
            return Step::Wait(p - now);
        }
        // Tokens: refill, then take when enough are there (or the bucket is full, for a request
        // larger than the whole bucket).
        if s.tokens_per_s > 0.0 {
            let dt = now.duration_since(s.refilled).as_secs_f64();
            s.tokens = (s.tokens + dt * s.tokens_per_s).min(s.token_capacity);
            s.refilled = now;
            let need = (tokens as f64).min(s.token_capacity);
            if s.tokens < need {
                return Step::Wait(Duration::from_secs_f64((need - s.tokens) / s.tokens_per_s));
            }
            s.tokens -= tokens as f64;
        }
        let slot = s.next_slot.max(now);
        s.next_slot = slot + Duration::from_secs_f64(s.interval);
        Step::Go(slot)
    }

    /// Corrects the token bucket once the real usage is known.
    pub fn settle_tokens(&self, estimated: u64, actual: u64) {
        let mut s = self.lock();
        if s.tokens_per_s > 0.0 {
            s.tokens += estimated as f64 - actual as f64;
        }
    }

    /// Stops every worker from sending until `d` from now (a `retry-after`, an empty window).
    pub fn pause_for(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut s = self.lock();
        if s.paused_until.is_none_or(|p| p < until) {
            s.paused_until = Some(until);
        }
    }

    /// Adopts what the provider's headers say: a lower limit than configured, or an empty window.
    pub fn observe(&self, h: &RateHeaders) {
        let mut s = self.lock();
        if let Some(limit) = h.limit_requests.filter(|l| *l > 0) {
            let interval = 60.0 / (limit as f64 * RPM_MARGIN);
            if interval > s.interval {
                s.interval = interval;
            }
        }
        if let Some(limit) = h.limit_tokens.filter(|l| *l > 0) {
            let rate = limit as f64 / 60.0;
            if s.tokens_per_s == 0.0 || rate < s.tokens_per_s {
                s.tokens_per_s = rate;
                s.token_capacity = rate * 10.0;
                s.tokens = s.tokens.min(s.token_capacity);
            }
        }
        let now = Instant::now();
        let mut pause = None;
        if h.remaining_requests == Some(0) {
            pause = h.reset_requests;
        }
        if h.remaining_tokens == Some(0) {
            pause = pause.max(h.reset_tokens);
        }
        if let Some(d) = pause {
            let until = now + d;
            if s.paused_until.is_none_or(|p| p < until) {
                s.paused_until = Some(until);
            }
        }
    }

    /// Seconds between sends now in force (0 when unlimited).
    pub fn interval(&self) -> f64 {
        self.lock().interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_parse_in_both_providers_styles() {
        assert_eq!(parse_reset("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_reset("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_reset("1m2.5s"), Some(Duration::from_secs_f64(62.5)));
        assert_eq!(parse_reset("soon"), None);
        assert_eq!(parse_rfc3339("1970-01-02T00:00:01Z"), Some(86_401.0));
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00+01:00"), Some(951_865_200.0));
        // An instant in the past resets now.
        assert_eq!(parse_reset("2001-01-01T00:00:00Z"), Some(Duration::ZERO));
    }

    #[test]
    fn headers_of_both_providers_are_read() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("x-ratelimit-limit-requests", "500".parse().unwrap());
        h.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
        h.insert("x-ratelimit-reset-requests", "120ms".parse().unwrap());
        h.insert("retry-after-ms", "250".parse().unwrap());
        let r = RateHeaders::parse(&h);
        assert_eq!(r.limit_requests, Some(500));
        assert_eq!(r.remaining_requests, Some(0));
        assert_eq!(r.reset_requests, Some(Duration::from_millis(120)));
        assert_eq!(r.retry_after, Some(Duration::from_millis(250)));
        let mut a = reqwest::header::HeaderMap::new();
        a.insert("anthropic-ratelimit-tokens-limit", "80000".parse().unwrap());
        a.insert("anthropic-ratelimit-tokens-remaining", "10".parse().unwrap());
        a.insert("retry-after", "3".parse().unwrap());
        let r = RateHeaders::parse(&a);
        assert_eq!(r.limit_tokens, Some(80_000));
        assert_eq!(r.remaining_tokens, Some(10));
        assert_eq!(r.retry_after, Some(Duration::from_secs(3)));
    }

    #[test]
    fn a_lower_limit_from_the_headers_slows_the_limiter_down() {
        let l = Limiter::new(4, Some(6000), None);
        let before = l.interval();
        l.observe(&RateHeaders { limit_requests: Some(600), ..RateHeaders::default() });
        assert!(l.interval() > before * 9.0);
        // A higher limit never speeds it up past the recipe.
        l.observe(&RateHeaders { limit_requests: Some(60_000), ..RateHeaders::default() });
        assert!(l.interval() > before * 9.0);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn sends_are_spaced_by_the_requests_per_minute() {
        let l = Limiter::new(100, Some(600), None);
        let start = Instant::now();
        for _ in 0..11 {
            let _g = l.acquire(1).await;
        }
        // 10 gaps of 60/(600*0.99) s, on tokio's paused clock.
        let took = start.elapsed().as_secs_f64();
        assert!((took - 10.0 * 60.0 / 594.0).abs() < 0.01, "{took}");
    }
}
