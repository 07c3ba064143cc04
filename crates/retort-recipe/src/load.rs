//! Loading a recipe: parse, refuse secrets, deserialize collecting every error, resolve defaults and
//! paths, then check values and cross-field rules.

use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use toml::de::DeTable;

use crate::de::{DeError, Kind, NodeDe, quote_list};
use crate::diag::{Diagnostic, Report};
use crate::schema::Recipe;
use crate::schema::distill::OutputKind;
use crate::schema::eval::{Compare, Metric};
use crate::secrets;
use crate::source::{ReadError, Source};
use crate::suggest::did_you_mean;
use crate::tree::{KeyPath, Node};
use crate::validate;

/// More errors than this in one file are not worth listing.
const MAX_ERRORS: usize = 200;

/// A recipe that passed validation, with its warnings.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The resolved recipe: defaults filled in, paths absolute.
    pub recipe: Recipe,
    /// Warnings (no errors).
    pub report: Report,
}

/// Why a recipe could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read as text.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The file was read but has errors (all of them are in the report).
    #[error("recipe `{}` has {} error(s)", .0.source.path.display(), .0.error_count())]
    Invalid(Box<Report>),
}

/// Reads and validates a recipe file.
pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    let source = Source::read(path)?;
    load_source(source).map_err(|r| LoadError::Invalid(Box::new(r)))
}

/// Validates recipe text already in memory. Relative paths resolve against the source path's
/// directory.
pub fn load_source(source: Source) -> Result<Loaded, Report> {
    let mut diags = Vec::new();
    let mut secret_values = secrets_in_text(&source.text);

    let (doc, syntax_errors) = DeTable::parse_recoverable(&source.text);
    let mut tree = Node::from_toml(doc);
    secret_values.extend(scan_secrets(&mut tree, &mut diags));
    // Keys the tree scan did not see (in comments, or on lines toml could not parse) leak just the
    // same once the file is committed.
    for (offset, token) in secret_tokens(&source.text) {
        let covered =
            diags.iter().any(|d| d.span.as_ref().is_some_and(|s| s.start <= offset && offset < s.end));
        if !covered {
            let what = secrets::looks_like_secret(token).unwrap_or("a credential");
            diags.push(
                Diagnostic::error("secret", format!("the recipe contains what looks like {what}"))
                    .span(offset..offset + token.len())
                    .found(format!("{what} (not shown)"))
                    .expected("no credentials anywhere in the recipe, comments included")
                    .hint("delete it, keep keys in environment variables (`teacher.api_key_env`), and rotate the exposed key"),
            );
        }
    }

    if !syntax_errors.is_empty() {
        for e in syntax_errors.iter().take(MAX_ERRORS) {
            diags.push(syntax_diagnostic(e, &source, &tree));
        }
        return Err(Report::new(source, diags, secret_values));
    }

    let (recipe, killed) = deserialize_collecting(&mut tree, &mut diags);
    let Some(mut recipe) = recipe else {
        return Err(Report::new(source, diags, secret_values));
    };

    resolve(&mut recipe, &source);
    let mut semantic = validate::validate(&recipe, &tree, &source);
    // A key that failed to deserialize fell back to its default; rules about it would only repeat
    // the first error with a confusing twist.
    semantic.retain(|d| {
        let Some(p) = &d.path else { return true };
        let p = KeyPath::parse(p);
        let sibling =
            |k: &KeyPath| matches!(p.0.last(), Some(crate::tree::Seg::Index(_))) && k.parent() == p.parent();
        !killed
            .iter()
            .any(|k| (k.0.starts_with(&p.0) && p.0.len() >= 2) || p.0.starts_with(&k.0) || sibling(k))
    });
    diags.extend(semantic);

    let report = Report::new(source, diags, secret_values);
    if report.has_errors() { Err(report) } else { Ok(Loaded { recipe, report }) }
}

fn syntax_diagnostic(e: &toml::de::Error, source: &Source, tree: &Node) -> Diagnostic {
    let message = e.message().trim();
    let Some(span) = e.span() else {
        return Diagnostic::error("syntax", format!("invalid TOML: {message}"));
    };
    if message == "duplicate key" {
        let key =
            source.text.get(span.clone()).unwrap_or("").trim().trim_matches(['[', ']', '"']).to_string();
        let last = key.rsplit('.').next().unwrap_or(&key).trim().to_string();
        // The recovered tree holds the first definition: find the nearest earlier key of that name.
        let mut first: Option<(KeyPath, usize)> = None;
        tree.walk(&KeyPath::default(), &mut |path, key_span, _| {
            if let Some(ks) = key_span
                && path.last_key() == Some(last.as_str())
                && ks.start < span.start
                && first.as_ref().is_none_or(|(_, s)| ks.start > *s)
            {
                first = Some((path.clone(), ks.start));
            }
        });
        let mut d = Diagnostic::error("duplicate-key", format!("duplicate key `{key}`")).span(span);
        if let Some((path, start)) = first {
            let pos = source.position(start);
            d = d.path(&path).hint(format!("`{path}` is already set at line {}; keep one of them", pos.line));
        } else {
            d = d.hint("a key or table may be defined only once; keep one of them");
        }
        return d;
    }
    Diagnostic::error("syntax", format!("invalid TOML: {message}"))
        .span(span)
        .hint("see https://toml.io for the syntax; strings need double quotes")
}

