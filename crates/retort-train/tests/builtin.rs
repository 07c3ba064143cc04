//! The built-in tiny model is a complete Hugging Face directory: its tokenizer is one token per byte
//! with single-id specials, its chat template renders Llama 3's layout, its weights load and run, and
//! writing it twice gives the same bytes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use retort_data::Tokenizer;
use retort_model::Precision;
use retort_model::burn::tensor::Device;

#[test]
fn the_tokenizer_is_one_token_per_byte_and_specials_are_single_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = retort_model::builtin::materialize("tiny-llama", &tmp.path().join("m")).unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    assert_eq!(tok.vocab_size(), 262);
    for text in ["billing", "héllo wörld\n\ttabs  and  spaces", "日本語 🙂", " leading and trailing "]
    {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids.len(), text.len(), "{text:?} is not one token per byte: {ids:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    for (i, special) in
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|eot_id|>"].iter().enumerate()
    {
        let ids = tok.encode(&format!("a{special}b"), false).unwrap();
        assert_eq!(ids.len(), 3, "{special} is not one token");
        assert_eq!(Some(ids[1]), tok.token_id(special), "{i}");
    }
    let template = tok.template().unwrap().expect("the built-in model has a chat template");
    let messages = [
        serde_json::json!({"role": "system", "content": "Route."}),
        serde_json::json!({"role": "user", "content": "refund"}),
    ];
    let opts = retort_data::RenderOptions {
        add_generation_prompt: true,
        bos_token: Some("<|begin_of_text|>".into()),
        ..Default::default()
    };
    assert_eq!(
        template.render(&messages, &opts).unwrap(),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nRoute.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nrefund<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn the_weights_load_and_the_files_are_the_same_every_time() {
    let tmp = tempfile::tempdir().unwrap();
    let a = retort_model::builtin::materialize("tiny-llama", &tmp.path().join("a")).unwrap();
    let b = retort_model::builtin::materialize("tiny-llama", &tmp.path().join("b")).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"] {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f}");
    }
    // A second call finds the complete copy and leaves it alone; no partial directory is left.
    let before = std::fs::metadata(a.join("model.safetensors")).unwrap().modified().unwrap();
    retort_model::builtin::materialize("tiny-llama", &a).unwrap();
    assert_eq!(std::fs::metadata(a.join("model.safetensors")).unwrap().modified().unwrap(), before);
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let (model, report) = retort_model::Transformer::load(&a, Precision::F32, &Device::flex()).unwrap();
    assert!(report.missing.is_empty() && report.unused.is_empty(), "{report:?}");
    let logits = model.forward(&retort_model::Batch::single(&[256, 98, 105]), None);
    assert_eq!(logits.dims(), [1, 3, 262]);
    let values: Vec<f32> = logits.into_data().try_to_vec().unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
    let err = retort_model::builtin::materialize("tiny-gpt", &tmp.path().join("c")).unwrap_err();
    assert!(err.to_string().contains("tiny-llama"), "{err}");
}
