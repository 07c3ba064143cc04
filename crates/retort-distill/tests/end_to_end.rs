//! The pipeline end to end against the in-process fake API: the JSON-schema re-ask, the judge,
//! generated inputs, and batch mode.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use retort_distill::Options;
use retort_teacher::mock::{Behavior, MockConfig, MockRequest, MockServer};
use retort_teacher::{Backoff, BatchOptions, Options as TeacherOptions};
use serde_json::Value;

const TICKETS: usize = 8;

fn write_case(dir: &Path, teacher: &str, distill: &str) {
    let mut tickets = String::new();
    for i in 0..TICKETS {
        tickets
            .push_str(&format!("{{\"id\": \"t{i}\", \"text\": \"ticket {i}: my screen {i} went dark\"}}\n"));
    }
    std::fs::write(dir.join("tickets.jsonl"), tickets).unwrap();
    let recipe = format!(
        r#"[project]
name = "e2e"
seed = 3
data_dir = "out"

[base]
model = "builtin:tiny-llama"

[teacher]
max_concurrency = 4
timeout = "30s"
max_retries = 2
price = {{ input_per_mtok = 1.0, output_per_mtok = 2.0 }}
{teacher}

[distill]
system_prompt = "Route the ticket."
split = {{ train = 0.8, val = 0.1, test = 0.1 }}
{distill}
"#
    );
    std::fs::write(dir.join("recipe.toml"), recipe).unwrap();
}

fn online(url: &str) -> String {
    format!("provider = \"openai-compatible\"\nmodel = \"mock\"\nbase_url = \"{url}/v1\"")
}

const FILE_INPUTS: &str = "[distill.inputs]\nfrom = \"file\"\npath = \"tickets.jsonl\"\nfield = \"text\"\n";

