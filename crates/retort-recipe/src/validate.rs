//! Value ranges and cross-field rules, checked on the deserialized (and resolved) recipe. Every rule
//! points at the key the user wrote, or at the section when the value is a default.

use std::collections::HashSet;
use std::fmt::Display;
use std::path::Path;

use crate::diag::Diagnostic;
use crate::schema::Recipe;
use crate::schema::distill::{Filter, Inputs, OutputKind};
use crate::schema::eval::{Compare, Metric};
use crate::schema::lora::Target;
use crate::schema::project::Quantize;
use crate::schema::teacher::Provider;
use crate::source::Source;
use crate::tree::{KeyPath, Node, Span};
use crate::types::{Device, ExportFormat, ModelRef};

/// Bounds of an allowed range; `*_open` makes a bound exclusive.
#[derive(Clone, Copy)]
struct Interval {
    lo: f64,
    hi: f64,
    lo_open: bool,
    hi_open: bool,
}

struct Ctx<'a> {
    tree: &'a Node,
    diags: Vec<Diagnostic>,
}

impl Ctx<'_> {
    fn written(&self, path: &str) -> bool {
        self.tree.has(&KeyPath::parse(path))
    }

    /// `array[i]` with `i` translated to the element's index in the file.
    fn elem(&self, array: &str, i: usize) -> String {
        format!("{array}[{}]", self.tree.file_index(&KeyPath::parse(array), i))
    }

    fn span(&self, path: &str) -> Option<Span> {
        self.tree.nearest_span(&KeyPath::parse(path))
    }

    /// The value as found, marked when it is a default the user did not write.
    fn found(&self, path: &str, v: impl Display) -> String {
        if self.written(path) { v.to_string() } else { format!("{v} (the default)") }
    }

    fn error(&mut self, code: &'static str, path: &str, message: impl Into<String>) -> DiagMut<'_> {
        let mut d = Diagnostic::error(code, message).path(path);
        d.span = self.span(path);
        let i = self.diags.len();
        self.diags.push(d);
        DiagMut(&mut self.diags[i])
    }

    fn warn(&mut self, code: &'static str, path: &str, message: impl Into<String>) -> DiagMut<'_> {
        let mut d = Diagnostic::warning(code, message).path(path);
        d.span = self.span(path);
        let i = self.diags.len();
        self.diags.push(d);
        DiagMut(&mut self.diags[i])
    }

    /// A number that must lie in a range; `lo_open`/`hi_open` make a bound exclusive.
    fn range(&mut self, path: &str, v: f64, iv: Interval, hint: &str) {
        let Interval { lo, hi, lo_open, hi_open } = iv;
        let below = if lo_open { v <= lo } else { v < lo };
        let above = if hi_open { v >= hi } else { v > hi };
        if v.is_nan() || below || above {
            let l = if lo_open { "(" } else { "[" };
            let h = if hi_open { ")" } else { "]" };
            let hi_s = if hi.is_infinite() { "inf".to_string() } else { hi.to_string() };
            let expected = if hi.is_infinite() {
                if lo_open { format!("a number > {lo}") } else { format!("a number >= {lo}") }
            } else {
                format!("a number in {l}{lo}, {hi_s}{h}")
            };
            let found = self.found(path, v);
            let d = self
                .error("range", path, format!("`{path}` is out of range"))
                .found(found)
                .expected(expected);
            if !hint.is_empty() {
                d.hint(hint.to_string());
            }
        }
    }

    /// An integer that must be at least `min`.
    fn at_least(&mut self, path: &str, v: u64, min: u64, hint: &str) {
        if v < min {
            let found = self.found(path, v);
            let d = self
                .error("range", path, format!("`{path}` must be at least {min}"))
                .found(found)
                .expected(format!("a whole number >= {min}"));
            if !hint.is_empty() {
                d.hint(hint.to_string());
            }
        }
    }

    fn required_str(&mut self, path: &str, v: &str, example: &str) {
        if v.trim().is_empty() {
            let msg = if self.written(path) {
                format!("`{path}` must not be empty")
            } else {
                format!("missing required key `{path}`")
            };
            let key = KeyPath::parse(path);
            let last = key.last_key().unwrap_or("").to_string();
            self.error("missing-key", path, msg).hint(format!("add `{last} = {example}`"));
        }
    }

    fn file_should_exist(&mut self, path: &str, p: &Path, what: &str) {
        if p.as_os_str().is_empty() {
            return;
        }
        if !p.exists() {
            self.warn("missing-file", path, format!("{what} `{}` does not exist (yet)", p.display())).hint("the stage that reads it will fail unless it exists by then; paths are relative to the recipe file");
        } else if p.is_dir() {
            self.error("not-a-file", path, format!("{what} `{}` is a directory", p.display()))
                .hint("point at a file");
        }
    }
}

/// Fills in a diagnostic already in the list.
struct DiagMut<'a>(&'a mut Diagnostic);

