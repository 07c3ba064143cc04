//! The `replay` provider: answers from a recorded transcript, and fails loudly on anything else.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::completion::{Completion, Finish, Usage};
use crate::error::TeacherError;
use crate::request::{ChatRequest, Message};

#[derive(Deserialize)]
struct Line {
    request: RecordedRequest,
    response: RecordedResponse,
}

#[derive(Deserialize)]
struct RecordedRequest {
    messages: Vec<Message>,
}

#[derive(Deserialize)]
struct RecordedResponse {
    content: String,
    #[serde(default)]
    finish_reason: Option<String>,
}

/// A loaded transcript.
#[derive(Debug)]
pub struct Replay {
    path: PathBuf,
    answers: HashMap<Vec<Message>, Vec<Completion>>,
}

impl Replay {
    /// Loads a transcript: JSON lines of `{"request": {"messages": [...]}, "response": {"content",
    /// "finish_reason"}}`.
    pub fn load(path: &Path) -> Result<Replay, TeacherError> {
        let text = std::fs::read_to_string(path).map_err(|e| TeacherError::Transcript {
            path: path.to_path_buf(),
            line: 0,
            message: format!("cannot read it: {e}"),
        })?;
        let mut answers: HashMap<Vec<Message>, Vec<Completion>> = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let l: Line = serde_json::from_str(line).map_err(|e| TeacherError::Transcript {
                path: path.to_path_buf(),
                line: i + 1,
                message: format!("not a recorded request and response ({e})"),
            })?;
            let finish = l.response.finish_reason.as_deref().map_or(Finish::Stop, Finish::from_openai);
            let c = Completion {
                content: l.response.content,
                finish,
                usage: Usage::default(),
                refusal: None,
                cost_usd: 0.0,
            };
            answers.entry(l.request.messages).or_default().push(c);
        }
        Ok(Replay { path: path.to_path_buf(), answers })
    }

    /// The recorded answer. The model and sampling settings are not compared; repeated recordings
    /// of the same messages answer samples 0, 1, 2, ... in turn (and then start over).
    pub fn answer(&self, req: &ChatRequest) -> Result<Completion, TeacherError> {
        match self.answers.get(&req.messages) {
            Some(list) if !list.is_empty() => Ok(list[req.sample as usize % list.len()].clone()),
            _ => Err(TeacherError::ReplayMiss { path: self.path.clone(), request: req.describe() }),
        }
    }

    /// Recorded answers.
    pub fn len(&self) -> usize {
        self.answers.values().map(Vec::len).sum()
    }

    /// True when the transcript is empty.
    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_recorded_requests_and_names_the_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        std::fs::write(
            &p,
            concat!(
                r#"{"request":{"model":"m","messages":[{"role":"user","content":"a"}]},"response":{"content":"A1","finish_reason":"stop"}}"#, "\n",
                r#"{"request":{"model":"m","messages":[{"role":"user","content":"a"}]},"response":{"content":"A2","finish_reason":"length"}}"#, "\n",
            ),
        )
        .unwrap();
        let r = Replay::load(&p).unwrap();
        let mut req = ChatRequest {
            model: "other".into(),
            messages: vec![Message::new("user", "a")],
            temperature: 0.0,
            max_tokens: 1,
            schema: None,
            sample: 0,
        };
        assert_eq!(r.answer(&req).unwrap().content, "A1");
        req.sample = 1;
        assert_eq!(r.answer(&req).unwrap().finish, Finish::Length);
        req.messages[0].content = "nope".into();
        let e = r.answer(&req).unwrap_err();
        assert!(e.to_string().contains("no answer for the request \"nope\""), "{e}");
    }

    #[test]
    fn a_bad_line_is_reported_with_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        std::fs::write(&p, "\n{\"request\": 1}\n").unwrap();
        let e = Replay::load(&p).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