/// Deserializes the tree, turning each failure into a diagnostic and retrying without the offending
/// value, so one run reports every problem. Returns the recipe (if the root could be built) and the
/// paths that were dropped.
fn deserialize_collecting(tree: &mut Node, diags: &mut Vec<Diagnostic>) -> (Option<Recipe>, Vec<KeyPath>) {
    let mut killed = Vec::new();
    for _ in 0..MAX_ERRORS {
        match Recipe::deserialize(NodeDe(tree)) {
            Ok(r) => return (Some(r), killed),
            Err(e) => {
                let (diag, kill) = to_diagnostic(&e, tree);
                diags.push(diag);
                if !tree.kill(&kill) {
                    return (None, killed);
                }
                killed.push(kill);
            }
        }
    }
    (None, killed)
}

/// How to name the table at `path` in a message: `[train]`, or for an element of an array of tables
/// `[[distill.filters]]` with its tag (`kind = "length"`) when it has one.
fn section_name(path: &KeyPath, tree: &Node) -> String {
    if path.is_root() {
        return "the top level".into();
    }
    if let Some(crate::tree::Seg::Index(i)) = path.0.last() {
        let array = path.parent();
        for tag in ["kind", "from"] {
            if let Some(crate::tree::Val::Str(v)) = tree.get(&path.key(tag)).map(|n| &n.val) {
                return format!("`[[{array}]]` with `{tag} = \"{v}\"`");
            }
        }
        return format!("`[[{array}]]` (item {i})");
    }
    format!("`[{path}]`")
}

/// Converts a deserialization error into a diagnostic and the path to drop before retrying.
fn to_diagnostic(e: &DeError, tree: &Node) -> (Diagnostic, KeyPath) {
    let span_at = |p: &KeyPath| e.span.clone().or_else(|| tree.nearest_span(p));
    match &e.kind {
        Kind::UnknownField { field, expected } => {
            let full = if e.at_key { e.path.clone() } else { e.path.key(field) };
            let parent = full.parent();
            let span = tree.key_span(&full).or_else(|| span_at(&full));
            let mut d = if parent.is_root() {
                Diagnostic::error("unknown-key", format!("unknown section `[{field}]`"))
                    .expected(format!("one of {}", quote_list(expected)))
            } else {
                Diagnostic::error("unknown-key", format!("unknown key `{full}`"))
                    .found(format!("`{field}`"))
                    .expected(format!("a key of {}", section_name(&parent, tree)))
            };
            d = d.path(&full).maybe_span(span);
            let hint = if let Some(near) = did_you_mean(field, expected.iter().copied()) {
                Some(format!("did you mean `{near}`?"))
            } else if let Some(home) = crate::docs::sections_with_key(field).first() {
                Some(format!("`{field}` belongs in {home}"))
            } else if !expected.is_empty() && !parent.is_root() {
                Some(format!("valid keys in {}: {}", section_name(&parent, tree), quote_list(expected)))
            } else {
                None
            };
            (d.maybe_hint(hint), full)
        }
        Kind::UnknownVariant { variant, expected } => {
            let mut d = Diagnostic::error("unknown-value", format!("`{}` has an unknown value", e.path))
                .path(&e.path)
                .maybe_span(span_at(&e.path))
                .found(format!("\"{variant}\""))
                .expected(format!("one of {}", quote_list(expected)));
            let hint = match (e.path.parent().to_string().as_str(), variant.as_str()) {
                ("lora.targets", "lm_head" | "embed_tokens") => Some(format!(
                    "adapting `{variant}` is not supported: it bloats the adapter and breaks GGUF export; \
                     `all-linear` covers every attention and MLP projection"
                )),
                _ => {
                    did_you_mean(variant, expected.iter().copied()).map(|n| format!("did you mean \"{n}\"?"))
                }
            };
            d = d.maybe_hint(hint);
            let kill = if e.at_tag { e.path.parent() } else { e.path.clone() };
            (d, kill)
        }
        Kind::MissingField { field } => {
            let full = e.path.key(field);
            let d = Diagnostic::error("missing-key", format!("missing required key `{full}`"))
                .path(&full)
                .maybe_span(span_at(&e.path))
                .hint(format!("add `{field} = ...` to {}", section_name(&e.path, tree)));
            // The table cannot be built without the key: drop the whole table.
            (d, e.path.clone())
        }
        Kind::InvalidType { found, expected } => {
            let hint = type_hint(found, expected);
            let d = Diagnostic::error("type", format!("`{}` has the wrong type", e.path))
                .path(&e.path)
                .maybe_span(span_at(&e.path))
                .found(found.clone())
                .expected(expected.clone())
                .maybe_hint(hint);
            let kill = if e.at_tag { e.path.parent() } else { e.path.clone() };
            (d, kill)
        }
        Kind::InvalidValue { found, expected } => {
            let d = Diagnostic::error("value", format!("`{}` has an invalid value", e.path))
                .path(&e.path)
                .maybe_span(span_at(&e.path))
                .found(found.clone())
                .expected(expected.clone());
            (d, e.path.clone())
        }
        Kind::Custom { message, hint } => {
            let d = Diagnostic::error("value", format!("invalid `{}`: {message}", e.path))
                .path(&e.path)
                .maybe_span(span_at(&e.path))
                .maybe_hint(hint.clone());
            (d, e.path.clone())
        }
    }
}

