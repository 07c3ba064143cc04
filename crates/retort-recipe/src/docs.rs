//! The recipe reference, generated from the schema (and so from the doc comments on the structs):
//! `retort recipe docs` prints it as an annotated TOML file, `retort recipe schema` as JSON Schema for
//! editors (Taplo / Even Better TOML read it through a `#:schema` comment).

use std::fmt::Write as _;
use std::sync::LazyLock;

use serde_json::{Map, Value};

use crate::schema::Recipe;

/// One key of a table.
#[derive(Debug, Clone)]
pub struct KeyDoc {
    /// The key name.
    pub key: String,
    /// Its documentation.
    pub description: String,
    /// The type in words.
    pub value_type: String,
    /// For enumerations: each allowed value and what it means.
    pub choices: Vec<(String, String)>,
    /// The default, when it is a real value (not "required" or "derived").
    pub default: Option<Value>,
}

/// One table of the recipe (`[train]`, `[[distill.filters]]` with `kind = "dedup"`, ...).
#[derive(Debug, Clone)]
pub struct TableDoc {
    /// Dotted header, e.g. `distill.output`.
    pub header: String,
    /// True for an array of tables (`[[...]]`).
    pub array: bool,
    /// For variants chosen by a tag key: the key and the value.
    pub selector: Option<(String, String)>,
    /// What the table is for.
    pub description: String,
    /// Its keys.
    pub keys: Vec<KeyDoc>,
}

/// The recipe's JSON Schema.
pub fn json_schema() -> Value {
    let mut schema = schemars::schema_for!(Recipe).to_value();
    if let Some(obj) = schema.as_object_mut() {
        obj.insert("title".into(), Value::String("retort recipe".into()));
    }
    schema
}

static REFERENCE: LazyLock<Vec<TableDoc>> = LazyLock::new(|| {
    let schema = json_schema();
    let empty = Map::new();
    let defs = schema.get("$defs").and_then(Value::as_object).unwrap_or(&empty);
    let mut out = Vec::new();
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            let r = resolve(prop, defs);
            let desc = describe(r).or_else(|| describe(prop)).unwrap_or_default();
            table(name, r, desc, false, None, defs, &mut out);
        }
    }
    out
});

/// Every table of the recipe with its keys, in schema order.
pub fn reference() -> &'static [TableDoc] {
    &REFERENCE
}

/// The tables (as they would be written, e.g. "`[train]`") that have a key named `key`.
pub fn sections_with_key(key: &str) -> Vec<String> {
    reference()
        .iter()
        .filter(|t| t.keys.iter().any(|k| k.key == key))
        .map(|t| match (&t.selector, t.array) {
            (Some((tk, tv)), true) => format!("`[[{}]]` with `{tk} = \"{tv}\"`", t.header),
            (Some((tk, tv)), false) => format!("`[{}]` with `{tk} = \"{tv}\"`", t.header),
            (None, _) => format!("`[{}]`", t.header),
        })
        .collect()
}

fn describe(v: &Value) -> Option<String> {
    v.get("description").and_then(Value::as_str).map(str::to_string)
}

/// Follows `$ref` and unwraps `Option` (`anyOf [X, null]`).
fn resolve<'a>(v: &'a Value, defs: &'a Map<String, Value>) -> &'a Value {
    if let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/$defs/");
        if let Some(d) = defs.get(name) {
            return resolve(d, defs);
        }
    }
    if let Some(any) = v.get("anyOf").and_then(Value::as_array) {
        let non_null: Vec<&Value> =
            any.iter().filter(|x| x.get("type").and_then(Value::as_str) != Some("null")).collect();
        if let [only] = non_null.as_slice() {
            return resolve(only, defs);
        }
    }
    v
}

fn is_table(v: &Value) -> bool {
    v.get("properties").is_some()
}

/// Variants chosen by a tag key: `oneOf` of objects whose `tag` property is a `const`.
fn tagged_variants(v: &Value) -> Option<Vec<(String, String, &Value)>> {
    let variants = v.get("oneOf")?.as_array()?;
    let mut out = Vec::new();
    for var in variants {
        let props = var.get("properties")?.as_object()?;
        let (tag, value) = props
            .iter()
            .find_map(|(k, p)| p.get("const").and_then(Value::as_str).map(|c| (k.clone(), c.to_string())))?;
        out.push((tag, value, var));
    }
    Some(out)
}

