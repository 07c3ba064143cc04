//! `retort train` as a child process on the built-in tiny model: `--plan`, SIGTERM mid-run (exit 4 with
//! a checkpoint), resume to the end, "up to date", export of the trained adapter from the same recipe,
//! and bad data reported with file and line (exit 1).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn write_case(dir: &Path, steps: u32) {
    let labels = ["billing", "bug", "account"];
    let texts = ["I was charged twice", "the app crashes on save", "I cannot log in"];
    let rows = |n: usize| -> String {
        (0..n)
            .map(|i| {
                serde_json::json!({"messages": [
                    {"role": "user", "content": format!("{} (#{i})", texts[i % 3])},
                    {"role": "assistant", "content": labels[i % 3]},
                ]})
                .to_string()
                    + "\n"
            })
            .collect()
    };
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/train.jsonl"), rows(24)).unwrap();
    std::fs::write(dir.join("data/val.jsonl"), rows(4)).unwrap();
    std::fs::write(
        dir.join("r.toml"),
        format!(
            r#"[project]
name = "cli-train"
seed = 3
data_dir = "data"
output_dir = "out"

[base]
model = "builtin:tiny-llama"

[lora]
r = 4
alpha = 8

[train]
device = "cpu"
max_steps = {steps}
micro_batch_size = 2
max_seq_len = 64
lr = 5e-3
save_every = 2

[export]
formats = ["adapter", "gguf:f16"]
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
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn plan_prints_the_shape_and_trains_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    write_case(tmp.path(), 6);
    let o = retort(tmp.path(), &["--log-format", "human", "train", "r.toml", "--plan"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("steps          6"), "{out}");
    assert!(out.contains("train.jsonl: 24 rows as `messages`, 0 skipped"), "{out}");
    // The step time is measured on stand-ins of the base, and the run's time follows from it.
    assert!(out.contains("time           about "), "{out}");
    let o = retort(tmp.path(), &["--log-format", "json", "train", "r.toml", "--plan"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let t = &v["plan"]["step_time"];
    let (step, one, per) = (
        t["seconds_per_step"].as_f64().unwrap(),
        t["one_layer_s"].as_f64().unwrap(),
        t["per_layer_s"].as_f64().unwrap(),
    );
    assert!(one > 0.0 && per > 0.0 && step >= one, "{t}");
    assert!(!tmp.path().join("out/train").exists(), "--plan wrote a run directory");
}

#[test]
fn sigterm_stops_with_a_checkpoint_and_a_rerun_finishes_then_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_case(dir, 40);
    // JSON lines on stderr: stop once the first step is reported.
    let mut child = Command::new(env!("CARGO_BIN_EXE_retort"))
        .current_dir(dir)
        .args(["--log-format", "json", "train", "r.toml"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let progress = line.contains("\"event\":\"progress\"") && line.contains("\"task\":\"train\"");
        seen.push(line);
        if progress {
            break;
        }
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(4), "{seen:?} {rest:?}");
    let last = rest.last().unwrap();
    assert!(last.contains("stopped by a signal") && last.contains("step-0"), "{last}");
    let ckpts: Vec<_> = std::fs::read_dir(dir.join("out/train"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert!(!ckpts.is_empty(), "no checkpoint after SIGTERM");
    assert!(!dir.join("out/adapter").exists(), "an unfinished run wrote the final adapter");

    let o = retort(dir, &["--log-format", "human", "train", "r.toml"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("trained 40 steps"), "{}", text(&o));
    // Every step is logged once across the two sessions.
    let metrics = std::fs::read_to_string(dir.join("out/train/metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=40).collect::<Vec<_>>());

    let o = retort(dir, &["--log-format", "human", "train", "r.toml"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("up to date"), "{}", text(&o));

    // The recipe's export finds the built-in base and the trained adapter by itself.
    let o = retort(dir, &["--log-format", "human", "export", "r.toml"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(dir.join("out/export/adapter/adapter_model.safetensors").is_file(), "{}", text(&o));
    let ggufs: Vec<_> = std::fs::read_dir(dir.join("out/export"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".gguf"))
        .collect();
    assert_eq!(ggufs.len(), 1, "{ggufs:?} {}", text(&o));
}

#[test]
fn bad_data_names_the_file_and_line_and_exits_1() {
    let tmp = tempfile::tempdir().unwrap();
    write_case(tmp.path(), 4);
    let train = tmp.path().join("data/train.jsonl");
    let mut rows = std::fs::read_to_string(&train).unwrap();
    rows.push_str("{\"messages\": [{\"role\": \"user\"}]}\n");
    std::fs::write(&train, rows).unwrap();
    let o = retort(tmp.path(), &["--log-format", "human", "train", "r.toml"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("train.jsonl:25"), "{}", text(&o));
    assert!(text(&o).contains("hint:"), "{}", text(&o));
}
