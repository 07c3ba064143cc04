//! Dataset files in every format read into the same conversations, and every bad input named by file
//! and line, stopped (`fail`) or counted (`skip`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::{Path, PathBuf};

use retort_data::dataset::{Conversation, DataError, Role, RowError, read_jsonl};
use retort_data::report::Reason;
use retort_recipe::schema::distill::DatasetFormat;
use retort_recipe::schema::train::OnBadRow;
use serde_json::json;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datasets").join(name)
}

fn read(name: &str, format: DatasetFormat) -> Vec<Conversation> {
    let (convs, report) = read_jsonl(&fixture(name), format, OnBadRow::Fail).unwrap();
    assert_eq!(report.skipped.total(), 0);
    assert_eq!(report.conversations, convs.len());
    convs
}

/// (role, content) of each message.
fn turns(c: &Conversation) -> Vec<(Role, &str)> {
    c.messages.iter().map(|m| (m.role, m.content.as_str())).collect()
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

#[test]
fn openai_messages_with_bom_empty_lines_crlf_content_parts_and_tools() {
    for format in [DatasetFormat::Messages, DatasetFormat::Auto] {
        let convs = read("messages.jsonl", format);
        assert_eq!(convs.len(), 3);
        // The BOM is not part of line 1; blank lines count as lines but not as rows.
        assert_eq!(convs.iter().map(|c| c.line).collect::<Vec<_>>(), [1, 4, 5]);
        assert_eq!(
            turns(&convs[0]),
            [
                (Role::System, "Route the ticket."),
                (Role::User, "I was charged twice."),
                (Role::Assistant, "billing")
            ]
        );
        // Text parts are joined with a newline, as vLLM joins them when serving.
        assert_eq!(turns(&convs[1]), [(Role::User, "Part one.\nPart two."), (Role::Assistant, "ok")]);
        let tool = &convs[2];
        assert_eq!(tool.messages[0].role, Role::System, "`developer` is a system message");
        assert_eq!(tool.messages[2].content, "", "null content is empty");
        assert_eq!(tool.messages[2].extra["tool_calls"][0]["function"]["name"], "get_weather");
        assert_eq!(tool.messages[3].extra["name"], "get_weather");
        assert_eq!(
            tool.messages[2].to_json(),
            json!({"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]})
        );
        assert_eq!(tool.tools.as_ref().unwrap()[0]["function"]["name"], "get_weather");
    }
    let (_, report) = read_jsonl(&fixture("messages.jsonl"), DatasetFormat::Auto, OnBadRow::Fail).unwrap();
    assert_eq!((report.format, report.detected_at, report.rows), (DatasetFormat::Messages, Some(1), 3));
}

#[test]
fn sharegpt_roles_map_to_openai_roles() {
    for format in [DatasetFormat::Sharegpt, DatasetFormat::Auto] {
        let convs = read("sharegpt.jsonl", format);
        assert_eq!(
            turns(&convs[0]),
            [
                (Role::System, "Route the ticket."),
                (Role::User, "I was charged twice."),
                (Role::Assistant, "billing")
            ]
        );
        assert_eq!(
            turns(&convs[1]),
            [
                (Role::User, "hi"),
                (Role::Assistant, "hello"),
                (Role::User, "bye"),
                (Role::Assistant, "goodbye")
            ]
        );
    }
}

#[test]
fn alpaca_joins_instruction_and_input_like_transformers() {
    for format in [DatasetFormat::Alpaca, DatasetFormat::Auto] {
        let convs = read("alpaca.jsonl", format);
        assert_eq!(
            turns(&convs[0]),
            [(Role::User, "Route the ticket.\n\nI was charged twice."), (Role::Assistant, "billing")]
        );
        assert_eq!(
            turns(&convs[1]),
            [(Role::System, "Be polite."), (Role::User, "Say hello."), (Role::Assistant, "hello")]
        );
        assert_eq!(convs[2].line, 4);
        assert_eq!(turns(&convs[2]), [(Role::User, "Only an input."), (Role::Assistant, "fine")]);
    }
}

#[test]
fn prompt_completion_with_string_or_message_prompts() {
    for format in [DatasetFormat::PromptCompletion, DatasetFormat::Auto] {
        let convs = read("prompt_completion.jsonl", format);
        assert_eq!(turns(&convs[0]), [(Role::User, "I was charged twice."), (Role::Assistant, "billing")]);
        assert_eq!(
            turns(&convs[1]),
            [(Role::System, "Route the ticket."), (Role::User, "The app crashes."), (Role::Assistant, "bug")]
        );
        assert_eq!(turns(&convs[2]), [(Role::User, "Weather?"), (Role::Assistant, "Sunny.")]);
    }
}

#[test]
fn empty_dataset_is_an_error_naming_the_file() {
    for text in ["", "\n\n  \n", "\u{feff}\n"] {
        let f = file(text);
        let err = read_jsonl(f.path(), DatasetFormat::Auto, OnBadRow::Skip).unwrap_err();
        assert!(matches!(err, DataError::Empty { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&f.path().display().to_string()) && msg.contains("empty"), "{msg}");
        assert!(err.hint().contains("retort distill"));
    }
    let err = read_jsonl(Path::new("/no/such/train.jsonl"), DatasetFormat::Auto, OnBadRow::Fail).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }) && err.to_string().contains("/no/such/train.jsonl"));
}

const MIXED: &str = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},]}

{"messages": [{"role": "user", "content": "no answer"}]}
{"instruction": "x", "output": "y"}
{"messages": [{"role": "bot", "content": "b"}]}
[1, 2]
{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]}
not json at all
"#;

