//! The Modelfile templates produce the same prompt as the models' own chat templates: each family's
//! Go template is rendered by a small interpreter of the Go template subset it uses (below) and
//! compared with the Jinja template rendered by minijinja, on several conversations. Run on the
//! fixture models' templates always, and on the real templates of shared/assets when present.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stderr)] // tests

use std::path::PathBuf;

use retort_export::ollama::Family;

// ------------------------------------------------------------------ a Go template subset interpreter

#[derive(Debug)]
enum Node {
    Text(String),
    Out(String),
    Assign(String, String),
    If(Vec<(String, Vec<Node>)>, Vec<Node>),
    Range(Vec<Node>),
}

/// Splits into text and actions, applying `{{-` / `-}}` whitespace trimming.
fn lex(src: &str) -> Vec<(bool, String)> {
    let mut out: Vec<(bool, String)> = Vec::new();
    let mut rest = src;
    let mut trim_next = false;
    while let Some(start) = rest.find("{{") {
        let mut text = rest[..start].to_string();
        if trim_next {
            text = text.trim_start().to_string();
        }
        let end = rest[start..].find("}}").unwrap() + start;
        let mut action = &rest[start + 2..end];
        if let Some(a) = action.strip_prefix('-') {
            text = text.trim_end().to_string();
            action = a;
        }
        trim_next = false;
        if let Some(a) = action.strip_suffix('-') {
            trim_next = true;
            action = a;
        }
        out.push((false, text));
        out.push((true, action.trim().to_string()));
        rest = &rest[end + 2..];
    }
    let text = if trim_next { rest.trim_start() } else { rest };
    out.push((false, text.to_string()));
    out
}

fn parse(tokens: &[(bool, String)], pos: &mut usize, stop: &[&str]) -> (Vec<Node>, String) {
    let mut nodes = Vec::new();
    while *pos < tokens.len() {
        let (is_action, s) = &tokens[*pos];
        *pos += 1;
        if !is_action {
            if !s.is_empty() {
                nodes.push(Node::Text(s.clone()));
            }
            continue;
        }
        if stop.iter().any(|p| s == p || s.starts_with(&format!("{p} "))) {
            return (nodes, s.clone());
        }
        if s == "range .Messages" {
            let (body, _) = parse(tokens, pos, &["end"]);
            nodes.push(Node::Range(body));
        } else if let Some(cond) = s.strip_prefix("if ") {
            let mut arms = Vec::new();
            let mut cond = cond.to_string();
            let mut otherwise = Vec::new();
            loop {
                let (body, ended) = parse(tokens, pos, &["end", "else"]);
                arms.push((cond.clone(), body));
                if ended == "end" {
                    break;
                }
                if let Some(c) = ended.strip_prefix("else if ") {
                    cond = c.to_string();
                    continue;
                }
                let (body, _) = parse(tokens, pos, &["end"]);
                otherwise = body;
                break;
            }
            nodes.push(Node::If(arms, otherwise));
        } else if let Some((var, val)) = s.split_once(":=").or_else(|| s.split_once(" = ")) {
            nodes.push(Node::Assign(var.trim().to_string(), val.trim().to_string()));
        } else {
            nodes.push(Node::Out(s.clone()));
        }
    }
    (nodes, String::new())
}

struct Ctx<'a> {
    vars: std::collections::HashMap<String, String>,
    msg: Option<&'a (String, String)>,
}

fn value(ctx: &Ctx<'_>, expr: &str) -> String {
    match expr {
        ".Role" => ctx.msg.unwrap().0.clone(),
        ".Content" => ctx.msg.unwrap().1.clone(),
        e if e.starts_with('"') => serde_json::from_str(e).unwrap(),
        e if e.starts_with('$') => ctx.vars.get(e).cloned().unwrap_or_default(),
        e => panic!("unsupported expression `{e}`"),
    }
}

fn truth(ctx: &Ctx<'_>, cond: &str) -> bool {
    if let Some(rest) = cond.strip_prefix("eq ") {
        let (a, b) = rest.split_once(' ').unwrap();
        return value(ctx, a) == value(ctx, b);
    }
    !value(ctx, cond).is_empty()
}

fn render_nodes<'a>(nodes: &[Node], ctx: &mut Ctx<'a>, msgs: &'a [(String, String)], out: &mut String) {
    for n in nodes {
        match n {
            Node::Text(t) => out.push_str(t),
            Node::Out(e) => out.push_str(&value(ctx, e)),
            Node::Assign(v, e) => {
                let val = value(ctx, e);
                ctx.vars.insert(v.clone(), val);
            }
            Node::If(arms, otherwise) => match arms.iter().find(|(c, _)| truth(ctx, c)) {
                Some((_, body)) => render_nodes(body, ctx, msgs, out),
                None => render_nodes(otherwise, ctx, msgs, out),
            },
            Node::Range(body) => {
                for m in msgs {
                    let saved = ctx.msg.replace(m);
                    render_nodes(body, ctx, msgs, out);
                    ctx.msg = saved;
                }
            }
        }
    }
}

fn render_go(src: &str, msgs: &[(String, String)]) -> String {
    let tokens = lex(src);
    let (nodes, _) = parse(&tokens, &mut 0, &[]);
    let mut out = String::new();
    render_nodes(&nodes, &mut Ctx { vars: Default::default(), msg: None }, msgs, &mut out);
    out
}

// ------------------------------------------------------------------ comparisons

fn render_jinja(src: &str, msgs: &[(String, String)], eos: &str) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.add_function("raise_exception", |m: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, m))
    });
    env.add_template("t", src).map_err(|e| e.to_string())?;
    let messages: Vec<serde_json::Value> =
        msgs.iter().map(|(r, c)| serde_json::json!({"role": r, "content": c})).collect();
    // llama.cpp and Ollama add BOS themselves, so the Go templates have none.
    let ctx = minijinja::context! { messages => messages, add_generation_prompt => true, bos_token => "", eos_token => eos };
    env.get_template("t").unwrap().render(ctx).map_err(|e| e.to_string())
}

