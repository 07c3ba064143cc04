//! `retort distill` as a child process against the in-process fake API: killed with SIGKILL at
//! random points and resumed, stopped by the budget and resumed, and its JSON progress lines.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use retort_teacher::mock::{Behavior, MockConfig, MockServer};

const INPUTS: usize = 40;
const CONCURRENCY: usize = 4;

fn write_case(dir: &Path, url: &str, extra_teacher: &str) {
    let mut tickets = String::new();
    for i in 0..INPUTS {
        tickets.push_str(&format!(
            "{{\"id\": \"t{i}\", \"text\": \"Ticket {i}: the {} stopped working after step {} of the {} wizard\"}}\n",
            ["app", "export", "login", "invoice", "search"][i % 5],
            i * 7 % 11,
            ["setup", "billing", "import"][i % 3]
        ));
    }
    std::fs::write(dir.join("tickets.jsonl"), tickets).unwrap();
    let recipe = format!(
        r#"[project]
name = "crash"
seed = 7
data_dir = "out"

[base]
model = "builtin:tiny-llama"

[teacher]
provider = "openai-compatible"
model = "mock-teacher"
base_url = "{url}/v1"
max_concurrency = {CONCURRENCY}
timeout = "30s"
{extra_teacher}

[distill]
system_prompt = "Route the ticket: bug, billing or other."
target_examples = {INPUTS}
split = {{ train = 0.8, val = 0.1, test = 0.1 }}

[distill.inputs]
from = "file"
path = "tickets.jsonl"
field = "text"

[distill.output]
kind = "label"
labels = ["bug", "billing", "other"]
"#
    );
    std::fs::write(dir.join("recipe.toml"), recipe).unwrap();
}

fn label(user: &str) -> String {
    let n: usize = user
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    ["bug", "billing", "other"][n % 3].to_string()
}

fn retort(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_retort"));
    c.current_dir(dir).env_remove("NO_COLOR").env("RETORT_LOG_FORMAT", "json");
    c
}

fn dataset(dir: &Path) -> Vec<String> {
    ["train", "val", "test"]
        .iter()
        .map(|s| std::fs::read_to_string(dir.join("out").join(format!("{s}.jsonl"))).unwrap())
        .collect()
}

fn answers_per_request(server: &MockServer) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for l in server.log().into_iter().filter(|l| l.answer.is_some()) {
        *m.entry(l.user).or_insert(0) += 1;
    }
    m
}

