//! Batch mode against the fake's batch endpoints: both providers, results out of order, error
//! entries, expired batches, limits, the budget and a restart mid-batch.

#![cfg(feature = "mock")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use retort_recipe::schema::teacher::{Price, Provider, Teacher as Settings};
use retort_recipe::types::Duration as RDuration;
use retort_teacher::mock::{Api, Behavior, MockConfig, MockRequest, MockServer};
use retort_teacher::{
    Answer, Backoff, BatchOptions, BatchProgress, ChatRequest, Message, Options, Pricing, Store, Teacher,
    TeacherError,
};

const KEY: &str = "sk-test-abcdefghijklmnopqrstuvwxyz0123456789";
const PROVIDERS: [Provider; 2] = [Provider::Openai, Provider::Anthropic];

fn price() -> Price {
    Price { input_per_mtok: 1.0, output_per_mtok: 2.0, cached_input_per_mtok: None, batch_discount: 0.5 }
}

fn settings(provider: Provider, url: &str) -> Settings {
    Settings {
        provider,
        model: "teacher-model".into(),
        base_url: Some(match provider {
            Provider::Anthropic => url.to_string(),
            _ => format!("{url}/v1"),
        }),
        api_key_env: Some("TEST_KEY".into()),
        max_concurrency: 4,
        timeout: RDuration(Duration::from_secs(5)),
        max_retries: 3,
        batch: true,
        price: Some(price()),
        ..Settings::default()
    }
}

/// Batch timings shortened so that no test waits: the fake answers at once.
fn fast() -> BatchOptions {
    BatchOptions {
        linger: Duration::from_millis(1),
        poll: Duration::from_millis(1),
        max_poll: Duration::from_millis(2),
        ..BatchOptions::default()
    }
}

fn teacher_with(s: &Settings, dir: &std::path::Path, batch: BatchOptions) -> Teacher {
    let store = Arc::new(Store::open(&dir.join("journal.jsonl")).unwrap());
    let backoff = Backoff { base: Duration::from_millis(1), max: Duration::from_millis(2) };
    Teacher::new(s, Some(KEY.into()), store, Options { backoff, batch }).unwrap()
}

fn req(text: &str) -> ChatRequest {
    ChatRequest {
        model: "teacher-model".into(),
        messages: vec![Message::new("system", "be brief"), Message::new("user", text)],
        temperature: 0.0,
        max_tokens: 50,
        schema: None,
        sample: 0,
    }
}

fn texts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("question {i}")).collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Asks everything at once, as distill does in batch mode; also returns every progress update.
fn ask_all(t: &Teacher, texts: &[String]) -> (Vec<Result<Answer, TeacherError>>, Vec<BatchProgress>) {
    rt().block_on(async {
        let mut rx = t.batch_progress().expect("batch mode");
        let reqs: Vec<ChatRequest> = texts.iter().map(|x| req(x)).collect();
        let asks = futures::future::join_all(reqs.iter().map(|r| t.ask(r)));
        tokio::pin!(asks);
        let mut seen = Vec::new();
        loop {
            tokio::select! {
                a = &mut asks => return (a, seen),
                Ok(()) = rx.changed() => seen.push(*rx.borrow_and_update()),
            }
        }
    })
}

fn answered_per_user(server: &MockServer) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for l in server.log().into_iter().filter(|l| l.answer.is_some()) {
        *m.entry(l.user).or_insert(0) += 1;
    }
    m
}

fn echo() -> MockConfig {
    MockConfig::scripted(|r: &MockRequest| {
        let auth = match r.api {
            Api::OpenAi => r.headers.get("authorization").cloned().unwrap_or_default(),
            Api::Anthropic => r.headers.get("x-api-key").cloned().unwrap_or_default(),
        };
        assert!(auth.ends_with(KEY), "batch calls carry the key in the auth header");
        assert_eq!(r.system, "be brief");
        Behavior::Answer(format!("echo {}", r.user))
    })
}