impl DiagMut<'_> {
    fn found(self, f: impl Into<String>) -> Self {
        self.0.found = Some(f.into());
        self
    }
    fn expected(self, e: impl Into<String>) -> Self {
        self.0.expected = Some(e.into());
        self
    }
    fn hint(self, h: impl Into<String>) -> Self {
        self.0.hint = Some(h.into());
        self
    }
}

fn is_slug(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
}

fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// Runs every semantic rule.
pub(crate) fn validate(r: &Recipe, tree: &Node, source: &Source) -> Vec<Diagnostic> {
    let mut c = Ctx { tree, diags: Vec::new() };
    project(&mut c, r, source);
    base(&mut c, r);
    teacher(&mut c, r);
    distill(&mut c, r);
    lora(&mut c, r);
    train(&mut c, r);
    eval(&mut c, r);
    export(&mut c, r);
    c.diags
}

fn project(c: &mut Ctx<'_>, r: &Recipe, source: &Source) {
    if !is_slug(&r.project.name) {
        let from_file = !c.written("project.name");
        let msg = if from_file {
            format!("the project name taken from the file name, `{}`, is not a valid name", r.project.name)
        } else {
            "`project.name` is not a valid name".to_string()
        };
        let _ = source;
        let d = c
            .error("value", "project.name", msg)
            .found(format!("\"{}\"", r.project.name))
            .expected("1-64 lowercase letters, digits, `-`, `_` or `.`, starting with a letter or digit");
        d.hint(if from_file {
            "set `name = \"...\"` under `[project]`".into()
        } else {
            format!("e.g. \"{}\"", slugify(&r.project.name))
        });
    }
}

fn slugify(s: &str) -> String {
    let mut out: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    let out = out.trim_matches('-').to_string();
    if out.is_empty() { "my-task".into() } else { out }
}

fn base(c: &mut Ctx<'_>, r: &Recipe) {
    match &r.base.model {
        ModelRef::Hub { repo } if repo.is_empty() => {
            c.error("missing-key", "base.model", "missing required key `base.model`").hint(
                "add `model = \"Qwen/Qwen2.5-1.5B-Instruct\"` (a hub id), a local directory, or \
                 \"builtin:tiny-llama\" under `[base]`",
            );
        }
        ModelRef::Local(p) => {
            if !p.exists() {
                c.warn(
                    "missing-file",
                    "base.model",
                    format!("model directory `{}` does not exist (yet)", p.display()),
                )
                .hint("a hub id is written `org/name`; local paths are relative to the recipe file");
            } else if !p.is_dir() {
                c.error("not-a-dir", "base.model", format!("`{}` is not a directory", p.display()))
                    .hint("point at the model's directory (the one holding `config.json`)");
            } else if !p.join("config.json").is_file() {
                c.warn("missing-file", "base.model", format!("`{}` has no `config.json`", p.display()))
                    .hint("a model directory in Hugging Face format holds `config.json` and `*.safetensors`");
            }
        }
        _ => {}
    }
    if c.written("base.revision") && !matches!(r.base.model, ModelRef::Hub { .. }) {
        c.warn("ignored", "base.revision", "`base.revision` only applies to hub models; it is ignored here");
    }
    if c.written("base.double_quant") && r.base.quantize == Quantize::None {
        c.warn(
            "ignored",
            "base.double_quant",
            "`base.double_quant` has no effect without `quantize = \"nf4\"`",
        );
    }
    if let Some(t) = &r.base.chat_template {
        c.file_should_exist("base.chat_template", t, "chat template");
    }
}

