//! Inputs: rows of a JSONL, CSV or text file, or slots the teacher fills from topics x personas.

use std::path::Path;

use retort_recipe::schema::distill::{FileInputs, GeneratedInputs, InputFormat};
use serde_json::{Map, Value, json};

use crate::error::DistillError;

/// One input.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    /// A stable name: the row's `id` field when it has one, else `line N` or `slot N`.
    pub id: String,
    /// Where it came from, for messages: `tickets.jsonl line 5`, or `generated slot 3`.
    pub origin: String,
    /// The input text.
    pub text: String,
    /// Template variables besides `input`: a JSONL row's fields, a CSV row's columns, or
    /// `topic`/`persona`/`index` for generated inputs.
    pub fields: Map<String, Value>,
}

fn input_err(path: &Path, line: Option<usize>, message: String, hint: &str) -> DistillError {
    DistillError::Input { path: path.to_path_buf(), line, message, hint: hint.into() }
}

fn origin(path: &Path, line: usize) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{name} line {line}")
}

fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Reads every input of a file.
pub fn read_file(f: &FileInputs) -> Result<Vec<Input>, DistillError> {
    let path = &f.path;
    let format = match f.format {
        InputFormat::Auto => {
            match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
                Some("jsonl") | Some("ndjson") => InputFormat::Jsonl,
                Some("csv") => InputFormat::Csv,
                _ => InputFormat::Text,
            }
        }
        other => other,
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        input_err(
            path,
            None,
            format!("cannot read the input file: {e}"),
            "check `distill.inputs.path` (relative to the recipe)",
        )
    })?;
    let mut out = Vec::new();
    match format {
        InputFormat::Jsonl | InputFormat::Auto => {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let n = i + 1;
                let row: Map<String, Value> = serde_json::from_str(line).map_err(|e| {
                    input_err(
                        path,
                        Some(n),
                        format!("not a JSON object ({e})"),
                        "each line of a JSONL file is one JSON object",
                    )
                })?;
                let Some(text) = row.get(&f.field).and_then(as_text) else {
                    let keys: Vec<&str> = row.keys().map(String::as_str).collect();
                    return Err(input_err(
                        path,
                        Some(n),
                        format!("the row has no text field `{}`", f.field),
                        &format!(
                            "set `distill.inputs.field` to the key holding the input; this row has {}",
                            keys.join(", ")
                        ),
                    ));
                };
                let id = row.get("id").and_then(as_text).unwrap_or_else(|| format!("line {n}"));
                out.push(Input { id, origin: origin(path, n), text, fields: row });
            }
        }
        InputFormat::Csv => {
            let mut rdr = csv::ReaderBuilder::new().has_headers(true).from_reader(text.as_bytes());
            let headers = rdr
                .headers()
                .map_err(|e| {
                    input_err(
                        path,
                        Some(1),
                        format!("bad CSV header: {e}"),
                        "the first row names the columns",
                    )
                })?
                .clone();
            let col = headers.iter().position(|h| h == f.field).ok_or_else(|| {
                input_err(
                    path,
                    Some(1),
                    format!("there is no column `{}`", f.field),
                    &format!(
                        "set `distill.inputs.field` to one of: {}",
                        headers.iter().collect::<Vec<_>>().join(", ")
                    ),
                )
            })?;
            for (i, rec) in rdr.records().enumerate() {
                let n = i + 2;
                let rec = rec.map_err(|e| {
                    input_err(path, Some(n), format!("bad CSV row: {e}"), "quote fields that contain commas")
                })?;
                let mut fields = Map::new();
                for (h, v) in headers.iter().zip(rec.iter()) {
                    fields.insert(h.to_string(), json!(v));
                }
                let text = rec.get(col).unwrap_or("").to_string();
                if text.trim().is_empty() {
                    continue;
                }
                let id = fields.get("id").and_then(as_text).unwrap_or_else(|| format!("line {n}"));
                out.push(Input { id, origin: origin(path, n), text, fields });
            }
        }
        InputFormat::Text => {
            for (i, line) in text.lines().enumerate() {
                if !line.trim().is_empty() {
                    let n = i + 1;
                    out.push(Input {
                        id: format!("line {n}"),
                        origin: origin(path, n),
                        text: line.to_string(),
                        fields: Map::new(),
                    });
                }
            }
        }
    }
    if out.is_empty() {
        return Err(input_err(
            path,
            None,
            "the input file holds no inputs".into(),
            "add one example per line",
        ));
    }
    Ok(out)
}

