//! `retort run` end to end on a small offline project (replayed teacher, built-in base): every stage
//! runs, a second run finds everything up to date, the eval report parses and the gate's exit code
//! follows `[eval.gate]`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::Path;
use std::process::{Command, Output};

const LABELS: [&str; 3] = ["billing", "bug", "account"];
const TEXTS: [&str; 3] = ["I was charged twice for", "the app crashes when I open", "I cannot log in to"];
const THINGS: [&str; 8] =
    ["my plan", "the report", "the dashboard", "my invoice", "settings", "the export", "my team", "the API"];

fn write_case(dir: &Path, gate: &str) {
    let system = "Route the ticket: billing, bug or account.";
    let mut inputs = String::new();
    let mut transcript = String::new();
    for i in 0..60 {
        let k = i % 3;
        let text = format!("{} {} ({i})", TEXTS[k], THINGS[(i / 3) % 8]);
        inputs.push_str(&serde_json::json!({"id": format!("t{i}"), "text": text}).to_string());
        inputs.push('\n');
        transcript.push_str(
            &serde_json::json!({
                "request": {"model": "rules", "messages": [{"role": "system", "content": system}, {"role": "user", "content": text}]},
                "response": {"content": LABELS[k], "finish_reason": "stop"},
            })
            .to_string(),
        );
        transcript.push('\n');
    }
    std::fs::write(dir.join("tickets.jsonl"), inputs).unwrap();
    std::fs::write(dir.join("teacher.jsonl"), transcript).unwrap();
    std::fs::write(
        dir.join("r.toml"),
        format!(
            r#"[project]
name = "pipe"
seed = 5
data_dir = "data"
output_dir = "out"

[base]
model = "builtin:tiny-llama"

[teacher]
provider = "replay"
model = "rules"
transcript = "teacher.jsonl"

[distill]
system_prompt = "{system}"
target_examples = 60
split = {{ train = 0.8, val = 0.1, test = 0.1 }}

[distill.inputs]
from = "file"
path = "tickets.jsonl"
field = "text"

[distill.output]
kind = "label"
labels = ["billing", "bug", "account"]

[lora]
r = 8
alpha = 16
dropout = 0.0

[train]
device = "cpu"
max_steps = 12
micro_batch_size = 8
max_seq_len = 128
lr = 1e-2

[eval]
max_new_tokens = 6
bootstrap = 200
{gate}

[export]
formats = ["adapter"]
"#
        ),
    )
    .unwrap();
}

