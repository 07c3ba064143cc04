//! Every real chat template, rendered for a set of conversations, equals transformers' rendering byte
//! for byte (fixtures from `scripts/make_template_fixtures.py`), including the templates' own errors
//! (`raise_exception`). The real Qwen2 tokenizer encodes like Python's `tokenizers`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::io::Read;
use std::path::{Path, PathBuf};

use retort_data::{ChatTemplate, RenderOptions, TemplateError, Tokenizer};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn real_templates_render_like_transformers() {
    let rows: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("chat_templates.json")).unwrap())
            .unwrap();
    assert!(rows.len() >= 40);
    let mut failures = Vec::new();
    for row in &rows {
        let name = row["template"].as_str().unwrap();
        let case = row["case"].as_str().unwrap();
        let source = std::fs::read_to_string(fixtures().join("chat-templates").join(name)).unwrap();
        let template = ChatTemplate::new(&source).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut extra = serde_json::Map::new();
        extra.insert("date_string".into(), row["date_string"].clone());
        if let Some(t) = row.get("enable_thinking") {
            extra.insert("enable_thinking".into(), t.clone());
        }
        let opts = RenderOptions {
            add_generation_prompt: row["add_generation_prompt"].as_bool().unwrap(),
            tools: row.get("tools").cloned(),
            bos_token: row["bos_token"].as_str().map(str::to_string),
            eos_token: row["eos_token"].as_str().map(str::to_string),
            extra,
        };
        let got = template.render(row["messages"].as_array().unwrap(), &opts);
        match (row.get("expected"), row.get("error"), got) {
            (Some(want), _, Ok(got)) if want.as_str().unwrap() == got => {}
            (_, Some(err), Err(TemplateError::Raised(msg))) if err.as_str().unwrap() == msg => {}
            (want, err, got) => {
                failures.push(format!("{name} / {case}:\n  want {want:?} {err:?}\n  got  {got:?}"))
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} renderings differ:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

fn qwen2() -> Tokenizer {
    let dir = fixtures().join("qwen2-tokenizer");
    let mut json = Vec::new();
    let gz = std::fs::read(dir.join("tokenizer.json.gz")).unwrap();
    flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut json).unwrap();
    Tokenizer::from_parts(&json, &dir, &dir.join("tokenizer.json")).unwrap()
}

#[test]
fn qwen2_tokenizer_encodes_like_python() {
    let tok = qwen2();
    let rows: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenization.json")).unwrap())
            .unwrap();
    for row in rows {
        let text = row["text"].as_str().unwrap();
        let want: Vec<u32> =
            row["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text, false).unwrap(), want, "{text:?}");
        let want: Vec<u32> =
            row["ids_special"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text, true).unwrap(), want, "{text:?} with special tokens");
        assert_eq!(tok.decode(&tok.encode(text, false).unwrap(), false).unwrap(), text, "round trip");
    }
    assert_eq!(tok.eos_token.as_deref(), Some("<|endoftext|>"));
    assert_eq!(tok.eos_ids, [151643]);
    assert!(tok.template().unwrap().is_some());
    assert_eq!(tok.vocab_size(), 151936); // Python: get_vocab_size(with_added_tokens=True)
    tok.check_model_vocab(151936).unwrap();
    assert!(tok.check_model_vocab(151935).is_err());
    let e = tok.check_model_vocab(256).unwrap_err().to_string();
    assert!(e.contains("151936 tokens") && e.contains("only 256 rows"), "{e}");
}
