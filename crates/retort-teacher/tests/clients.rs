//! Both clients against the in-process fake API: every success and failure path a provider plays.

#![cfg(feature = "mock")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::sync::Arc;
use std::time::Duration;

use retort_recipe::schema::teacher::{Price, Provider, Teacher as Settings};
use retort_recipe::types::Duration as RDuration;
use retort_teacher::mock::{Api, Behavior, MockConfig, MockRequest, MockServer};
use retort_teacher::{Backoff, ChatRequest, Finish, Message, Options, Store, Teacher, TeacherError};

const KEY: &str = "sk-test-abcdefghijklmnopqrstuvwxyz0123456789";

fn settings(provider: Provider, url: &str) -> Settings {
    Settings {
        provider,
        model: "gpt-4o-mini".into(),
        base_url: Some(match provider {
            Provider::Anthropic => url.to_string(),
            _ => format!("{url}/v1"),
        }),
        api_key_env: Some("TEST_KEY".into()),
        max_concurrency: 4,
        timeout: RDuration(Duration::from_millis(300)),
        max_retries: 3,
        stall_timeout: RDuration(Duration::from_secs(30)),
        price: Some(Price {
            input_per_mtok: 1.0,
            output_per_mtok: 2.0,
            cached_input_per_mtok: None,
            batch_discount: 0.5,
        }),
        ..Settings::default()
    }
}

fn teacher(s: &Settings, dir: &std::path::Path) -> Teacher {
    let store = Arc::new(Store::open(&dir.join("journal.jsonl")).unwrap());
    let options = Options {
        backoff: Backoff { base: Duration::from_millis(1), max: Duration::from_millis(5) },
        ..Options::default()
    };
    Teacher::new(s, Some(KEY.into()), store, options).unwrap()
}