fn conversations() -> Vec<Vec<(String, String)>> {
    let c = |v: &[(&str, &str)]| v.iter().map(|(r, t)| (r.to_string(), t.to_string())).collect();
    vec![
        c(&[("user", "Where is my refund?")]),
        c(&[("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Route this: app crashes.")]),
        c(&[
            ("system", "Answer with one label."),
            ("user", "I was charged twice."),
            ("assistant", "billing"),
            ("user", "Login fails."),
        ]),
    ]
}

/// Compares a Jinja template with its family's Go template; conversations the Jinja template refuses
/// (no system role) are skipped. Returns how many were compared.
fn compare(name: &str, jinja: &str, eos: &str) -> usize {
    let family = Family::detect(jinja).unwrap_or_else(|| panic!("{name}: family not recognised"));
    let mut n = 0;
    for conv in conversations() {
        let Ok(want) = render_jinja(jinja, &conv, eos) else { continue };
        let got = render_go(family.template(), &conv);
        assert_eq!(got, want, "{name} ({}) on {conv:?}", family.name());
        n += 1;
    }
    n
}

fn fixture_template(family: &str) -> (String, String) {
    let base =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(family).join("base");
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("tokenizer_config.json")).unwrap()).unwrap();
    let t = tc["chat_template"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| std::fs::read_to_string(base.join("chat_template.jinja")).unwrap());
    let eos = tc["eos_token"].as_str().unwrap_or("</s>").to_string();
    (t, eos)
}

#[test]
fn go_templates_render_like_the_fixture_chat_templates() {
    for (family, at_least) in
        [("llama", 3), ("qwen2", 3), ("phi3", 3), ("gemma2", 3), ("gemma3", 3), ("mistral", 2)]
    {
        let (t, eos) = fixture_template(family);
        let n = compare(family, &t, &eos);
        assert!(n >= at_least, "{family}: only {n} conversations compared");
    }
}

#[test]
fn go_templates_render_like_real_chat_templates_when_assets_are_present() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/assets/chat-templates");
    let dir =
        std::env::var_os("RETORT_SHARED_ASSETS").map_or(dir, |d| PathBuf::from(d).join("chat-templates"));
    if !dir.is_dir() {
        eprintln!(
            "NOTICE: {} not found; real chat templates not compared (fixture ones were)",
            dir.display()
        );
        return;
    }
    // (file, EOS text, compared conversations at least). Llama 3.x templates add a date header to every
    // system prompt, and Qwen 2.5 a default system prompt, which Ollama's Go templates do not
    // reproduce either: those are checked for family and stops only (next test).
    for (file, eos, at_least) in [
        ("microsoft-Phi-3.5-mini-instruct.jinja", "<|endoftext|>", 3),
        ("google-gemma-2-2b-it.jinja", "<eos>", 2),
    ] {
        let t = std::fs::read_to_string(dir.join(file)).unwrap();
        let n = compare(file, &t, eos);
        assert!(n >= at_least, "{file}: only {n} conversations compared");
    }
    let qwen = std::fs::read_to_string(dir.join("Qwen-Qwen2.5-7B-Instruct.jinja")).unwrap();
    let conv = &conversations()[2];
    assert_eq!(
        render_go(Family::ChatMl.template(), conv),
        render_jinja(&qwen, conv, "<|im_end|>").unwrap(),
        "Qwen2.5 with a system prompt"
    );
}

#[test]
fn real_templates_are_recognised_with_ollama_s_stop_tokens() {
    let assets = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/assets");
    let assets = std::env::var_os("RETORT_SHARED_ASSETS").map_or(assets, PathBuf::from);
    if !assets.is_dir() {
        eprintln!("NOTICE: {} not found; real template families not checked", assets.display());
        return;
    }
    let cases = [
        ("meta-llama-Llama-3.1-8B-Instruct.jinja", Some(Family::Llama3), "llama3-instruct"),
        ("meta-llama-Llama-3.2-3B-Instruct.jinja", Some(Family::Llama3), "llama3-instruct"),
        ("meta-llama-Llama-3.3-70B-Instruct.jinja", Some(Family::Llama3), "llama3-instruct"),
        ("Qwen-Qwen2.5-7B-Instruct.jinja", Some(Family::ChatMl), "chatml"),
        ("Qwen-Qwen3-0.6B.jinja", Some(Family::ChatMl), "chatml"),
        ("microsoft-Phi-3.5-mini-instruct.jinja", Some(Family::Phi3), "phi-3"),
        ("google-gemma-2-2b-it.jinja", Some(Family::Gemma), "gemma-instruct"),
        // Mistral's newer tight "[INST]x[/INST]" formats (with tools and system prompts placed
        // differently) are not translated: Ollama then uses the template inside the GGUF.
        ("mistralai-Mistral-Nemo-Instruct-2407.jinja", None, ""),
        ("unsloth-mistral-Devstral-Small-2507.jinja", None, ""),
    ];
    for (file, want, ollama) in cases {
        let t = std::fs::read_to_string(assets.join("chat-templates").join(file)).unwrap();
        assert_eq!(Family::detect(&t), want, "{file}");
        if let Some(f) = want {
            let params: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(assets.join("ollama/template").join(format!("{ollama}.json")))
                    .unwrap(),
            )
            .unwrap();
            for stop in params["stop"].as_array().unwrap() {
                assert!(f.turn_markers().contains(&stop.as_str().unwrap()), "{file}: Ollama stops at {stop}");
            }
        }
    }
}