fn teacher(c: &mut Ctx<'_>, r: &Recipe) {
    let Some(t) = &r.teacher else { return };
    if t.provider != Provider::Replay {
        c.required_str("teacher.model", &t.model, "\"gpt-5-mini\"");
    }
    match (&t.base_url, t.provider) {
        (None, Provider::OpenaiCompatible) => {
            c.error("missing-key", "teacher.base_url", "`provider = \"openai-compatible\"` needs `teacher.base_url`")
                .hint(
                "e.g. `base_url = \"http://localhost:8000/v1\"` (vLLM) or \"http://localhost:11434/v1\" (Ollama)");
        }
        (Some(url), p) => {
            if p == Provider::Replay && c.written("teacher.base_url") {
                c.warn("ignored", "teacher.base_url", "`teacher.base_url` is ignored by the replay provider");
            } else if !(url.starts_with("http://") || url.starts_with("https://")) {
                c.error("value", "teacher.base_url", "`teacher.base_url` is not an http(s) URL")
                    .found(format!("\"{url}\""))
                    .expected("a URL starting with `http://` or `https://`");
            }
        }
        _ => {}
    }
    if let Some(env) = &t.api_key_env {
        if !is_env_name(env) {
            c.error(
                "value",
                "teacher.api_key_env",
                "`teacher.api_key_env` is not an environment variable name",
            )
            .found(format!("\"{env}\""))
            .expected("letters, digits and `_`, e.g. \"OPENAI_API_KEY\"");
        } else if t.provider == Provider::Replay && c.written("teacher.api_key_env") {
            c.warn(
                "ignored",
                "teacher.api_key_env",
                "`teacher.api_key_env` is ignored by the replay provider",
            );
        }
    }
    match (&t.transcript, t.provider) {
        (None, Provider::Replay) => {
            c.error(
                "missing-key",
                "teacher.transcript",
                "`provider = \"replay\"` needs `teacher.transcript`",
            )
            .hint("add `transcript = \"path/to/transcript.jsonl\"` (relative to the recipe)");
        }
        (Some(p), Provider::Replay) => c.file_should_exist("teacher.transcript", p, "transcript"),
        (Some(_), _) => {
            c.warn(
                "ignored",
                "teacher.transcript",
                "`teacher.transcript` is only used with `provider = \"replay\"`",
            );
        }
        _ => {}
    }
    c.at_least("teacher.max_concurrency", t.max_concurrency.into(), 1, "");
    if let Some(rpm) = t.requests_per_minute {
        c.at_least("teacher.requests_per_minute", rpm.into(), 1, "remove the key for no cap");
    }
    if let Some(tpm) = t.tokens_per_minute {
        c.at_least("teacher.tokens_per_minute", tpm.into(), 1, "remove the key for no cap");
    }
    if t.timeout.0.is_zero() {
        c.error("range", "teacher.timeout", "`teacher.timeout` must be longer than zero");
    }
    if t.stall_timeout <= t.timeout {
        c.warn(
            "range",
            "teacher.stall_timeout",
            "`teacher.stall_timeout` is not longer than `teacher.timeout`",
        )
        .found(t.stall_timeout.to_string())
        .hint("a single slow request would stop the run; make it several times the timeout");
    }
    if t.batch && !t.provider.has_batch_api() {
        c.error(
            "cross-field",
            "teacher.batch",
            format!("`teacher.batch = true` is not available for `{}`", t.provider.as_str()),
        )
        .expected("`provider = \"openai\"` or `\"anthropic\"`")
        .hint("batch APIs exist only at OpenAI and Anthropic; set `batch = false`");
    }
    if let Some(b) = t.budget_usd {
        c.range(
            "teacher.budget_usd",
            b,
            Interval { lo: 0.0, hi: f64::INFINITY, lo_open: true, hi_open: false },
            "",
        );
    }
    if let Some(p) = &t.price {
        c.range(
            "teacher.price.input_per_mtok",
            p.input_per_mtok,
            Interval { lo: 0.0, hi: f64::INFINITY, lo_open: false, hi_open: false },
            "",
        );
        c.range(
            "teacher.price.output_per_mtok",
            p.output_per_mtok,
            Interval { lo: 0.0, hi: f64::INFINITY, lo_open: false, hi_open: false },
            "",
        );
        if let Some(x) = p.cached_input_per_mtok {
            c.range(
                "teacher.price.cached_input_per_mtok",
                x,
                Interval { lo: 0.0, hi: f64::INFINITY, lo_open: false, hi_open: false },
                "",
            );
        }
        c.range(
            "teacher.price.batch_discount",
            p.batch_discount,
            Interval { lo: 0.0, hi: 1.0, lo_open: true, hi_open: false },
            "0.5 means half price",
        );
    }
    c.range(
        "teacher.temperature",
        t.temperature,
        Interval { lo: 0.0, hi: 2.0, lo_open: false, hi_open: false },
        "",
    );
    c.at_least("teacher.max_tokens", t.max_tokens.into(), 1, "");
}

fn template(c: &mut Ctx<'_>, path: &str, text: &str, must_use: &[&str]) {
    let env = minijinja::Environment::new();
    match env.template_from_str(text) {
        Err(e) => {
            let line = e.line().map(|l| format!(" (line {l} of the template)")).unwrap_or_default();
            c.error("template", path, format!("`{path}` is not a valid Jinja template{line}"))
                .found(e.detail().unwrap_or("a syntax error").to_string())
                .hint("templates use Jinja syntax: `{{ input }}` inserts a variable");
        }
        Ok(t) => {
            let vars = t.undeclared_variables(false);
            if !must_use.is_empty() && !must_use.iter().any(|v| vars.contains(*v)) {
                let names =
                    must_use.iter().map(|v| format!("`{{{{ {v} }}}}`")).collect::<Vec<_>>().join(" or ");
                c.warn("template", path, format!("`{path}` never uses {names}"))
                    .hint("every request would be the same; insert the variable where the input belongs");
            }
        }
    }
}

