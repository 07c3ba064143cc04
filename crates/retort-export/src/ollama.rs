//! An Ollama `Modelfile` for an exported GGUF: `FROM`, a `TEMPLATE` in Ollama's Go template language
//! that produces the same prompt as the model's Jinja chat template, a `PARAMETER stop` for every
//! end-of-turn token, and `SYSTEM`.
//!
//! Templates are recognised by family (Llama 3, ChatML for Qwen, Gemma 2/3, Phi-3, Mistral) from
//! the markers in the Jinja source; each family has one Go template here, written for Ollama's
//! `.Messages` interface (system messages arrive in `.Messages` too). A template of another shape gets
//! no `TEMPLATE` line: Ollama then uses the GGUF's embedded chat template, and the report says so.

use crate::tokenizer::Tokenizer;

/// A chat format Ollama templates exist for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`.
    Llama3,
    /// `<|im_start|>role\ncontent<|im_end|>\n` (Qwen 2/2.5/3).
    ChatMl,
    /// `<start_of_turn>user\n...<end_of_turn>\n`, `model` for the assistant; Gemma has no system role,
    /// so the system prompt goes before the first user message (as Gemma 3's template does).
    Gemma,
    /// `<|user|>\ncontent<|end|>\n` (Phi-3, Phi-3.5).
    Phi3,
    /// `[INST] user [/INST]assistant</s>` (Mistral v0.1/v0.2).
    Mistral,
}

impl Family {
    /// Recognises the family of a Jinja chat template.
    pub fn detect(jinja: &str) -> Option<Family> {
        let has = |s: &str| jinja.contains(s);
        if has("<|start_header_id|>") && has("<|eot_id|>") {
            Some(Family::Llama3)
        } else if has("<|im_start|>") && has("<|im_end|>") {
            Some(Family::ChatMl)
        } else if has("<start_of_turn>") && has("<end_of_turn>") {
            Some(Family::Gemma)
        } else if has("<|end|>") && has("<|assistant|>") {
            Some(Family::Phi3)
        } else if has("[INST]")
            && has("[/INST]")
            && (has("'[INST] '") || has("\"[INST] \"") || has("[INST] {{"))
        {
            // v0.1/v0.2 style with spaces around the message; the newer tight `[INST]x[/INST]` formats
            // place the system prompt and tools differently and are left to the GGUF's template.
            Some(Family::Mistral)
        } else {
            None
        }
    }

    /// The family's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama3 => "llama3",
            Family::ChatMl => "chatml",
            Family::Gemma => "gemma",
            Family::Phi3 => "phi3",
            Family::Mistral => "mistral",
        }
    }

    /// The Go template.
    pub fn template(self) -> &'static str {
        match self {
            Family::Llama3 => concat!(
                "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n",
                "{{ .Content }}<|eot_id|>\n",
                "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
            ),
            Family::ChatMl => concat!(
                "{{- range .Messages }}<|im_start|>{{ .Role }}\n",
                "{{ .Content }}<|im_end|>\n",
                "{{ end }}<|im_start|>assistant\n",
            ),
            Family::Phi3 => concat!(
                "{{- range .Messages }}<|{{ .Role }}|>\n",
                "{{ .Content }}<|end|>\n",
                "{{ end }}<|assistant|>\n",
            ),
            // No system role: system text is held and put at the top of the next user turn.
            Family::Gemma => concat!(
                "{{- $system := \"\" }}\n",
                "{{- range .Messages }}\n",
                "{{- if eq .Role \"system\" }}{{ $system = .Content }}\n",
                "{{- else if eq .Role \"user\" }}<start_of_turn>user\n",
                "{{ if $system }}{{ $system }}\n\n{{ $system = \"\" }}{{ end }}{{ .Content }}<end_of_turn>\n",
                "{{ else }}<start_of_turn>model\n",
                "{{ .Content }}<end_of_turn>\n",
                "{{ end }}\n",
                "{{- end }}<start_of_turn>model\n",
            ),
            Family::Mistral => concat!(
                "{{- $system := \"\" }}\n",
                "{{- range .Messages }}\n",
                "{{- if eq .Role \"system\" }}{{ $system = .Content }}\n",
                "{{- else if eq .Role \"user\" }}[INST] {{ if $system }}{{ $system }}\n\n{{ $system = \"\" }}{{ end }}{{ .Content }} [/INST]\n",
                "{{- else }}{{ .Content }}</s>\n",
                "{{- end }}\n",
                "{{- end }}",
            ),
        }
    }

    /// Marker strings that start or end a turn.
    pub fn turn_markers(self) -> &'static [&'static str] {
        match self {
            Family::Llama3 => &["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"],
            Family::ChatMl => &["<|im_end|>", "<|im_start|>"],
            Family::Gemma => &["<end_of_turn>", "<start_of_turn>"],
            Family::Phi3 => &["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"],
            Family::Mistral => &["[INST]", "[/INST]"],
        }
    }
}

