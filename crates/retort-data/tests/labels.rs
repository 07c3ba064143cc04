//! Labels fall exactly on the assistant turns and their end-of-turn markers, on the real chat
//! templates: Qwen2.5 and Qwen3 with the real Qwen2 tokenizer; Llama 3.x, Phi-3.5, Mistral Nemo,
//! Devstral and Gemma 2 with a byte-level tokenizer whose offsets are exact bytes. Templates that
//! refuse a conversation or rewrite earlier turns give a clear error, never silent mislabelling.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use retort_data::dataset::{Conversation, Message, Role};
use retort_data::labels::{ExampleError, IGNORE, assistant_spans, encode};
use retort_data::{ChatTemplate, TemplateError, Tokenizer};
use retort_recipe::schema::train::LossOn;
use serde_json::json;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn template(name: &str) -> ChatTemplate {
    let source = std::fs::read_to_string(fixtures().join("chat-templates").join(name)).unwrap();
    ChatTemplate::new(&source).unwrap()
}

fn qwen2() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = fixtures().join("qwen2-tokenizer");
        let mut json = Vec::new();
        let gz = std::fs::read(dir.join("tokenizer.json.gz")).unwrap();
        flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut json).unwrap();
        Tokenizer::from_parts(&json, &dir, &dir.join("tokenizer.json")).unwrap()
    })
}

/// The 256-token byte-level tokenizer: one token per byte, offsets exact.
fn bytes(bos: &str, eos: &str) -> Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../retort-cli/tests/fixtures/byte-tokenizer");
    let mut tok = Tokenizer::load(&dir).unwrap();
    tok.bos_token = Some(bos.into());
    tok.eos_token = Some(eos.into());
    tok
}

fn conv(turns: &[(Role, &str)]) -> Conversation {
    Conversation { messages: turns.iter().map(|(r, c)| Message::new(*r, *c)).collect(), tools: None, line: 7 }
}

const SYSTEM: &str = "You route support tickets. Answer with one label.";

fn two_turns(system: bool) -> Conversation {
    let mut turns = vec![
        (Role::User, "I was charged twice."),
        (Role::Assistant, "billing"),
        (Role::User, "The app crashes when I upload a photo. Ça va?"),
        (Role::Assistant, "bug: «crash» 🙂"),
    ];
    if system {
        turns.insert(0, (Role::System, SYSTEM));
    }
    conv(&turns)
}

/// The decoded text of each run of consecutive labelled tokens.
fn labelled_runs(tok: &Tokenizer, ids: &[u32], labels: &[i64]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut run: Vec<u32> = Vec::new();
    for (&id, &l) in ids.iter().zip(labels) {
        if l == IGNORE {
            if !run.is_empty() {
                runs.push(tok.decode(&std::mem::take(&mut run), false).unwrap());
            }
        } else {
            assert_eq!(l, i64::from(id), "a label is its own token's id (not shifted)");
            run.push(id);
        }
    }
    if !run.is_empty() {
        runs.push(tok.decode(&run, false).unwrap());
    }
    runs
}

#[test]
fn qwen25_labels_exactly_the_answers_and_their_im_end() {
    let tok = qwen2();
    let ex = encode(&two_turns(true), tok, &template("Qwen-Qwen2.5-7B-Instruct.jinja"), LossOn::Completion)
        .unwrap();
    assert_eq!(ex.ids.len(), ex.labels.len());
    assert_eq!(ex.line, 7);
    // The ids are the whole rendering, tokenized once, with the template's special tokens as tokens.
    let text = tok.decode(&ex.ids, false).unwrap();
    assert_eq!(
        text,
        format!(
            "<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nI was charged twice.<|im_end|>\n\
             <|im_start|>assistant\nbilling<|im_end|>\n<|im_start|>user\nThe app crashes when I upload a photo. \
             Ça va?<|im_end|>\n<|im_start|>assistant\nbug: «crash» 🙂<|im_end|>\n"
        )
    );
    assert_eq!(ex.ids, tok.encode(&text, false).unwrap());
    assert_eq!(
        labelled_runs(tok, &ex.ids, &ex.labels),
        ["billing<|im_end|>\n", "bug: «crash» 🙂<|im_end|>\n"]
    );
    let im_end = tok.token_id("<|im_end|>").unwrap();
    assert_eq!(
        ex.labels.iter().filter(|&&l| l == i64::from(im_end)).count(),
        2,
        "both end-of-turn tokens learned"
    );
    // No system or user token, and no assistant header, carries a label.
    let unlabelled: Vec<u32> =
        ex.ids.iter().zip(&ex.labels).filter(|(_, l)| **l == IGNORE).map(|(i, _)| *i).collect();
    let prompt = tok.decode(&unlabelled, false).unwrap();
    assert!(prompt.contains(SYSTEM) && prompt.contains("I was charged twice.") && prompt.contains("Ça va?"));
    assert!(!prompt.contains("billing") && !prompt.contains("bug:") && !prompt.contains("🙂"));
}

