//! Turning an answer into an example, and the filters that decide which examples are kept.

use std::path::Path;

use regex::Regex;
use retort_recipe::schema::distill::{Filter, LengthFilter, Output, OutputKind, TextField};
use retort_recipe::types::ModelRef;
use serde_json::Value;

use crate::error::DistillError;

/// The answer in the form it is trained on, or why it cannot be.
pub fn parse_output(o: &Output, schema: Option<&Value>, raw: &str) -> Result<String, String> {
    match o.kind {
        OutputKind::Text => {
            let t = raw.trim();
            if t.is_empty() { Err("the answer is empty".into()) } else { Ok(t.to_string()) }
        }
        OutputKind::Label => {
            let t = raw
                .trim()
                .trim_matches(|c: char| c == '"' || c == '\'' || c == '`' || c == '.' || c.is_whitespace());
            o.labels
                .iter()
                .find(|l| l.eq_ignore_ascii_case(t))
                .cloned()
                .ok_or_else(|| format!("the answer {:?} is not one of the labels", short(raw)))
        }
        OutputKind::Json => {
            let v = parse_json(raw)?;
            if let Some(s) = schema {
                crate::schema::validate(s, &v)
                    .map_err(|e| format!("the JSON does not match the schema: {e}"))?;
            }
            Ok(v.to_string())
        }
    }
}

/// Parses a JSON answer, tolerating a Markdown code fence around it.
pub fn parse_json(raw: &str) -> Result<Value, String> {
    let t = raw.trim();
    let t = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .map_or(t, |r| r.trim_end().trim_end_matches("```"));
    serde_json::from_str(t.trim()).map_err(|e| format!("the answer is not valid JSON ({e})"))
}

/// Shortens text for a reason.
pub fn short(s: &str) -> String {
    let t: String = s.chars().take(80).collect();
    if t.len() < s.len() { format!("{t}...") } else { t }
}

/// Counts tokens with the base model's tokenizer.
pub struct Tokens(tokenizers::Tokenizer);

impl Tokens {
    /// Tokens in `text` (no special tokens added).
    pub fn count(&self, text: &str) -> Result<usize, String> {
        self.0.encode(text, false).map(|e| e.len()).map_err(|e| format!("the tokenizer failed: {e}"))
    }
}

/// Loads `tokenizer.json` from a local base model directory; any other base cannot count tokens.
pub fn load_tokenizer(model: &ModelRef) -> Result<Tokens, DistillError> {
    let hint = "token bounds need the base model's tokenizer: set `base.model` to a local Hugging Face directory holding `tokenizer.json`, or use `min_chars`/`max_chars` instead";
    let dir = match model {
        ModelRef::Local(d) => d,
        other => {
            return Err(DistillError::Config {
                message: format!(
                    "a `length` filter counts tokens, but the base model `{other}` is not a local directory with a tokenizer"
                ),
                hint: hint.into(),
            });
        }
    };
    let file = dir.join("tokenizer.json");
    if !file.is_file() {
        return Err(DistillError::Config {
            message: format!("a `length` filter counts tokens, but `{}` does not exist", file.display()),
            hint: hint.into(),
        });
    }
    tokenizers::Tokenizer::from_file(&file).map(Tokens).map_err(|e| DistillError::Config {
        message: format!("cannot load the tokenizer `{}`: {e}", file.display()),
        hint: "the file must be a Hugging Face `tokenizer.json`".into(),
    })
}

/// A compiled `regex` filter.
#[derive(Debug)]
pub struct Patterns {
    /// Which text.
    pub field: TextField,
    must: Vec<Regex>,
    must_not: Vec<Regex>,
}

impl Patterns {
    /// Compiles the patterns (the recipe check already validated them).
    pub fn new(
        field: Option<TextField>,
        must: &[String],
        must_not: &[String],
    ) -> Result<Patterns, DistillError> {
        let compile = |p: &String| {
            Regex::new(p).map_err(|e| DistillError::Config {
                message: format!("the regex filter pattern {p:?} is invalid: {e}"),
                hint: "patterns use Rust `regex` syntax".into(),
            })
        };
        Ok(Patterns {
            field: field.unwrap_or(TextField::Output),
            must: must.iter().map(compile).collect::<Result<_, _>>()?,
            must_not: must_not.iter().map(compile).collect::<Result<_, _>>()?,
        })
    }

    /// Why `text` fails, if it does.
    pub fn check(&self, text: &str) -> Option<String> {
        if let Some(r) = self.must.iter().find(|r| !r.is_match(text)) {
            return Some(format!("does not match `{}`", r.as_str()));
        }
        self.must_not.iter().find(|r| r.is_match(text)).map(|r| format!("matches `{}`", r.as_str()))
    }
}

/// Why `text` is outside a length filter's bounds, if it is.
pub fn check_length(l: &LengthFilter, text: &str, tokens: Option<&Tokens>) -> Result<Option<String>, String> {
    let chars = text.chars().count() as u64;
    if let Some(min) = l.min_chars
        && chars < u64::from(min)
    {
        return Ok(Some(format!("{chars} characters, fewer than {min}")));
    }
    if let Some(max) = l.max_chars
        && chars > u64::from(max)
    {
        return Ok(Some(format!("{chars} characters, more than {max}")));
    }
    if l.min_tokens.is_some() || l.max_tokens.is_some() {
        let Some(t) = tokens else { return Err("no tokenizer loaded".into()) };
        let n = t.count(text)? as u64;
        if let Some(min) = l.min_tokens
            && n < u64::from(min)
        {
            return Ok(Some(format!("{n} tokens, fewer than {min}")));
        }
        if let Some(max) = l.max_tokens
            && n > u64::from(max)
        {
            return Ok(Some(format!("{n} tokens, more than {max}")));
        }
    }
    Ok(None)
}