fn distill(c: &mut Ctx<'_>, r: &Recipe) {
    let Some(d) = &r.distill else {
        let train = r.project.data_dir.join("train.jsonl");
        if !train.exists() {
            c.warn(
                "missing-file",
                "project.data_dir",
                format!("there is no `[distill]` section and `{}` does not exist (yet)", train.display()),
            )
            .hint("add a `[distill]` section, or put your own `train.jsonl` (and `val.jsonl`, `test.jsonl`) there");
        }
        return;
    };
    if r.teacher.is_none() {
        c.error("cross-field", "distill", "`[distill]` needs a `[teacher]` section")
            .hint("add `[teacher]` with `provider` and `model`");
    }
    if d.system_prompt.trim().is_empty() {
        c.warn(
            "missing-key",
            "distill.system_prompt",
            "`distill.system_prompt` is empty: the teacher gets no task description",
        )
        .hint("describe the task in a few sentences: what comes in, what must come out");
    }
    c.at_least("distill.target_examples", d.target_examples.into(), 1, "");
    c.at_least("distill.max_attempts", d.max_attempts.into(), 1, "");
    match &d.inputs {
        Inputs::File(f) => {
            if f.path.as_os_str().is_empty() {
                c.error("missing-key", "distill.inputs.path", "missing required key `distill.inputs.path`")
                    .hint("add `path = \"inputs.jsonl\"` under `[distill.inputs]` (relative to the recipe)");
            } else {
                c.file_should_exist("distill.inputs.path", &f.path, "input file");
            }
            c.required_str("distill.inputs.field", &f.field, "\"input\"");
            template(c, "distill.prompt", &d.prompt, &["input"]);
        }
        Inputs::Generate(g) => {
            c.required_str(
                "distill.inputs.prompt",
                &g.prompt,
                "\"Write one support ticket about {{ topic }}.\"",
            );
            if !g.prompt.trim().is_empty() {
                template(c, "distill.inputs.prompt", &g.prompt, &[]);
            }
            if let Some(p) = &g.topics_file {
                c.file_should_exist("distill.inputs.topics_file", p, "topics file");
            }
            c.range(
                "distill.inputs.oversample",
                g.oversample,
                Interval { lo: 1.0, hi: 10.0, lo_open: false, hi_open: false },
                "1.3 requests 30% more inputs than needed",
            );
            c.range(
                "distill.inputs.temperature",
                g.temperature,
                Interval { lo: 0.0, hi: 2.0, lo_open: false, hi_open: false },
                "",
            );
            template(c, "distill.prompt", &d.prompt, &["input"]);
        }
    }
    output(c, r);
    filters(c, r);
    let s = &d.split;
    for (k, v) in [("train", s.train), ("val", s.val), ("test", s.test)] {
        c.range(
            &format!("distill.split.{k}"),
            v,
            Interval { lo: 0.0, hi: 1.0, lo_open: false, hi_open: false },
            "",
        );
    }
    let sum = s.train + s.val + s.test;
    if (sum - 1.0).abs() > 1e-6 {
        c.error("cross-field", "distill.split", "`distill.split` fractions must add up to 1")
            .found(format!(
                "train {} + val {} + test {} = {}",
                s.train,
                s.val,
                s.test,
                (sum * 1e6).round() / 1e6
            ))
            .expected("a sum of 1")
            .hint("e.g. `split = { train = 0.9, val = 0.05, test = 0.05 }`");
    } else if s.train <= 0.0 {
        c.error("range", "distill.split.train", "`distill.split.train` must be above 0");
    } else {
        let test_rows = (f64::from(d.target_examples) * s.test).floor();
        if s.test == 0.0 {
            c.warn(
                "cross-field",
                "distill.split.test",
                "`distill.split.test` is 0: `retort eval` will have nothing to score",
            );
        } else if test_rows < 30.0 {
            c.warn("cross-field", "distill.split.test", format!("only about {test_rows} test examples"))
                .hint("confidence intervals on fewer than ~30 examples are too wide to gate on; raise `target_examples` or `split.test`");
        }
        if s.val == 0.0 && r.train.eval_every.is_some() {
            c.warn(
                "cross-field",
                "train.eval_every",
                "`train.eval_every` is set but `distill.split.val` is 0",
            );
        }
    }
    for (i, p) in d.exclude.iter().enumerate() {
        let path = c.elem("distill.exclude", i);
        c.file_should_exist(&path, p, "exclude file");
    }
}

/// Paths (below `prefix`) of JSON nulls: TOML has no null, so each one was a `nan` or `inf`, which
/// JSON cannot represent.
fn non_finite_paths(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Null => out.push(prefix.to_string()),
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                non_finite_paths(x, &format!("{prefix}[{i}]"), out);
            }
        }
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                non_finite_paths(x, &format!("{prefix}.{k}"), out);
            }
        }
        _ => {}
    }
}

