//! Bad input: each case fails with a message that says what and where (and a hint how to fix), or is
//! handled correctly; none leaves a file under a final name.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use retort_export::job::{Format, Job};
use retort_export::merge::{Model, OutDtype};
use retort_export::output::{Disk, OutFile, Sink};
use retort_export::quant::mix::FileType;
use retort_export::safetensors_out::{Entry, write_checkpoint};
use retort_export::{ExportError, gguf::GgufFile};
use retort_hf::{Checkpoint, Dtype};
use retort_io::NoProgress;

fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(family)
}

fn job(base: &Path, adapter: Option<&Path>, formats: Vec<Format>, out: &Path) -> Job {
    Job {
        base: base.to_path_buf(),
        adapter: adapter.map(Path::to_path_buf),
        formats,
        dtype: None,
        out: out.to_path_buf(),
        name: "m".into(),
        shard_size: 5_000_000_000,
        chat_template: None,
        system: None,
    }
}

fn run(j: &Job) -> Result<retort_export::Report, ExportError> {
    retort_export::run(j, &Disk, &NoProgress)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// An adapter directory: `from`'s tensors plus `extra` whole tensors, with config changes.
fn adapter_with(
    from: &Path,
    to: &Path,
    extra: &[(&str, Vec<usize>, f32)],
    config: &[(&str, serde_json::Value)],
    poison: Option<&str>,
) {
    std::fs::create_dir_all(to).unwrap();
    let src = Checkpoint::open_files(&[from.join("adapter_model.safetensors")]).unwrap();
    let mut entries: Vec<Entry> = src
        .names()
        .map(|n| {
            let i = src.info(n).unwrap();
            Entry { name: n.into(), dtype: i.dtype.clone(), shape: i.shape.clone() }
        })
        .collect();
    for (n, shape, _) in extra {
        entries.push(Entry { name: (*n).into(), dtype: Dtype::F32, shape: shape.clone() });
    }
    write_checkpoint(&Disk, to, &entries, u64::MAX, &mut |e| {
        if let Some(v) = src.get(&e.name) {
            let mut b = v.data.to_vec();
            if poison == Some(e.name.as_str()) {
                b[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
            return Ok(b);
        }
        let (_, shape, value) = extra.iter().find(|x| x.0 == e.name).unwrap();
        let n: usize = shape.iter().product();
        Ok((0..n).flat_map(|i| (value + i as f32 * 1e-4).to_le_bytes()).collect())
    })
    .unwrap();
    std::fs::rename(to.join("model.safetensors"), to.join("adapter_model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("adapter_config.json")).unwrap()).unwrap();
    for (k, v) in config {
        cfg[*k] = v.clone();
    }
    std::fs::write(to.join("adapter_config.json"), cfg.to_string()).unwrap();
}

#[test]
fn adapter_for_a_different_base_names_the_tensor_and_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    // qwen3's heads are 32 wide, qwen2's 16: the k_proj update has the wrong number of rows.
    let e = run(&job(
        &fixture("qwen2").join("base"),
        Some(&fixture("qwen3").join("adapter")),
        vec![Format::Merged],
        tmp.path(),
    ))
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("adapter tensor `base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight` does not fit the base model: expected shape [32, 8], found [64, 8]"),
        "{msg}"
    );
    assert!(e.hint().unwrap().contains("the base model it was trained on"), "{:?}", e.hint());
    // Phi-3's fused projections do not exist in a Llama.
    let e = run(&job(
        &fixture("llama").join("base"),
        Some(&fixture("phi3").join("adapter")),
        vec![Format::Merged],
        tmp.path(),
    ))
    .unwrap_err();
    assert!(
        e.to_string().contains(
            "targets `model.layers.0.mlp.gate_up_proj`, which the base model (LlamaForCausalLM) does not have"
        ),
        "{e}"
    );
    assert!(!tmp.path().join("merged").exists());
}

#[test]
fn modules_to_save_lm_head_replaces_it_and_unties_a_tied_model() {
    let tmp = tempfile::tempdir().unwrap();
    // Untied (mistral): the saved lm_head replaces the base's.
    let a = tmp.path().join("a1");
    adapter_with(
        &fixture("mistral").join("adapter"),
        &a,
        &[("base_model.model.lm_head.weight", vec![416, 64], 0.5)],
        &[("modules_to_save", serde_json::json!(["lm_head"]))],
        None,
    );
    let out = tmp.path().join("o1");
    run(&job(
        &fixture("mistral").join("base"),
        Some(&a),
        vec![Format::Merged, Format::Gguf(FileType::F32)],
        &out,
    ))
    .unwrap();
    let merged = Checkpoint::open(&out.join("merged")).unwrap();
    let head = merged.get("lm_head.weight").unwrap().to_f32().unwrap();
    assert_eq!(head[0], 0.5);
    let g = GgufFile::open(&out.join("m-F32.gguf")).unwrap();
    assert_eq!(g.to_f32(g.tensor("output.weight").unwrap()).unwrap(), head);
    // A GGUF LoRA cannot carry a whole tensor: refused, with the alternative.
    let e =
        run(&job(&fixture("mistral").join("base"), Some(&a), vec![Format::GgufAdapter], &out)).unwrap_err();
    assert!(e.to_string().contains("replaces `lm_head.weight` whole (modules_to_save)"), "{e}");

    // Tied (llama): the output gets its own lm_head; the embeddings stay the base's.
    let a = tmp.path().join("a2");
    adapter_with(
        &fixture("llama").join("adapter"),
        &a,
        &[("base_model.model.lm_head.weight", vec![320, 64], -0.25)],
        &[("modules_to_save", serde_json::json!(["lm_head"]))],
        None,
    );
    let out = tmp.path().join("o2");
    let report = run(&job(
        &fixture("llama").join("base"),
        Some(&a),
        vec![Format::Merged, Format::Gguf(FileType::F32)],
        &out,
    ))
    .unwrap();
    assert!(report.notes.iter().any(|n| n.contains("untie")), "{:?}", report.notes);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("merged/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], false);
    let merged = Checkpoint::open(&out.join("merged")).unwrap();
    let base = Checkpoint::open(&fixture("llama").join("base")).unwrap();
    assert_eq!(merged.get("lm_head.weight").unwrap().to_f32().unwrap()[0], -0.25);
    assert_eq!(
        merged.get("model.embed_tokens.weight").unwrap().data,
        base.get("model.embed_tokens.weight").unwrap().data
    );
    let g = GgufFile::open(&out.join("m-F32.gguf")).unwrap();
    assert!(g.tensor("output.weight").is_some());
}

#[test]
fn lora_on_something_that_is_not_a_linear_layer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    adapter_with(
        &fixture("mistral").join("adapter"),
        &a,
        &[
            ("base_model.model.model.norm.lora_A.weight", vec![4, 64], 0.1),
            ("base_model.model.model.norm.lora_B.weight", vec![64, 4], 0.1),
        ],
        &[],
        None,
    );
    let e = Model::open(&fixture("mistral").join("base"), Some(&a), None).unwrap_err();
    assert!(
        e.to_string()
            .contains("adapts `model.norm`, which is not a linear layer or an embedding (shape [64])"),
        "{e}"
    );
}

#[test]
fn resized_vocabulary_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    adapter_with(
        &fixture("mistral").join("adapter"),
        &a,
        &[("base_model.model.model.embed_tokens.weight", vec![420, 64], 0.1)],
        &[("modules_to_save", serde_json::json!(["embed_tokens"]))],
        None,
    );
    let e =
        run(&job(&fixture("mistral").join("base"), Some(&a), vec![Format::Merged], tmp.path())).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("has 420 rows but the base vocabulary has 416") && msg.contains("resized vocabulary"),
        "{msg}"
    );
    assert!(e.hint().unwrap().contains("cannot export resized vocabularies"), "{:?}", e.hint());
}

#[test]
fn non_finite_adapter_values_stop_the_export() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    adapter_with(&fixture("mistral").join("adapter"), &a, &[], &[], Some(key));
    let e =
        run(&job(&fixture("mistral").join("base"), Some(&a), vec![Format::Merged], &tmp.path().join("o")))
            .unwrap_err();
    assert!(
        e.to_string().starts_with("tensor `model.layers.1.self_attn.v_proj.weight` has 64 non-finite values"),
        "{e}"
    );
    assert!(!tmp.path().join("o/merged").exists());
}