/// The topic x persona grid of a generate section, with topics from `topics_file` appended.
pub fn grid(g: &GeneratedInputs) -> Result<Vec<(String, String)>, DistillError> {
    let mut topics = g.topics.clone();
    if let Some(p) = &g.topics_file {
        let text = std::fs::read_to_string(p).map_err(|e| {
            input_err(
                p,
                None,
                format!("cannot read the topics file: {e}"),
                "check `distill.inputs.topics_file`",
            )
        })?;
        topics.extend(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string));
    }
    if topics.is_empty() {
        topics.push(String::new());
    }
    let personas = if g.personas.is_empty() { vec![String::new()] } else { g.personas.clone() };
    Ok(topics.iter().flat_map(|t| personas.iter().map(move |p| (t.clone(), p.clone()))).collect())
}

/// Slot `i` of the grid: its topic, persona and sample index.
pub fn slot(grid: &[(String, String)], i: usize) -> (String, String, usize) {
    let (t, p) = &grid[i % grid.len()];
    (t.clone(), p.clone(), i / grid.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, text: &str, field: &str) -> FileInputs {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        FileInputs { path: p, field: field.into(), format: InputFormat::Auto }
    }

    #[test]
    fn jsonl_csv_and_text_files_are_read() {
        let d = tempfile::tempdir().unwrap();
        let j = read_file(&file(
            d.path(),
            "a.jsonl",
            "{\"id\": \"t1\", \"text\": \"hi\", \"n\": 2}\n\n{\"text\": 5}\n",
            "text",
        ))
        .unwrap();
        assert_eq!(j.len(), 2);
        assert_eq!((j[0].id.as_str(), j[0].text.as_str()), ("t1", "hi"));
        assert_eq!(j[0].fields["n"], 2);
        assert_eq!((j[1].id.as_str(), j[1].text.as_str()), ("line 3", "5"));
        let c = read_file(&file(d.path(), "a.csv", "id,text\n1,\"a, b\"\n2,c\n", "text")).unwrap();
        assert_eq!(c[0].text, "a, b");
        assert_eq!(c[1].id, "2");
        let t = read_file(&file(d.path(), "a.txt", "one\n\ntwo\n", "ignored")).unwrap();
        assert_eq!(t.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["line 1", "line 3"]);
    }

    #[test]
    fn a_missing_field_names_the_line_and_the_keys_there_are() {
        let d = tempfile::tempdir().unwrap();
        let e = read_file(&file(d.path(), "a.jsonl", "{\"text\": \"a\"}\n{\"body\": \"b\"}\n", "text"))
            .unwrap_err();
        let msg = format!("{e} / {}", e.hint().unwrap());
        assert!(
            msg.contains("a.jsonl line 2") && msg.contains("no text field `text`") && msg.contains("body"),
            "{msg}"
        );
        let e = read_file(&file(d.path(), "b.csv", "a,b\n1,2\n", "text")).unwrap_err();
        assert!(e.hint().unwrap().contains("a, b"), "{e}");
    }

    #[test]
    fn the_grid_crosses_topics_and_personas() {
        let g = GeneratedInputs {
            topics: vec!["x".into(), "y".into()],
            personas: vec!["p".into()],
            ..GeneratedInputs::default()
        };
        let grid = grid(&g).unwrap();
        assert_eq!(grid.len(), 2);
        assert_eq!(slot(&grid, 3), ("y".into(), "p".into(), 1));
        assert_eq!(super::grid(&GeneratedInputs::default()).unwrap(), vec![(String::new(), String::new())]);
    }
}
