//! `json.dumps` as Python writes it, because chat templates call `tojson` and transformers' `tojson` is
//! Python's `json.dumps(x, ensure_ascii=False, indent=..., separators=..., sort_keys=...)`: `", "` and
//! `": "` separators, floats in Python's `repr`, non-ASCII left as is. serde_json's compact output
//! differs, and a rendered prompt must match byte for byte.

use std::fmt::Write as _;

use serde_json::Value;

/// Python `json.dumps` options.
#[derive(Debug, Clone)]
pub struct Dumps {
    /// Escape non-ASCII characters as `\uXXXX`.
    pub ensure_ascii: bool,
    /// Pretty-print with this many spaces (Python's `indent`).
    pub indent: Option<String>,
    /// Between items.
    pub item_sep: String,
    /// Between a key and its value.
    pub key_sep: String,
    /// Sort object keys.
    pub sort_keys: bool,
}

impl Default for Dumps {
    fn default() -> Self {
        Dumps {
            ensure_ascii: false,
            indent: None,
            item_sep: ", ".into(),
            key_sep: ": ".into(),
            sort_keys: false,
        }
    }
}

/// Python's `repr(float)`: the shortest string that round-trips, in scientific notation when the
/// exponent is below -4 or at least 16.
pub fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Rust's `{:e}` gives the shortest round-trip digits: d.ddddde±x.
    let e = format!("{x:e}");
    let (mantissa, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if negative { "-" } else { "" };
    if !(-4..16).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        let esign = if exp < 0 { "-" } else { "+" };
        return format!("{sign}{first}{frac}e{esign}{:02}", exp.abs());
    }
    let n = digits.len() as i32;
    if exp >= 0 {
        let int_len = exp + 1;
        if n <= int_len {
            format!("{sign}{digits}{}.0", "0".repeat((int_len - n) as usize))
        } else {
            let (i, f) = digits.split_at(int_len as usize);
            format!("{sign}{i}.{f}")
        }
    } else {
        format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
    }
}

fn string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write(out: &mut String, v: &Value, o: &Dumps, depth: usize) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    };
    // With an indent, Python drops the trailing space of the item separator.
    let item_sep = if o.indent.is_some() { o.item_sep.trim_end() } else { o.item_sep.as_str() };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Some(u) = n.as_u64() {
                let _ = write!(out, "{u}");
            } else {
                out.push_str(&py_float(n.as_f64().unwrap_or(0.0)));
            }
        }
        Value::String(s) => string(out, s, o.ensure_ascii),
        Value::Array(a) => {
            if a.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write(out, x, o, depth + 1);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(m) => {
            if m.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            if o.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                string(out, k, o.ensure_ascii);
                out.push_str(&o.key_sep);
                write(out, x, o, depth + 1);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

/// Serialises like Python's `json.dumps`.
pub fn dumps(v: &Value, o: &Dumps) -> String {
    let mut out = String::new();
    write(&mut out, v, o, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn floats_print_like_python() {
        for (x, py) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (123456789.0, "123456789.0"),
            (1e16, "1e+16"),
            (1.5e300, "1.5e+300"),
            (-2.5, "-2.5"),
            (4.56789, "4.56789"),
            (1e15, "1000000000000000.0"),
        ] {
            assert_eq!(py_float(x), py, "{x}");
        }
    }

    #[test]
    fn dumps_like_python() {
        let v = json!({"name": "café \"x\"\n", "n": 1, "f": 2.0, "l": [1, {"a": null}], "e": {}});
        assert_eq!(
            dumps(&v, &Dumps::default()),
            r#"{"name": "café \"x\"\n", "n": 1, "f": 2.0, "l": [1, {"a": null}], "e": {}}"#
        );
        let pretty = Dumps { indent: Some("    ".into()), ..Dumps::default() };
        assert_eq!(dumps(&json!({"a": [1, 2]}), &pretty), "{\n    \"a\": [\n        1,\n        2\n    ]\n}");
        let ascii = Dumps { ensure_ascii: true, ..Dumps::default() };
        assert_eq!(dumps(&json!("é🙂"), &ascii), "\"\\u00e9\\ud83d\\ude42\"");
    }
}
