//! `retort logits`, `retort generate` and `retort inspect model` through the real binary, on the tiny
//! fixture models of retort-model, and every bad model input issue 3 lists: each exits 1 with a message
//! naming the file and what to do, and none panics.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../retort-model/tests/fixtures")
}

fn retort(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_retort"));
    cmd.args(args).env("RETORT_LOG_FORMAT", "human").env("NO_COLOR", "1");
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    let shape_text = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> =
        shape_text.split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse().unwrap()).collect();
    let data = b[10 + hlen..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    (shape, data)
}

#[test]
fn logits_npy_matches_transformers_for_every_family() {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(models().join("index.json")).unwrap()).unwrap();
    let ids: Vec<String> =
        index["models"]["llama"]["ids"][1].as_array().unwrap().iter().map(|x| x.to_string()).collect();
    let dir = tempfile::tempdir().unwrap();
    for name in index["models"].as_object().unwrap().keys() {
        let out = dir.path().join(format!("{name}.npy"));
        let o = retort(
            &[
                "logits",
                "--model",
                models().join(name).to_str().unwrap(),
                "--device",
                "cpu",
                "--dtype",
                "f32",
                "--ids",
                &ids.join(","),
                "--out",
                out.to_str().unwrap(),
            ],
            None,
        );
        assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
        let (shape, ours) = read_npy(&out);
        let exp =
            retort_hf::Checkpoint::open_files(&[models().join(name).join("expected.safetensors")]).unwrap();
        let theirs = exp.get("logits_1").unwrap().to_f32().unwrap();
        assert_eq!(shape, [ids.len(), 256]);
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs() - 1e-4 * (1.0 + b.abs()))
            .fold(f32::MIN, f32::max);
        assert!(worst <= 0.0, "{name}: logits differ from transformers by more than the tolerance");
    }
}

/// The llama fixture with a 256-token byte-level tokenizer and a small chat template.
fn model_with_tokenizer() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(models().join("llama").join(f), dir.path().join(f)).unwrap();
    }
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/byte-tokenizer");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn library_greedy(dir: &Path, text: &str, n: usize) -> String {
    use retort_model::{GenerateOptions, Precision, Sampling, Transformer, generate};
    let (model, _) =
        Transformer::load(dir, Precision::F32, &retort_model::burn::tensor::Device::flex()).unwrap();
    let tok = retort_data::Tokenizer::load(dir).unwrap();
    let ids = tok.encode(text, false).unwrap();
    let opts = GenerateOptions { max_new_tokens: n, sampling: Sampling::greedy(), eos: vec![2], pad: 0 };
    let out = generate(&model, &[ids], &opts, |_, _| {}).unwrap();
    tok.decode(&out.tokens[0], true).unwrap()
}

#[test]
fn generate_prints_what_the_library_generates() {
    let dir = model_with_tokenizer();
    let d = dir.path().to_str().unwrap();
    let o = retort(
        &["generate", "--model", d, "--device", "cpu", "--prompt", "Hello", "--raw", "--max-tokens", "10"],
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.trim_end_matches('\n'), library_greedy(dir.path(), "Hello", 10));
    assert!(stderr(&o).contains("tokens in"), "{}", stderr(&o));

    // Chat: the template wraps each line; two lines, two answers.
    let o = retort(
        &["generate", "--model", d, "--device", "cpu", "--chat", "--max-tokens", "6"],
        Some("hi\nagain\n"),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let first = library_greedy(dir.path(), "<user>hi\n<assistant>", 6);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(stdout.starts_with(&first), "{stdout:?} vs {first:?}");
    assert_eq!(stderr(&o).matches("tokens in").count(), 2);
}

#[test]
fn inspect_model_reports_shape_and_memory() {
    let o = retort(&["inspect", "model", models().join("qwen3").to_str().unwrap()], None);
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("Qwen3ForCausalLM")
            && out.contains("parameters     131520")
            && out.contains("QLoRA (NF4 base)")
            && out.contains("longest context that fits (estimate)")
            && out.contains("24 GiB: over 4M tokens"),
        "{out}"
    );
}