/// True when any filter needs token counts.
pub fn needs_tokenizer(filters: &[Filter]) -> bool {
    filters.iter().any(|f| matches!(f, Filter::Length(l) if l.min_tokens.is_some() || l.max_tokens.is_some()))
}

/// The judge's prompt for one example.
pub fn judge_prompt(rubric: &str, scale: u32, system: &str, user: &str, answer: &str) -> String {
    format!(
        "Grade one example for a fine-tuning dataset against the rubric.\n\nRubric:\n{rubric}\n\n\
         The assistant's instructions:\n{system}\n\nThe user's message:\n{user}\n\nThe assistant's answer:\n{answer}\n\n\
         Reply with only a JSON object: {{\"score\": <a whole number from 1 to {scale}>, \"reason\": \"<one sentence>\"}}"
    )
}

/// The score in a judge's reply: the `score` of a JSON object, else the first number.
pub fn parse_score(reply: &str, scale: u32) -> Option<f64> {
    let from_json = parse_json(reply).ok().and_then(|v| v["score"].as_f64());
    let score = from_json.or_else(|| {
        let re = Regex::new(r"\d+(\.\d+)?").ok()?;
        re.find(reply).and_then(|m| m.as_str().parse().ok())
    })?;
    (score >= 1.0 && score <= f64::from(scale)).then_some(score)
}

/// Text of every string in a JSON value (an exclude file's row in any dataset format).
pub fn all_text(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Array(a) => a.iter().for_each(|x| all_text(x, out)),
        Value::Object(o) => o.values().for_each(|x| all_text(x, out)),
        _ => {}
    }
}

/// Reads an exclude file (JSONL in any format, or plain text) into texts.
pub fn read_exclude(path: &Path) -> Result<Vec<String>, DistillError> {
    let text = std::fs::read_to_string(path).map_err(|e| DistillError::Input {
        path: path.to_path_buf(),
        line: None,
        message: format!("cannot read the exclude file: {e}"),
        hint: "check `distill.exclude` (paths are relative to the recipe)".into(),
    })?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match serde_json::from_str::<Value>(l) {
            Ok(v) => {
                let mut s = String::new();
                all_text(&v, &mut s);
                s
            }
            Err(_) => l.to_string(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labels_are_matched_leniently_but_only_to_the_list() {
        let o = Output {
            kind: OutputKind::Label,
            labels: vec!["bug".into(), "billing".into()],
            ..Output::default()
        };
        assert_eq!(parse_output(&o, None, " Bug.\n"), Ok("bug".into()));
        assert_eq!(parse_output(&o, None, "\"billing\""), Ok("billing".into()));
        assert!(parse_output(&o, None, "a bug").unwrap_err().contains("not one of the labels"));
    }

    #[test]
    fn json_answers_are_parsed_fenced_and_validated() {
        let o = Output { kind: OutputKind::Json, ..Output::default() };
        let s = json!({"type": "object", "required": ["a"]});
        assert_eq!(parse_output(&o, Some(&s), "```json\n{\"a\": 1}\n```"), Ok("{\"a\":1}".into()));
        assert!(
            parse_output(&o, Some(&s), "{\"b\": 1}").unwrap_err().contains("missing required property `a`")
        );
        assert!(parse_output(&o, Some(&s), "{\"a\": ").unwrap_err().contains("not valid JSON"));
    }

    #[test]
    fn length_and_regex_filters_explain_rejections() {
        let l = LengthFilter { min_chars: Some(3), max_chars: Some(5), ..LengthFilter::default() };
        assert_eq!(check_length(&l, "abcd", None), Ok(None));
        assert!(check_length(&l, "ab", None).unwrap().unwrap().contains("fewer than 3"));
        assert!(check_length(&l, "abcdef", None).unwrap().unwrap().contains("more than 5"));
        let p = Patterns::new(None, &["^- ".into()], &["(?i)as an ai".into()]).unwrap();
        assert_eq!(p.check("- fine"), None);
        assert!(p.check("fine").unwrap().contains("does not match"));
        assert!(p.check("- As an AI, no").unwrap().contains("matches"));
    }

    #[test]
    fn judge_scores_are_read_and_bounded() {
        assert_eq!(parse_score("{\"score\": 8, \"reason\": \"ok\"}", 10), Some(8.0));
        assert_eq!(parse_score("Score: 7/10", 10), Some(7.0));
        assert_eq!(parse_score("{\"score\": 11}", 10), None);
        assert_eq!(parse_score("no idea", 10), None);
    }

    #[test]
    fn token_bounds_without_a_local_tokenizer_fail_clearly() {
        let e = load_tokenizer(&ModelRef::Hub { repo: "Qwen/Qwen2.5-0.5B".into() }).err().unwrap();
        assert!(e.to_string().contains("not a local directory"), "{e}");
        assert!(e.hint().unwrap().contains("min_chars"));
        let d = tempfile::tempdir().unwrap();
        let e = load_tokenizer(&ModelRef::Local(d.path().to_path_buf())).err().unwrap();
        assert!(e.to_string().contains("tokenizer.json` does not exist"), "{e}");
    }
}