fn output(c: &mut Ctx<'_>, r: &Recipe) {
    let Some(d) = &r.distill else { return };
    let o = &d.output;
    if let Some(schema) = &o.schema {
        let mut bad = Vec::new();
        non_finite_paths(schema, "distill.output.schema", &mut bad);
        for path in bad {
            c.error("value", &path, format!("`{path}` is not a JSON number"))
                .found("nan or inf")
                .expected("a finite number (JSON has no NaN or infinity)");
        }
    }
    match o.kind {
        OutputKind::Label => {
            if o.labels.is_empty() {
                c.error(
                    "missing-key",
                    "distill.output.labels",
                    "`kind = \"label\"` needs `distill.output.labels`",
                )
                .hint("e.g. `labels = [\"billing\", \"bug\", \"account\"]`");
            } else if o.labels.len() == 1 {
                c.warn("range", "distill.output.labels", "only one label: every answer would be the same");
            }
            let mut seen = HashSet::new();
            for (i, l) in o.labels.iter().enumerate() {
                let p = c.elem("distill.output.labels", i);
                if l.trim().is_empty() {
                    c.error("value", &p, "labels must not be empty");
                } else if l.trim() != l {
                    c.error("value", &p, format!("label {l:?} has leading or trailing whitespace"));
                } else if !seen.insert(l.as_str()) {
                    c.error("value", &p, format!("label \"{l}\" appears twice"));
                }
            }
        }
        OutputKind::Json => match (&o.schema, &o.schema_file) {
            (None, None) => {
                c.error("missing-key", "distill.output", "`kind = \"json\"` needs `schema` or `schema_file`")
                    .hint(
                        "add `schema_file = \"schema.json\"`, or an inline `[distill.output.schema]` table",
                    );
            }
            (Some(_), Some(_)) => {
                c.error(
                    "cross-field",
                    "distill.output.schema_file",
                    "set either `schema` or `schema_file`, not both",
                );
            }
            (Some(s), None) => {
                if !s.is_object() {
                    c.error(
                        "type",
                        "distill.output.schema",
                        "`distill.output.schema` must be a table (a JSON Schema object)",
                    );
                }
            }
            (None, Some(p)) => c.file_should_exist("distill.output.schema_file", p, "schema file"),
        },
        OutputKind::Text => {}
    }
    if o.kind != OutputKind::Label && c.written("distill.output.labels") {
        c.warn("ignored", "distill.output.labels", "`labels` is only used with `kind = \"label\"`");
    }
    if o.kind != OutputKind::Json
        && (c.written("distill.output.schema") || c.written("distill.output.schema_file"))
    {
        c.warn("ignored", "distill.output", "a schema is only used with `kind = \"json\"`");
    }
}

