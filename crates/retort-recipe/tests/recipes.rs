//! Every recipe shipped in `recipes/` loads, validates, and has no warnings.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::{Path, PathBuf};

fn shipped() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("recipes/ exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn shipped_recipes_are_valid_without_warnings() {
    let files = shipped();
    assert!(files.len() >= 4, "expected at least 4 shipped recipes, found {files:?}");
    for f in files {
        match retort_recipe::load(&f) {
            Ok(loaded) => assert!(
                loaded.report.diagnostics.is_empty(),
                "{} has warnings:\n{}",
                f.display(),
                loaded.report.render(retort_recipe::RenderStyle::Plain)
            ),
            Err(retort_recipe::LoadError::Invalid(r)) => {
                panic!("{} is invalid:\n{}", f.display(), r.render(retort_recipe::RenderStyle::Plain))
            }
            Err(e) => panic!("{}: {e}", f.display()),
        }
    }
}

#[test]
fn shipped_recipes_open_with_a_comment_block_and_command() {
    for f in shipped() {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(text.starts_with("# "), "{} must open with a comment block", f.display());
        let header: String = text.lines().take_while(|l| l.starts_with('#')).collect::<Vec<_>>().join("\n");
        assert!(header.contains("retort "), "{}: the header must show the command to run", f.display());
        assert!(
            header.to_lowercase().contains("trade-off"),
            "{}: the header must explain the knobs' trade-offs",
            f.display()
        );
    }
}

#[test]
fn show_output_round_trips() {
    // `retort recipe show` prints the resolved recipe; loading that text again gives the same recipe.
    for f in shipped() {
        let loaded = retort_recipe::load(&f).unwrap();
        let text = loaded.recipe.to_toml().unwrap();
        let again = retort_recipe::load_source(retort_recipe::Source::from_text(&f, text.clone()))
            .unwrap_or_else(|r| {
                panic!("{}:\n{}\n{}", f.display(), r.render(retort_recipe::RenderStyle::Plain), text)
            });
        assert_eq!(again.recipe, loaded.recipe, "{}", f.display());
    }
}