/// A nested table found while walking a table: header, schema, description, array-ness, selector.
type SubTable<'a> = (String, &'a Value, String, bool, Option<(String, String)>);

fn table(
    header: &str,
    schema: &Value,
    description: String,
    array: bool,
    selector: Option<(String, String)>,
    defs: &Map<String, Value>,
    out: &mut Vec<TableDoc>,
) {
    let mut keys = Vec::new();
    let mut subs: Vec<SubTable<'_>> = Vec::new();
    let empty = Map::new();
    let props = schema.get("properties").and_then(Value::as_object).unwrap_or(&empty);
    for (key, prop) in props {
        if selector.as_ref().is_some_and(|(tag, _)| tag == key) {
            continue;
        }
        let r = resolve(prop, defs);
        let desc = describe(prop).or_else(|| describe(r)).unwrap_or_default();
        let path = format!("{header}.{key}");
        let items = r.get("items").map(|i| resolve(i, defs));
        if is_table(r) {
            subs.push((path, r, desc, false, None));
        } else if let Some(vars) = items.and_then(tagged_variants) {
            for (tag, value, var) in vars {
                let d = describe(var).unwrap_or_default();
                subs.push((path.clone(), var, d, true, Some((tag, value))));
            }
        } else if let Some(vars) = tagged_variants(r) {
            for (tag, value, var) in vars {
                let d = describe(var).unwrap_or_default();
                subs.push((path.clone(), var, d, false, Some((tag, value))));
            }
        } else {
            keys.push(leaf(key, prop, r, items, desc));
        }
    }
    out.push(TableDoc { header: header.to_string(), array, selector, description, keys });
    for (path, s, d, arr, sel) in subs {
        table(&path, s, d, arr, sel, defs, out);
    }
}