fn filters(c: &mut Ctx<'_>, r: &Recipe) {
    let Some(d) = &r.distill else { return };
    let mut kinds = HashSet::new();
    for (i, f) in d.filters.iter().enumerate() {
        let here = c.elem("distill.filters", i);
        let p = |k: &str| format!("{here}.{k}");
        if !kinds.insert(f.kind()) {
            c.warn("duplicate", &format!("{here}.kind"), format!("a second `{}` filter", f.kind()));
        }
        match f {
            Filter::JsonSchema(_) => {
                if d.output.kind != OutputKind::Json {
                    c.error(
                        "cross-field",
                        &format!("{here}.kind"),
                        "the `json_schema` filter needs `distill.output.kind = \"json\"`",
                    );
                }
            }
            Filter::Length(l) => {
                if l.min_chars.is_none()
                    && l.max_chars.is_none()
                    && l.min_tokens.is_none()
                    && l.max_tokens.is_none()
                {
                    c.error("missing-key", &here, "a `length` filter needs at least one bound")
                        .hint("set `min_chars`, `max_chars`, `min_tokens` or `max_tokens`");
                }
                for (lo, hi, name) in
                    [(l.min_chars, l.max_chars, "chars"), (l.min_tokens, l.max_tokens, "tokens")]
                {
                    if let (Some(lo), Some(hi)) = (lo, hi)
                        && lo > hi
                    {
                        c.error(
                            "cross-field",
                            &p(&format!("min_{name}")),
                            format!("`min_{name}` ({lo}) is above `max_{name}` ({hi})"),
                        );
                    }
                }
            }
            Filter::Regex(x) => {
                if x.must_match.is_empty() && x.must_not_match.is_empty() {
                    c.error("missing-key", &here, "a `regex` filter needs `must_match` or `must_not_match`");
                }
                for (key, list) in [("must_match", &x.must_match), ("must_not_match", &x.must_not_match)] {
                    for (j, pat) in list.iter().enumerate() {
                        if let Err(e) = regex::Regex::new(pat) {
                            let msg = e.to_string();
                            let last = msg
                                .lines()
                                .last()
                                .unwrap_or("")
                                .trim()
                                .trim_start_matches("error: ")
                                .to_string();
                            let path = p(&format!("{key}[{j}]"));
                            c.error("value", &path, format!("`{path}` is not a valid regular expression"))
                                .found(format!("{pat:?}"))
                                .hint(last);
                        }
                    }
                }
            }
            Filter::Dedup(x) => {
                c.range(
                    &p("threshold"),
                    x.threshold,
                    Interval { lo: 0.0, hi: 1.0, lo_open: true, hi_open: false },
                    "0.85 is a common near-duplicate threshold",
                );
                c.at_least(&p("shingle"), x.shingle.into(), 1, "");
                c.at_least(
                    &p("num_perm"),
                    x.num_perm.into(),
                    16,
                    "128 is a good balance of speed and accuracy",
                );
            }
            Filter::Judge(j) => {
                c.required_str(&p("rubric"), &j.rubric, "\"The answer is correct, complete and concise.\"");
                c.at_least(&p("scale"), j.scale.into(), 2, "");
                c.range(
                    &p("min_score"),
                    j.min_score,
                    Interval { lo: 1.0, hi: f64::from(j.scale.max(1)), lo_open: false, hi_open: false },
                    "",
                );
                if r.teacher.is_none() && j.model.is_none() {
                    c.error(
                        "cross-field",
                        &here,
                        "the `judge` filter needs a `[teacher]` (or its own `model`)",
                    );
                }
            }
            Filter::Decontaminate(x) => {
                c.at_least(&p("ngram"), x.ngram.into(), 1, "");
                if (1..5).contains(&x.ngram) {
                    c.warn(
                        "range",
                        &p("ngram"),
                        format!("{}-grams are so short that unrelated texts share them", x.ngram),
                    )
                    .hint("13 is the usual choice");
                }
            }
            Filter::SelfConsistency(x) => {
                c.at_least(&p("n"), x.n.into(), 2, "agreement needs at least two answers");
                c.range(
                    &p("min_agreement"),
                    x.min_agreement,
                    Interval { lo: 0.0, hi: 1.0, lo_open: true, hi_open: false },
                    "",
                );
                if d.output.kind == OutputKind::Text {
                    c.warn(
                        "cross-field",
                        &format!("{here}.kind"),
                        "free-text answers rarely agree word for word",
                    )
                    .hint("self-consistency suits `label` and `json` outputs");
                }
            }
        }
    }
}

fn lora(c: &mut Ctx<'_>, r: &Recipe) {
    let l = &r.lora;
    c.at_least("lora.r", l.r.into(), 1, "8-32 suits most single tasks");
    if l.r > 256 {
        c.warn("range", "lora.r", format!("`lora.r = {}` is unusually large", l.r))
            .hint("ranks above 256 rarely help a single task and cost memory; try 16-64");
    }
    c.range(
        "lora.alpha",
        l.alpha,
        Interval { lo: 0.0, hi: f64::INFINITY, lo_open: true, hi_open: false },
        "a common choice is twice `r`",
    );
    c.range(
        "lora.dropout",
        l.dropout,
        Interval { lo: 0.0, hi: 1.0, lo_open: false, hi_open: true },
        "0.05 is a common choice; 0 is fastest",
    );
    if l.targets.is_empty() {
        c.error("range", "lora.targets", "`lora.targets` is empty: nothing would train")
            .hint("use `targets = [\"all-linear\"]`, or name modules such as \"q_proj\"");
    } else if l.targets.contains(&Target::AllLinear) && l.targets.len() > 1 {
        c.warn("duplicate", "lora.targets", "`all-linear` already covers the other targets listed");
    }
    let mut seen = HashSet::new();
    for (i, t) in l.targets.iter().enumerate() {
        if !seen.insert(*t) {
            let path = c.elem("lora.targets", i);
            c.warn("duplicate", &path, "this target is listed twice");
        }
    }
}