fn type_hint(found: &str, expected: &str) -> Option<String> {
    let number = expected.contains("number");
    let quoted = found.strip_prefix("string ").and_then(|q| serde_json::from_str::<String>(q).ok());
    let unquotable = quoted.as_deref().is_some_and(|q| {
        let q = q.trim().replace('_', "");
        (number && q.parse::<f64>().is_ok()) || (expected.contains("true") && (q == "true" || q == "false"))
    });
    if unquotable {
        Some("remove the quotes around the value".into())
    } else if found.starts_with("float") && expected.contains("whole number") {
        Some("write a whole number without a decimal point, e.g. `16`".into())
    } else if (found.starts_with("integer") || found.starts_with("float") || found.starts_with("boolean"))
        && (expected.contains("string") || expected.starts_with("one of") || expected.starts_with('"'))
    {
        Some("put the value in double quotes".into())
    } else if found == "a table" && expected == "an array" {
        Some("use `[[section]]` (double brackets) for an array of tables".into())
    } else if expected == "an array" {
        Some("write a list in square brackets, e.g. `[\"a\", \"b\"]`".into())
    } else {
        None
    }
}

/// Rejects credentials in the recipe and returns the secret strings (for redaction). Offending values
/// are removed from the tree so no later step sees or echoes them.
fn scan_secrets(tree: &mut Node, diags: &mut Vec<Diagnostic>) -> Vec<String> {
    let mut found: Vec<(KeyPath, crate::tree::Span, String, Diagnostic)> = Vec::new();
    tree.walk(&KeyPath::default(), &mut |path, _key_span, node| {
        let crate::tree::Val::Str(s) = &node.val else { return };
        let key = path.last_key().unwrap_or("");
        let what = secrets::looks_like_secret(s);
        let hint = "put the key in an environment variable (e.g. `export OPENAI_API_KEY=...` in your shell or \
                    job), set `teacher.api_key_env = \"OPENAI_API_KEY\"`, and rotate the exposed key";
        let diag = if key == "api_key_env" && what.is_some() {
            Diagnostic::error("secret", format!("`{path}` holds a key, not the name of an environment variable"))
                .found(format!("{} (not shown)", what.unwrap_or("a key")))
                .expected("an environment variable name like `OPENAI_API_KEY`")
                .hint(hint)
        } else if secrets::is_secret_key(key) && !s.trim().is_empty() {
            Diagnostic::error("secret", format!("`{path}` is a literal secret; recipes must not contain keys"))
                .found("a secret value (not shown)")
                .expected(format!("`{}_env = \"VAR_NAME\"` naming an environment variable", key.trim_end_matches('_')))
                .hint(hint)
        } else if let Some(what) = what {
            Diagnostic::error("secret", format!("`{path}` contains what looks like {what}"))
                .found(format!("{what} (not shown)"))
                .expected("no credentials in the recipe")
                .hint(hint)
        } else {
            return;
        };
        found.push((path.clone(), node.span.clone(), s.clone(), diag));
    });
    let mut values = Vec::new();
    for (path, span, value, diag) in found {
        diags.push(diag.path(&path).span(span));
        tree.kill(&path);
        values.push(value);
    }
    values
}

fn is_token_separator(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '=' | ',' | '[' | ']' | '{' | '}' | '#')
}