fn enum_choices(v: &Value) -> Vec<(String, String)> {
    v.get("oneOf")
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .filter_map(|x| {
                    Some((x.get("const")?.as_str()?.to_string(), describe(x).unwrap_or_default()))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn leaf(key: &str, prop: &Value, r: &Value, items: Option<&Value>, description: String) -> KeyDoc {
    let ty = r.get("type");
    let type_word = |t: Option<&Value>| -> String {
        match t {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(a)) => {
                a.iter().filter_map(Value::as_str).filter(|s| *s != "null").collect::<Vec<_>>().join(" or ")
            }
            _ => "table".into(),
        }
    };
    let mut choices = enum_choices(r);
    let value_type = if !choices.is_empty() {
        "string".to_string()
    } else if let Some(items) = items {
        choices = enum_choices(items);
        let inner = if choices.is_empty() {
            match describe(items) {
                Some(d) if items.get("type").and_then(Value::as_str) == Some("string") => d,
                _ => type_word(items.get("type")),
            }
        } else {
            "string".into()
        };
        format!("array of {inner}")
    } else if r.get("anyOf").is_some()
        || (ty.is_some_and(|t| t == "string") && describe(r).is_some() && r != prop)
    {
        describe(r).unwrap_or_else(|| type_word(ty))
    } else {
        let t = type_word(ty);
        if t == "number" || t == "integer" {
            format!("{t} ({})", r.get("format").and_then(Value::as_str).unwrap_or(""))
        } else {
            t
        }
    };
    let value_type =
        value_type.replace(" (double)", "").replace(" (uint32)", " >= 0").replace(" (uint64)", " >= 0");
    let default = prop.get("default").filter(|d| match d {
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        _ => true,
    });
    KeyDoc { key: key.to_string(), description, value_type, choices, default: default.cloned() }
}

/// A JSON value written as a TOML inline value.
pub fn toml_inline(v: &Value) -> String {
    match v {
        Value::String(s) => serde_json::to_string(s).unwrap_or_default(),
        Value::Array(a) => format!("[{}]", a.iter().map(toml_inline).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => {
            if o.is_empty() {
                "{}".into()
            } else {
                let parts: Vec<String> = o.iter().map(|(k, v)| format!("{k} = {}", toml_inline(v))).collect();
                format!("{{ {} }}", parts.join(", "))
            }
        }
        Value::Number(n) => {
            let s = n.to_string();
            if n.is_f64() && !s.contains(['.', 'e', 'E']) { format!("{s}.0") } else { s }
        }
        other => other.to_string(),
    }
}

fn comment_block(out: &mut String, text: &str) {
    for line in text.lines() {
        if line.trim().is_empty() {
            out.push_str("#\n");
        } else {
            let _ = writeln!(out, "# {}", line.trim_end());
        }
    }
}

/// The whole reference as an annotated TOML file: every table, every key with its documentation, type,
/// allowed values and default. Keys without a plain default are commented out.
pub fn render_reference() -> String {
    let mut out = String::new();
    out.push_str(
        "# retort recipe reference: every section and key, with its default.\n\
         # Generated from the schema by `retort recipe docs`; `retort recipe schema` prints the same as JSON Schema.\n\
         # Keys shown commented out have no plain default: they are required, optional, or derived (see their text).\n",
    );
    for t in reference() {
        out.push('\n');
        let bar = "#".repeat(100);
        let _ = writeln!(out, "{bar}");
        comment_block(&mut out, &t.description);
        if t.array {
            let _ = writeln!(out, "[[{}]]", t.header);
        } else {
            let _ = writeln!(out, "[{}]", t.header);
        }
        if let Some((k, v)) = &t.selector {
            let _ = writeln!(out, "{k} = \"{v}\"");
        }
        let alternative = !t.array
            && t.selector.is_some()
            && reference().iter().take_while(|o| !std::ptr::eq(*o, t)).any(|o| o.header == t.header);
        if alternative {
            // A second variant of the same table: an alternative to the first, shown commented out.
            let start = out.rfind(&bar).map_or(out.len(), |i| i + bar.len() + 1);
            let block = out.split_off(start);
            let _ = writeln!(out, "# Alternatively:");
            for line in block.lines() {
                if line.starts_with('#') {
                    let _ = writeln!(out, "{line}");
                } else {
                    let _ = writeln!(out, "# {line}");
                }
            }
        }
        for k in &t.keys {
            out.push('\n');
            comment_block(&mut out, &k.description);
            let _ = writeln!(out, "# type: {}", k.value_type);
            for (value, doc) in &k.choices {
                if doc.is_empty() {
                    let _ = writeln!(out, "#   \"{value}\"");
                } else {
                    let _ = writeln!(out, "#   \"{value}\": {}", doc.replace('\n', " "));
                }
            }
            match &k.default {
                Some(d) if alternative => {
                    let _ = writeln!(out, "# {} = {}", k.key, toml_inline(d));
                }
                Some(d) => {
                    let _ = writeln!(out, "{} = {}", k.key, toml_inline(d));
                }
                None => {
                    let _ = writeln!(out, "# {} = ...", k.key);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_documented() {
        let mut undocumented = Vec::new();
        for t in reference() {
            if t.description.trim().is_empty() {
                undocumented.push(format!("[{}]", t.header));
            }
            for k in &t.keys {
                if k.description.trim().is_empty() {
                    undocumented.push(format!("{}.{}", t.header, k.key));
                }
            }
        }
        assert!(undocumented.is_empty(), "keys without documentation: {undocumented:?}");
    }

    #[test]
    fn reference_covers_sections_and_variants() {
        let headers: Vec<String> = reference().iter().map(|t| t.header.clone()).collect();
        for s in crate::schema::SECTIONS {
            assert!(headers.iter().any(|h| h == s), "missing section {s}");
        }
        let filters: Vec<_> = reference()
            .iter()
            .filter(|t| t.header == "distill.filters")
            .filter_map(|t| t.selector.as_ref().map(|s| s.1.clone()))
            .collect();
        assert_eq!(
            filters,
            ["json_schema", "length", "regex", "dedup", "judge", "decontaminate", "self_consistency"]
        );
        assert_eq!(sections_with_key("lr"), ["`[train]`"]);
    }

    #[test]
    fn rendered_reference_is_valid_toml() {
        // The reference is itself TOML (commented-out keys aside); it must parse.
        let text = render_reference();
        // Array-of-tables headers repeat; a TOML parser accepts that.
        let parsed: Result<toml::Table, _> = toml::from_str(&text);
        assert!(parsed.is_ok(), "{:?}", parsed.err());
        assert!(text.contains("[train]\n"));
        assert!(text.contains("lr = 0.0002"));
    }
}