fn train(c: &mut Ctx<'_>, r: &Recipe) {
    let t = &r.train;
    match t.max_steps {
        Some(s) => {
            c.at_least("train.max_steps", s, 1, "");
            if c.written("train.epochs") {
                c.warn(
                    "cross-field",
                    "train.epochs",
                    "`train.max_steps` is set, so `train.epochs` is ignored",
                );
            }
        }
        None => c.at_least("train.epochs", t.epochs.into(), 1, ""),
    }
    c.at_least("train.micro_batch_size", t.micro_batch_size.into(), 1, "");
    c.at_least("train.grad_accum", t.grad_accum.into(), 1, "");
    c.at_least("train.max_seq_len", t.max_seq_len.into(), 32, "");
    c.range(
        "train.lr",
        t.lr,
        Interval { lo: 0.0, hi: f64::INFINITY, lo_open: true, hi_open: false },
        "LoRA learning rates are usually 1e-4 to 3e-4",
    );
    if t.lr.is_finite() && t.lr > 1e-2 {
        c.warn("range", "train.lr", format!("`train.lr = {}` is unusually high for LoRA", t.lr))
            .hint("LoRA learning rates are usually 1e-4 to 3e-4; high rates diverge");
    }
    c.range(
        "train.warmup_ratio",
        t.warmup_ratio,
        Interval { lo: 0.0, hi: 1.0, lo_open: false, hi_open: true },
        "0.03 warms up over the first 3% of steps",
    );
    if t.warmup_steps.is_some() && c.written("train.warmup_ratio") {
        c.warn(
            "cross-field",
            "train.warmup_ratio",
            "`train.warmup_steps` is set, so `train.warmup_ratio` is ignored",
        );
    }
    c.range(
        "train.min_lr_ratio",
        t.min_lr_ratio,
        Interval { lo: 0.0, hi: 1.0, lo_open: false, hi_open: false },
        "",
    );
    c.range(
        "train.weight_decay",
        t.weight_decay,
        Interval { lo: 0.0, hi: f64::INFINITY, lo_open: false, hi_open: false },
        "",
    );
    c.range(
        "train.adam_beta1",
        t.adam_beta1,
        Interval { lo: 0.0, hi: 1.0, lo_open: false, hi_open: true },
        "",
    );
    c.range(
        "train.adam_beta2",
        t.adam_beta2,
        Interval { lo: 0.0, hi: 1.0, lo_open: false, hi_open: true },
        "",
    );
    c.range("train.adam_eps", t.adam_eps, Interval { lo: 0.0, hi: 1.0, lo_open: true, hi_open: false }, "");
    c.range(
        "train.max_grad_norm",
        t.max_grad_norm,
        Interval { lo: 0.0, hi: f64::INFINITY, lo_open: false, hi_open: false },
        "0 turns clipping off",
    );
    if let Some(n) = t.eval_every {
        c.at_least("train.eval_every", n, 1, "");
    }
    if let Some(n) = t.save_every {
        c.at_least("train.save_every", n, 1, "");
    }
    c.at_least("train.keep_last", t.keep_last.into(), 1, "");
    if let Some(m) = t.max_time
        && m.0.is_zero()
    {
        c.error("range", "train.max_time", "`train.max_time` must be longer than zero");
    }
    // What a device can hold depends on the model, which a recipe check does not load: flag only
    // sizes that are large for any model.
    let tokens = u64::from(t.micro_batch_size) * u64::from(t.max_seq_len);
    let path =
        if c.written("train.micro_batch_size") { "train.micro_batch_size" } else { "train.max_seq_len" };
    if t.device == Device::Cpu && tokens > 16_384 {
        c.warn("memory", path, format!("{tokens} tokens per micro-batch is very slow on the CPU"))
            .hint("on the CPU, keep `micro_batch_size` x `max_seq_len` at or below 16384 and raise `grad_accum` instead");
    } else if tokens > 32_768 {
        c.warn("memory", path, format!("{tokens} tokens per micro-batch may not fit in GPU memory"))
            .hint("activations grow with `micro_batch_size` x `max_seq_len`; lower `micro_batch_size` and raise `grad_accum`: the result is the same");
    }
}

