//! One conversation as token ids and labels, rendered with the model's own chat template.
//!
//! The whole conversation is rendered once (`add_generation_prompt = false`) and tokenized once
//! without added special tokens, because the template writes them, as transformers'
//! `apply_chat_template(tokenize=True)` does.
//!
//! **Which tokens are labelled.** Labels come from character spans of the rendered assistant turns,
//! never from searching the tokens for a response template (which silently loses examples when the
//! template tokenizes differently in context). For assistant turn `i`:
//!
//! - `prefix = render(messages[..i], add_generation_prompt = true)`: everything before the answer,
//!   including the header that opens the assistant's turn;
//! - `upto = render(messages[..=i], add_generation_prompt = false)`: the same conversation ending with
//!   that answer;
//! - the span is `[prefix.len(), upto.len())` of the full text. It holds the answer and the template's
//!   end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...), so the model learns to stop even
//!   when the pad token is the EOS token.
//!
//! `upto` must start with `prefix`, and the full text must start with `upto`; otherwise the template
//! rewrites earlier text once later turns are added (Qwen3 drops the reasoning of earlier turns,
//! Mistral Nemo moves the system prompt into the last user turn) and the answer cannot be located without
//! guessing, so [`encode`] fails and names the turn. One allowance: a template that closes a finished
//! conversation with the EOS token (Phi-3) writes it after the last message only, so an earlier turn
//! ends where that EOS would begin (the EOS is learned once, at the end of the final turn).
//!
//! A token is labelled when its start offset falls inside a span. Labels equal the ids there and are
//! `-100` elsewhere; they are not shifted (the trainer shifts). With `loss_on = "all"` every token is
//! labelled.

use std::ops::Range;

use retort_recipe::schema::train::LossOn;
use serde_json::Value;

use crate::dataset::{Conversation, Role};
use crate::report::Reason;
use crate::template::{ChatTemplate, RenderOptions, TemplateError};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// The label of a token that carries no loss (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// A tokenized conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// The id where the token is learned, [`IGNORE`] elsewhere; same length as `ids`, not shifted.
    pub labels: Vec<i64>,
    /// 1-based line of the dataset row (0 when it did not come from a file).
    pub line: usize,
}

impl Example {
    /// How many tokens carry loss.
    pub fn label_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }
}

/// Why a conversation cannot be turned into an example.
#[derive(Debug, thiserror::Error)]
pub enum ExampleError {
    /// Nothing to learn from.
    #[error("the conversation has no assistant turn to learn from")]
    NoAssistant,
    /// The template raised an error or failed.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The template renders an assistant turn differently once later messages follow.
    #[error(
        "the chat template renders `messages[{index}]` (assistant turn {turn}) differently once later messages follow, so its tokens cannot be located in the training text"
    )]
    Rewrites {
        /// 0-based index of the message.
        index: usize,
        /// 1-based number of the assistant turn.
        turn: usize,
    },
    /// The template renders the messages before an assistant turn differently once the turn follows
    /// them (or its generation prompt is not how it begins the turn).
    #[error(
        "the chat template renders the messages before `messages[{index}]` (assistant turn {turn}) differently once that answer follows them, so the answer cannot be located in the training text"
    )]
    PromptMismatch {
        /// 0-based index of the message.
        index: usize,
        /// 1-based number of the assistant turn.
        turn: usize,
    },
    /// The tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

impl ExampleError {
    /// The reason it is counted under when its row is skipped.
    pub fn reason(&self) -> Reason {
        match self {
            ExampleError::NoAssistant => Reason::NoAssistant,
            ExampleError::Template(_) => Reason::TemplateRefused,
            ExampleError::Rewrites { .. } | ExampleError::PromptMismatch { .. } => Reason::TemplateRewrites,
            ExampleError::Tokenizer(_) => Reason::Tokenizer,
        }
    }

    /// How to fix it.
    pub fn hint(&self) -> String {
        match self {
            ExampleError::NoAssistant => "add the answer as an assistant message".into(),
            ExampleError::Template(TemplateError::Raised(_)) => {
                "change the row to what the model's chat template accepts (Gemma has no system role; \
                 Mistral needs user and assistant turns to alternate)"
                    .into()
            }
            ExampleError::Template(_) => "the model's chat template cannot render this row".into(),
            ExampleError::Rewrites { .. } | ExampleError::PromptMismatch { .. } => {
                "the template changes earlier text as the conversation grows (Qwen3 drops the reasoning of \
                 earlier turns; Mistral Nemo moves the system prompt into the last user turn and drops it when \
                 an answer ends the conversation): keep one assistant answer per row and put instructions in \
                 the user message, or train on every token with `train.loss_on = \"all\"`"
                    .into()
            }
            ExampleError::Tokenizer(_) => "check the tokenizer files of the base model".into(),
        }
    }
}

