//! Property tests over the recipe loader: whatever the input, it returns a recipe or a report (never
//! panics), every diagnostic points inside the file, nothing it renders leaks a key, and every recipe
//! it accepts survives `show` and a reload unchanged.
//!
//! Inputs are arbitrary text and, more usefully, random edits of every shipped recipe and starter
//! (lines deleted, duplicated, swapped; values replaced by values of other types; truncation; stray
//! bytes). Case counts are fixed so the run takes a few seconds; set `PROPTEST_CASES` for more.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::Path;

use proptest::prelude::*;
use retort_recipe::{RenderStyle, Source, load_source};

const KEY: &str = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123";

fn corpus() -> Vec<String> {
    let mut out = Vec::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            out.push(std::fs::read_to_string(p).unwrap());
        }
    }
    for t in retort_recipe::starter::Task::ALL {
        out.push(retort_recipe::starter::render("fuzz", t));
    }
    out
}

const VALUES: &[&str] = &[
    "\"x\"",
    "\"\"",
    "-1",
    "0",
    "1e400",
    "-0.0",
    "nan",
    "inf",
    "true",
    "[1, \"a\"]",
    "[]",
    "{}",
    "{ a = 1 }",
    "1979-05-27T07:32:00Z",
    "9999999999999999999999",
    "\"sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123\"",
    "\"gguf:q4_k_m\"",
    "\"cuda:x\"",
    "\"10 parsecs\"",
    "\"{{ unclosed\"",
    "[[1]]",
    "'''\nmulti\n'''",
];

#[derive(Debug, Clone)]
enum Edit {
    DeleteLine(usize),
    DuplicateLine(usize),
    SwapLines(usize, usize),
    ReplaceValue(usize, usize),
    Truncate(usize),
    InsertBytes(usize, String),
    RenameKey(usize, String),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<usize>().prop_map(Edit::DeleteLine),
        any::<usize>().prop_map(Edit::DuplicateLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
        (any::<usize>(), 0..VALUES.len()).prop_map(|(a, b)| Edit::ReplaceValue(a, b)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), "[\\[\\]{}=\"'#.\\n a-z0-9,]{1,6}").prop_map(|(a, s)| Edit::InsertBytes(a, s)),
        (any::<usize>(), "[a-z_]{1,12}").prop_map(|(a, s)| Edit::RenameKey(a, s)),
    ]
}

fn apply(text: &str, e: &Edit) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        return text.to_string();
    }
    let n = lines.len();
    match e {
        Edit::DeleteLine(i) => {
            lines.remove(i % n);
        }
        Edit::DuplicateLine(i) => {
            let l = lines[i % n].clone();
            lines.insert(i % n, l);
        }
        Edit::SwapLines(a, b) => lines.swap(a % n, b % n),
        Edit::ReplaceValue(i, v) => {
            let l = &mut lines[i % n];
            if let Some(eq) = l.find(" = ") {
                l.truncate(eq + 3);
                l.push_str(VALUES[*v]);
            }
        }
        Edit::Truncate(i) => {
            let mut cut = i % text.len().max(1);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            return text[..cut].to_string();
        }
        Edit::InsertBytes(i, s) => {
            let l = &mut lines[i % n];
            let mut at = i % (l.len() + 1);
            while !l.is_char_boundary(at) {
                at -= 1;
            }
            l.insert_str(at, s);
        }
        Edit::RenameKey(i, k) => {
            let l = &mut lines[i % n];
            if let Some(eq) = l.find(" = ") {
                *l = format!("{k}{}", &l[eq..]);
            }
        }
    }
    lines.join("\n") + "\n"
}

fn check(text: &str) {
    let source = Source::from_text("/nonexistent/fuzz.toml", text);
    match load_source(source) {
        Ok(loaded) => {
            for d in &loaded.report.diagnostics {
                assert!(!d.is_error());
            }
            // Whatever is accepted survives `show` and a reload.
            let shown = loaded.recipe.to_toml().expect("an accepted recipe serializes");
            let again = load_source(Source::from_text("/nonexistent/fuzz.toml", shown.clone()))
                .unwrap_or_else(|r| {
                    panic!("show output does not reload:\n{shown}\n{}", r.render(RenderStyle::Plain))
                });
            assert_eq!(again.recipe, loaded.recipe);
        }
        Err(report) => {
            assert!(report.has_errors());
            for d in &report.diagnostics {
                if let Some(s) = &d.span {
                    assert!(
                        s.start <= s.end && s.end <= text.len(),
                        "span {s:?} outside a {}-byte file",
                        text.len()
                    );
                    assert!(text.is_char_boundary(s.start), "span {s:?} splits a character");
                }
            }
            for out in [report.render(RenderStyle::Plain), report.render_json()] {
                assert!(!out.contains(KEY), "a key leaked:\n{out}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn edited_recipes_never_panic(which in 0usize..64, edits in prop::collection::vec(edit(), 1..6)) {
        let corpus = corpus();
        let mut text = corpus[which % corpus.len()].clone();
        for e in &edits {
            text = apply(&text, e);
        }
        check(&text);
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        check(&text);
    }

    #[test]
    fn toml_shaped_noise_never_panics(text in "([a-z_]{1,8}( = |\\.)(\"[a-z:0-9 ]{0,8}\"|[0-9.e+-]{1,6}|true|\\[|\\]|\\{|\\})\n|\\[{1,2}[a-z._]{1,12}\\]{1,2}\n){0,30}") {
        check(&text);
    }
}
