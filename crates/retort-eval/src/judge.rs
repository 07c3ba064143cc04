//! `judge_win_rate`: an LLM judge compares the tuned model's answer with the teacher's on every test
//! example, by the recipe's rubric.
//!
//! Each pair is judged twice, once with the tuned answer first and once second, because judges favour
//! a position; an example scores 1 when the tuned answer wins both, 0.5 for a split or a tie, 0 when it
//! loses both (the mean of the two verdicts, a tie counting half). Identical answers score 0.5 without
//! a request. The judge is the teacher's client (its provider, key, rate limits and prices), with
//! `eval.judge.model` when set, and its requests go through the distill journal: a rerun pays for
//! nothing already judged, and the teacher's `budget_usd` covers distill and judge together.

use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use retort_recipe::schema::eval::Judge;
use retort_recipe::schema::teacher::Teacher as TeacherSettings;
use retort_teacher::{ChatRequest, Message, Options, Store, Teacher};
use serde::{Deserialize, Serialize};

use crate::EvalError;

/// What judging cost and how it went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JudgeStats {
    /// The judge model.
    pub model: String,
    /// Verdicts asked for (two per example whose answers differ).
    pub verdicts: usize,
    /// Of those, answered from the journal (already paid for).
    pub cached: usize,
    /// Replies with no readable verdict, counted as ties.
    pub unreadable: usize,
}

/// A verdict read from a judge's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The answer shown first wins.
    A,
    /// The answer shown second wins.
    B,
    /// Neither is better.
    Tie,
}

/// The judge's prompt for one ordered pair.
pub fn prompt(rubric: &str, system: &str, input: &str, first: &str, second: &str) -> String {
    format!(
        "You compare two answers to the same task and say which is better.\n\n\
         Task instructions:\n{system}\n\nInput:\n{input}\n\n\
         Answer A:\n{first}\n\nAnswer B:\n{second}\n\n\
         What makes an answer better: {rubric}\n\n\
         Reply with JSON only: {{\"winner\": \"A\"}}, {{\"winner\": \"B\"}} or {{\"winner\": \"tie\"}}."
    )
}

/// The verdict in a reply: the `winner` of a JSON object anywhere in it, else a lone `A`, `B` or `tie`.
pub fn parse_verdict(reply: &str) -> Option<Verdict> {
    let word =
        |w: &str| match w.trim().trim_matches(|c: char| !c.is_alphanumeric()).to_ascii_lowercase().as_str() {
            "a" => Some(Verdict::A),
            "b" => Some(Verdict::B),
            "tie" | "draw" | "equal" => Some(Verdict::Tie),
            _ => None,
        };
    let mut from = 0;
    while let Some(start) = reply[from..].find('{').map(|i| i + from) {
        if let Some(end) = reply[start..].find('}').map(|i| i + start)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&reply[start..=end])
            && let Some(w) = v.get("winner").and_then(|w| w.as_str())
        {
            return word(w);
        }
        from = start + 1;
    }
    word(reply)
}

/// Score of one example from its two verdicts (tuned first, then tuned second).
pub fn example_score(tuned_first: Verdict, tuned_second: Verdict) -> f64 {
    let first = match tuned_first {
        Verdict::A => 1.0,
        Verdict::B => 0.0,
        Verdict::Tie => 0.5,
    };
    let second = match tuned_second {
        Verdict::A => 0.0,
        Verdict::B => 1.0,
        Verdict::Tie => 0.5,
    };
    (first + second) / 2.0
}

/// One example to judge.
#[derive(Debug, Clone)]
pub struct Pair<'a> {
    /// The user's input.
    pub input: &'a str,
    /// The teacher's answer (the reference).
    pub teacher: &'a str,
    /// The tuned model's answer.
    pub tuned: &'a str,
}