fn req(text: &str) -> ChatRequest {
    ChatRequest {
        model: "gpt-4o-mini".into(),
        messages: vec![Message::new("system", "be brief"), Message::new("user", text)],
        temperature: 0.0,
        max_tokens: 50,
        schema: None,
        sample: 0,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Plays `first` on the first attempt of every request, then answers.
fn flaky(first: Behavior) -> MockConfig {
    MockConfig::scripted(move |r: &MockRequest| {
        if r.attempt == 0 { first.clone() } else { Behavior::Answer(format!("ok: {}", r.user)) }
    })
}

#[test]
fn both_apis_answer_with_usage_and_cost_and_send_the_key_only_in_headers() {
    for provider in [Provider::Openai, Provider::Anthropic, Provider::OpenaiCompatible] {
        let server = MockServer::start(MockConfig::scripted(|r: &MockRequest| {
            let auth = match r.api {
                Api::OpenAi => r.headers.get("authorization").cloned().unwrap_or_default(),
                Api::Anthropic => {
                    assert_eq!(r.headers.get("anthropic-version").map(String::as_str), Some("2023-06-01"));
                    r.headers.get("x-api-key").cloned().unwrap_or_default()
                }
            };
            assert!(auth.ends_with(KEY), "the key goes in the auth header");
            assert_eq!(r.system, "be brief");
            Behavior::Answer(format!("echo {}", r.user))
        }))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let t = teacher(&settings(provider, &server.url()), dir.path());
        let a = rt().block_on(t.ask(&req("hello"))).unwrap();
        assert_eq!(a.completion.content, "echo hello");
        assert_eq!(a.completion.finish, Finish::Stop);
        assert!(a.completion.usage.input_tokens > 0 && a.completion.cost_usd > 0.0);
        assert!(!a.cached);
        // Asked again: the cache answers and nothing is sent.
        let b = rt().block_on(t.ask(&req("hello"))).unwrap();
        assert!(b.cached);
        assert_eq!(server.log().len(), 1);
        t.store().sync().unwrap();
        let journal = std::fs::read_to_string(dir.path().join("journal.jsonl")).unwrap();
        assert!(
            !journal.contains(KEY) && !journal.contains("abcdefghijklmnop"),
            "the journal never holds the key"
        );
        assert!(!format!("{t:?}").contains("abcdefghijklmnop"), "Debug never shows the key");
    }
}

#[test]
fn transient_failures_are_retried_and_counted_by_cause() {
    let cases: Vec<(Behavior, &str)> = vec![
        (
            Behavior::Status(429, "slow down".into(), vec![("retry-after-ms".into(), "2".into())]),
            "rate_limit",
        ),
        (Behavior::Status(500, "oops".into(), vec![]), "server_error"),
        (Behavior::Status(529, "overloaded".into(), vec![]), "overloaded"),
        (Behavior::Status(503, "unavailable".into(), vec![("retry-after".into(), "0".into())]), "overloaded"),
        (Behavior::Hang, "timeout"),
        (Behavior::Delay(Duration::from_secs(5), Box::new(Behavior::Answer("late".into()))), "timeout"),
        (Behavior::Reset, "connection"),
        (Behavior::Truncate("half of this answer".into()), "bad_response"),
        (Behavior::Malformed, "bad_response"),
    ];
    for provider in [Provider::Openai, Provider::Anthropic] {
        for (first, cause) in &cases {
            let server = MockServer::start(flaky(first.clone())).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let t = teacher(&settings(provider, &server.url()), dir.path());
            let a = rt().block_on(t.ask(&req("x"))).unwrap_or_else(|e| panic!("{provider:?} {cause}: {e}"));
            assert_eq!(a.completion.content, "ok: x", "{provider:?} {cause}");
            let stats = t.stats();
            assert_eq!(stats.retries.get(*cause), Some(&1), "{provider:?} {cause}: {:?}", stats.retries);
            assert_eq!(stats.sent, 1);
        }
    }
}

#[test]
fn cut_off_and_refused_answers_come_back_as_failures_not_examples() {
    for provider in [Provider::Openai, Provider::Anthropic] {
        let server = MockServer::start(MockConfig::scripted(|r: &MockRequest| match r.user.as_str() {
            "long" => Behavior::Length("and then".into()),
            _ => Behavior::Refuse("I can't help with that".into()),
        }))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let t = teacher(&settings(provider, &server.url()), dir.path());
        let long = rt().block_on(t.ask(&req("long"))).unwrap().completion;
        assert_eq!(long.finish, Finish::Length);
        assert!(long.failure().unwrap().contains("cut off"));
        let refused = rt().block_on(t.ask(&req("bad"))).unwrap().completion;
        assert!(refused.failure().unwrap().contains("refused"), "{provider:?}: {refused:?}");
    }
}

#[test]
fn errors_retrying_cannot_fix_stop_at_once_with_a_hint_and_no_key() {
    let cases: Vec<(Behavior, &str)> = vec![
        (Behavior::Status(401, format!("Incorrect API key provided: {KEY}"), vec![]), "rejected the API key"),
        (Behavior::Status(403, "forbidden".into(), vec![]), "denied access"),
        (Behavior::Status(404, "The model `x` does not exist".into(), vec![]), "does not know the model"),
        (
            Behavior::Status(429, "You exceeded your current quota: insufficient_quota".into(), vec![]),
            "quota",
        ),
    ];
    for (b, want) in cases {
        let server = MockServer::start(MockConfig::scripted(move |_| b.clone())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let t = teacher(&settings(Provider::Openai, &server.url()), dir.path());
        let e = rt().block_on(t.ask(&req("x"))).unwrap_err();
        let text = format!("{e} {}", e.hint().unwrap_or_default());
        assert!(matches!(e, TeacherError::Fatal { .. }), "{e:?}");
        assert!(text.contains(want), "{text}");
        assert!(!text.contains("abcdefghijklmnop"), "the key is redacted: {text}");
        assert_eq!(server.log().len(), 1, "no retry for {want}");
    }
}

#[test]
fn retries_run_out_and_a_stall_stops_instead_of_hanging() {
    let server =
        MockServer::start(MockConfig::scripted(|_| Behavior::Status(500, "down".into(), vec![]))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t = teacher(&settings(Provider::Openai, &server.url()), dir.path());
    let e = rt().block_on(t.ask(&req("x"))).unwrap_err();
    assert!(matches!(e, TeacherError::RetriesExhausted { attempts: 4, .. }), "{e:?}");
    assert!(e.is_resumable());

    let mut s = settings(Provider::Openai, &server.url());
    s.max_retries = 1000;
    s.stall_timeout = RDuration(Duration::from_millis(50));
    let dir = tempfile::tempdir().unwrap();
    let t = teacher(&s, dir.path());
    let e = rt().block_on(t.ask(&req("y"))).unwrap_err();
    assert!(matches!(e, TeacherError::Stalled { .. }), "{e:?}");
}

#[test]
fn the_budget_refuses_a_request_whose_worst_case_does_not_fit() {
    let server = MockServer::start(MockConfig::answering(|u| u.to_string())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(Provider::Openai, &server.url());
    // Worst case of one request: ~40 input tokens at $1/M plus 50 output at $2/M = ~$0.00014.
    s.budget_usd = Some(0.00015);
    let t = teacher(&s, dir.path());
    rt().block_on(t.ask(&req("a"))).unwrap();
    let e = rt().block_on(t.ask(&req("b"))).unwrap_err();
    assert!(matches!(e, TeacherError::Budget { .. }), "{e:?}");
    assert!(e.is_resumable());
    assert_eq!(server.log().len(), 1, "the refused request was never sent");
    // A cached answer is free even at the cap.
    assert!(rt().block_on(t.ask(&req("a"))).unwrap().cached);
}

#[test]
fn identical_requests_in_flight_are_sent_once() {
    let server = MockServer::start(MockConfig::answering(|u| u.to_string())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t = teacher(&settings(Provider::Openai, &server.url()), dir.path());
    let r = req("same");
    let answers = rt().block_on(async { futures_join(&t, &r).await });
    assert_eq!(answers, 1);
    assert_eq!(server.log().len(), 1);
}

async fn futures_join(t: &Teacher, r: &ChatRequest) -> usize {
    let (a, b, c) = tokio::join!(t.ask(r), t.ask(r), t.ask(r));
    [a.unwrap(), b.unwrap(), c.unwrap()].iter().filter(|x| !x.cached).count()
}

#[test]
fn a_missing_key_variable_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("j.jsonl")).unwrap());
    let e =
        Teacher::new(&settings(Provider::Anthropic, "http://127.0.0.1:9"), None, store, Options::default())
            .unwrap_err();
    assert!(e.to_string().contains("`TEST_KEY` is not set"), "{e}");
}

#[test]
fn a_429_pauses_every_worker_for_the_retry_after() {
    let server = MockServer::start(flaky(Behavior::Status(
        429,
        "slow".into(),
        vec![("retry-after-ms".into(), "30".into())],
    )))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t = teacher(&settings(Provider::Openai, &server.url()), dir.path());
    let started = std::time::Instant::now();
    rt().block_on(t.ask(&req("a"))).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(30));
}