fn options(conv: &Conversation, tok: &Tokenizer, add_generation_prompt: bool) -> RenderOptions {
    RenderOptions {
        add_generation_prompt,
        tools: conv.tools.clone(),
        bos_token: tok.bos_token.clone(),
        eos_token: tok.eos_token.clone(),
        extra: serde_json::Map::new(),
    }
}

/// The full training text of a conversation and the byte spans of its assistant turns in it (see
/// the module doc for the rule).
pub fn assistant_spans(
    conv: &Conversation,
    tok: &Tokenizer,
    template: &ChatTemplate,
) -> Result<(String, Vec<Range<usize>>), ExampleError> {
    let messages: Vec<Value> = conv.messages.iter().map(|m| m.to_json()).collect();
    let full = template.render(&messages, &options(conv, tok, false))?;
    let mut spans = Vec::new();
    for (index, m) in conv.messages.iter().enumerate() {
        if m.role != Role::Assistant {
            continue;
        }
        let turn = spans.len() + 1;
        let prefix = template.render(&messages[..index], &options(conv, tok, true))?;
        let upto = template.render(&messages[..=index], &options(conv, tok, false))?;
        let after_last = spans.last().is_none_or(|s: &Range<usize>| s.end <= prefix.len());
        if !upto.starts_with(&prefix) || !after_last {
            return Err(ExampleError::PromptMismatch { index, turn });
        }
        let end = if full.starts_with(&upto) {
            upto.len()
        } else {
            // Phi-3 closes a finished conversation with EOS; in the full text the next turn follows.
            match tok.eos_token.as_deref().and_then(|eos| upto.strip_suffix(eos)) {
                Some(body) if body.len() > prefix.len() && full.starts_with(body) => body.len(),
                _ => return Err(ExampleError::Rewrites { index, turn }),
            }
        };
        spans.push(prefix.len()..end);
    }
    if spans.is_empty() {
        return Err(ExampleError::NoAssistant);
    }
    Ok((full, spans))
}

/// Renders, tokenizes and labels a conversation (see the module doc for which tokens are labelled).
pub fn encode(
    conv: &Conversation,
    tok: &Tokenizer,
    template: &ChatTemplate,
    loss_on: LossOn,
) -> Result<Example, ExampleError> {
    let (text, spans) = match loss_on {
        LossOn::Completion => assistant_spans(conv, tok, template)?,
        LossOn::All => {
            if !conv.messages.iter().any(|m| m.role == Role::Assistant) {
                return Err(ExampleError::NoAssistant);
            }
            let messages: Vec<Value> = conv.messages.iter().map(|m| m.to_json()).collect();
            let text = template.render(&messages, &options(conv, tok, false))?;
            let all = 0..text.len();
            (text, vec![all])
        }
    };
    let enc = tok.encode_with_offsets(&text)?;
    let labels = label_by_spans(&enc.ids, &enc.offsets, &spans);
    Ok(Example { ids: enc.ids, labels, line: conv.line })
}

/// Labels the tokens whose start offset falls inside one of `spans` (sorted, disjoint).
pub fn label_by_spans(ids: &[u32], offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Vec<i64> {
    let mut s = 0;
    ids.iter()
        .zip(offsets)
        .map(|(&id, &(start, _))| {
            while s < spans.len() && spans[s].end <= start {
                s += 1;
            }
            match spans.get(s) {
                Some(span) if span.contains(&start) => i64::from(id),
                _ => IGNORE,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_labelled_by_their_start_offset() {
        let ids = [10, 11, 12, 13, 14];
        let offsets = [(0, 2), (2, 5), (5, 6), (6, 9), (9, 12)];
        // Token 1 starts at 2, inside; token 2 starts at 5 = the end, outside; token 3 straddles
        // the start of the second span, so it is not labelled.
        assert_eq!(label_by_spans(&ids, &offsets, &[1..5, 7..12]), [IGNORE, 11, IGNORE, IGNORE, 14]);
        assert_eq!(label_by_spans(&ids, &offsets, &[]), [IGNORE; 5]);
        let all = 0..12;
        assert_eq!(label_by_spans(&ids, &offsets, std::slice::from_ref(&all)), [10, 11, 12, 13, 14]);
    }
}