fn retort(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_retort"))
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("RETORT_LOG_FORMAT")
        .arg("--log-format")
        .arg("human")
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn run_does_every_stage_then_finds_them_up_to_date() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_case(dir, "");
    let o = retort(dir, &["run", "r.toml"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    for f in [
        "data/train.jsonl",
        "data/test.jsonl",
        "out/adapter/adapter_model.safetensors",
        "out/eval/report.json",
        "out/eval/report.md",
        "out/export/adapter/adapter_config.json",
        "out/run.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing:\n{}", text(&o));
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("out/eval/report.json")).unwrap()).unwrap();
    let models: Vec<&str> =
        report["models"].as_array().unwrap().iter().map(|m| m["model"].as_str().unwrap()).collect();
    assert_eq!(models, ["base", "tuned", "teacher"]);
    let n = report["examples"].as_array().unwrap().len();
    assert_eq!(n, 6, "10% of 60");
    for m in report["models"].as_array().unwrap() {
        assert_eq!(m["answers"].as_array().unwrap().len(), n);
        let s = &m["scores"]["label_accuracy"];
        let (v, lo, hi) =
            (s["value"].as_f64().unwrap(), s["low"].as_f64().unwrap(), s["high"].as_f64().unwrap());
        assert!(lo <= v + 1e-12 && v <= hi + 1e-12 && (0.0..=1.0).contains(&v), "{m}");
    }
    // The references are the teacher's answers.
    assert_eq!(report["models"][2]["scores"]["label_accuracy"]["value"], 1.0);
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("out/run.json")).unwrap()).unwrap();
    let stages: Vec<&str> =
        run["stages"].as_array().unwrap().iter().map(|s| s["decision"].as_str().unwrap()).collect();
    assert_eq!(stages, ["ran", "ran", "ran", "ran"]);
    assert_eq!(run["hashes"]["test.jsonl"].as_str().unwrap().len(), 64, "{run}");
    assert!(run["hashes"]["adapter_model.safetensors"].is_string(), "{run}");
    assert_eq!(run["costs"]["teacher_usd_total"], 0.0, "a replayed teacher costs nothing");

    let o = retort(dir, &["run", "r.toml"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = text(&o);
    assert_eq!(out.matches("up to date").count(), 3, "train, eval and export:\n{out}");
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("out/run.json")).unwrap()).unwrap();
    assert_eq!(run["stages"][3]["decision"], "up to date");

    // `--only eval --force` evaluates again, nothing else.
    let o = retort(dir, &["run", "r.toml", "--only", "eval", "--force"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("evaluating"), "{}", text(&o));
    assert!(!text(&o).contains("training"), "{}", text(&o));

    // One recipe field changes: only the stages that read it run again.
    let decisions = |dir: &Path| -> Vec<String> {
        let run: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("out/run.json")).unwrap()).unwrap();
        run["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["decision"].as_str().unwrap().to_string())
            .collect()
    };
    let recipe = std::fs::read_to_string(dir.join("r.toml")).unwrap();
    std::fs::write(dir.join("r.toml"), recipe.replace("bootstrap = 200", "bootstrap = 300")).unwrap();
    let o = retort(dir, &["run", "r.toml"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(decisions(dir), ["ran", "up to date", "ran", "up to date"], "{}", text(&o));
    let recipe = std::fs::read_to_string(dir.join("r.toml")).unwrap();
    std::fs::write(dir.join("r.toml"), recipe.replace("lr = 1e-2", "lr = 2e-2")).unwrap();
    let o = retort(dir, &["run", "r.toml"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("train.lr: 0.01 then, 0.02 now"), "{}", text(&o));
    assert_eq!(decisions(dir), ["ran", "ran", "ran", "ran"], "{}", text(&o));
}

#[test]
fn a_failed_gate_exits_3_and_stops_before_export() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A random tiny model after 12 steps is nowhere near the teacher.
    write_case(dir, "[eval.gate]\nmin_score = 0.99\nmin_vs_teacher = 0.99");
    let o = retort(dir, &["run", "r.toml"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("the quality gate failed") && out.contains("below the minimum 0.9900"), "{out}");
    assert!(!dir.join("out/export").exists(), "exported despite the failed gate");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("out/eval/report.json")).unwrap()).unwrap();
    assert_eq!(report["gate"]["passed"], false);
    assert_eq!(report["gate"]["checks"].as_array().unwrap().len(), 2);
    // `retort eval` alone reads the same report (up to date) and exits 3 again.
    let o = retort(dir, &["eval", "r.toml"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("up to date"), "{}", text(&o));
}

/// The README's main command, `retort run recipes/quickstart.toml`, on a copy of the shipped recipe and
/// data: every stage runs offline, training lowers the validation loss, the tuned model beats the base on
/// the held-out split, and the served files are written.
#[test]
fn the_quickstart_runs_end_to_end() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("recipes")).unwrap();
    std::fs::create_dir_all(dir.join("data/quickstart")).unwrap();
    std::fs::copy(root.join("recipes/quickstart.toml"), dir.join("recipes/quickstart.toml")).unwrap();
    for f in ["teacher.jsonl", "tickets.jsonl"] {
        std::fs::copy(root.join("data/quickstart").join(f), dir.join("data/quickstart").join(f)).unwrap();
    }
    let o = retort(dir, &["run", "recipes/quickstart.toml"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("tiny"), "the output must say the base is a tiny demo model:\n{out}");
    let ck = dir.join("checkpoints/quickstart");
    for f in [
        "adapter/adapter_model.safetensors",
        "train/report.json",
        "train/loss.svg",
        "eval/report.json",
        "eval/report.md",
        "eval/report.html",
        "export/quickstart-Q8_0.gguf",
        "export/Modelfile",
        "run.json",
    ] {
        assert!(ck.join(f).is_file(), "{f} missing:\n{out}");
    }
    let train: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck.join("train/report.json")).unwrap()).unwrap();
    let (first, last) = (train["first_val_loss"].as_f64().unwrap(), train["val_loss"].as_f64().unwrap());
    assert!(last < first, "validation loss went from {first} to {last}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck.join("eval/report.json")).unwrap()).unwrap();
    let score = |i: usize| report["models"][i]["scores"]["label_accuracy"]["value"].as_f64().unwrap();
    assert_eq!(report["models"][0]["model"], "base");
    assert_eq!(report["models"][1]["model"], "tuned");
    assert!(score(1) > score(0), "tuned {} is not above base {}", score(1), score(0));
    // The exported Q8_0 file, read back and evaluated, answers like the tuned model it came from.
    assert_eq!(report["models"][2]["model"], "gguf");
    let answers = |i: usize| report["models"][i]["answers"].as_array().unwrap().clone();
    let same = answers(1).iter().zip(&answers(2)).filter(|(a, b)| a == b).count();
    assert!(
        same * 10 >= answers(1).len() * 9,
        "the GGUF agrees with tuned on {same} of {}",
        answers(1).len()
    );
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck.join("run.json")).unwrap()).unwrap();
    let order: Vec<&str> =
        run["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(order, ["distill", "train", "export", "eval"], "the GGUF is written before it is evaluated");
    assert!(report["serving"]["tuned_requests_per_hour"].as_f64().unwrap() > 0.0);
    let html = std::fs::read_to_string(ck.join("eval/report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("Training loss") && html.contains("Confusion matrix"));
}

/// SIGTERM during training (what Slurm, systemd and the kubelet send): the run checkpoints and exits 4,
/// records it, and the next `retort run` resumes training to the end and finishes the pipeline.
#[test]
fn sigterm_mid_training_exits_4_and_the_next_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_case(dir, "");
    let recipe = std::fs::read_to_string(dir.join("r.toml")).unwrap();
    std::fs::write(dir.join("r.toml"), recipe.replace("max_steps = 12", "max_steps = 60\nsave_every = 1"))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_retort"))
        .current_dir(dir)
        .args(["--log-format", "human", "run", "r.toml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until a few steps are logged.
    let metrics = dir.join("out/train/metrics.jsonl");
    let t = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.matches("\"loss\"").count()) < 3 {
        assert!(t.elapsed().as_secs() < 300, "training never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let ok = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(ok.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("out/run.json")).unwrap()).unwrap();
    assert_eq!(run["exit"], 4);
    assert!(!dir.join("out/eval/report.json").exists(), "eval ran after a stopped training");

    let o = retort(dir, &["run", "r.toml"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("resum"), "{}", text(&o));
    let train: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("out/train/report.json")).unwrap()).unwrap();
    assert_eq!(train["steps"], 60);
    assert!(dir.join("out/eval/report.json").is_file() && dir.join("out/export/adapter").is_dir());
}
