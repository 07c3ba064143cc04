//! Loading recipes: every error at once, each with its position, key path, what was found, what is
//! allowed and a hint; defaults and path resolution; secrets refused and never echoed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::Path;

use retort_recipe::schema::eval::{Compare, Metric};
use retort_recipe::types::ModelRef;
use retort_recipe::{Diagnostic, Loaded, RenderStyle, Report, Severity, Source, load_source};

const MINIMAL: &str = "[base]\nmodel = \"builtin:tiny-llama\"\n";

fn ok(text: &str) -> Loaded {
    ok_at("/nonexistent/recipes/demo.toml", text)
}

fn ok_at(path: impl AsRef<Path>, text: &str) -> Loaded {
    match load_source(Source::from_text(path.as_ref(), text)) {
        Ok(l) => l,
        Err(r) => panic!("expected a valid recipe:\n{}", r.render(RenderStyle::Plain)),
    }
}

fn bad(text: &str) -> Report {
    match load_source(Source::from_text("/nonexistent/recipes/demo.toml", text)) {
        Ok(l) => panic!("expected errors, got a recipe with {:?}", l.report.diagnostics),
        Err(r) => r,
    }
}

/// (code, path, line, col) of each error, in file order.
fn errors(r: &Report) -> Vec<(&'static str, String, usize, usize)> {
    r.diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| {
            let p = r.position(d).map(|p| (p.line, p.col)).unwrap_or((0, 0));
            (d.code, d.path.clone().unwrap_or_default(), p.0, p.1)
        })
        .collect()
}

fn find<'a>(r: &'a Report, path: &str) -> &'a Diagnostic {
    r.diagnostics
        .iter()
        .find(|d| d.path.as_deref() == Some(path))
        .unwrap_or_else(|| panic!("no diagnostic for `{path}` in:\n{}", r.render(RenderStyle::Plain)))
}

#[test]
fn every_problem_is_reported_at_once_with_positions() {
    let text = r#"[base]
model = "Qwen/Qwen2.5-0.5B-Instruct"
dtype = "bfloat16"

[train]
lrr = 2e-4
lr = -0.1
epochs = "3"
schedule = "cosin"

[lora]
r = 0
dropout = 1.0
targets = ["q_proj", "lm_head"]

[exprt]
formats = []
"#;
    let r = bad(text);
    assert_eq!(
        errors(&r),
        vec![
            ("unknown-value", "base.dtype".to_string(), 3, 9),
            ("unknown-key", "train.lrr".to_string(), 6, 1),
            ("range", "train.lr".to_string(), 7, 6),
            ("type", "train.epochs".to_string(), 8, 10),
            ("unknown-value", "train.schedule".to_string(), 9, 12),
            ("range", "lora.r".to_string(), 12, 5),
            ("range", "lora.dropout".to_string(), 13, 11),
            ("unknown-value", "lora.targets[1]".to_string(), 14, 22),
            ("unknown-key", "exprt".to_string(), 16, 2),
        ]
    );
    let lrr = find(&r, "train.lrr");
    assert_eq!(lrr.hint.as_deref(), Some("did you mean `lr`?"));
    let lr = find(&r, "train.lr");
    assert_eq!(lr.found.as_deref(), Some("-0.1"));
    assert_eq!(lr.expected.as_deref(), Some("a number > 0"));
    assert!(lr.hint.is_some());
    let epochs = find(&r, "train.epochs");
    assert_eq!(epochs.found.as_deref(), Some("string \"3\""));
    assert_eq!(epochs.hint.as_deref(), Some("remove the quotes around the value"));
    assert_eq!(find(&r, "train.schedule").hint.as_deref(), Some("did you mean \"cosine\"?"));
    assert_eq!(find(&r, "exprt").hint.as_deref(), Some("did you mean `export`?"));
    assert!(find(&r, "lora.targets[1]").hint.as_deref().unwrap().contains("lm_head"));
    let dropout = find(&r, "lora.dropout");
    assert_eq!(dropout.expected.as_deref(), Some("a number in [0, 1)"));
}