/// Credential-looking tokens anywhere in the text with their byte offsets, including in comments and
/// in lines toml could not parse.
fn secret_tokens(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices().chain(std::iter::once((text.len(), ' '))) {
        match (start, is_token_separator(c)) {
            (None, false) => start = Some(i),
            (Some(s), true) => {
                let token = &text[s..i];
                if secrets::looks_like_secret(token).is_some() {
                    out.push((s, token));
                }
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// The secret tokens as strings, for redaction (so that snippets never show them).
fn secrets_in_text(text: &str) -> Vec<String> {
    secret_tokens(text).into_iter().map(|(_, t)| t.to_string()).collect()
}

/// Lexically normalises `a/./b/../c` to `a/c` (no filesystem access, so it works for files that do
/// not exist yet).
pub(crate) fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn expand_home(p: &Path) -> PathBuf {
    if let Ok(rest) = p.strip_prefix("~")
        && let Some(home) = std::env::var_os("HOME")
    {
        return PathBuf::from(home).join(rest);
    }
    p.to_path_buf()
}

/// Makes a path from the recipe absolute, relative to the recipe's directory.
pub(crate) fn resolve_path(base: &Path, p: &Path) -> PathBuf {
    let p = expand_home(p);
    if p.as_os_str().is_empty() {
        return p;
    }
    normalize(&base.join(p))
}

/// Default name for a recipe file: its stem.
fn name_from_path(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Fills derived defaults and makes every path absolute.
fn resolve(r: &mut Recipe, source: &Source) {
    let base = std::path::absolute(source.base_dir()).unwrap_or_else(|_| source.base_dir());
    let base = normalize(&base);
    if r.project.name.is_empty() {
        r.project.name = name_from_path(&source.path);
    }
    let name = r.project.name.clone();
    r.project.data_dir = if r.project.data_dir.as_os_str().is_empty() {
        base.join("data").join(&name)
    } else {
        resolve_path(&base, &r.project.data_dir)
    };
    r.project.output_dir = if r.project.output_dir.as_os_str().is_empty() {
        base.join("checkpoints").join(&name)
    } else {
        resolve_path(&base, &r.project.output_dir)
    };

    match &r.base.model {
        crate::types::ModelRef::Local(p) => {
            r.base.model = crate::types::ModelRef::Local(resolve_path(&base, p))
        }
        crate::types::ModelRef::Hub { repo } if !repo.is_empty() && base.join(repo).is_dir() => {
            // As transformers does: an existing local directory wins over a hub id of the same name.
            r.base.model = crate::types::ModelRef::Local(normalize(&base.join(repo)));
        }
        _ => {}
    }
    if let Some(t) = &mut r.base.chat_template {
        *t = resolve_path(&base, t);
    }

    if let Some(t) = &mut r.teacher {
        if t.model.is_empty() && t.provider == crate::schema::teacher::Provider::Replay {
            t.model = "replay".into();
        }
        if t.base_url.is_none() {
            t.base_url = t.provider.default_base_url().map(str::to_string);
        }
        if t.api_key_env.is_none() {
            t.api_key_env = t.provider.default_api_key_env().map(str::to_string);
        }
        if let Some(p) = &mut t.transcript {
            *p = resolve_path(&base, p);
        }
    }

    let output_kind = r.distill.as_ref().map(|d| d.output.kind);
    if let Some(d) = &mut r.distill {
        match &mut d.inputs {
            crate::schema::distill::Inputs::File(f) => f.path = resolve_path(&base, &f.path),
            crate::schema::distill::Inputs::Generate(g) => {
                if let Some(p) = &mut g.topics_file {
                    *p = resolve_path(&base, p);
                }
            }
        }
        if let Some(p) = &mut d.output.schema_file {
            *p = resolve_path(&base, p);
        }
        for p in &mut d.exclude {
            *p = resolve_path(&base, p);
        }
        if r.export.ollama.system.is_none() && !d.system_prompt.is_empty() {
            r.export.ollama.system = Some(d.system_prompt.clone());
        }
    }

    if r.eval.metrics.is_empty() {
        r.eval.metrics = match output_kind {
            Some(OutputKind::Label) => vec![Metric::LabelAccuracy, Metric::MacroF1],
            Some(OutputKind::Json) => vec![Metric::FieldAccuracy, Metric::SchemaValidity],
            Some(OutputKind::Text) | None => vec![Metric::RougeL, Metric::Chrf],
        };
    }
    if r.eval.primary.is_none() {
        r.eval.primary = r.eval.metrics.first().copied();
    }
    if r.eval.compare.is_empty() {
        r.eval.compare = vec![Compare::Base, Compare::Tuned];
        if r.teacher.is_some() {
            r.eval.compare.push(Compare::Teacher);
        }
    }
    if let Some(p) = &mut r.eval.gate.max_regression_vs {
        *p = resolve_path(&base, p);
    }
    if r.export.name.is_none() {
        r.export.name = Some(name);
    }
}