fn copy_model(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(models().join(name).join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn rewrite_safetensors(
    dir: &Path,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>, &mut Vec<u8>),
) {
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    edit(&mut header, &mut data);
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    std::fs::write(&p, out).unwrap();
}

fn expect_bad(dir: &Path, want: &[&str]) {
    let o = retort(
        &[
            "logits",
            "--model",
            dir.to_str().unwrap(),
            "--device",
            "cpu",
            "--ids",
            "1,2",
            "--out",
            "/dev/null",
        ],
        None,
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for w in want {
        assert!(err.contains(w), "missing {w:?} in:\n{err}");
    }
}

#[test]
fn bad_model_inputs_exit_1_with_clear_messages() {
    // Missing config.json.
    let d = copy_model("llama");
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    expect_bad(d.path(), &["has no config.json"]);
    // Unsupported architecture.
    let d = copy_model("llama");
    let cfg = std::fs::read_to_string(d.path().join("config.json"))
        .unwrap()
        .replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
    std::fs::write(d.path().join("config.json"), cfg).unwrap();
    expect_bad(d.path(), &["GPTNeoXForCausalLM", "is not supported", "Qwen2ForCausalLM"]);
    // A missing tensor, named.
    let d = copy_model("llama");
    rewrite_safetensors(d.path(), |h, _| {
        let t = h.remove("model.norm.weight").unwrap();
        h.insert("model.final_norm.weight".into(), t);
    });
    expect_bad(
        d.path(),
        &[
            "missing `model.norm.weight` (did you mean `model.final_norm.weight`?)",
            "do not match its config.json",
        ],
    );
    // A tensor of the wrong shape: expected vs found.
    let d = copy_model("llama");
    rewrite_safetensors(d.path(), |h, _| {
        h["model.layers.0.self_attn.o_proj.weight"]["shape"] = serde_json::json!([32, 128]);
    });
    expect_bad(
        d.path(),
        &["`model.layers.0.self_attn.o_proj.weight` has shape [32, 128]; the model needs [64, 64]"],
    );
    // Truncated file.
    let d = copy_model("llama");
    let p = d.path().join("model.safetensors");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    expect_bad(d.path(), &["model.safetensors", "truncated"]);
    // A header length that claims gigabytes.
    let d = copy_model("llama");
    let mut b = (8u64 << 30).to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(d.path().join("model.safetensors"), b).unwrap();
    expect_bad(d.path(), &["larger than 100 MB"]);
    // A dtype retort does not load, named with its tensor.
    let d = copy_model("llama");
    rewrite_safetensors(d.path(), |h, _| {
        h["model.norm.weight"]["dtype"] = serde_json::json!("I32");
    });
    expect_bad(d.path(), &["model.norm.weight", "I32", "F32, F16 and BF16"]);
    // A tokenizer larger than the model's vocabulary.
    let d = copy_model("llama");
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/byte-tokenizer/tokenizer.json");
    let mut t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tok).unwrap()).unwrap();
    t["added_tokens"] = serde_json::json!([{"id": 300, "content": "<extra>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}]);
    std::fs::write(d.path().join("tokenizer.json"), t.to_string()).unwrap();
    expect_bad(d.path(), &["only 256 rows"]);
    // A chat template that raises.
    let d = model_with_tokenizer();
    std::fs::write(
        d.path().join("tokenizer_config.json"),
        r#"{"chat_template": "{{ raise_exception('no chats here') }}"}"#,
    )
    .unwrap();
    let o = retort(
        &["generate", "--model", d.path().to_str().unwrap(), "--device", "cpu", "--prompt", "x"],
        None,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no chats here"), "{}", stderr(&o));
}

#[test]
fn hub_ids_use_the_cache_offline_and_say_what_to_do() {
    let cache = tempfile::tempdir().unwrap();
    // A snapshot put in the cache the way the hub client lays it out.
    let snap = cache.path().join("models--acme--tiny/snapshots/0123456789abcdef0123456789abcdef01234567");
    std::fs::create_dir_all(&snap).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(models().join("llama").join(f), snap.join(f)).unwrap();
    }
    std::fs::create_dir_all(cache.path().join("models--acme--tiny/refs")).unwrap();
    std::fs::write(
        cache.path().join("models--acme--tiny/refs/main"),
        "0123456789abcdef0123456789abcdef01234567",
    )
    .unwrap();
    let out = cache.path().join("l.npy");
    let run = |model: &str| {
        Command::new(env!("CARGO_BIN_EXE_retort"))
            .args([
                "--log-format",
                "human",
                "logits",
                "--model",
                model,
                "--device",
                "cpu",
                "--ids",
                "1,2",
                "--out",
                out.to_str().unwrap(),
            ])
            .env("HF_HUB_CACHE", cache.path())
            .env("HF_HUB_OFFLINE", "1")
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    };
    let o = run("acme/tiny");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(read_npy(&out).0, [2, 256]);
    let o = run("acme/missing");
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("is not in the cache") && e.contains("unset HF_HUB_OFFLINE"), "{e}");
}