#[test]
fn one_batch_answers_everything_out_of_order_at_the_batch_discount_with_progress() {
    for provider in PROVIDERS {
        let mut config = echo();
        config.batch_polls = 2;
        let server = MockServer::start(config).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let s = settings(provider, &server.url());
        let t = teacher_with(&s, dir.path(), fast());
        let questions = texts(10);
        let (answers, seen) = ask_all(&t, &questions);
        for (q, a) in questions.iter().zip(&answers) {
            let a = a.as_ref().unwrap_or_else(|e| panic!("{provider:?}: {e}"));
            assert_eq!(a.completion.content, format!("echo {q}"), "{provider:?}: matched by custom_id");
            assert!(!a.cached);
            // Half the online price.
            let u = a.completion.usage;
            let full = (u.input_tokens as f64 * 1.0 + u.output_tokens as f64 * 2.0) / 1e6;
            assert!(full > 0.0);
            assert!(
                (a.completion.cost_usd - full * 0.5).abs() < 1e-15,
                "{provider:?}: {}",
                a.completion.cost_usd
            );
        }
        let batches = server.batches();
        assert_eq!(batches.len(), 1, "{provider:?}: one batch for one pass");
        assert_eq!(batches[0].custom_ids.len(), 10);
        assert_eq!(batches[0].polls, 3, "{provider:?}: two polls in progress, then the end");
        let keys: Vec<String> = questions.iter().map(|q| t.key(&req(q))).collect();
        assert_eq!(batches[0].custom_ids, keys, "{provider:?}: custom_id is the request's key");
        assert!(answered_per_user(&server).values().all(|n| *n == 1));
        assert!(
            seen.iter().any(|p| p.batches == 1 && p.total == 10 && p.done == 0),
            "{provider:?}: progress while polling: {seen:?}"
        );
        let stats = t.stats();
        assert_eq!((stats.sent, stats.batches_submitted), (10, 1));
        let total: f64 = answers.iter().map(|a| a.as_ref().unwrap().completion.cost_usd).sum();
        assert!((stats.cost_usd - total).abs() < 1e-12);
        // Asked again: the journal answers, nothing is submitted.
        let (again, _) = ask_all(&t, &questions);
        assert!(again.iter().all(|a| a.as_ref().unwrap().cached));
        assert_eq!(server.batches().len(), 1);
        t.store().sync().unwrap();
        let journal = std::fs::read_to_string(dir.path().join("journal.jsonl")).unwrap();
        assert!(!journal.contains("abcdefghijklmnop"), "the journal never holds the key");
        assert!(journal.contains(&format!("\"t\":\"batch_closed\",\"id\":\"{}\"", batches[0].id)));
    }
}

#[test]
fn retryable_error_entries_go_into_the_next_batch_and_others_stop_the_run() {
    for provider in PROVIDERS {
        let server = MockServer::start(MockConfig::scripted(|r: &MockRequest| match r.user.as_str() {
            "flaky" if r.attempt == 0 => Behavior::Status(500, "try again".into(), vec![]),
            "bad" => Behavior::Status(400, "the schema is invalid".into(), vec![]),
            u => Behavior::Answer(format!("echo {u}")),
        }))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let t = teacher_with(&settings(provider, &server.url()), dir.path(), fast());
        let (answers, _) = ask_all(&t, &["a".into(), "flaky".into()]);
        assert_eq!(answers[1].as_ref().unwrap().completion.content, "echo flaky", "{provider:?}");
        let batches = server.batches();
        assert_eq!(batches.len(), 2, "{provider:?}");
        assert_eq!(batches[1].users, ["flaky"], "{provider:?}: only the failed request again");
        assert_eq!(t.stats().retries.get("server_error"), Some(&1), "{provider:?}");

        let (answers, _) = ask_all(&t, &["b".into(), "bad".into()]);
        assert_eq!(answers[0].as_ref().unwrap().completion.content, "echo b");
        let e = answers[1].as_ref().unwrap_err();
        assert!(matches!(e, TeacherError::Fatal { .. }), "{provider:?}: {e:?}");
        assert!(e.to_string().contains("the schema is invalid"), "{e}");
        assert!(t.is_cached(&req("b")), "the answers of the same batch are kept");
        assert_eq!(server.batches().len(), 3, "{provider:?}: nothing resubmitted after a fatal error");
    }
}

#[test]
fn an_expired_batch_keeps_its_answers_and_only_the_missing_requests_are_resubmitted() {
    for provider in PROVIDERS {
        let mut config = MockConfig::answering(|u| format!("echo {u}"));
        config.batch_expire =
            Some(Arc::new(|r: &MockRequest| r.attempt == 0 && r.user.ends_with(['1', '3', '5'])));
        let server = MockServer::start(config).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let t = teacher_with(&settings(provider, &server.url()), dir.path(), fast());
        let questions = texts(6);
        let (answers, _) = ask_all(&t, &questions);
        for (q, a) in questions.iter().zip(&answers) {
            assert_eq!(a.as_ref().unwrap().completion.content, format!("echo {q}"), "{provider:?}");
        }
        let batches = server.batches();
        assert_eq!(batches.len(), 2, "{provider:?}");
        assert_eq!(batches[1].users, ["question 1", "question 3", "question 5"], "{provider:?}");
        let per_user = answered_per_user(&server);
        assert_eq!(per_user.len(), 6);
        assert!(per_user.values().all(|n| *n == 1), "{provider:?}: {per_user:?}");
        assert_eq!(t.stats().retries.get("batch_expired"), Some(&3), "{provider:?}");
        assert_eq!(t.stats().sent, 6);
    }
}

