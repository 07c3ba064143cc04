//! Whole runs on the built-in tiny model: the loss falls, the adapter lands where eval and export read
//! it, a run stopped by a signal and resumed ends bit-for-bit where an uninterrupted run ends, a
//! checkpoint from other settings is refused with the setting named, and a finished run is up to date.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use retort_model::Precision;
use retort_model::burn::tensor::Device;
use retort_train::{Outcome, Setup, TrainError};

const LABELS: [&str; 3] = ["billing", "bug", "account"];
const TOPICS: [&[&str]; 3] = [
    &["I was charged twice", "my invoice is wrong", "refund my payment", "the card was billed"],
    &["the app crashes", "error 500 on save", "the button does nothing", "it freezes on start"],
    &["I cannot log in", "reset my password", "change my email", "delete my profile"],
];

fn rows(n: usize, offset: usize) -> String {
    (0..n)
        .map(|i| {
            let k = (i + offset) % 3;
            let text = TOPICS[k][(i / 3 + offset) % 4];
            serde_json::json!({"messages": [
                {"role": "system", "content": "Route the ticket."},
                {"role": "user", "content": format!("{text} (#{i})")},
                {"role": "assistant", "content": LABELS[k]},
            ]})
            .to_string()
                + "\n"
        })
        .collect()
}

struct Project {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    base: PathBuf,
}

fn project(extra: &str) -> Project {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let base = retort_model::builtin::materialize("tiny-llama", &root.join("base")).unwrap();
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::write(root.join("data/train.jsonl"), rows(24, 0)).unwrap();
    std::fs::write(root.join("data/val.jsonl"), rows(6, 1)).unwrap();
    write_recipe(&root, &base, extra);
    Project { _tmp: tmp, root, base }
}

fn write_recipe(root: &Path, base: &Path, extra: &str) {
    let text = format!(
        r#"
[project]
name = "t"
seed = 7
data_dir = "data"
output_dir = "out"

[base]
model = "{}"
dtype = "f32"

[lora]
r = 4
alpha = 8
dropout = 0.1

[train]
device = "cpu"
max_steps = 8
micro_batch_size = 2
grad_accum = 2
max_seq_len = 192
lr = 3e-3
warmup_steps = 1
save_every = 3
eval_every = 4
"#,
        base.display()
    );
    // `extra` lines replace the lines of the same keys.
    let keys: Vec<&str> = extra.lines().filter_map(|l| l.split('=').next()).map(str::trim).collect();
    let mut text: String = text
        .lines()
        .filter(|l| !keys.contains(&l.split('=').next().unwrap_or("").trim()))
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(extra);
    text.push('\n');
    std::fs::write(root.join("recipe.toml"), text).unwrap();
}