#[test]
fn killed_at_random_points_and_resumed_it_pays_for_nothing_twice_and_ends_as_an_uninterrupted_run() {
    // The uninterrupted run.
    let reference_server = MockServer::start(MockConfig::answering(label)).unwrap();
    let reference = tempfile::tempdir().unwrap();
    write_case(reference.path(), &reference_server.url(), "");
    let o = retort(reference.path()).args(["-q", "distill", "recipe.toml"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));

    // The same work, killed several times. Freezing the server at a random arrival and waiting
    // until all CONCURRENCY slots are held at the server means no answer is in transit at the kill.
    let frozen = Arc::new(AtomicBool::new(false));
    let freeze_at = Arc::new(AtomicUsize::new(usize::MAX));
    let arrivals = Arc::new(AtomicUsize::new(0));
    let (f, k, a) = (frozen.clone(), freeze_at.clone(), arrivals.clone());
    let server = MockServer::start(MockConfig::scripted(move |r| {
        let n = a.fetch_add(1, Ordering::SeqCst);
        if n >= k.load(Ordering::SeqCst) {
            f.store(true, Ordering::SeqCst);
        }
        if f.load(Ordering::SeqCst) { Behavior::Hang } else { Behavior::Answer(label(&r.user)) }
    }))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_case(dir.path(), &server.url(), "");
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut rng = seed | 1;
    let mut next = |bound: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % bound as u64) as usize
    };
    let mut kills = 0;
    let mut remaining = INPUTS;
    while remaining > CONCURRENCY + 1 && kills < 4 {
        // At most half of what is left, so several kills fit in one run of the test.
        let k = next((remaining - CONCURRENCY) / 2 + 1);
        arrivals.store(0, Ordering::SeqCst);
        frozen.store(false, Ordering::SeqCst);
        freeze_at.store(k, Ordering::SeqCst);
        let mut child = retort(dir.path())
            .args(["-q", "distill", "recipe.toml"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let fr = frozen.clone();
        let held = server.wait_until(Duration::from_secs(30), |pending, _| {
            fr.load(Ordering::SeqCst) && pending == CONCURRENCY
        });
        assert!(held, "seed {seed}: the client never filled its {CONCURRENCY} slots at arrival {k}");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(
            server.wait_until(Duration::from_secs(30), |pending, _| pending == 0),
            "seed {seed}: connections linger"
        );
        kills += 1;
        remaining = INPUTS - answers_per_request(&server).len();
    }
    assert!(kills >= 2, "seed {seed}: only {kills} kills");
    freeze_at.store(usize::MAX, Ordering::SeqCst);
    frozen.store(false, Ordering::SeqCst);
    let o: Output = retort(dir.path()).args(["-q", "distill", "recipe.toml"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "seed {seed}: {}", String::from_utf8_lossy(&o.stderr));

    let per_request = answers_per_request(&server);
    assert_eq!(per_request.len(), INPUTS, "seed {seed}: every input answered");
    let twice: Vec<_> = per_request.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "seed {seed}: answered more than once: {twice:?}");
    assert_eq!(
        dataset(dir.path()),
        dataset(reference.path()),
        "seed {seed}: the dataset differs from an uninterrupted run"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/distill.json")).unwrap()).unwrap();
    assert!(report["requests"]["cache_hits"].as_u64().unwrap() > 0);
}

#[test]
fn the_budget_stops_with_exit_4_and_a_higher_budget_resumes() {
    let server = MockServer::start(MockConfig::answering(label)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // About 30 input tokens and at most 16 output tokens a request: $0.000046 worst case at these
    // prices, so $0.0005 pays for about ten requests.
    let price =
        "max_tokens = 16\nprice = { input_per_mtok = 1.0, output_per_mtok = 1.0 }\nbudget_usd = 0.0005";
    write_case(dir.path(), &server.url(), price);
    let o = retort(dir.path()).args(["distill", "recipe.toml"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(err.contains("budget") && err.contains("raise `teacher.budget_usd`"), "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/distill.json")).unwrap()).unwrap();
    assert_eq!(report["status"], "stopped_resumable");
    let spent = report["cost_usd"]["total"].as_f64().unwrap();
    assert!(spent > 0.0 && spent <= 0.0005, "{spent}");
    let first = server.log().len();
    assert!(first > 0 && first < INPUTS, "{first}");
    // Every line of stderr is JSON (progress and errors alike).
    for line in err.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }

    let raised = std::fs::read_to_string(dir.path().join("recipe.toml"))
        .unwrap()
        .replace("budget_usd = 0.0005", "budget_usd = 1.0");
    std::fs::write(dir.path().join("recipe.toml"), raised).unwrap();
    let o = retort(dir.path()).args(["distill", "recipe.toml"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.lines().any(|l| l.contains("\"event\":\"finish\"") && l.contains("\"task\":\"answers\"")),
        "{err}"
    );
    assert!(answers_per_request(&server).values().all(|n| *n == 1), "nothing paid twice");
    assert_eq!(answers_per_request(&server).len(), INPUTS);
}

#[test]
fn a_bad_key_stops_at_once_with_exit_1_and_never_prints_the_key() {
    let key = "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWXYZ012345";
    let server = MockServer::start(MockConfig::scripted(move |_| {
        Behavior::Status(401, format!("Incorrect API key provided: {key}"), vec![])
    }))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_case(dir.path(), &server.url(), "api_key_env = \"RETORT_TEST_KEY\"");
    let o = retort(dir.path())
        .args(["-v", "distill", "recipe.toml"])
        .env("RETORT_TEST_KEY", key)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("rejected the API key") && err.contains("RETORT_TEST_KEY"), "{err}");
    assert!(!err.contains("ABCDEFGHIJKLMNOP"), "{err}");
    assert!(server.log().len() <= CONCURRENCY, "fails fast: {}", server.log().len());
    let journal =
        std::fs::read_to_string(dir.path().join("out/.cache/teacher-journal.jsonl")).unwrap_or_default();
    assert!(!journal.contains("ABCDEFGHIJKLMNOP"));
}

#[test]
fn dry_run_sends_nothing_and_prices_the_worst_case() {
    let server = MockServer::start(MockConfig::answering(label)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_case(
        dir.path(),
        &server.url(),
        "max_tokens = 100\nprice = { input_per_mtok = 1.0, output_per_mtok = 10.0 }",
    );
    let o = retort(dir.path()).args(["-q", "distill", "recipe.toml", "--dry-run"]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0));
    assert!(out.contains("requests: 40 in the first pass (0 cached, 40 to send)"), "{out}");
    assert!(out.contains("output tokens: at most 4000"), "{out}");
    // 4000 output tokens at $10/M is $0.04, plus the input.
    assert!(out.contains("= at most $0.04"), "{out}");
    assert!(server.log().is_empty());
}

#[test]
fn killed_after_submitting_a_batch_the_rerun_polls_that_batch_and_pays_once_at_the_batch_price() {
    let hold = Arc::new(AtomicBool::new(true));
    let mut config = MockConfig::answering(label);
    config.batch_hold = Some(hold.clone());
    let server = MockServer::start(config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_case(
        dir.path(),
        &server.url(),
        "api_key_env = \"RETORT_TEST_KEY\"\nbatch = true\nprice = { input_per_mtok = 1.0, output_per_mtok = 1.0 }",
    );
    let recipe = std::fs::read_to_string(dir.path().join("recipe.toml")).unwrap();
    std::fs::write(dir.path().join("recipe.toml"), recipe.replace("\"openai-compatible\"", "\"openai\""))
        .unwrap();
    let key = "sk-batch-ABCDEFGHIJKLMNOPQRSTUVWXYZ";

    // The first run submits one batch for every input, polls it once, and is killed while it runs.
    let mut child = retort(dir.path())
        .args(["-q", "distill", "recipe.toml"])
        .env("RETORT_TEST_KEY", key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let polled = server.wait_batches(Duration::from_secs(30), |b| b.first().is_some_and(|b| b.polls >= 1));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(polled, "the first run never polled its batch");
    assert_eq!(server.batches().len(), 1);
    assert!(server.log().is_empty(), "nothing answered yet");

    // The provider finishes the batch; the rerun finds it in the journal.
    hold.store(false, Ordering::SeqCst);
    let o = retort(dir.path())
        .args(["-q", "distill", "recipe.toml"])
        .env("RETORT_TEST_KEY", key)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let batches = server.batches();
    assert_eq!(batches.len(), 1, "the rerun submitted no second batch: {batches:?}");
    assert_eq!(batches[0].custom_ids.len(), INPUTS);
    let per_request = answers_per_request(&server);
    assert_eq!(per_request.len(), INPUTS);
    assert!(per_request.values().all(|n| *n == 1));
    assert_eq!(dataset(dir.path()).iter().map(|s| s.lines().count()).sum::<usize>(), INPUTS);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/distill.json")).unwrap()).unwrap();
    assert_eq!(report["requests"]["batches_resumed"], 1);
    assert_eq!(report["requests"]["batches_submitted"], 0);
    let tokens = report["tokens"]["input"].as_f64().unwrap() + report["tokens"]["output"].as_f64().unwrap();
    let cost = report["cost_usd"]["total"].as_f64().unwrap();
    assert!((cost - 0.5 * tokens / 1e6).abs() < 1e-6, "half price: {cost} for {tokens} tokens");
    let journal = std::fs::read_to_string(dir.path().join("out/.cache/teacher-journal.jsonl")).unwrap();
    assert!(!journal.contains("ABCDEFGHIJKLMNOP"), "no key in the journal");
}