#[test]
fn unknown_key_deep_in_an_array_of_tables() {
    let text = format!(
        "{MINIMAL}[teacher]\nmodel = \"m\"\n[distill]\nsystem_prompt = \"s\"\n[distill.inputs]\nfrom = \"generate\"\nprompt = \"p {{{{ topic }}}}\"\n\
         [[distill.filters]]\nkind = \"dedup\"\n\n[[distill.filters]]\nkind = \"length\"\nmax_charz = 10\n"
    );
    let r = bad(&text);
    assert_eq!(errors(&r), vec![("unknown-key", "distill.filters[1].max_charz".to_string(), 15, 1)]);
    let d = find(&r, "distill.filters[1].max_charz");
    assert_eq!(d.hint.as_deref(), Some("did you mean `max_chars`?"));
    assert_eq!(d.expected.as_deref(), Some("a key of `[[distill.filters]]` with `kind = \"length\"`"));
}

#[test]
fn a_key_from_another_section_says_where_it_belongs() {
    let r = bad(&format!("{MINIMAL}[lora]\nepochs = 3\n"));
    assert_eq!(find(&r, "lora.epochs").hint.as_deref(), Some("`epochs` belongs in `[train]`"));
}

#[test]
fn wrong_types_name_found_and_expected() {
    let text = format!(
        "{MINIMAL}[train]\nmicro_batch_size = 4.5\npacking = \"yes\"\nlr = \"fast\"\n[lora]\ntargets = \"q_proj\"\n[export]\nformats = [1]\n"
    );
    let r = bad(&text);
    let mbs = find(&r, "train.micro_batch_size");
    assert_eq!(mbs.found.as_deref(), Some("float 4.5"));
    assert_eq!(mbs.expected.as_deref(), Some("a whole number >= 0"));
    assert!(mbs.hint.as_deref().unwrap().contains("whole number"));
    let packing = find(&r, "train.packing");
    assert_eq!(packing.expected.as_deref(), Some("`true` or `false`"));
    // Quotes around a non-number: no "remove the quotes" hint.
    assert_eq!(find(&r, "train.lr").hint, None);
    assert_eq!(find(&r, "lora.targets").expected.as_deref(), Some("an array"));
    assert_eq!(find(&r, "export.formats[0]").found.as_deref(), Some("integer 1"));
}

#[test]
fn duplicate_keys_point_at_both_definitions() {
    let r = bad("[base]\nmodel = \"a/b\"\nmodel = \"c/d\"\n");
    assert_eq!(errors(&r), vec![("duplicate-key", "base.model".to_string(), 3, 1)]);
    assert_eq!(
        r.diagnostics[0].hint.as_deref(),
        Some("`base.model` is already set at line 2; keep one of them")
    );
}

#[test]
fn syntax_errors_have_positions() {
    let r = bad("[base]\nmodel = Qwen/Qwen2.5\n");
    let (code, _, line, col) = errors(&r)[0].clone();
    assert_eq!((code, line), ("syntax", 2));
    assert!(col >= 9, "{col}");
}

#[test]
fn missing_base_model_is_an_error() {
    let r = bad("[project]\nname = \"x\"\n");
    let d = find(&r, "base.model");
    assert_eq!(d.code, "missing-key");
    // No `[base]` table to point at: no position rather than a made-up one.
    assert_eq!(r.position(d), None);
}

const KEY: &str = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD";

#[test]
fn literal_keys_are_refused_and_never_echoed() {
    let cases = [
        format!("{MINIMAL}[teacher]\nmodel = \"m\"\napi_key = \"{KEY}\"\n"),
        format!("{MINIMAL}[teacher]\nmodel = \"m\"\napi_key_env = \"{KEY}\"\n"),
        format!("{MINIMAL}[teacher]\nmodel = \"m\"\nbase_url = \"{KEY}\"\n"),
        format!("{MINIMAL}[teacher]\nmodel = \"m\"\n# old key: {KEY}\n"),
        format!("{MINIMAL}[teacher]\nmodel = \"m\"\nmax_tokens = \"{KEY}\"\n"),
        format!("{MINIMAL}[teacher\nmodel = \"{KEY}\n"),
        format!("{MINIMAL}[project]\ndescription = \"token {KEY}\"\n"),
    ];
    for text in cases {
        let r = bad(&text);
        assert!(r.diagnostics.iter().any(|d| d.code == "secret" || d.code == "syntax"), "{text}");
        for rendered in [r.render(RenderStyle::Plain), r.render(RenderStyle::Color), r.render_json()] {
            assert!(!rendered.contains(KEY), "key leaked for input:\n{text}\n---\n{rendered}");
            assert!(!rendered.contains(&KEY[10..30]), "part of the key leaked:\n{rendered}");
        }
    }
    let r = bad(&format!("{MINIMAL}[teacher]\nmodel = \"m\"\napi_key = \"{KEY}\"\n"));
    let d = find(&r, "teacher.api_key");
    assert_eq!(d.code, "secret");
    assert!(d.hint.as_deref().unwrap().contains("api_key_env"));
    // One clear error, not a second "unknown key" about the same line.
    assert_eq!(r.error_count(), 1, "{}", r.render(RenderStyle::Plain));
}