#[test]
fn qwen25_tool_calls_are_learned_and_tool_results_are_not() {
    let tok = qwen2();
    let mut c = conv(&[(Role::User, "Status of order 42?")]);
    let mut call = Message::new(Role::Assistant, "");
    call.extra.insert(
        "tool_calls".into(),
        json!([{"type": "function", "function": {"name": "get_order_status", "arguments": {"order_id": "42"}}}]),
    );
    c.messages.push(call);
    let mut result = Message::new(Role::Tool, "{\"status\": \"shipped\"}");
    result.extra.insert("name".into(), json!("get_order_status"));
    c.messages.push(result);
    c.messages.push(Message::new(Role::Assistant, "It has shipped."));
    c.tools = Some(json!([{"type": "function", "function": {"name": "get_order_status", "parameters": {}}}]));
    let ex = encode(&c, tok, &template("Qwen-Qwen2.5-7B-Instruct.jinja"), LossOn::Completion).unwrap();
    let text = tok.decode(&ex.ids, false).unwrap();
    assert!(
        text.contains("# Tools") && text.contains("\"name\": \"get_order_status\", \"parameters\": {}"),
        "{text}"
    );
    assert_eq!(
        labelled_runs(tok, &ex.ids, &ex.labels),
        [
            "<tool_call>\n{\"name\": \"get_order_status\", \"arguments\": {\"order_id\": \"42\"}}\n</tool_call><|im_end|>\n",
            "It has shipped.<|im_end|>\n"
        ]
    );
}

#[test]
fn loss_on_all_labels_every_token() {
    let tok = qwen2();
    let ex = encode(&two_turns(true), tok, &template("Qwen-Qwen2.5-7B-Instruct.jinja"), LossOn::All).unwrap();
    assert!(ex.ids.len() > 40);
    assert_eq!(ex.labels, ex.ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>());
    assert_eq!(ex.label_tokens(), ex.ids.len());
}

/// Byte-level checks: the labelled bytes are exactly the expected answer spans.
fn check_bytes(name: &str, tok: &Tokenizer, c: &Conversation, want: &[&str]) {
    let t = template(name);
    let ex = encode(c, tok, &t, LossOn::Completion).unwrap_or_else(|e| panic!("{name}: {e}"));
    let (text, spans) = assistant_spans(c, tok, &t).unwrap();
    assert_eq!(tok.decode(&ex.ids, false).unwrap(), text, "{name}: ids are the rendering");
    let by_span: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
    assert_eq!(by_span, want, "{name}: spans");
    assert_eq!(labelled_runs(tok, &ex.ids, &ex.labels), want, "{name}: labelled tokens");
}

#[test]
fn llama3_templates_label_the_answers_and_eot() {
    let tok = bytes("<|begin_of_text|>", "<|eot_id|>");
    for name in [
        "meta-llama-Llama-3.1-8B-Instruct.jinja",
        "meta-llama-Llama-3.2-3B-Instruct.jinja",
        "meta-llama-Llama-3.3-70B-Instruct.jinja",
    ] {
        for system in [true, false] {
            check_bytes(name, &tok, &two_turns(system), &["billing<|eot_id|>", "bug: «crash» 🙂<|eot_id|>"]);
        }
    }
}

#[test]
fn phi35_learns_end_and_eos_closes_only_the_last_turn() {
    // Phi-3.5 writes EOS after the last message only when no generation prompt follows; an earlier
    // turn ends where that EOS would begin.
    let tok = bytes("<s>", "<|endoftext|>");
    for system in [true, false] {
        check_bytes(
            "microsoft-Phi-3.5-mini-instruct.jinja",
            &tok,
            &two_turns(system),
            &["billing<|end|>\n", "bug: «crash» 🙂<|end|>\n<|endoftext|>"],
        );
    }
}

#[test]
fn mistral_templates_label_the_answers_and_eos() {
    let tok = bytes("<s>", "</s>");
    let single =
        conv(&[(Role::System, SYSTEM), (Role::User, "Charged twice."), (Role::Assistant, "billing")]);
    for name in ["mistralai-Mistral-Nemo-Instruct-2407.jinja", "unsloth-mistral-Devstral-Small-2507.jinja"] {
        check_bytes(name, &tok, &two_turns(false), &["billing</s>", "bug: «crash» 🙂</s>"]);
    }
    // Devstral keeps the system prompt in place, so rows with one work too.
    let devstral = "unsloth-mistral-Devstral-Small-2507.jinja";
    check_bytes(devstral, &tok, &single, &["billing</s>"]);
    check_bytes(devstral, &tok, &two_turns(true), &["billing</s>", "bug: «crash» 🙂</s>"]);
}

