//! `judge_win_rate` against a mock OpenAI-compatible judge: both orders are asked and combined, equal
//! answers cost nothing, unreadable verdicts count as ties, a position-biased judge scores 0.5, and a
//! rerun is answered from the journal without a single new request.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use retort_eval::judge::{Pair, win_rates};
use retort_recipe::schema::eval::Judge;
use retort_recipe::schema::teacher::{Provider, Teacher};
use retort_teacher::mock::{Behavior, MockConfig, MockRequest, MockServer};

fn settings(url: &str) -> Teacher {
    Teacher {
        provider: Provider::OpenaiCompatible,
        model: "teacher-model".into(),
        base_url: Some(format!("{url}/v1")),
        ..Teacher::default()
    }
}

fn slots(prompt: &str) -> (String, String) {
    let a = prompt.split("Answer A:\n").nth(1).unwrap().split("\n\nAnswer B:").next().unwrap();
    let b = prompt.split("Answer B:\n").nth(1).unwrap().split("\n\nWhat makes").next().unwrap();
    (a.to_string(), b.to_string())
}

const PAIRS: [(&str, &str, &str); 4] = [
    // input, teacher, tuned
    ("ticket 1", "bad", "good"),
    ("ticket 2", "good", "bad"),
    ("ticket 3", "same", "same"),
    ("ticket 4", "x", "y"),
];

fn pairs() -> Vec<Pair<'static>> {
    PAIRS.iter().map(|(input, teacher, tuned)| Pair { input, teacher, tuned }).collect()
}

#[test]
fn tuned_answers_are_judged_in_both_orders_and_never_paid_twice() {
    let server = MockServer::start(MockConfig::scripted(|r: &MockRequest| {
        assert_eq!(r.body["model"], "judge-model", "eval.judge.model is used");
        assert!(r.user.contains("Be right.") && r.user.contains("Route it."), "rubric and task are shown");
        let (a, b) = slots(&r.user);
        if a == "x" || b == "x" {
            return Behavior::Answer("I cannot decide.".into());
        }
        let w = if a == "good" {
            "A"
        } else if b == "good" {
            "B"
        } else {
            "tie"
        };
        Behavior::Answer(format!("{{\"winner\": \"{w}\"}}"))
    }))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal.jsonl");
    let judge = Judge { rubric: "Be right.".into(), model: Some("judge-model".into()) };
    let t = settings(&server.url());
    let (v, stats) =
        win_rates(&t, &judge, "Route it.", &pairs(), &journal, None, Default::default()).unwrap();
    assert_eq!(v, [1.0, 0.0, 0.5, 0.5]);
    assert_eq!((stats.verdicts, stats.cached, stats.unreadable), (6, 0, 2), "{stats:?}");
    assert_eq!(stats.model, "judge-model");
    assert_eq!(server.log().len(), 6, "two per differing pair, none for equal answers");

    // Again: every verdict comes from the journal.
    let (again, stats) =
        win_rates(&t, &judge, "Route it.", &pairs(), &journal, None, Default::default()).unwrap();
    assert_eq!(again, v);
    assert_eq!(stats.cached, 6);
    assert_eq!(server.log().len(), 6, "a rerun sent requests");
}

#[test]
fn a_judge_that_always_picks_the_first_answer_gives_one_half() {
    let server = MockServer::start(MockConfig::answering(|_| "{\"winner\": \"A\"}".into())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let judge = Judge { rubric: "Be right.".into(), model: None };
    let (v, _) = win_rates(
        &settings(&server.url()),
        &judge,
        "Route it.",
        &pairs(),
        &dir.path().join("j.jsonl"),
        None,
        Default::default(),
    )
    .unwrap();
    assert_eq!(v, [0.5; 4]);
    assert!(server.log().iter().all(|l| l.status == 200));
}