#[test]
fn secret_named_keys_with_any_value_are_refused() {
    let r = bad(&format!("{MINIMAL}[teacher]\nmodel = \"m\"\npassword = \"hunter2hunter2\"\n"));
    assert_eq!(find(&r, "teacher.password").code, "secret");
    assert!(!r.render(RenderStyle::Plain).contains("hunter2hunter2"));
}

#[test]
fn defaults_are_filled_and_paths_resolve_against_the_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("recipes");
    std::fs::create_dir(&sub).unwrap();
    std::fs::create_dir(dir.path().join("models")).unwrap();
    std::fs::create_dir(dir.path().join("models/tiny")).unwrap();
    std::fs::write(dir.path().join("models/tiny/config.json"), "{}").unwrap();
    std::fs::write(dir.path().join("inputs.jsonl"), "{\"input\":\"x\"}\n").unwrap();
    let text = r#"[base]
model = "../models/tiny"
[teacher]
provider = "anthropic"
model = "claude-sonnet-4-5"
[distill]
system_prompt = "Label it."
[distill.inputs]
from = "file"
path = "../inputs.jsonl"
[distill.output]
kind = "label"
labels = ["a", "b"]
"#;
    let l = ok_at(sub.join("my-task.toml"), text);
    let r = &l.recipe;
    let root = std::path::absolute(dir.path()).unwrap();
    assert_eq!(r.project.name, "my-task");
    assert_eq!(r.project.data_dir, root.join("recipes/data/my-task"));
    assert_eq!(r.project.output_dir, root.join("recipes/checkpoints/my-task"));
    assert_eq!(r.base.model, ModelRef::Local(root.join("models/tiny")));
    let t = r.teacher.as_ref().unwrap();
    assert_eq!(t.base_url.as_deref(), Some("https://api.anthropic.com"));
    assert_eq!(t.api_key_env.as_deref(), Some("ANTHROPIC_API_KEY"));
    let d = r.distill.as_ref().unwrap();
    match &d.inputs {
        retort_recipe::schema::distill::Inputs::File(f) => assert_eq!(f.path, root.join("inputs.jsonl")),
        other => panic!("{other:?}"),
    }
    assert_eq!(r.eval.metrics, [Metric::LabelAccuracy, Metric::MacroF1]);
    assert_eq!(r.eval.primary, Some(Metric::LabelAccuracy));
    assert_eq!(r.eval.compare, [Compare::Base, Compare::Tuned, Compare::Teacher]);
    assert_eq!(r.export.name.as_deref(), Some("my-task"));
    assert_eq!(r.export.ollama.system.as_deref(), Some("Label it."));
    // Practitioner defaults.
    assert_eq!((r.lora.r, r.lora.alpha, r.lora.dropout), (16, 32.0, 0.05));
    assert_eq!(
        (r.train.lr, r.train.max_grad_norm, r.train.adam_eps, r.train.weight_decay),
        (2e-4, 1.0, 1e-8, 0.0)
    );
    assert!(r.train.packing);
}

#[test]
fn hub_ids_stay_hub_ids_unless_a_directory_of_that_name_exists() {
    let l = ok("[base]\nmodel = \"Qwen/Qwen2.5-0.5B-Instruct\"\n");
    assert_eq!(l.recipe.base.model, ModelRef::Hub { repo: "Qwen/Qwen2.5-0.5B-Instruct".into() });
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("org/model")).unwrap();
    std::fs::write(dir.path().join("org/model/config.json"), "{}").unwrap();
    let l = ok_at(dir.path().join("r.toml"), "[base]\nmodel = \"org/model\"\n");
    assert!(matches!(l.recipe.base.model, ModelRef::Local(_)));
}