#[test]
fn mistral_nemo_drops_the_system_prompt_so_retort_refuses_rather_than_guess() {
    // Nemo writes the system prompt into the *last* user turn, and drops it when an answer ends the
    // conversation: the text before each answer changes once the answer is added.
    let tok = bytes("<s>", "</s>");
    let nemo = template("mistralai-Mistral-Nemo-Instruct-2407.jinja");
    let single =
        conv(&[(Role::System, SYSTEM), (Role::User, "Charged twice."), (Role::Assistant, "billing")]);
    for c in [single, two_turns(true)] {
        let err = encode(&c, &tok, &nemo, LossOn::Completion).unwrap_err();
        assert!(matches!(err, ExampleError::PromptMismatch { index: 2, turn: 1 }), "{err:?}");
        assert!(err.to_string().contains("the messages before `messages[2]` (assistant turn 1)"), "{err}");
        assert!(err.hint().contains("Mistral Nemo") && err.hint().contains("loss_on = \"all\""));
    }
}

#[test]
fn gemma2_labels_model_turns_and_refuses_a_system_message() {
    let tok = bytes("<bos>", "<eos>");
    check_bytes(
        "google-gemma-2-2b-it.jinja",
        &tok,
        &two_turns(false),
        &["billing<end_of_turn>\n", "bug: «crash» 🙂<end_of_turn>\n"],
    );
    let err = encode(&two_turns(true), &tok, &template("google-gemma-2-2b-it.jinja"), LossOn::Completion)
        .unwrap_err();
    assert!(
        matches!(&err, ExampleError::Template(TemplateError::Raised(m)) if m == "System role not supported"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "the chat template refused this conversation: System role not supported");
}

#[test]
fn qwen3_learns_the_reasoning_of_the_last_turn_or_its_empty_think_block() {
    let tok = qwen2();
    let mut c =
        conv(&[(Role::System, SYSTEM), (Role::User, "I was charged twice."), (Role::Assistant, "billing")]);
    c.messages[2].extra.insert("reasoning_content".into(), json!("A double charge is a billing matter."));
    let ex = encode(&c, tok, &template("Qwen-Qwen3-0.6B.jinja"), LossOn::Completion).unwrap();
    assert_eq!(
        labelled_runs(tok, &ex.ids, &ex.labels),
        ["<think>\nA double charge is a billing matter.\n</think>\n\nbilling<|im_end|>\n"]
    );
    c.messages[2].extra.clear();
    let ex = encode(&c, tok, &template("Qwen-Qwen3-0.6B.jinja"), LossOn::Completion).unwrap();
    assert_eq!(labelled_runs(tok, &ex.ids, &ex.labels), ["<think>\n\n</think>\n\nbilling<|im_end|>\n"]);
}

#[test]
fn qwen3_dropping_earlier_reasoning_is_an_error_not_silent_mislabelling() {
    let tok = qwen2();
    let mut c = two_turns(true);
    c.messages[2].extra.insert("reasoning_content".into(), json!("A double charge is a billing matter."));
    let err = encode(&c, tok, &template("Qwen-Qwen3-0.6B.jinja"), LossOn::Completion).unwrap_err();
    assert!(matches!(err, ExampleError::Rewrites { index: 2, turn: 1 }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "the chat template renders `messages[2]` (assistant turn 1) differently once later messages follow, so its tokens cannot be located in the training text"
    );
    // Without reasoning too: Qwen3 writes an empty `<think>` block into the final answer only, so an
    // earlier answer reads differently once it is no longer last.
    let err =
        encode(&two_turns(true), tok, &template("Qwen-Qwen3-0.6B.jinja"), LossOn::Completion).unwrap_err();
    assert!(matches!(err, ExampleError::Rewrites { index: 2, turn: 1 }), "{err:?}");
    // Training on every token needs no spans, so it still works.
    let all = encode(&c, tok, &template("Qwen-Qwen3-0.6B.jinja"), LossOn::All).unwrap();
    assert_eq!(all.label_tokens(), all.ids.len());
}

#[test]
fn a_conversation_without_an_assistant_turn_has_nothing_to_learn() {
    let tok = qwen2();
    let c = conv(&[(Role::User, "hello?")]);
    for loss_on in [LossOn::Completion, LossOn::All] {
        let err = encode(&c, tok, &template("Qwen-Qwen2.5-7B-Instruct.jinja"), loss_on).unwrap_err();
        assert!(matches!(err, ExampleError::NoAssistant), "{err:?}");
    }
}
