//! Recognising credentials that were pasted into a recipe, so they are refused and never echoed.
//!
//! A recipe lives in version control; a key in it leaks to everyone with the repository. Keys come only
//! from the environment variable a recipe names (`teacher.api_key_env`).

/// Known credential formats: (prefix, minimum length of the rest, what it is).
const PREFIXES: &[(&str, usize, &str)] = &[
    ("sk-ant-", 20, "an Anthropic API key"),
    ("sk-proj-", 20, "an OpenAI project API key"),
    ("sk-or-", 20, "an OpenRouter API key"),
    ("sk-", 20, "an API key (OpenAI style)"),
    ("hf_", 30, "a Hugging Face token"),
    ("ghp_", 30, "a GitHub token"),
    ("gho_", 30, "a GitHub token"),
    ("github_pat_", 30, "a GitHub token"),
    ("gsk_", 30, "a Groq API key"),
    ("r8_", 30, "a Replicate token"),
    ("AIza", 30, "a Google API key"),
    ("xoxb-", 20, "a Slack token"),
    ("xoxp-", 20, "a Slack token"),
    ("AKIA", 16, "an AWS access key id"),
    ("nvapi-", 30, "an NVIDIA API key"),
    ("pplx-", 30, "a Perplexity API key"),
];

/// Key names whose value is a credential whatever it looks like. Compared after lowercasing and
/// removing `_` and `-`.
const SECRET_KEYS: &[&str] = &[
    "apikey",
    "key",
    "token",
    "accesstoken",
    "authtoken",
    "bearertoken",
    "hftoken",
    "secret",
    "secretkey",
    "clientsecret",
    "password",
    "passwd",
    "authorization",
    "privatekey",
    "openaiapikey",
    "anthropicapikey",
];

/// If the string looks like a credential, what kind it looks like.
pub fn looks_like_secret(s: &str) -> Option<&'static str> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix("Bearer ").or_else(|| s.strip_prefix("bearer "))
        && rest.len() >= 16
        && !rest.contains(char::is_whitespace)
    {
        return Some("a bearer token");
    }
    for &(prefix, min_rest, what) in PREFIXES {
        if let Some(rest) = s.strip_prefix(prefix)
            && rest.len() >= min_rest
            && rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Some(what);
        }
    }
    // A URL with a password in it (`https://user:pass@host`).
    if let Some((_, after_scheme)) = s.split_once("://") {
        let authority = after_scheme.split(['/', '?', '#']).next().unwrap_or("");
        if let Some((userinfo, _)) = authority.rsplit_once('@')
            && userinfo.contains(':')
        {
            return Some("a URL with a password in it");
        }
        if let Some((_, query)) = after_scheme.split_once('?') {
            let lowered = query.to_ascii_lowercase();
            if ["key=", "api_key=", "apikey=", "token=", "access_token="]
                .iter()
                .any(|k| lowered.split('&').any(|kv| kv.starts_with(k) && kv.len() > k.len()))
            {
                return Some("a URL with a key in its query string");
            }
        }
    }
    None
}

/// True when a key name means its value is a credential (`api_key`, `token`, `password`, ...).
/// Names ending in `_env` name an environment variable and are fine.
pub fn is_secret_key(name: &str) -> bool {
    let norm: String =
        name.chars().filter(|c| *c != '_' && *c != '-').collect::<String>().to_ascii_lowercase();
    if norm.ends_with("env") {
        return false;
    }
    SECRET_KEYS.contains(&norm.as_str())
}

/// Replaces every occurrence of any of `secrets` in `text` with `<redacted>`.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        out = out.replace(s.as_str(), "<redacted>");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_common_keys() {
        assert_eq!(looks_like_secret("sk-abcdefghijklmnopqrstuvwxyz0123"), Some("an API key (OpenAI style)"));
        assert_eq!(looks_like_secret("sk-ant-api03-abcdefghijklmnopqrstuv"), Some("an Anthropic API key"));
        assert!(looks_like_secret("hf_abcdefghijklmnopqrstuvwxyzABCDEFGH").is_some());
        assert!(looks_like_secret("https://bob:hunter2@example.com/v1").is_some());
        assert!(looks_like_secret("https://example.com/v1?key=abc").is_some());
        assert!(looks_like_secret("Bearer abcdefghijklmnopqrstuvwxyz").is_some());
    }

    #[test]
    fn ignores_ordinary_text() {
        for s in
            ["sk-learn", "skip", "gpt-4o-mini", "https://api.openai.com/v1", "OPENAI_API_KEY", "task-name"]
        {
            assert_eq!(looks_like_secret(s), None, "{s}");
        }
        // A long hyphenated slug is not a key unless it has a known prefix.
        assert_eq!(looks_like_secret("support-ticket-routing-with-a-very-long-name"), None);
    }

    #[test]
    fn secret_key_names() {
        assert!(is_secret_key("api_key"));
        assert!(is_secret_key("API-KEY"));
        assert!(is_secret_key("hf_token"));
        assert!(!is_secret_key("api_key_env"));
        assert!(!is_secret_key("max_tokens"));
        assert!(!is_secret_key("tokens_per_minute"));
    }

    #[test]
    fn redaction_replaces_all_occurrences() {
        let s = vec!["sk-abcdefghijklmnopqrstuvwxyz".to_string()];
        assert_eq!(
            redact("a sk-abcdefghijklmnopqrstuvwxyz b sk-abcdefghijklmnopqrstuvwxyz", &s),
            "a <redacted> b <redacted>"
        );
    }
}