/// Per-example win rates of the tuned answers over the teacher's, with what it cost. `journal` is the
/// teacher journal (cache and budget), `api_key` the value of the teacher's `api_key_env`.
pub fn win_rates(
    settings: &TeacherSettings,
    judge: &Judge,
    system: &str,
    pairs: &[Pair<'_>],
    journal: &Path,
    api_key: Option<String>,
    options: Options,
) -> Result<(Vec<f64>, JudgeStats), EvalError> {
    let mut t = settings.clone();
    if let Some(m) = &judge.model {
        t.model = m.clone();
    }
    let model = t.model.clone();
    let fail = |e: retort_teacher::TeacherError| EvalError::Judge {
        message: e.to_string(),
        hint: e.hint().unwrap_or_default(),
    };
    let store = Arc::new(Store::open(journal).map_err(fail)?);
    let teacher = Teacher::new(&t, api_key, store, options).map_err(fail)?;
    let request = |first: &str, second: &str, input: &str| ChatRequest {
        model: model.clone(),
        messages: vec![Message::new("user", prompt(&judge.rubric, system, input, first, second))],
        temperature: 0.0,
        max_tokens: 64,
        schema: None,
        sample: 0,
    };
    // Two requests per example whose answers differ: tuned first, then tuned second.
    let mut jobs = Vec::new();
    for (i, p) in pairs.iter().enumerate() {
        if p.tuned.trim() != p.teacher.trim() {
            jobs.push((i, 0usize, request(p.tuned, p.teacher, p.input)));
            jobs.push((i, 1usize, request(p.teacher, p.tuned, p.input)));
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| {
        EvalError::Judge { message: format!("cannot start the async runtime: {e}"), hint: String::new() }
    })?;
    let concurrency = t.max_concurrency.max(1) as usize;
    let answers: Vec<_> = runtime.block_on(
        futures::stream::iter(jobs.iter().map(|(_, _, r)| teacher.ask(r))).buffered(concurrency).collect(),
    );
    let mut stats = JudgeStats { model, verdicts: jobs.len(), ..JudgeStats::default() };
    let mut verdicts = vec![[Verdict::Tie; 2]; pairs.len()];
    for ((i, slot, _), a) in jobs.iter().zip(answers) {
        let a = a.map_err(fail)?;
        stats.cached += usize::from(a.cached);
        let v = match a.completion.failure() {
            Some(_) => None,
            None => parse_verdict(&a.completion.content),
        };
        if v.is_none() {
            stats.unreadable += 1;
        }
        verdicts[*i][*slot] = v.unwrap_or(Verdict::Tie);
    }
    // Equal answers keep [Tie, Tie]: 0.5 without asking.
    Ok((verdicts.iter().map(|[a, b]| example_score(*a, *b)).collect(), stats))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

    use super::*;

    #[test]
    fn verdicts_are_read_from_json_or_a_lone_word() {
        assert_eq!(parse_verdict(r#"{"winner": "A"}"#), Some(Verdict::A));
        assert_eq!(parse_verdict("Sure. {\"reason\": \"x\"} then {\"winner\":\"b\"}"), Some(Verdict::B));
        assert_eq!(parse_verdict("```json\n{\"winner\": \"tie\"}\n```"), Some(Verdict::Tie));
        assert_eq!(parse_verdict(" B. "), Some(Verdict::B));
        assert_eq!(parse_verdict("Answer A is better because"), None);
        assert_eq!(parse_verdict(r#"{"winner": "C"}"#), None);
    }

    #[test]
    fn both_orders_count_and_position_bias_cancels() {
        // Tuned wins in both positions, loses in both, or the judge always picks the first slot.
        assert_eq!(example_score(Verdict::A, Verdict::B), 1.0);
        assert_eq!(example_score(Verdict::B, Verdict::A), 0.0);
        assert_eq!(example_score(Verdict::A, Verdict::A), 0.5);
        assert_eq!(example_score(Verdict::Tie, Verdict::B), 0.75);
    }
}
