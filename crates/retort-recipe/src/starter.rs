//! Starter recipes for `retort recipe new`: commented, complete, and valid as written.

use std::fmt;
use std::str::FromStr;

/// The kind of task a starter recipe is set up for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// One label per input (routing, classification).
    Classify,
    /// JSON matching a schema (structured extraction).
    Extract,
    /// Free-text answers (a narrow assistant).
    Chat,
}

impl Task {
    /// All tasks, in the order `--help` lists them.
    pub const ALL: [Task; 3] = [Task::Classify, Task::Extract, Task::Chat];

    /// The command-line spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Classify => "classify",
            Task::Extract => "extract",
            Task::Chat => "chat",
        }
    }

    fn template(self) -> &'static str {
        match self {
            Task::Classify => include_str!("../starters/classify.toml"),
            Task::Extract => include_str!("../starters/extract.toml"),
            Task::Chat => include_str!("../starters/chat.toml"),
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Task::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown task `{s}`; tasks: classify, extract, chat"))
    }
}

/// True when `name` is usable as a project name (and so as a recipe file stem).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
}

/// The starter recipe text for a task, with the project name filled in.
pub fn render(name: &str, task: Task) -> String {
    task.template().replace("@NAME@", name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Source;

    #[test]
    fn every_starter_is_valid_without_warnings() {
        for task in Task::ALL {
            let text = render("my-task", task);
            let src = Source::from_text("/nonexistent-dir/my-task.toml", text.clone());
            let loaded = match crate::load_source(src) {
                Ok(l) => l,
                Err(report) => {
                    panic!("{task} starter is invalid:\n{}", report.render(crate::RenderStyle::Plain))
                }
            };
            assert!(
                loaded.report.diagnostics.is_empty(),
                "{task} starter has warnings:\n{}",
                loaded.report.render(crate::RenderStyle::Plain)
            );
            assert_eq!(loaded.recipe.project.name, "my-task");
            assert!(!text.contains("@NAME@"));
        }
    }
}