#[test]
fn values_too_large_for_f16_are_refused_not_turned_into_infinity() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    adapter_with(
        &fixture("mistral").join("adapter"),
        &a,
        &[("base_model.model.lm_head.weight", vec![416, 64], 70000.0)],
        &[],
        None,
    );
    let mut j = job(&fixture("mistral").join("base"), Some(&a), vec![Format::Merged], &tmp.path().join("o"));
    j.dtype = Some(OutDtype::F16);
    let e = run(&j).unwrap_err();
    assert!(e.to_string().contains("values of `lm_head.weight` are too large for float16"), "{e}");
    assert_eq!(e.hint().as_deref(), Some("export with `--dtype bf16` or `--dtype f32`"));
}

#[test]
fn unknown_quant_types_and_formats_list_the_valid_ones() {
    let e = Format::parse("gguf:q3_k_s").unwrap_err();
    assert_eq!(
        e.to_string(),
        "`q3_k_s` is not a GGUF type retort writes; valid: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q5_1, Q5_0, Q4_K_M, Q4_1, Q4_0"
    );
    let e = Format::parse("onnx").unwrap_err();
    assert!(e.hint().unwrap().contains("merged, adapter, gguf:TYPE, gguf-adapter, ollama"), "{:?}", e.hint());
}

#[test]
fn unwritable_output_directory_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = file.join("export");
    let e =
        run(&job(&fixture("qwen2").join("base"), None, vec![Format::Gguf(FileType::F16)], &out)).unwrap_err();
    assert!(e.to_string().starts_with(&format!("cannot write `{}`", out.display())), "{e}");
    assert!(e.hint().is_some());
    // A read-only directory (unless running as root, which may write anywhere).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let ro = tmp.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        if std::fs::write(ro.join("probe"), b"").is_err() {
            let e = run(&job(&fixture("qwen2").join("base"), None, vec![Format::Gguf(FileType::F16)], &ro))
                .unwrap_err();
            assert!(
                matches!(&e, ExportError::Write { path, source } if path == &ro && source.kind() == io::ErrorKind::PermissionDenied),
                "{e}"
            );
            assert!(e.hint().unwrap().contains("--out"), "{:?}", e.hint());
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// A disk that fills up after `budget` bytes, shared by every file written through it.
struct FullDisk(&'static AtomicU64);

fn full_disk(bytes: u64) -> FullDisk {
    FullDisk(Box::leak(Box::new(AtomicU64::new(bytes))))
}

/// A file on that disk. The budget is leaked so the trait object can be 'static (tests only).
struct LimitedStatic {
    inner: Box<dyn OutFile>,
    budget: &'static AtomicU64,
}

impl Write for LimitedStatic {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.budget.load(Ordering::SeqCst);
        if buf.len() as u64 > left {
            self.budget.store(0, Ordering::SeqCst);
            return Err(io::Error::new(io::ErrorKind::StorageFull, "No space left on device"));
        }
        self.budget.fetch_sub(buf.len() as u64, Ordering::SeqCst);
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl OutFile for LimitedStatic {
    fn commit(self: Box<Self>) -> io::Result<()> {
        self.inner.commit()
    }
}

impl Sink for FullDisk {
    fn create(&self, path: &Path) -> io::Result<Box<dyn OutFile>> {
        Ok(Box::new(LimitedStatic { inner: Disk.create(path)?, budget: self.0 }))
    }
}

fn leftovers(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_full_disk_leaves_nothing_under_a_final_name() {
    let fx = fixture("gemma2");
    for budget in [1_000u64, 60_000] {
        let tmp = tempfile::tempdir().unwrap();
        let j = job(
            &fx.join("base"),
            Some(&fx.join("adapter")),
            vec![Format::Gguf(FileType::Q8_0), Format::Merged],
            tmp.path(),
        );
        let e = retort_export::run(&j, &full_disk(budget), &NoProgress).unwrap_err();
        assert!(
            matches!(&e, ExportError::Write { source, .. } if source.kind() == io::ErrorKind::StorageFull),
            "{e}"
        );
        assert!(e.hint().unwrap().contains("nothing was left under the output's name"), "{:?}", e.hint());
        assert_eq!(leftovers(tmp.path()), Vec::<String>::new(), "budget {budget}");
    }
    // Enough room for the GGUF but not the merged directory: the GGUF is complete, nothing else exists.
    let tmp = tempfile::tempdir().unwrap();
    let j = job(
        &fx.join("base"),
        Some(&fx.join("adapter")),
        vec![Format::Gguf(FileType::Q8_0), Format::Merged],
        tmp.path(),
    );
    let e = retort_export::run(&j, &full_disk(150_000), &NoProgress).unwrap_err();
    assert!(e.to_string().contains("merged"), "{e}");
    assert_eq!(leftovers(tmp.path()), ["m-Q8_0.gguf"]);
    GgufFile::open(&tmp.path().join("m-Q8_0.gguf")).unwrap();
}

#[test]
fn an_architecture_without_gguf_support_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    copy_dir(&fixture("llama").join("base"), &base);
    let cfg = std::fs::read_to_string(base.join("config.json"))
        .unwrap()
        .replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
    std::fs::write(base.join("config.json"), cfg).unwrap();
    let e = run(&job(&base, None, vec![Format::Gguf(FileType::Q4_K_M)], &tmp.path().join("o"))).unwrap_err();
    assert!(
        e.to_string()
            .contains("architecture `GPTNeoXForCausalLM` is not supported; supported: LlamaForCausalLM"),
        "{e}"
    );
    // Partial rotary embeddings outside Phi-3 have no llama.cpp equivalent in these architectures.
    let cfg = std::fs::read_to_string(base.join("config.json"))
        .unwrap()
        .replace("GPTNeoXForCausalLM", "LlamaForCausalLM")
        .replace("\"vocab_size\"", "\"partial_rotary_factor\": 0.5, \"vocab_size\"");
    std::fs::write(base.join("config.json"), cfg).unwrap();
    let e = run(&job(&base, None, vec![Format::Gguf(FileType::Q4_K_M)], &tmp.path().join("o"))).unwrap_err();
    assert!(e.to_string().contains("partial rotary embeddings"), "{e}");
    assert!(!tmp.path().join("o/m-Q4_K_M.gguf").exists());
}

#[test]
fn adapters_that_are_not_peft_lora_say_what_they_are() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("qwen2").join("base");
    let missing = tmp.path().join("nope");
    let e = Model::open(&base, Some(&missing), None).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    let ia3 = tmp.path().join("ia3");
    adapter_with(
        &fixture("qwen2").join("adapter"),
        &ia3,
        &[],
        &[("peft_type", serde_json::json!("IA3"))],
        None,
    );
    let e = Model::open(&base, Some(&ia3), Some(OutDtype::F32)).unwrap_err();
    assert!(e.to_string().contains("is a IA3 adapter; retort exports LoRA adapters"), "{e}");
    let pickle = tmp.path().join("pickle");
    std::fs::create_dir(&pickle).unwrap();
    std::fs::copy(fixture("qwen2").join("adapter/adapter_config.json"), pickle.join("adapter_config.json"))
        .unwrap();
    std::fs::write(pickle.join("adapter_model.bin"), b"PK").unwrap();
    let e = Model::open(&base, Some(&pickle), None).unwrap_err();
    assert!(e.hint().unwrap().contains("safe_serialization=True"), "{:?}", e.hint());
}