fn eval(c: &mut Ctx<'_>, r: &Recipe) {
    let e = &r.eval;
    let kind = r.distill.as_ref().map(|d| d.output.kind);
    for (i, m) in e.metrics.iter().enumerate() {
        let path = c.elem("eval.metrics", i);
        let need = match m {
            Metric::LabelAccuracy | Metric::MacroF1 => Some(OutputKind::Label),
            Metric::FieldAccuracy | Metric::SchemaValidity => Some(OutputKind::Json),
            _ => None,
        };
        if let (Some(need), Some(kind)) = (need, kind)
            && need != kind
        {
            let need_s = if need == OutputKind::Label { "label" } else { "json" };
            c.error(
                "cross-field",
                &path,
                format!("`{}` needs `distill.output.kind = \"{need_s}\"`", m.as_str()),
            );
        }
        if *m == Metric::JudgeWinRate {
            if r.teacher.is_none() {
                c.error("cross-field", &path, "`judge_win_rate` needs a `[teacher]`");
            }
            if !e.compare.contains(&Compare::Teacher) {
                c.error(
                    "cross-field",
                    &path,
                    "`judge_win_rate` compares with the teacher: add \"teacher\" to `eval.compare`",
                );
            }
            match &e.judge {
                Some(j) if !j.rubric.trim().is_empty() => {}
                _ => {
                    c.error("missing-key", "eval.judge.rubric", "`judge_win_rate` needs `eval.judge.rubric`")
                        .hint("add `[eval.judge]` with `rubric = \"...\"`");
                }
            }
        }
    }
    if let Some(p) = e.primary
        && !e.metrics.contains(&p)
    {
        c.error(
            "cross-field",
            "eval.primary",
            format!("`eval.primary = \"{}\"` is not in `eval.metrics`", p.as_str()),
        );
    }
    let mut seen = HashSet::new();
    for (i, m) in e.compare.iter().enumerate() {
        let path = c.elem("eval.compare", i);
        if !seen.insert(*m) {
            c.warn("duplicate", &path, "listed twice");
        }
        match m {
            Compare::Teacher if r.teacher.is_none() => {
                c.error("cross-field", &path, "comparing with the teacher needs a `[teacher]`");
            }
            Compare::Gguf if !r.export.formats.iter().any(|f| matches!(f, ExportFormat::Gguf(_))) => {
                c.error("cross-field", &path, "comparing the GGUF needs a `gguf:TYPE` in `export.formats`");
            }
            _ => {}
        }
    }
    if !e.compare.contains(&Compare::Tuned) {
        c.warn("cross-field", "eval.compare", "`eval.compare` leaves out `tuned`, the model being trained");
    }
    if let Some(n) = e.max_examples {
        c.at_least("eval.max_examples", n.into(), 1, "");
    }
    c.at_least("eval.max_new_tokens", e.max_new_tokens.into(), 1, "");
    c.at_least("eval.batch_size", e.batch_size.into(), 1, "");
    c.at_least("eval.bootstrap", e.bootstrap.into(), 100, "1000 resamples give stable 95% intervals");
    if let Some(usd) = e.hardware_usd_per_hour {
        c.range(
            "eval.hardware_usd_per_hour",
            usd,
            Interval { lo: 0.0, hi: f64::INFINITY, lo_open: false, hi_open: true },
            "the hourly price of the serving machine in US dollars, e.g. 1.2",
        );
    }
    let g = &e.gate;
    if let Some(m) = g.min_score {
        c.range(
            "eval.gate.min_score",
            m,
            Interval { lo: 0.0, hi: 1.0, lo_open: false, hi_open: false },
            "scores are fractions: 0.9 means 90%",
        );
    }
    if let Some(m) = g.min_vs_teacher {
        c.range(
            "eval.gate.min_vs_teacher",
            m,
            Interval { lo: 0.0, hi: 2.0, lo_open: true, hi_open: false },
            "0.95 means within 5% of the teacher",
        );
        if !e.compare.contains(&Compare::Teacher) {
            c.error(
                "cross-field",
                "eval.gate.min_vs_teacher",
                "`eval.gate.min_vs_teacher` needs \"teacher\" in `eval.compare`",
            );
        }
    }
    c.range(
        "eval.gate.max_regression",
        g.max_regression,
        Interval { lo: 0.0, hi: 1.0, lo_open: false, hi_open: false },
        "",
    );
    if c.written("eval.gate.max_regression") && g.max_regression_vs.is_none() {
        c.warn(
            "ignored",
            "eval.gate.max_regression",
            "`max_regression` has no effect without `max_regression_vs`",
        );
    }
}

fn export(c: &mut Ctx<'_>, r: &Recipe) {
    let x = &r.export;
    if x.formats.is_empty() {
        c.warn("range", "export.formats", "`export.formats` is empty: `retort export` will write nothing");
    }
    let mut seen = HashSet::new();
    for (i, f) in x.formats.iter().enumerate() {
        if !seen.insert(f) {
            let path = c.elem("export.formats", i);
            c.warn("duplicate", &path, format!("\"{f}\" is listed twice"));
        }
    }
    if x.formats.contains(&ExportFormat::Ollama)
        && !x.formats.iter().any(|f| matches!(f, ExportFormat::Gguf(_)))
    {
        let i = x.formats.iter().position(|f| *f == ExportFormat::Ollama).unwrap_or(0);
        let path = c.elem("export.formats", i);
        c.error("cross-field", &path, "\"ollama\" needs a GGUF to point at")
            .hint("add a GGUF format such as \"gguf:q4_k_m\" to `export.formats`");
    }
    if let Some(n) = &x.name
        && !is_slug(n)
    {
        c.error("value", "export.name", "`export.name` is not a valid file name stem")
            .found(format!("\"{n}\""))
            .expected("lowercase letters, digits, `-`, `_` or `.`");
    }
    if x.shard_size.0 < 100_000_000 {
        c.warn("range", "export.shard_size", format!("shards of {} make many files", x.shard_size))
            .hint("the hub uses 5GB; below 100MB loaders open hundreds of files");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        assert!(is_slug("support-tickets"));
        assert!(is_slug("a.b_c-1"));
        assert!(!is_slug("Support Tickets"));
        assert!(!is_slug("-x"));
        assert_eq!(slugify("Support Tickets!"), "support-tickets");
    }

    #[test]
    fn env_names() {
        assert!(is_env_name("OPENAI_API_KEY"));
        assert!(!is_env_name("1KEY"));
        assert!(!is_env_name("MY-KEY"));
    }
}
