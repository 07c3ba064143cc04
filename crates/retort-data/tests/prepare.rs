//! One file to rows in one call, with one report: every bad input of issue 4 that belongs to data
//! (empty dataset, a line that is not JSON, a conversation without an assistant turn, the template's
//! own refusal, examples longer than `max_seq_len`) stops with its line or is counted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::Path;

use retort_data::dataset::{DataError, RowError};
use retort_data::labels::{ExampleError, IGNORE};
use retort_data::prepare::{PrepareOptions, prepare};
use retort_data::report::Reason;
use retort_data::{ChatTemplate, TemplateError, Tokenizer};
use retort_recipe::schema::distill::DatasetFormat;
use retort_recipe::schema::train::{LossOn, OnBadRow, TooLong, Train};

fn byte_tokenizer() -> Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../retort-cli/tests/fixtures/byte-tokenizer");
    let mut tok = Tokenizer::load(&dir).unwrap();
    tok.bos_token = Some("<bos>".into());
    tok.eos_token = Some("<eos>".into());
    tok
}

fn gemma2() -> ChatTemplate {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chat-templates/google-gemma-2-2b-it.jinja");
    ChatTemplate::new(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

fn opts(on_bad_row: OnBadRow, max_len: usize, too_long: TooLong) -> PrepareOptions {
    PrepareOptions {
        format: DatasetFormat::Auto,
        on_bad_row,
        loss_on: LossOn::Completion,
        max_len,
        too_long,
        packing: true,
        seed: 3,
    }
}

const DATA: &str = r#"{"messages": [{"role": "user", "content": "I was charged twice."}, {"role": "assistant", "content": "billing"}]}
{"messages": [{"role": "user", "content": "The app crashes."}, {"role": "assistant", "content": "bug"}]
{"messages": [{"role": "system", "content": "Route it."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "other"}]}

{"messages": [{"role": "user", "content": "Where is my order?"}]}
{"messages": [{"role": "user", "content": "Please add a dark mode to the app, the white screen hurts my eyes at night."}, {"role": "assistant", "content": "feature_request"}]}
{"messages": [{"role": "user", "content": "Reset my password."}, {"role": "assistant", "content": "account"}]}
"#;

#[test]
fn skip_reports_every_reason_with_lines_and_builds_the_rest() {
    let f = file(DATA);
    let (rows, report) =
        prepare(f.path(), &byte_tokenizer(), &gemma2(), &opts(OnBadRow::Skip, 150, TooLong::Drop)).unwrap();
    assert_eq!((report.format, report.rows_in_file), (DatasetFormat::Messages, 6));
    let lines = |r: Reason| report.skipped.0.iter().find(|s| s.reason == r).unwrap().rows.lines.clone();
    assert_eq!(lines(Reason::NotJson), [2]);
    assert_eq!(lines(Reason::TemplateRefused), [3]);
    assert_eq!(lines(Reason::NoAssistant), [5]);
    // Line 6 renders to over 150 bytes: dropped and counted with its line.
    assert_eq!(report.pack.dropped_too_long.lines, [6]);
    assert_eq!((report.pack.examples_in, report.pack.examples_out), (3, 2));
    assert_eq!(rows.len(), 2, "101 + 99 tokens do not fit in one row of 150");
    let text = report.to_string();
    for want in [
        "6 rows as `messages`, 3 skipped",
        "not JSON: 1 (line 2); first: not JSON: EOF while parsing an object at column 103",
        "refused by the chat template: 1 (line 3); first: the chat template refused this conversation: System role not supported",
        "no assistant turn: 1 (line 5)",
        "dropped, longer than 150 tokens: 1 (line 6)",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
}

#[test]
fn fail_stops_at_the_first_bad_row_even_when_the_template_refuses_it() {
    let f = file(DATA);
    let err = prepare(f.path(), &byte_tokenizer(), &gemma2(), &opts(OnBadRow::Fail, 100, TooLong::Drop))
        .unwrap_err();
    assert!(matches!(err, DataError::Row { line: 2, problem: RowError::NotJson { .. }, .. }), "{err:?}");
    // Without the broken line, the first bad row is the one Gemma's template refuses.
    let f = file(&DATA.lines().filter(|l| !l.contains("crashes")).collect::<Vec<_>>().join("\n"));
    let err = prepare(f.path(), &byte_tokenizer(), &gemma2(), &opts(OnBadRow::Fail, 100, TooLong::Drop))
        .unwrap_err();
    let DataError::Row {
        line: 2,
        problem: RowError::Example(ExampleError::Template(TemplateError::Raised(m))),
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(m, "System role not supported");
    assert_eq!(
        err.to_string(),
        format!(
            "{}:2: the chat template refused this conversation: System role not supported",
            f.path().display()
        )
    );
    assert!(
        err.hint().contains("Gemma has no system role") && err.hint().contains("on_bad_row"),
        "{}",
        err.hint()
    );
}

#[test]
fn truncation_is_reported_and_everything_dropped_is_an_error() {
    let f = file(
        &DATA
            .lines()
            .filter(|l| l.contains("dark mode") || l.contains("charged"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let (rows, report) =
        prepare(f.path(), &byte_tokenizer(), &gemma2(), &opts(OnBadRow::Fail, 150, TooLong::Truncate))
            .unwrap();
    assert_eq!(report.pack.truncated.lines, [2]);
    assert!(rows.iter().all(|r| r.len() <= 150));
    assert!(report.to_string().contains("truncated to 150 tokens: 1 (line 2)"), "{report}");

    let err = prepare(f.path(), &byte_tokenizer(), &gemma2(), &opts(OnBadRow::Fail, 20, TooLong::Drop))
        .unwrap_err();
    assert!(matches!(err, DataError::NothingUsable { .. }), "{err:?}");
    assert!(err.to_string().contains("dropped, longer than 20 tokens: 2 (lines"), "{err}");
    assert!(err.hint().contains("max_seq_len"));
}

#[test]
fn an_empty_dataset_is_an_error() {
    let f = file("\n\n");
    let err = prepare(f.path(), &byte_tokenizer(), &gemma2(), &opts(OnBadRow::Skip, 100, TooLong::Drop))
        .unwrap_err();
    assert!(matches!(err, DataError::Empty { .. }), "{err:?}");
}

#[test]
fn options_come_from_the_recipe() {
    let o = PrepareOptions::from_recipe(&Train::default(), 42);
    assert_eq!(
        o,
        PrepareOptions {
            format: DatasetFormat::Auto,
            on_bad_row: OnBadRow::Fail,
            loss_on: LossOn::Completion,
            max_len: 2048,
            too_long: TooLong::Truncate,
            packing: true,
            seed: 42,
        }
    );
}

#[test]
fn labels_survive_the_whole_pipeline() {
    let f = file(DATA.lines().next().unwrap());
    let tok = byte_tokenizer();
    let (rows, _) = prepare(f.path(), &tok, &gemma2(), &opts(OnBadRow::Fail, 1000, TooLong::Drop)).unwrap();
    let learned: Vec<u32> =
        rows[0].ids.iter().zip(&rows[0].labels).filter(|(_, l)| **l != IGNORE).map(|(i, _)| *i).collect();
    assert_eq!(tok.decode(&learned, false).unwrap(), "billing<end_of_turn>\n");
}