/// Changes a line of the written recipe outside `[train]` (where `project`'s extra lines go).
fn replace_in_recipe(p: &Project, from: &str, to: &str) {
    let path = p.root.join("recipe.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "the recipe has no {from:?}");
    std::fs::write(&path, text.replace(from, to)).unwrap();
}

fn recipe(p: &Project) -> retort_recipe::Recipe {
    match retort_recipe::load(&p.root.join("recipe.toml")) {
        Ok(l) => l.recipe,
        Err(e) => panic!("{e:?}"),
    }
}

fn setup(p: &Project, fresh: bool) -> Setup {
    Setup {
        base_dir: p.base.clone(),
        base_name: "builtin:tiny-llama".into(),
        device: Device::flex(),
        gpu: false,
        precision: match recipe(p).base.dtype {
            retort_recipe::schema::project::Dtype::F16 => Precision::F16,
            retort_recipe::schema::project::Dtype::Bf16 => Precision::Bf16,
            _ => Precision::F32,
        },
        fresh,
    }
}

/// Progress that raises the stop flag once `after` steps are counted, as SIGTERM would.
struct StopAfter {
    after: u64,
    seen: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl retort_io::Progress for StopAfter {
    fn task(&self, _name: &str, _total: u64) -> Box<dyn retort_io::Task> {
        Box::new(StopTask { after: self.after, seen: self.seen.clone(), stop: self.stop.clone() })
    }
}

struct StopTask {
    after: u64,
    seen: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl retort_io::Task for StopTask {
    fn inc(&self, n: u64) {
        if self.seen.fetch_add(n, Ordering::SeqCst) + n >= self.after {
            self.stop.store(true, Ordering::SeqCst);
        }
    }
    fn set_message(&self, _msg: &str) {}
    fn finish(&self) {}
}

fn run(p: &Project, fresh: bool) -> Result<Outcome, TrainError> {
    retort_train::run(&recipe(p), &setup(p, fresh), &retort_io::NoProgress, &AtomicBool::new(false))
}

fn metrics(p: &Project) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p.root.join("out/train/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn adapter_bytes(p: &Project) -> Vec<u8> {
    std::fs::read(p.root.join("out/adapter/adapter_model.safetensors")).unwrap()
}

#[test]
fn a_run_learns_and_writes_a_peft_adapter_where_eval_and_export_read_it() {
    let p = project("max_steps = 16\nlr = 1e-2");
    let Outcome::Finished(report) = run(&p, false).unwrap() else { panic!("not finished") };
    assert_eq!(report.steps, 16);
    assert_eq!(report.skipped_steps, 0);
    let (first, last) = (report.first_loss.unwrap(), report.final_loss.unwrap());
    let losses: Vec<f64> = metrics(&p).iter().filter_map(|v| v["loss"].as_f64()).collect();
    // A random-init base learns slowly through rank-4 adapters: a fifth off in 16 steps is a clear fall.
    assert!(last < first * 0.8, "loss fell from {first} only to {last}: {losses:?}");
    let (_, best) = report.best_val.unwrap();
    assert!(best < first, "validation loss {best} is not below the first training loss {first}");
    // The adapter is a PEFT directory that loads back onto the base.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.root.join("out/adapter/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["base_model_name_or_path"], "builtin:tiny-llama");
    let (base, _) = retort_model::Transformer::load(&p.base, Precision::F32, &Device::flex()).unwrap();
    retort_lora::load_adapter(base, &p.root.join("out/adapter")).unwrap();
    // One metrics line per step plus one per validation; the report and the plot exist.
    let m = metrics(&p);
    assert_eq!(m.iter().filter(|v| v.get("loss").is_some()).count(), 16);
    assert_eq!(m.iter().filter(|v| v.get("val_loss").is_some()).count(), 5, "steps 0, 4, 8, 12, 16");
    // Step 0 is the untrained adapter's (the base's) validation loss; training lowered it.
    assert_eq!(m.iter().find(|v| v.get("val_loss").is_some()).unwrap()["step"], 0);
    assert!(report.first_val_loss.unwrap() > report.val_loss.unwrap());
    assert!(p.root.join("out/train/report.json").is_file());
    assert!(std::fs::read_to_string(p.root.join("out/train/loss.svg")).unwrap().contains("<path"));
    // The learning rate followed warmup then cosine decay.
    let lrs: Vec<f64> = m.iter().filter_map(|v| v["lr"].as_f64()).collect();
    assert_eq!(lrs[0], 0.0);
    assert!((lrs[1] - 1e-2).abs() < 1e-12);
    assert!(lrs.windows(2).skip(1).all(|w| w[1] < w[0]));
    // keep_last = 3 by default: only the newest checkpoints remain.
    let steps: Vec<u64> =
        retort_train::checkpoint::list(&p.root.join("out/train")).iter().map(|c| c.0).collect();
    assert_eq!(steps, [12, 15, 16]);
}

#[test]
fn a_stopped_run_resumes_to_the_same_bits_as_an_uninterrupted_one() {
    let whole = project("");
    let Outcome::Finished(_) = run(&whole, false).unwrap() else { panic!("not finished") };

    let parts = project("");
    let stop = Arc::new(AtomicBool::new(false));
    let progress = StopAfter { after: 5, seen: Arc::new(AtomicU64::new(0)), stop: stop.clone() };
    let out = retort_train::run(&recipe(&parts), &setup(&parts, false), &progress, &stop).unwrap();
    let Outcome::Stopped { step, checkpoint, reason, .. } = out else { panic!("did not stop") };
    assert_eq!((step, reason), (5, "signal"));
    assert!(checkpoint.ends_with("step-000005"));
    assert!(!parts.root.join("out/adapter").exists(), "no final adapter before the run finishes");
    // Resume from step 5, which is mid-epoch (two examples packed per row: 12 rows, 2 x 2 per step, 3 steps per epoch).
    let Outcome::Finished(report) = run(&parts, false).unwrap() else { panic!("not finished") };
    assert_eq!(report.steps, 8);
    let losses = |p: &Project| -> Vec<(u64, String)> {
        metrics(p)
            .iter()
            .map(|v| (v["step"].as_u64().unwrap(), format!("{}|{}", v["loss"], v["val_loss"])))
            .collect()
    };
    assert_eq!(losses(&whole), losses(&parts), "metrics differ (or steps were logged twice)");
    assert!(adapter_bytes(&whole) == adapter_bytes(&parts), "resumed adapter differs");
}

#[test]
fn other_settings_are_refused_by_name_and_fresh_starts_over() {
    let p = project("");
    let stop = Arc::new(AtomicBool::new(false));
    let progress = StopAfter { after: 2, seen: Arc::new(AtomicU64::new(0)), stop: stop.clone() };
    retort_train::run(&recipe(&p), &setup(&p, false), &progress, &stop).unwrap();
    write_recipe(&p.root, &p.base, "weight_decay = 0.01");
    let err = run(&p, false).unwrap_err();
    let TrainError::Mismatch { diffs, .. } = &err else { panic!("{err}") };
    assert_eq!(diffs.len(), 1);
    assert_eq!(diffs[0].0, "train.weight_decay");
    assert!(err.to_string().contains("train.weight_decay: 0.0 then, 0.01 now"), "{err}");
    assert!(err.hint().contains("--fresh"));
    // Changed data is refused too.
    write_recipe(&p.root, &p.base, "");
    std::fs::write(p.root.join("data/train.jsonl"), rows(25, 0)).unwrap();
    let TrainError::Mismatch { diffs, .. } = run(&p, false).unwrap_err() else { panic!() };
    assert_eq!(diffs[0].0, "data.train");
    // Settings that do not change the result may change between sessions.
    write_recipe(&p.root, &p.base, "save_every = 2\nkeep_last = 1\nmax_time = \"1h\"");
    let out = run(&p, true).unwrap();
    assert!(matches!(out, Outcome::Finished(_)));
    assert_eq!(retort_train::checkpoint::list(&p.root.join("out/train")).len(), 1);
    // Finished and unchanged: nothing to do.
    assert!(matches!(run(&p, false).unwrap(), Outcome::UpToDate { .. }));
}

#[test]
fn a_time_limit_stops_with_a_checkpoint_after_at_least_one_step() {
    let p = project("max_time = \"1ms\"");
    let Outcome::Stopped { step, reason, .. } = run(&p, false).unwrap() else { panic!("did not stop") };
    assert_eq!((step, reason), (1, "max_time"));
    let Outcome::Stopped { step, .. } = run(&p, false).unwrap() else { panic!("did not stop") };
    assert_eq!(step, 2, "each session makes progress");
}

#[test]
fn bad_data_is_reported_with_file_and_line() {
    let p = project("");
    let mut text = rows(4, 0);
    text.push_str("{\"messages\": [{\"role\": \"user\"}]}\n");
    std::fs::write(p.root.join("data/train.jsonl"), text).unwrap();
    let err = run(&p, false).unwrap_err();
    assert!(err.to_string().contains("train.jsonl:5"), "{err}");
    assert!(err.hint().contains("on_bad_row"), "{}", err.hint());
}

/// `project` with `[base] quantize = "nf4"` (QLoRA).
fn nf4_project(extra: &str) -> Project {
    let p = project(extra);
    let path = p.root.join("recipe.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("dtype = \"f32\"\n", "dtype = \"f32\"\nquantize = \"nf4\"\n");
    std::fs::write(&path, text).unwrap();
    p
}

#[test]
fn qlora_learns_and_resumes_to_the_same_bits() {
    let whole = nf4_project("max_steps = 16\nlr = 1e-2");
    assert_eq!(recipe(&whole).base.quantize, retort_recipe::schema::project::Quantize::Nf4);
    let Outcome::Finished(report) = run(&whole, false).unwrap() else { panic!("not finished") };
    assert_eq!((report.steps, report.skipped_steps), (16, 0));
    assert_eq!(report.fingerprint["base.quantize"], "nf4");
    let (first, last) = (report.first_loss.unwrap(), report.final_loss.unwrap());
    assert!(last < first * 0.8, "loss fell from {first} only to {last}");
    // The adapter loads onto the NF4 base.
    let (base, _) =
        retort_lora::qlora::load_quantized(&whole.base, Precision::F32, &Device::flex(), true).unwrap();
    retort_lora::load_adapter(base, &whole.root.join("out/adapter")).unwrap();

    // Stopped at step 5 and resumed: the base is re-quantized to the same bits, so the run ends where
    // the uninterrupted one does.
    let parts = nf4_project("max_steps = 16\nlr = 1e-2");
    let stop = Arc::new(AtomicBool::new(false));
    let progress = StopAfter { after: 5, seen: Arc::new(AtomicU64::new(0)), stop: stop.clone() };
    let out = retort_train::run(&recipe(&parts), &setup(&parts, false), &progress, &stop).unwrap();
    assert!(matches!(out, Outcome::Stopped { step: 5, .. }));
    let Outcome::Finished(_) = run(&parts, false).unwrap() else { panic!("not finished") };
    let losses = |p: &Project| -> Vec<String> {
        metrics(p).iter().map(|v| format!("{}|{}", v["loss"], v["val_loss"])).collect()
    };
    assert_eq!(losses(&whole), losses(&parts));
    assert!(adapter_bytes(&whole) == adapter_bytes(&parts), "resumed adapter differs");

    // The same recipe without quantization trains differently: the NF4 base is really in use.
    let dense = project("max_steps = 16\nlr = 1e-2");
    let Outcome::Finished(_) = run(&dense, false).unwrap() else { panic!("not finished") };
    assert_ne!(losses(&whole), losses(&dense));
}

#[test]
fn an_f16_base_trains_with_loss_scaling_and_resumes_to_the_same_bits() {
    let f16 = |p: &Project| replace_in_recipe(p, "dtype = \"f32\"\n", "dtype = \"f16\"\n");
    let whole = project("");
    f16(&whole);
    let Outcome::Finished(report) = run(&whole, false).unwrap() else { panic!("not finished") };
    assert_eq!(report.fingerprint["base.precision"], "f16");
    assert_eq!(report.steps, 8);
    let steps: Vec<serde_json::Value> = metrics(&whole).into_iter().filter(|v| v["loss"].is_f64()).collect();
    assert_eq!(steps.len(), 8);
    for v in &steps {
        let scale = v["loss_scale"].as_f64().expect("every step logs the loss scale");
        assert!(
            (1.0..=retort_train::scaler::INITIAL_SCALE).contains(&scale) && scale.log2().fract() == 0.0,
            "{v}"
        );
        assert!(v["loss"].as_f64().unwrap().is_finite());
        assert_eq!(v["overflow"].as_bool(), Some(v["skipped"].as_bool().unwrap()), "{v}");
    }
    assert!(steps.iter().any(|v| !v["skipped"].as_bool().unwrap()), "no step was applied");
    // The f32 run logs no scale.
    let plain = project("max_steps = 2");
    run(&plain, false).unwrap();
    assert!(metrics(&plain).iter().all(|v| v.get("loss_scale").is_none()));

    // Stopped after 5 steps and resumed: the checkpoint carries the scaler, so the run ends where the
    // uninterrupted one does.
    let parts = project("");
    f16(&parts);
    let stop = Arc::new(AtomicBool::new(false));
    let progress = StopAfter { after: 5, seen: Arc::new(AtomicU64::new(0)), stop: stop.clone() };
    let out = retort_train::run(&recipe(&parts), &setup(&parts, false), &progress, &stop).unwrap();
    let Outcome::Stopped { checkpoint, .. } = out else { panic!("did not stop") };
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(checkpoint.join("state.json")).unwrap()).unwrap();
    assert!(state["loss_scale"]["scale"].is_f64(), "{state}");
    let Outcome::Finished(_) = run(&parts, false).unwrap() else { panic!("not finished") };
    let lines = |p: &Project| -> Vec<String> {
        metrics(p).iter().map(|v| format!("{}|{}|{}", v["loss"], v["val_loss"], v["loss_scale"])).collect()
    };
    assert_eq!(lines(&whole), lines(&parts));
    assert!(adapter_bytes(&whole) == adapter_bytes(&parts), "resumed adapter differs");
}

/// The run's plan for the project's recipe, as on a GPU or the CPU.
fn planned(p: &Project, gpu: bool) -> retort_train::run::Plan {
    let r = recipe(p);
    let (tok, template, _) = retort_train::run::text_tools(&r, &p.base).unwrap();
    let layout = retort_train::run::Layout::of(&r);
    let data = retort_train::run::load_data(&r, &layout, &tok, &template).unwrap();
    let config = retort_hf::ModelConfig::load(&p.base).unwrap();
    retort_train::run::plan(&r, &data, &config, gpu, setup(p, false).precision)
}

#[test]
fn offloaded_checkpoints_are_planned_on_gpus_with_checkpointing_and_change_no_result() {
    let on = project("offload_checkpoints = true");
    let (gpu, cpu) = (planned(&on, true), planned(&on, false));
    assert!(gpu.offload_checkpoints && gpu.checkpointing, "auto checkpointing is on for GPUs");
    assert!(!cpu.offload_checkpoints, "no host to offload to from the CPU");
    let plain = planned(&project(""), true);
    assert!(!plain.offload_checkpoints);
    // One layer input on the device instead of every layer's.
    assert!(gpu.memory.activations < plain.memory.activations);
    assert!(
        !planned(&project("offload_checkpoints = true\ncheckpointing = false"), true).offload_checkpoints
    );
    // Where it is, not what is trained: not in the fingerprint, so a resume may change it.
    let Outcome::Finished(report) = run(&on, false).unwrap() else { panic!("not finished") };
    assert!(report.fingerprint.keys().all(|k| !k.contains("offload")), "{:?}", report.fingerprint);
    assert!(report.fingerprint.contains_key("train.lr"));
}

#[test]
fn autocast_is_planned_by_device_and_dtype_and_resumes_to_the_same_bits() {
    let bf16 = |p: &Project| replace_in_recipe(p, "dtype = \"f32\"\n", "dtype = \"bf16\"\n");
    // `auto`: on for a GPU with a 16-bit base, off on the CPU, never with an f32 base.
    let auto = project("");
    assert!(!planned(&auto, true).autocast, "f32 base");
    bf16(&auto);
    assert!(planned(&auto, true).autocast && !planned(&auto, false).autocast);
    let off = project("autocast = false");
    bf16(&off);
    assert!(!planned(&off, true).autocast);
    // On: the adapters' f32 copies of their inputs leave the plan.
    let on = project("autocast = true");
    bf16(&on);
    let (p_on, p_off) = (planned(&on, false), planned(&off, false));
    assert!(p_on.autocast && p_on.memory.activations < p_off.memory.activations);

    // A run with autocast, stopped after 5 steps and resumed, ends where the uninterrupted one does,
    // and differs from the run without it (the resumed half runs autocast too).
    let Outcome::Finished(report) = run(&on, false).unwrap() else { panic!("not finished") };
    assert_eq!(report.fingerprint["train.autocast"], "true");
    let Outcome::Finished(_) = run(&off, false).unwrap() else { panic!("not finished") };
    assert!(adapter_bytes(&on) != adapter_bytes(&off), "autocast made no difference");
    let parts = project("autocast = true");
    bf16(&parts);
    let stop = Arc::new(AtomicBool::new(false));
    let progress = StopAfter { after: 5, seen: Arc::new(AtomicU64::new(0)), stop: stop.clone() };
    let out = retort_train::run(&recipe(&parts), &setup(&parts, false), &progress, &stop).unwrap();
    let Outcome::Stopped { .. } = out else { panic!("did not stop") };
    let Outcome::Finished(_) = run(&parts, false).unwrap() else { panic!("not finished") };
    assert!(adapter_bytes(&on) == adapter_bytes(&parts), "resumed adapter differs");
}

#[test]
fn gpu_style_padding_to_a_multiple_of_64_tokens_leaves_the_losses_unchanged() {
    // A run set up as on a GPU (on the CPU device here) pads every micro-batch's rows to a multiple of
    // 64 tokens and turns checkpointing on; the padding is masked and unlabelled, so training and
    // validation losses match the unpadded run to f32 rounding. (Without dropout: a mask is drawn over
    // the padded shape, so it differs.)
    let losses = |gpu: bool| {
        let p = project("max_steps = 3\neval_every = 3");
        replace_in_recipe(&p, "dropout = 0.1\n", "dropout = 0.0\n");
        let setup = Setup { gpu, ..setup(&p, false) };
        let r = recipe(&p);
        assert_eq!(retort_train::run::len_multiple(gpu), if gpu { 64 } else { 1 });
        let Outcome::Finished(_) =
            retort_train::run(&r, &setup, &retort_io::NoProgress, &AtomicBool::new(false)).unwrap()
        else {
            panic!("not finished")
        };
        let m = metrics(&p);
        let pick = |key: &str| -> Vec<f64> { m.iter().filter_map(|v| v[key].as_f64()).collect() };
        (pick("loss"), pick("val_loss"), pick("tokens"))
    };
    let (plain, padded) = (losses(false), losses(true));
    assert_eq!(plain.0.len(), 3);
    assert!(!plain.1.is_empty() && plain.1.len() == padded.1.len());
    assert_eq!(plain.2, padded.2, "tokens count valid tokens only");
    for (a, b) in plain.0.iter().chain(&plain.1).zip(padded.0.iter().chain(&padded.1)) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{a} vs {b}");
    }
}

#[test]
fn a_bf16_base_with_autocast_follows_the_f32_loss_curve() {
    // What a GPU run does (bf16 base, adapters' matmuls in bf16), here on the CPU: the same recipe's
    // training and validation losses stay within bf16 rounding of the f32 run's. Without dropout, so
    // that both runs draw nothing from the generator and see the same batches and adapters.
    let curve = |dtype: &str| {
        let p = project("autocast = true");
        replace_in_recipe(&p, "dropout = 0.1\n", "dropout = 0.0\n");
        replace_in_recipe(&p, "dtype = \"f32\"\n", &format!("dtype = \"{dtype}\"\n"));
        let Outcome::Finished(_) = run(&p, false).unwrap() else { panic!("not finished") };
        let m = metrics(&p);
        let pick = |key: &str| -> Vec<f64> { m.iter().filter_map(|v| v[key].as_f64()).collect() };
        (pick("loss"), pick("val_loss"))
    };
    let (f32, bf16) = (curve("f32"), curve("bf16"));
    assert_eq!(f32.0.len(), 8);
    assert_eq!((f32.0.len(), f32.1.len()), (bf16.0.len(), bf16.1.len()));
    let worst = f32
        .0
        .iter()
        .chain(&f32.1)
        .zip(bf16.0.iter().chain(&bf16.1))
        .map(|(a, b)| (a - b).abs() / a.abs())
        .fold(0.0, f64::max);
    eprintln!("f32 {f32:?}\nbf16 {bf16:?}\nworst relative difference {worst:.2e}");
    // Measured 9.6e-5: the loss averages over many tokens, so it moves far less than bf16's unit
    // rounding (3.9e-3). The bound leaves a factor of 10 over the measurement.
    assert!(worst < 1e-3, "bf16 strays {worst} from the f32 curve");
    assert!(f32.0 != bf16.0, "the bf16 run did not run in bf16");
}
