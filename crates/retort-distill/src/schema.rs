//! A JSON Schema validator for the subset structured outputs use: `type` (one or a list), `enum`,
//! `const`, `properties`, `required`, `additionalProperties`, `items`, `minItems`/`maxItems`,
//! `minLength`/`maxLength`, `minimum`/`maximum`, `pattern`, `anyOf`/`oneOf`/`allOf`, and local
//! `$ref`s into `$defs`/`definitions`. Keywords outside it are ignored, never guessed at.

use serde_json::Value;

/// Validates `v`; the first violation as `path: problem`.
pub fn validate(schema: &Value, v: &Value) -> Result<(), String> {
    check(schema, schema, v, "$", 0)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn is_type(v: &Value, t: &str) -> bool {
    let actual = type_name(v);
    actual == t || (t == "number" && actual == "integer")
}

fn resolve<'a>(root: &'a Value, r: &str) -> Option<&'a Value> {
    let path = r.strip_prefix("#")?;
    let mut cur = root;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        cur = cur.get(part.replace("~1", "/").replace("~0", "~"))?;
    }
    Some(cur)
}

fn check(root: &Value, s: &Value, v: &Value, at: &str, depth: usize) -> Result<(), String> {
    if depth > 64 {
        return Err(format!("{at}: the schema nests too deeply (a $ref cycle?)"));
    }
    let Value::Object(s) = s else { return Ok(()) };
    if let Some(Value::String(r)) = s.get("$ref") {
        let target =
            resolve(root, r).ok_or_else(|| format!("{at}: the schema's $ref `{r}` points nowhere"))?;
        check(root, target, v, at, depth + 1)?;
    }
    match s.get("type") {
        Some(Value::String(t)) if !is_type(v, t) => {
            return Err(format!("{at}: expected {t}, found {}", type_name(v)));
        }
        Some(Value::Array(ts)) if !ts.iter().any(|t| t.as_str().is_some_and(|t| is_type(v, t))) => {
            let names: Vec<&str> = ts.iter().filter_map(Value::as_str).collect();
            return Err(format!("{at}: expected {}, found {}", names.join(" or "), type_name(v)));
        }
        _ => {}
    }
    if let Some(Value::Array(options)) = s.get("enum")
        && !options.contains(v)
    {
        return Err(format!("{at}: {v} is not one of {}", Value::Array(options.clone())));
    }
    if let Some(c) = s.get("const")
        && c != v
    {
        return Err(format!("{at}: expected {c}, found {v}"));
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(subs)) = s.get(key) {
            let results: Vec<Result<(), String>> =
                subs.iter().map(|sub| check(root, sub, v, at, depth + 1)).collect();
            let ok = results.iter().filter(|r| r.is_ok()).count();
            let pass = match key {
                "allOf" => ok == subs.len(),
                "anyOf" => ok >= 1,
                _ => ok == 1,
            };
            if !pass {
                let first = results.into_iter().find_map(Result::err).unwrap_or_default();
                return Err(if key == "allOf" {
                    first
                } else {
                    format!("{at}: matches no allowed alternative ({first})")
                });
            }
        }
    }
    match v {
        Value::Object(o) => {
            if let Some(Value::Array(req)) = s.get("required") {
                for r in req.iter().filter_map(Value::as_str) {
                    if !o.contains_key(r) {
                        return Err(format!("{at}: missing required property `{r}`"));
                    }
                }
            }
            let props = s.get("properties").and_then(Value::as_object);
            for (k, x) in o {
                match props.and_then(|p| p.get(k)) {
                    Some(ps) => check(root, ps, x, &format!("{at}.{k}"), depth + 1)?,
                    None => match s.get("additionalProperties") {
                        Some(Value::Bool(false)) => return Err(format!("{at}: unexpected property `{k}`")),
                        Some(extra @ Value::Object(_)) => {
                            check(root, extra, x, &format!("{at}.{k}"), depth + 1)?
                        }
                        _ => {}
                    },
                }
            }
        }
        Value::Array(a) => {
            if let Some(items) = s.get("items") {
                for (i, x) in a.iter().enumerate() {
                    check(root, items, x, &format!("{at}[{i}]"), depth + 1)?;
                }
            }
            if let Some(n) = s.get("minItems").and_then(Value::as_u64)
                && (a.len() as u64) < n
            {
                return Err(format!("{at}: {} items, at least {n} needed", a.len()));
            }
            if let Some(n) = s.get("maxItems").and_then(Value::as_u64)
                && (a.len() as u64) > n
            {
                return Err(format!("{at}: {} items, at most {n} allowed", a.len()));
            }
        }
        Value::String(t) => {
            let chars = t.chars().count() as u64;
            if let Some(n) = s.get("minLength").and_then(Value::as_u64)
                && chars < n
            {
                return Err(format!("{at}: shorter than {n} characters"));
            }
            if let Some(n) = s.get("maxLength").and_then(Value::as_u64)
                && chars > n
            {
                return Err(format!("{at}: longer than {n} characters"));
            }
            if let Some(Value::String(p)) = s.get("pattern")
                && let Ok(re) = regex::Regex::new(p)
                && !re.is_match(t)
            {
                return Err(format!("{at}: does not match the pattern `{p}`"));
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if let Some(m) = s.get("minimum").and_then(Value::as_f64)
                && x < m
            {
                return Err(format!("{at}: {x} is below the minimum {m}"));
            }
            if let Some(m) = s.get("maximum").and_then(Value::as_f64)
                && x > m
            {
                return Err(format!("{at}: {x} is above the maximum {m}"));
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_types_and_refs_are_checked() {
        let s = json!({
            "type": "object",
            "required": ["total", "items"],
            "additionalProperties": false,
            "properties": {
                "total": {"type": "number", "minimum": 0},
                "currency": {"type": ["string", "null"], "enum": ["EUR", "USD", null]},
                "items": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/item"}}
            },
            "$defs": {"item": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}}}
        });
        assert_eq!(validate(&s, &json!({"total": 3, "items": [{"name": "x"}], "currency": null})), Ok(()));
        let bad = [
            (json!({"items": [{"name": "x"}]}), "missing required property `total`"),
            (json!({"total": "3", "items": [{"name": "x"}]}), "$.total: expected number, found string"),
            (json!({"total": -1, "items": [{"name": "x"}]}), "below the minimum"),
            (json!({"total": 1, "items": []}), "at least 1 needed"),
            (json!({"total": 1, "items": [{"name": ""}]}), "$.items[0].name: shorter than 1"),
            (json!({"total": 1, "items": [{"name": "x"}], "extra": 1}), "unexpected property `extra`"),
            (json!({"total": 1, "items": [{"name": "x"}], "currency": "GBP"}), "is not one of"),
        ];
        for (v, want) in bad {
            let e = validate(&s, &v).unwrap_err();
            assert!(e.contains(want), "{v}: {e}");
        }
    }

    #[test]
    fn alternatives_and_integers() {
        let s = json!({"anyOf": [{"type": "integer"}, {"type": "string", "pattern": "^[a-z]+$"}]});
        assert!(validate(&s, &json!(3)).is_ok());
        assert!(validate(&s, &json!(3.0)).is_ok());
        assert!(validate(&s, &json!("abc")).is_ok());
        assert!(validate(&s, &json!("ABC")).is_err());
        assert!(validate(&s, &json!(3.5)).is_err());
    }
}