#[test]
fn batches_are_split_by_the_request_limit_and_an_oversized_request_is_refused() {
    let server = MockServer::start(MockConfig::answering(|u| format!("echo {u}"))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = BatchOptions { max_requests: Some(3), ..fast() };
    let t = teacher_with(&settings(Provider::Openai, &server.url()), dir.path(), opts);
    let (answers, _) = ask_all(&t, &texts(7));
    assert!(answers.iter().all(Result::is_ok));
    let sizes: Vec<usize> = server.batches().iter().map(|b| b.custom_ids.len()).collect();
    assert_eq!(sizes, [3, 3, 1]);

    let dir = tempfile::tempdir().unwrap();
    let opts = BatchOptions { max_bytes: Some(64), ..fast() };
    let t = teacher_with(&settings(Provider::Anthropic, &server.url()), dir.path(), opts);
    let (answers, _) = ask_all(&t, &texts(1));
    let e = answers[0].as_ref().unwrap_err();
    assert!(e.to_string().contains("more than one Anthropic batch may hold"), "{e}");
    assert_eq!(server.batches().len(), 3, "nothing submitted");
}

#[test]
fn the_budget_reserves_a_whole_batch_before_submitting_it() {
    let server = MockServer::start(MockConfig::answering(|u| format!("echo {u}"))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(Provider::Openai, &server.url());
    let pricing = Pricing::resolve(Provider::Openai, "teacher-model", Some(&price()), true, None).unwrap();
    let r = req("question 0");
    let worst = pricing.worst_case(r.worst_case_input_tokens(), r.max_tokens);
    s.budget_usd = Some(worst * 3.5);
    let t = teacher_with(&s, dir.path(), fast());
    let (answers, _) = ask_all(&t, &texts(5));
    assert!(answers[..3].iter().all(Result::is_ok));
    for a in &answers[3..] {
        assert!(matches!(a, Err(TeacherError::Budget { .. })), "{a:?}");
    }
    assert_eq!(server.batches()[0].custom_ids.len(), 3, "only what the budget covers is submitted");
    assert!(t.budget().spent() <= worst * 3.5);
}

#[test]
fn a_teacher_stopped_mid_batch_is_followed_by_one_that_polls_the_same_batch() {
    for provider in PROVIDERS {
        let hold = Arc::new(AtomicBool::new(true));
        let mut config = MockConfig::answering(|u| format!("echo {u}"));
        config.batch_hold = Some(hold.clone());
        let server = Arc::new(MockServer::start(config).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let s = settings(provider, &server.url());
        let questions = texts(4);
        {
            // The first teacher submits, polls once, and is dropped while the batch runs.
            let t = teacher_with(&s, dir.path(), fast());
            let srv = server.clone();
            rt().block_on(async {
                let reqs: Vec<ChatRequest> = questions.iter().map(|x| req(x)).collect();
                let asks = futures::future::join_all(reqs.iter().map(|r| t.ask(r)));
                let polled = tokio::task::spawn_blocking(move || {
                    srv.wait_batches(Duration::from_secs(30), |b| b.first().is_some_and(|b| b.polls >= 1))
                });
                tokio::select! {
                    _ = asks => panic!("{provider:?}: answered while the batch was held"),
                    p = polled => assert!(p.unwrap(), "{provider:?}: never polled"),
                }
            });
        }
        hold.store(false, Ordering::SeqCst);
        let t = teacher_with(&s, dir.path(), fast());
        let (answers, _) = ask_all(&t, &questions);
        for (q, a) in questions.iter().zip(&answers) {
            assert_eq!(a.as_ref().unwrap().completion.content, format!("echo {q}"), "{provider:?}");
        }
        assert_eq!(server.batches().len(), 1, "{provider:?}: no second batch for the same requests");
        assert_eq!(t.stats().batches_resumed, 1);
        assert_eq!(t.stats().batches_submitted, 0);
        assert!(answered_per_user(&server).values().all(|n| *n == 1));
    }
}