#[test]
fn fail_stops_at_the_first_bad_row_with_its_line_and_column() {
    let f = file(MIXED);
    let err = read_jsonl(f.path(), DatasetFormat::Auto, OnBadRow::Fail).unwrap_err();
    let DataError::Row { line, problem: RowError::NotJson { column, .. }, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!((*line, *column), (2, 87));
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("{}:2: not JSON: ", f.path().display())), "{msg}");
    assert!(msg.ends_with("at column 87"), "{msg}");
    assert!(err.hint().contains("one complete JSON object") && err.hint().contains("on_bad_row"));
}

#[test]
fn skip_counts_every_bad_row_by_reason_with_line_numbers() {
    let f = file(MIXED);
    let (convs, report) = read_jsonl(f.path(), DatasetFormat::Auto, OnBadRow::Skip).unwrap();
    assert_eq!(convs.iter().map(|c| c.line).collect::<Vec<_>>(), [1, 8]);
    assert_eq!(report.rows, 8);
    assert_eq!(report.skipped.total(), 6);
    let by = |r: Reason| report.skipped.0.iter().find(|s| s.reason == r).unwrap().clone();
    assert_eq!(by(Reason::NotJson).rows.lines, [2, 9]);
    assert_eq!(by(Reason::NoAssistant).rows.lines, [4]);
    let shape = by(Reason::WrongShape);
    assert_eq!(shape.rows.lines, [5, 6, 7]);
    // Auto holds every row to the format of line 1 and says so.
    assert_eq!(
        shape.first,
        "wrong shape for `messages`: no `messages` list (the row looks like `alpaca`, but line 1 set the format)"
    );
    assert!(report.to_string().contains("8 rows as `messages`, 2 read, 6 skipped"), "{report}");
}

#[test]
fn a_conversation_without_an_assistant_turn_is_a_bad_row() {
    for (text, format) in [
        (
            r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}"#,
            DatasetFormat::Auto,
        ),
        (r#"{"conversations": [{"from": "human", "value": "q"}]}"#, DatasetFormat::Sharegpt),
        (r#"{"prompt": "q", "completion": [{"role": "user", "content": "more"}]}"#, DatasetFormat::Auto),
    ] {
        let f = file(&format!("\n{text}\n"));
        let err = read_jsonl(f.path(), format, OnBadRow::Fail).unwrap_err();
        assert!(matches!(err, DataError::Row { line: 2, problem: RowError::NoAssistant, .. }), "{err:?}");
        assert!(
            err.to_string().ends_with(":2: the conversation has no assistant turn to learn from"),
            "{err}"
        );
        assert!(err.hint().contains("assistant message"));
    }
}

#[test]
fn wrong_shapes_name_the_json_path_and_show_the_format() {
    for (row, format, want) in [
        (
            r#"{"messages": "hi"}"#,
            DatasetFormat::Messages,
            "`messages` must be a list of messages, not a string",
        ),
        (r#"{"messages": []}"#, DatasetFormat::Messages, "`messages` is an empty list"),
        (r#"{"messages": [{"role": "user"}]}"#, DatasetFormat::Messages, "`messages[0]` has no `content`"),
        (
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}"#,
            DatasetFormat::Messages,
            "`messages[0].content[0]` is a `image_url` part; only text parts can be trained on",
        ),
        (
            r#"{"messages": [{"role": "user", "content": 3}]}"#,
            DatasetFormat::Messages,
            "`messages[0].content` must be a string or a list of text parts, not a number",
        ),
        (
            r#"{"conversations": [{"from": "bot", "value": "x"}]}"#,
            DatasetFormat::Sharegpt,
            "`conversations[0].from` is \"bot\"; use \"system\", \"human\", \"gpt\" or \"tool\"",
        ),
        (r#"{"instruction": "x"}"#, DatasetFormat::Alpaca, "wrong shape for `alpaca`: no `output`"),
        (
            r#"{"prompt": "x", "completion": 1}"#,
            DatasetFormat::PromptCompletion,
            "`completion` must be a string",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "a"}]}"#,
            DatasetFormat::Sharegpt,
            "no `conversations` list (the row looks like `messages`)",
        ),
    ] {
        let f = file(row);
        let err = read_jsonl(f.path(), format, OnBadRow::Fail).unwrap_err();
        assert!(err.to_string().contains(want), "{row}: {err}");
        assert!(matches!(err, DataError::Row { line: 1, problem: RowError::Shape { .. }, .. }));
    }
    let f = file(r#"{"text": "hello"}"#);
    let err = read_jsonl(f.path(), DatasetFormat::Auto, OnBadRow::Fail).unwrap_err();
    assert!(err.to_string().contains("cannot tell the dataset format from this row (keys: `text`)"), "{err}");
    assert!(err.hint().contains("`conversations` (ShareGPT)"));
}

#[test]
fn a_file_with_only_bad_rows_has_nothing_usable() {
    let f = file("{oops\n{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\n");
    let err = read_jsonl(f.path(), DatasetFormat::Auto, OnBadRow::Skip).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::NothingUsable { .. }), "{err:?}");
    assert!(msg.contains("all 2 rows were skipped") && msg.contains("not JSON: 1 (line 1)"), "{msg}");
    assert!(msg.contains("no assistant turn: 1 (line 2)"), "{msg}");
}

#[test]
fn lines_that_are_not_utf8_are_bad_rows() {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), b"{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"\xff\"}\n")
        .unwrap();
    let (convs, report) = read_jsonl(f.path(), DatasetFormat::Auto, OnBadRow::Skip).unwrap();
    assert_eq!(convs.len(), 1);
    assert_eq!(report.skipped.0[0].first, "not UTF-8 text");
}