#[test]
fn range_and_cross_field_rules() {
    let text = r#"[base]
model = "builtin:tiny-llama"
[teacher]
provider = "openai-compatible"
model = "m"
batch = true
[distill]
system_prompt = "s"
split = { train = 0.8, val = 0.1, test = 0.2 }
[distill.inputs]
from = "generate"
prompt = "write about {{ topic }}"
[[distill.filters]]
kind = "json_schema"
[eval]
metrics = ["macro_f1", "judge_win_rate"]
compare = ["base", "tuned", "gguf"]
[eval.gate]
min_score = 90
[export]
formats = ["ollama"]
"#;
    let r = bad(text);
    let codes: Vec<(&str, String)> = errors(&r).into_iter().map(|(c, p, _, _)| (c, p)).collect();
    for expected in [
        ("missing-key", "teacher.base_url"),
        ("cross-field", "teacher.batch"),
        ("cross-field", "distill.split"),
        ("cross-field", "distill.filters[0].kind"),
        ("cross-field", "eval.metrics[0]"),
        ("cross-field", "eval.metrics[1]"),
        ("missing-key", "eval.judge.rubric"),
        ("cross-field", "eval.compare[2]"),
        ("range", "eval.gate.min_score"),
        ("cross-field", "export.formats[0]"),
    ] {
        assert!(codes.contains(&(expected.0, expected.1.to_string())), "missing {expected:?} in {codes:#?}");
    }
    assert_eq!(find(&r, "distill.split").found.as_deref(), Some("train 0.8 + val 0.1 + test 0.2 = 1.1"));
}

#[test]
fn large_micro_batches_are_a_warning_not_an_error() {
    let l =
        ok(&format!("{MINIMAL}[train]\ndevice = \"cuda:0\"\nmicro_batch_size = 16\nmax_seq_len = 4096\n"));
    let w = &l.report.diagnostics;
    assert_eq!(w.len(), 2, "{w:?}"); // the memory warning and the missing-dataset warning
    let mem = w.iter().find(|d| d.code == "memory").expect("memory warning");
    assert_eq!(mem.severity, Severity::Warning);
    assert_eq!(mem.path.as_deref(), Some("train.micro_batch_size"));
}

#[test]
fn json_rendering_has_file_position_and_fields() {
    let r = bad(&format!("{MINIMAL}[train]\nlr = 0\n"));
    let line = r.render_json();
    let v: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(v["file"], "/nonexistent/recipes/demo.toml");
    assert_eq!(v["line"], 4);
    assert_eq!(v["col"], 6);
    assert_eq!(v["level"], "error");
    assert_eq!(v["code"], "range");
    assert_eq!(v["path"], "train.lr");
    assert_eq!(v["found"], "0");
    assert_eq!(v["expected"], "a number > 0");
}

#[test]
fn read_errors_are_clear() {
    use retort_recipe::{LoadError, ReadError, load};
    let dir = tempfile::tempdir().unwrap();
    let check = |path: &Path, want: fn(&ReadError) -> bool| match load(path) {
        Err(LoadError::Read(e)) => {
            assert!(want(&e), "{e:?}");
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
            assert!(e.hint().is_some(), "{e}");
        }
        other => panic!("{other:?}"),
    };
    check(&dir.path().join("missing.toml"), |e| matches!(e, ReadError::NotFound { .. }));
    check(dir.path(), |e| matches!(e, ReadError::IsDirectory { .. }));
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "  \n\n").unwrap();
    check(&empty, |e| matches!(e, ReadError::Empty { .. }));
    let latin1 = dir.path().join("latin1.toml");
    std::fs::write(&latin1, b"[base]\nmodel = \"caf\xe9\"\n").unwrap();
    check(&latin1, |e| matches!(e, ReadError::NotUtf8 { line: 2, col: 13, .. }));
    let binary = dir.path().join("binary.toml");
    std::fs::write(&binary, b"\x7fELF\x02\x01\x01\x00\x00").unwrap();
    check(&binary, |e| matches!(e, ReadError::Binary { line: 1, col: 8, .. }));
    let big = dir.path().join("big.toml");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(50 * 1024 * 1024).unwrap(); // sparse: 50 MB without writing them
    check(&big, |e| matches!(e, ReadError::TooLarge { size: 52428800, .. }));
}

#[test]
fn non_finite_numbers_in_an_inline_schema_are_rejected() {
    // Found by the fuzzer: serde_json turns nan into null, which `recipe show` cannot write.
    let text = format!(
        "{MINIMAL}[teacher]\nmodel = \"m\"\n[distill]\nsystem_prompt = \"s\"\n[distill.inputs]\nfrom = \"generate\"\n\
         prompt = \"p\"\n[distill.output]\nkind = \"json\"\nschema = {{ type = \"object\", maximum = inf }}\n"
    );
    let r = bad(&text);
    assert_eq!(errors(&r), vec![("value", "distill.output.schema.maximum".to_string(), 12, 39)]);
}