/// The stop strings: the family's turn markers (those the vocabulary has, plus the first one always)
/// and the text of every end-of-sequence token.
pub fn stops(family: Option<Family>, tok: &Tokenizer, eos_ids: &[u32]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |s: &str| {
        if !s.is_empty() && !out.iter().any(|o| o == s) {
            out.push(s.to_string());
        }
    };
    if let Some(f) = family {
        for (i, m) in f.turn_markers().iter().enumerate() {
            if i == 0 || tok.vocab.tokens.iter().any(|t| t == m) {
                push(m);
            }
        }
    }
    for id in tok.special_id("eos").into_iter().chain(eos_ids.iter().copied()) {
        if let Some(t) = tok.token(id) {
            push(t);
        }
    }
    out
}

/// Quotes a Modelfile value with triple quotes; `None` when it contains them itself.
fn triple(s: &str) -> Option<String> {
    (!s.contains("\"\"\"")).then(|| format!("\"\"\"{s}\"\"\""))
}

/// The Modelfile text.
pub fn modelfile(
    from: &str,
    family: Option<Family>,
    stops: &[String],
    system: Option<&str>,
) -> Result<String, String> {
    let mut m = String::new();
    m.push_str("# Written by retort export. Create the model with: ollama create NAME -f Modelfile\n");
    m.push_str(&format!("FROM {from}\n"));
    if let Some(f) = family {
        m.push_str(&format!("TEMPLATE {}\n", triple(f.template()).unwrap_or_default()));
    }
    for s in stops {
        let q = serde_json::to_string(s).unwrap_or_default();
        m.push_str(&format!("PARAMETER stop {q}\n"));
    }
    if let Some(sys) = system {
        let q = triple(sys).ok_or_else(|| {
            "the system prompt contains `\"\"\"`, which a Modelfile cannot quote".to_string()
        })?;
        m.push_str(&format!("SYSTEM {q}\n"));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_families_of_shipped_templates() {
        assert_eq!(Family::detect("{{ '<|im_start|>' + m['role'] }}...<|im_end|>"), Some(Family::ChatMl));
        assert_eq!(Family::detect("<|start_header_id|>...<|eot_id|>"), Some(Family::Llama3));
        assert_eq!(Family::detect("[INST] {{ x }} [/INST]"), Some(Family::Mistral));
        assert_eq!(Family::detect("{{ messages }}"), None);
        let m =
            modelfile("./m.gguf", Some(Family::ChatMl), &["<|im_end|>".into()], Some("Be brief.")).unwrap();
        assert!(m.contains("FROM ./m.gguf\nTEMPLATE \"\"\"{{- range .Messages }}"), "{m}");
        assert!(m.contains("PARAMETER stop \"<|im_end|>\"\nSYSTEM \"\"\"Be brief.\"\"\"\n"), "{m}");
        assert!(modelfile("x", None, &[], Some("a \"\"\" b")).is_err());
    }
}