fn run(dir: &Path) -> Result<retort_distill::Outcome, retort_distill::DistillError> {
    let recipe = match retort_recipe::load(&dir.join("recipe.toml")) {
        Ok(l) => l.recipe,
        Err(e) => panic!("{e:?}"),
    };
    let opts = Options {
        teacher: TeacherOptions {
            backoff: Backoff { base: Duration::from_millis(1), max: Duration::from_millis(2) },
            batch: BatchOptions {
                linger: Duration::from_millis(1),
                poll: Duration::from_millis(1),
                max_poll: Duration::from_millis(2),
                ..BatchOptions::default()
            },
        },
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(retort_distill::run(&recipe, Some("sk-test-key".into()), &retort_io::NoProgress, &opts))
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn kept(dir: &Path) -> Vec<Value> {
    ["train", "val", "test"].iter().flat_map(|s| jsonl(&dir.join(format!("out/{s}.jsonl")))).collect()
}

fn assistant(row: &Value) -> String {
    row["messages"].as_array().unwrap().last().unwrap()["content"].as_str().unwrap().to_string()
}

fn user(row: &Value) -> String {
    let m = row["messages"].as_array().unwrap();
    m.iter().find(|m| m["role"] == "user").unwrap()["content"].as_str().unwrap().to_string()
}

fn ticket_number(text: &str) -> usize {
    text.split(|c: char| !c.is_ascii_digit()).find(|s| !s.is_empty()).and_then(|s| s.parse().ok()).unwrap()
}

#[test]
fn an_invalid_json_answer_gets_one_reask_quoting_the_error_then_is_kept_or_rejected() {
    let reasks: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = reasks.clone();
    let server = MockServer::start(MockConfig::scripted(move |r: &MockRequest| {
        if r.user.contains("Answer again") {
            seen.lock().unwrap().push(r.user.clone());
            // The conversation carries the first answer before the re-ask.
            let msgs = r.body["messages"].as_array().unwrap();
            assert_eq!(msgs[msgs.len() - 2]["role"], "assistant");
            let n = ticket_number(msgs[1]["content"].as_str().unwrap());
            return Behavior::Answer(if n.is_multiple_of(2) {
                "{\"label\": \"bug\"}".into()
            } else {
                "{\"tag\": 1}".into()
            });
        }
        let n = ticket_number(&r.user);
        Behavior::Answer(if n < 4 {
            "{\"label\": \"billing\"}".into()
        } else {
            "{\"labels\": \"bug\"}".into()
        })
    }))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let distill = format!(
        "target_examples = {TICKETS}\n{FILE_INPUTS}\n[distill.output]\nkind = \"json\"\nstrict = false\n\
         schema = {{ type = \"object\", properties = {{ label = {{ type = \"string\" }} }}, required = [\"label\"], additionalProperties = false }}\n\n\
         [[distill.filters]]\nkind = \"json_schema\"\nreask = true\n"
    );
    write_case(dir.path(), &online(&server.url()), &distill);
    let o = run(dir.path()).unwrap();
    // Tickets 4-7 answered wrongly: one re-ask each, quoting what was wrong, never a plain retry.
    let reasks = reasks.lock().unwrap().clone();
    assert_eq!(reasks.len(), 4, "{reasks:?}");
    for r in &reasks {
        assert!(r.contains("label"), "the re-ask quotes the validation error: {r}");
    }
    assert_eq!(server.log().len(), TICKETS + 4);
    let rows = kept(dir.path());
    let mut answers: Vec<(usize, String)> =
        rows.iter().map(|r| (ticket_number(&user(r)), assistant(r))).collect();
    answers.sort();
    let want: Vec<(usize, String)> = [0, 1, 2, 3, 4, 6]
        .iter()
        .map(|&n| (n, if n < 4 { "{\"label\":\"billing\"}" } else { "{\"label\":\"bug\"}" }.to_string()))
        .collect();
    assert_eq!(answers, want, "fixed answers are kept in their corrected form");
    let rejected = jsonl(&dir.path().join("out/rejected.jsonl"));
    assert_eq!(rejected.len(), 2);
    for r in &rejected {
        assert_eq!(r["filter"], "json_schema");
        assert!(r["reason"].as_str().unwrap().contains("after one re-ask"), "{r}");
        assert_eq!(r["output"], "{\"tag\": 1}");
    }
    assert_eq!(o.rejected, 2);
}

#[test]
fn the_judge_rejects_low_scores_with_the_score_and_its_requests_are_paid_for() {
    let server = MockServer::start(MockConfig::scripted(|r: &MockRequest| {
        if r.user.starts_with("Grade one example") {
            assert!(r.user.contains("Be correct."), "the rubric is in the judge's prompt");
            let n = ticket_number(r.user.split("The user's message:").nth(1).unwrap());
            let score = if n.is_multiple_of(3) { 4 } else { 9 };
            return Behavior::Answer(format!("{{\"score\": {score}, \"reason\": \"ok\"}}"));
        }
        Behavior::Answer("bug".into())
    }))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let distill = format!(
        "target_examples = {TICKETS}\n{FILE_INPUTS}\n[distill.output]\nkind = \"label\"\nlabels = [\"bug\", \"billing\"]\n\n\
         [[distill.filters]]\nkind = \"judge\"\nrubric = \"Be correct.\"\nmin_score = 7\n"
    );
    write_case(dir.path(), &online(&server.url()), &distill);
    let o = run(dir.path()).unwrap();
    let low: Vec<usize> = (0..TICKETS).filter(|n| n.is_multiple_of(3)).collect();
    let rejected = jsonl(&dir.path().join("out/rejected.jsonl"));
    let mut got: Vec<usize> = rejected.iter().map(|r| ticket_number(r["input"].as_str().unwrap())).collect();
    got.sort();
    assert_eq!(got, low);
    for r in &rejected {
        assert_eq!(r["filter"], "judge");
        assert_eq!(r["reason"], "the judge scored it 4, below 7");
    }
    let rows = kept(dir.path());
    assert_eq!(rows.len(), TICKETS - low.len());
    assert!(rows.iter().all(|r| r["provenance"]["scores"]["judge"] == 9.0), "{rows:?}");
    // Every judge request was sent and paid for like an answer.
    let r = &o.report;
    assert_eq!(r["requests"]["sent"], TICKETS as u64 * 2);
    assert_eq!(server.log().iter().filter(|l| l.user.starts_with("Grade")).count(), TICKETS);
    let (i, out) = (r["tokens"]["input"].as_f64().unwrap(), r["tokens"]["output"].as_f64().unwrap());
    let cost = r["cost_usd"]["this_run"].as_f64().unwrap();
    assert!((cost - (i * 1.0 + out * 2.0) / 1e6).abs() < 1e-6, "{cost} for {i} in, {out} out");
    let by_judge =
        r["rejected_by_filter"].as_array().unwrap().iter().find(|f| f["filter"] == "judge").unwrap();
    assert_eq!(by_judge["rejected"], low.len());
}

#[test]
fn generated_inputs_cover_topics_times_personas_and_are_answered() {
    let server = MockServer::start(MockConfig::scripted(|r: &MockRequest| {
        if let Some(rest) = r.user.strip_prefix("Write one support ticket about ") {
            return Behavior::Answer(format!("Help with {rest}"));
        }
        Behavior::Answer(if r.user.contains("billing") { "billing".into() } else { "bug".into() })
    }))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let distill = "target_examples = 4\n\n[distill.inputs]\nfrom = \"generate\"\n\
         prompt = \"Write one support ticket about {{ topic }} as {{ persona }}, variant {{ index }}\"\n\
         topics = [\"billing\", \"login\"]\npersonas = [\"a new user\", \"an admin\"]\noversample = 1.0\n\n\
         [distill.output]\nkind = \"label\"\nlabels = [\"bug\", \"billing\"]\n";
    write_case(dir.path(), &online(&server.url()), distill);
    let o = run(dir.path()).unwrap();
    let mut generated: Vec<String> =
        server.log().iter().filter(|l| l.user.starts_with("Write one")).map(|l| l.user.clone()).collect();
    generated.sort();
    assert_eq!(
        generated,
        [
            "Write one support ticket about billing as a new user, variant 0",
            "Write one support ticket about billing as an admin, variant 0",
            "Write one support ticket about login as a new user, variant 0",
            "Write one support ticket about login as an admin, variant 0",
        ]
    );
    let rows = kept(dir.path());
    assert_eq!(rows.len(), 4);
    for r in &rows {
        let u = user(r);
        assert!(u.starts_with("Help with "), "the generated text is the input: {u}");
        assert_eq!(assistant(r), if u.contains("billing") { "billing" } else { "bug" });
        assert!(r["provenance"]["input"].as_str().unwrap().starts_with("gen-"));
    }
    assert_eq!(o.report["requests"]["sent"], 8);
}

#[test]
fn batch_mode_sends_a_pass_as_one_provider_batch_at_half_price() {
    let server = MockServer::start(MockConfig::answering(|u| {
        if u.contains("ticket 1") { "billing".into() } else { "bug".into() }
    }))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let teacher = format!(
        "provider = \"openai\"\nmodel = \"gpt-4o-mini\"\nbase_url = \"{}/v1\"\napi_key_env = \"E2E_KEY\"\nbatch = true",
        server.url()
    );
    let distill = format!(
        "target_examples = {TICKETS}\n{FILE_INPUTS}\n[distill.output]\nkind = \"label\"\nlabels = [\"bug\", \"billing\"]\n"
    );
    write_case(dir.path(), &teacher, &distill);
    let o = run(dir.path()).unwrap();
    assert_eq!(kept(dir.path()).len(), TICKETS);
    let batches = server.batches();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].custom_ids.len(), TICKETS);
    let r = &o.report;
    assert_eq!(r["requests"]["batches_submitted"], 1);
    let (i, out) = (r["tokens"]["input"].as_f64().unwrap(), r["tokens"]["output"].as_f64().unwrap());
    let cost = r["cost_usd"]["this_run"].as_f64().unwrap();
    assert!(cost > 0.0);
    assert!((cost - 0.5 * (i * 1.0 + out * 2.0) / 1e6).abs() < 1e-6, "half price: {cost}");
}
