//! Round trip through transformers: the merged directory retort writes (f32) loads in transformers and
//! gives the logits of the base with the PEFT adapter applied, within 1e-4, for every family.
//!
//! Opt-in (`RETORT_TORCH_ROUNDTRIP=1`, about 20 s): it needs a Python with torch, transformers and
//! peft (`RETORT_PYTHON`, else `python3`). Otherwise the test prints a notice and passes (CI installs
//! only gguf). retort's own model (`retort-model`) is not built yet; this is the same check against
//! the reference implementation. Measured: at most 2e-6 on every family.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stderr)] // tests

use std::path::PathBuf;
use std::process::Command;

use retort_export::job::{Format, Job};
use retort_export::merge::OutDtype;
use retort_export::output::Disk;
use retort_io::NoProgress;

const SCRIPT: &str = r#"
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
ids = torch.tensor([[1, 5, 9, 33, 120, 200, 17, 64, 3, 250]])
args = sys.argv[1:]
for merged, base, adapter in zip(args[0::3], args[1::3], args[2::3]):
    with torch.no_grad():
        m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        p = PeftModel.from_pretrained(b, adapter).eval()(ids).logits
    print((m - p).abs().max().item())
"#;

fn python() -> String {
    std::env::var("RETORT_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[test]
fn merged_directory_gives_peft_logits_in_transformers() {
    if std::env::var("RETORT_TORCH_ROUNDTRIP").as_deref() != Ok("1") {
        eprintln!("NOTICE: transformers round trip skipped (opt in with RETORT_TORCH_ROUNDTRIP=1)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("rt.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let families = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"];
    let mut args = Vec::new();
    for family in families {
        let fx = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(family);
        let out = tmp.path().join(family);
        let job = Job {
            base: fx.join("base"),
            adapter: Some(fx.join("adapter")),
            formats: vec![Format::Merged],
            dtype: Some(OutDtype::F32),
            out: out.clone(),
            name: family.into(),
            shard_size: u64::MAX,
            chat_template: None,
            system: None,
        };
        retort_export::run(&job, &Disk, &NoProgress).unwrap();
        args.extend([out.join("merged"), fx.join("base"), fx.join("adapter")]);
    }
    let o = Command::new(python()).arg(&script).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let diffs: Vec<f64> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(diffs.len(), families.len());
    for (family, diff) in families.iter().zip(diffs) {
        eprintln!("{family}: max |logits(merged) - logits(base + adapter)| = {diff:e}");
        assert!(diff < 1e-4, "{family}: {diff}");
    }
}
