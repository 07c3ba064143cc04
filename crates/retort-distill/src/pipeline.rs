//! The distill run: inputs, answers, filters in recipe order, waves until the target is met,
//! split, outputs and the report.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use futures::StreamExt;
use retort_io::Progress;
use retort_recipe::Recipe;
use retort_recipe::schema::distill::{
    Distill, Filter, GeneratedInputs, Inputs, JudgeFilter, OutputKind, TextField,
};
use retort_recipe::schema::teacher::Teacher as TeacherSettings;
use retort_teacher::{ChatRequest, Message, Options as TeacherOptions, Store, Teacher, TeacherError};
use serde_json::{Map, Value, json};

use crate::error::DistillError;
use crate::filters::{self, Patterns, Tokens};
use crate::inputs::{self, Input};
use crate::output::{self, Example};
use crate::text::{self, NearDup};

/// Where the cache and journal live inside `project.data_dir`.
pub const JOURNAL: &str = ".cache/teacher-journal.jsonl";

/// Generated inputs never exceed this many times `target_examples x oversample`.
const GENERATE_CAP: f64 = 3.0;

/// Settings of a run that are not in the recipe.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Teacher settings for tests and benchmarks (retry delays).
    pub teacher: TeacherOptions,
}

/// A rejected row and why.
#[derive(Debug, Clone)]
struct Reject {
    filter: String,
    reason: String,
    input: Input,
    user: String,
    output: Option<String>,
    key: Option<String>,
}

/// An input with an answer that is still in the running.
#[derive(Debug, Clone)]
struct Cand {
    input: Input,
    user: String,
    answer: String,
    key: String,
    agreement: Option<f64>,
    schema_error: Option<String>,
    judge: Option<f64>,
}

impl Cand {
    fn text(&self, f: TextField) -> &str {
        match f {
            TextField::Input => &self.input.text,
            TextField::Output => &self.answer,
        }
    }

    fn reject(&self, filter: &str, reason: String) -> Reject {
        Reject {
            filter: filter.to_string(),
            reason,
            input: self.input.clone(),
            user: self.user.clone(),
            output: Some(self.answer.clone()),
            key: Some(self.key.clone()),
        }
    }
}

/// Per-filter state that lives across waves.
enum FilterState {
    None,
    Regex(Patterns),
    Dedup { exact: HashMap<String, String>, near: Option<(NearDup, Vec<String>)> },
    Decontaminate(HashSet<u64>),
}

struct Ctx<'a> {
    recipe: &'a Recipe,
    d: &'a Distill,
    t: &'a TeacherSettings,
    teacher: Teacher,
    env: minijinja::Environment<'a>,
    schema: Option<Value>,
    tokens: Option<Tokens>,
    names: Vec<String>,
    sc: Option<(u32, f64)>,
    reask: Option<bool>,
    stop: AtomicBool,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// `distill.json`, also written to the data directory.
    pub report: Value,
    /// Rows written to train, val and test.
    pub counts: [usize; 3],
    /// Rows rejected.
    pub rejected: usize,
}

/// What a dry run would send.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    /// Requests the first pass would make.
    pub requests: u64,
    /// Of those, answered by the cache (free).
    pub cached: u64,
    /// Estimated input tokens of the requests to send (four bytes a token).
    pub input_tokens: u64,
    /// Output tokens if every answer ran to `max_tokens`.
    pub max_output_tokens: u64,
    /// Estimated input cost in dollars.
    pub input_cost_usd: f64,
    /// The most the requests can cost (every answer at `max_tokens`).
    pub max_cost_usd: f64,
    /// Dollars already spent by earlier runs of this data directory.
    pub spent_usd: f64,
    /// The budget, if any.
    pub budget_usd: Option<f64>,
    /// Whether the price is known.
    pub priced: bool,
    /// What the estimate leaves out.
    pub notes: Vec<String>,
}

fn filter_names(filters: &[Filter]) -> Vec<String> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    filters
        .iter()
        .map(|f| {
            let n = seen.entry(f.kind()).or_insert(0);
            *n += 1;
            if *n == 1 { f.kind().to_string() } else { format!("{}#{n}", f.kind()) }
        })
        .collect()
}

fn settings(recipe: &Recipe) -> Result<(&Distill, &TeacherSettings), DistillError> {
    let d = recipe.distill.as_ref().ok_or_else(|| DistillError::Config {
        message: "the recipe has no `[distill]` section".into(),
        hint: "add `[distill]` (see `retort recipe docs`), or bring your own train.jsonl".into(),
    })?;
    let t = recipe.teacher.as_ref().ok_or_else(|| DistillError::Config {
        message: "`[distill]` needs a `[teacher]` section".into(),
        hint: "add `[teacher]` with `provider` and `model`".into(),
    })?;
    Ok((d, t))
}

fn load_schema(d: &Distill) -> Result<Option<Value>, DistillError> {
    if d.output.kind != OutputKind::Json {
        return Ok(None);
    }
    if let Some(s) = &d.output.schema {
        return Ok(Some(s.clone()));
    }
    let Some(p) = &d.output.schema_file else { return Ok(None) };
    let text = std::fs::read_to_string(p).map_err(|e| DistillError::Config {
        message: format!("cannot read the schema file `{}`: {e}", p.display()),
        hint: "check `distill.output.schema_file` (relative to the recipe)".into(),
    })?;
    serde_json::from_str(&text).map(Some).map_err(|e| DistillError::Config {
        message: format!("the schema file `{}` is not JSON: {e}", p.display()),
        hint: "it must hold one JSON Schema object".into(),
    })
}

impl<'a> Ctx<'a> {
    fn new(recipe: &'a Recipe, api_key: Option<String>, opts: &Options) -> Result<Ctx<'a>, DistillError> {
        let (d, t) = settings(recipe)?;
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        let tmpl_err = |key: &'static str, e: minijinja::Error| DistillError::Template {
            key,
            input: "every input".into(),
            message: e.to_string(),
        };
        env.add_template("prompt", &d.prompt).map_err(|e| tmpl_err("distill.prompt", e))?;
        if let Inputs::Generate(g) = &d.inputs {
            env.add_template("generate", &g.prompt).map_err(|e| tmpl_err("distill.inputs.prompt", e))?;
        }
        let tokens = if filters::needs_tokenizer(&d.filters) {
            Some(filters::load_tokenizer(&recipe.base.model)?)
        } else {
            None
        };
        let store = Arc::new(Store::open(&recipe.project.data_dir.join(JOURNAL))?);
        let teacher = Teacher::new(t, api_key, store, opts.teacher.clone())?;
        let sc = d.filters.iter().find_map(|f| match f {
            Filter::SelfConsistency(s) => Some((s.n.max(1), s.min_agreement)),
            _ => None,
        });
        let reask = d.filters.iter().find_map(|f| match f {
            Filter::JsonSchema(j) => Some(j.reask),
            _ => None,
        });
        Ok(Ctx {
            recipe,
            d,
            t,
            teacher,
            env,
            schema: load_schema(d)?,
            tokens,
            names: filter_names(&d.filters),
            sc,
            reask,
            stop: AtomicBool::new(false),
        })
    }

    fn render(
        &self,
        name: &'static str,
        key: &'static str,
        input: &Input,
        extra: Option<&str>,
    ) -> Result<String, DistillError> {
        let mut vars: Map<String, Value> = input.fields.clone();
        if let Some(text) = extra {
            vars.insert("input".into(), json!(text));
        }
        let tmpl = self.env.get_template(name).map_err(|e| DistillError::Template {
            key,
            input: describe(input),
            message: e.to_string(),
        })?;
        tmpl.render(Value::Object(vars)).map_err(|e| DistillError::Template {
            key,
            input: describe(input),
            message: e.to_string(),
        })
    }

    fn answer_request(&self, messages: Vec<Message>, sample: u32) -> ChatRequest {
        let structured = self.d.output.kind == OutputKind::Json && self.d.output.strict;
        ChatRequest {
            model: self.t.model.clone(),
            messages,
            temperature: self.t.temperature,
            max_tokens: self.t.max_tokens,
            schema: if structured { self.schema.clone() } else { None },
            sample,
        }
    }

    fn base_messages(&self, user: &str) -> Vec<Message> {
        let mut m = Vec::new();
        if !self.d.system_prompt.is_empty() {
            m.push(Message::new("system", self.d.system_prompt.clone()));
        }
        m.push(Message::new("user", user));
        m
    }

    async fn ask(&self, input: &Input, req: &ChatRequest) -> Result<retort_teacher::Answer, DistillError> {
        self.teacher.ask(req).await.map_err(|source| DistillError::Teacher { input: describe(input), source })
    }

    /// Answers one input: samples, retries of unusable answers, the schema re-ask.
    async fn answer(&self, input: Input) -> Result<Result<Cand, Reject>, DistillError> {
        let user = self.render("prompt", "distill.prompt", &input, Some(&input.text))?;
        let n = self.sc.map_or(1, |(n, _)| n);
        let validate_schema = if self.reask.is_some() { self.schema.as_ref() } else { None };
        let mut last = ("teacher", "no answer".to_string(), None::<String>);
        for attempt in 0..self.d.max_attempts.max(1) {
            let mut valid: Vec<(String, String)> = Vec::new();
            // The samples of one attempt go out together (one provider batch in batch mode).
            let reqs: Vec<ChatRequest> =
                (0..n).map(|s| self.answer_request(self.base_messages(&user), attempt * n + s)).collect();
            let answers = futures::future::join_all(reqs.iter().map(|r| self.ask(&input, r))).await;
            for (req, a) in reqs.into_iter().zip(answers) {
                let a = a?;
                if let Some(why) = a.completion.failure() {
                    last = ("teacher", why, Some(a.completion.content.clone()));
                    continue;
                }
                match filters::parse_output(&self.d.output, validate_schema, &a.completion.content) {
                    Ok(ans) => valid.push((ans, a.key)),
                    Err(why) if n == 1 && self.reask.is_some() => {
                        return self.reask(input, user, req, a, why).await;
                    }
                    Err(why) => last = ("output", why, Some(a.completion.content.clone())),
                }
            }
            if valid.is_empty() {
                continue;
            }
            let (answer, key, agreement) = majority(&valid, n, self.d.output.kind);
            return Ok(Ok(Cand { input, user, answer, key, agreement, schema_error: None, judge: None }));
        }
        let (filter, reason, output) = last;
        Ok(Err(Reject { filter: filter.into(), reason, input, user, output, key: None }))
    }

    /// One more request that quotes the validation error; its answer is final either way.
    async fn reask(
        &self,
        input: Input,
        user: String,
        req: ChatRequest,
        first: retort_teacher::Answer,
        why: String,
    ) -> Result<Result<Cand, Reject>, DistillError> {
        let enabled = self.reask == Some(true);
        let mut answer = first.completion.content.clone();
        let mut key = first.key.clone();
        let mut error = why;
        if enabled {
            let mut messages = req.messages.clone();
            messages.push(Message::new("assistant", first.completion.content.clone()));
            messages.push(Message::new(
                "user",
                format!("{error}. Answer again with only the corrected JSON, nothing else."),
            ));
            let again = self.answer_request(messages, req.sample);
            let a = self.ask(&input, &again).await?;
            key = a.key.clone();
            if let Some(f) = a.completion.failure() {
                error = format!("{error}; the re-ask failed too: {f}");
            } else {
                match filters::parse_output(&self.d.output, self.schema.as_ref(), &a.completion.content) {
                    Ok(ok) => {
                        return Ok(Ok(Cand {
                            input,
                            user,
                            answer: ok,
                            key,
                            agreement: None,
                            schema_error: None,
                            judge: None,
                        }));
                    }
                    Err(e2) => {
                        answer = a.completion.content.clone();
                        error = format!("{e2} (after one re-ask quoting the error)");
                    }
                }
            }
        }
        Ok(Ok(Cand { input, user, answer, key, agreement: None, schema_error: Some(error), judge: None }))
    }

    async fn judge(&self, j: &JudgeFilter, c: &Cand) -> Result<Result<f64, String>, DistillError> {
        let prompt = filters::judge_prompt(&j.rubric, j.scale, &self.d.system_prompt, &c.user, &c.answer);
        let req = ChatRequest {
            model: j.model.clone().unwrap_or_else(|| self.t.model.clone()),
            messages: vec![Message::new("user", prompt)],
            temperature: 0.0,
            max_tokens: 256,
            schema: None,
            sample: 0,
        };
        let a = self.ask(&c.input, &req).await?;
        if let Some(f) = a.completion.failure() {
            return Ok(Err(format!("the judge gave no score: {f}")));
        }
        Ok(filters::parse_score(&a.completion.content, j.scale).ok_or_else(|| {
            format!(
                "the judge's reply has no score from 1 to {}: {:?}",
                j.scale,
                filters::short(&a.completion.content)
            )
        }))
    }

    /// Runs futures over `items` with bounded concurrency, in order; after the first error no new
    /// work starts, work in flight finishes (its answers are journaled), and the error is returned.
    async fn each<T, R, F, Fut>(
        &self,
        items: Vec<T>,
        progress: &dyn retort_io::Task,
        f: F,
    ) -> Result<Vec<Option<R>>, DistillError>
    where
        F: Fn(T) -> Fut,
        Fut: Future<Output = Result<R, DistillError>>,
    {
        // In batch mode every item is in flight at once, so that its requests join one batch.
        let width = if self.teacher.is_batch() {
            items.len().max(1)
        } else {
            (self.t.max_concurrency as usize).max(1) * 2
        };
        let batch_progress = async {
            let Some(mut rx) = self.teacher.batch_progress() else { return std::future::pending().await };
            while rx.changed().await.is_ok() {
                let p = *rx.borrow_and_update();
                if p.batches > 0 {
                    let b = if p.batches == 1 { "batch" } else { "batches" };
                    progress.set_message(&format!(
                        "{} provider {b}: {}/{} requests done",
                        p.batches, p.done, p.total
                    ));
                }
            }
            std::future::pending::<()>().await
        };
        let work = futures::stream::iter(items)
            .map(|item| {
                let fut = f(item);
                async move {
                    if self.stop.load(Ordering::Relaxed) {
                        return Ok(None);
                    }
                    let r = fut.await;
                    if r.is_err() {
                        self.stop.store(true, Ordering::Relaxed);
                        self.teacher.halt();
                    }
                    progress.inc(1);
                    if self.t.budget_usd.is_some() || self.teacher.pricing().price.is_some() {
                        progress.set_message(&format!("${:.4}", self.teacher.budget().spent()));
                    }
                    r.map(Some)
                }
            })
            .buffered(width)
            .collect::<Vec<Result<Option<R>, DistillError>>>();
        let results = tokio::select! {
            r = work => r,
            () = batch_progress => Vec::new(),
        };
        let mut out = Vec::with_capacity(results.len());
        let mut first_err = None;
        for r in results {
            match r {
                Ok(x) => out.push(x),
                Err(e) => {
                    // The error that stopped the run, not the requests it stopped.
                    let halted = matches!(e, DistillError::Teacher { source: TeacherError::Halted, .. });
                    if first_err.is_none() || (!halted && first_is_halt(&first_err)) {
                        first_err = Some(e);
                    }
                    out.push(None);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

fn first_is_halt(e: &Option<DistillError>) -> bool {
    matches!(e, Some(DistillError::Teacher { source: TeacherError::Halted, .. }))
}

fn describe(input: &Input) -> String {
    format!("input `{}` at {}", input.id, input.origin)
}

fn agreement_key(a: &str, kind: OutputKind) -> String {
    match kind {
        OutputKind::Text => text::normalize(a),
        OutputKind::Json => serde_json::from_str::<Value>(a)
            .map(|v| retort_teacher::canonical_json(&v).to_string())
            .unwrap_or_else(|_| a.to_string()),
        OutputKind::Label => a.to_string(),
    }
}

/// The most common answer (ties go to the earliest sample), its key, and its share of all `n`
/// samples (failed samples count as disagreeing).
fn majority(valid: &[(String, String)], n: u32, kind: OutputKind) -> (String, String, Option<f64>) {
    let mut counts: Vec<(String, usize, usize)> = Vec::new();
    for (i, (a, _)) in valid.iter().enumerate() {
        let k = agreement_key(a, kind);
        match counts.iter_mut().find(|c| c.0 == k) {
            Some(c) => c.1 += 1,
            None => counts.push((k, 1, i)),
        }
    }
    let best = counts.iter().max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2))).cloned().unwrap_or_default();
    let (answer, key) = valid[best.2].clone();
    let agreement = (n > 1).then(|| best.1 as f64 / f64::from(n));
    (answer, key, agreement)
}

/// State of the whole run.
struct Run {
    kept: Vec<Cand>,
    rejected: Vec<Reject>,
    states: Vec<FilterState>,
    inputs_used: usize,
}

impl Run {
    fn new(ctx: &Ctx<'_>) -> Result<Run, DistillError> {
        let mut states = Vec::new();
        for f in &ctx.d.filters {
            states.push(match f {
                Filter::Regex(r) => {
                    FilterState::Regex(Patterns::new(r.field, &r.must_match, &r.must_not_match)?)
                }
                Filter::Dedup(x) => FilterState::Dedup {
                    exact: HashMap::new(),
                    near: x.near.then(|| (NearDup::new(x.threshold, x.shingle, x.num_perm), Vec::new())),
                },
                Filter::Decontaminate(x) => {
                    let mut grams = HashSet::new();
                    for p in &ctx.d.exclude {
                        for t in filters::read_exclude(p)? {
                            grams.extend(text::strict_ngram_hashes(&t, x.ngram as usize));
                        }
                    }
                    FilterState::Decontaminate(grams)
                }
                _ => FilterState::None,
            });
        }
        Ok(Run { kept: Vec::new(), rejected: Vec::new(), states, inputs_used: 0 })
    }

    /// Applies the filters in recipe order to one wave of answered inputs.
    async fn filter(
        &mut self,
        ctx: &Ctx<'_>,
        mut alive: Vec<Cand>,
        progress: &dyn Progress,
    ) -> Result<(), DistillError> {
        for (fi, f) in ctx.d.filters.iter().enumerate() {
            let name = ctx.names[fi].clone();
            let mut next = Vec::with_capacity(alive.len());
            if let Filter::Judge(j) = f {
                let task = progress.task("judge", alive.len() as u64);
                let scores =
                    ctx.each(alive.clone(), task.as_ref(), |c| async move { ctx.judge(j, &c).await }).await;
                task.finish();
                for (mut c, s) in alive.into_iter().zip(scores?) {
                    match s {
                        Some(Ok(score)) if score >= j.min_score => {
                            c.judge = Some(score);
                            next.push(c);
                        }
                        Some(Ok(score)) => {
                            let r = c
                                .reject(&name, format!("the judge scored it {score}, below {}", j.min_score));
                            self.rejected.push(r);
                        }
                        Some(Err(why)) => self.rejected.push(c.reject(&name, why)),
                        None => {}
                    }
                }
                alive = next;
                continue;
            }
            for c in alive {
                let verdict: Option<String> = match (f, &mut self.states[fi]) {
                    (Filter::JsonSchema(_), _) => c.schema_error.clone(),
                    (Filter::Length(l), _) => {
                        let field = l.field.unwrap_or(TextField::Output);
                        filters::check_length(l, c.text(field), ctx.tokens.as_ref()).map_err(|message| {
                            DistillError::Config { message, hint: "check the tokenizer".into() }
                        })?
                    }
                    (Filter::Regex(_), FilterState::Regex(p)) => p.check(c.text(p.field)),
                    (Filter::Dedup(x), FilterState::Dedup { exact, near }) => {
                        let t = c.text(x.field.unwrap_or(TextField::Input));
                        let norm = text::normalize(t);
                        if let Some(first) = exact.get(&norm) {
                            Some(format!("an exact duplicate of input `{first}`"))
                        } else {
                            let mut why = None;
                            if let Some((nd, ids)) = near {
                                let sig = nd.signature(t);
                                match nd.query(&sig) {
                                    Some((j, sim)) => {
                                        why = Some(format!(
                                            "a near-duplicate (similarity {sim:.2}) of input `{}`",
                                            ids[j]
                                        ))
                                    }
                                    None => {
                                        nd.insert(sig);
                                        ids.push(c.input.id.clone());
                                    }
                                }
                            }
                            if why.is_none() {
                                exact.insert(norm, c.input.id.clone());
                            }
                            why
                        }
                    }
                    (Filter::Decontaminate(x), FilterState::Decontaminate(grams)) => {
                        let n = x.ngram as usize;
                        let hit = [&c.input.text, &c.answer]
                            .iter()
                            .any(|t| text::strict_ngram_hashes(t, n).iter().any(|g| grams.contains(g)));
                        hit.then(|| format!("shares a {n}-word sequence with a `distill.exclude` file"))
                    }
                    (Filter::SelfConsistency(x), _) => match c.agreement {
                        Some(a) if a + 1e-9 < x.min_agreement => Some(format!(
                            "only {:.0}% of the samples agree, below {:.0}%",
                            a * 100.0,
                            x.min_agreement * 100.0
                        )),
                        _ => None,
                    },
                    _ => None,
                };
                match verdict {
                    Some(why) => self.rejected.push(c.reject(&name, why)),
                    None => next.push(c),
                }
            }
            alive = next;
        }
        self.kept.extend(alive);
        Ok(())
    }
}

/// How many more inputs to try: the shortfall, inflated by the rejection rate seen so far.
fn wave_size(need: usize, used: usize, kept: usize, first_factor: f64) -> usize {
    let factor = if used == 0 {
        first_factor
    } else if kept == 0 {
        2.0
    } else {
        (used as f64 / kept as f64 * 1.1).min(10.0)
    };
    ((need as f64 * factor).ceil() as usize).max(1)
}

async fn generate_inputs(
    ctx: &Ctx<'_>,
    g: &GeneratedInputs,
    grid: &[(String, String)],
    range: std::ops::Range<usize>,
    run: &mut Run,
    progress: &dyn Progress,
) -> Result<Vec<Input>, DistillError> {
    let task = progress.task("inputs", range.len() as u64);
    let slots: Vec<usize> = range.collect();
    let results = ctx
        .each(slots.clone(), task.as_ref(), |i| async move {
            let (topic, persona, index) = inputs::slot(grid, i);
            let mut fields = Map::new();
            fields.insert("topic".into(), json!(topic));
            fields.insert("persona".into(), json!(persona));
            fields.insert("index".into(), json!(index));
            let slot = Input {
                id: format!("gen-{i}"),
                origin: format!("generated slot {i}"),
                text: String::new(),
                fields,
            };
            let prompt = ctx.render("generate", "distill.inputs.prompt", &slot, None)?;
            let req = ChatRequest {
                model: ctx.t.model.clone(),
                messages: vec![Message::new("user", prompt.clone())],
                temperature: g.temperature,
                max_tokens: ctx.t.max_tokens,
                schema: None,
                sample: index as u32,
            };
            let a = ctx.ask(&slot, &req).await?;
            Ok((slot, prompt, a))
        })
        .await;
    task.finish();
    let mut out = Vec::new();
    for r in results? {
        let Some((mut slot, prompt, a)) = r else { continue };
        match a.completion.failure() {
            Some(why) => run.rejected.push(Reject {
                filter: "generate".into(),
                reason: why,
                input: slot,
                user: prompt,
                output: Some(a.completion.content),
                key: Some(a.key),
            }),
            None => {
                slot.text = a.completion.content.trim().to_string();
                out.push(slot);
            }
        }
    }
    Ok(out)
}

/// Runs distill for a loaded recipe: answers, filters, splits, and writes `train/val/test.jsonl`,
/// `rejected.jsonl` and `distill.json` in `project.data_dir`. The caller holds the data
/// directory's lock. On a budget or time limit the report is written with the reason, and the
/// error is returned (it is resumable: answered requests are in the journal).
pub async fn run(
    recipe: &Recipe,
    api_key: Option<String>,
    progress: &dyn Progress,
    opts: &Options,
) -> Result<Outcome, DistillError> {
    let started = Instant::now();
    let ctx = Ctx::new(recipe, api_key, opts)?;
    let mut run = Run::new(&ctx)?;
    let result = drive(&ctx, &mut run, progress).await;
    let _ = ctx.teacher.store().sync();
    let data_dir = &recipe.project.data_dir;
    match result {
        Ok(()) => finish(&ctx, run, started, data_dir),
        Err(e) => {
            let mut report = report(&ctx, &run, started, [0, 0, 0]);
            report["status"] = json!(if e.is_resumable() { "stopped_resumable" } else { "failed" });
            report["error"] = json!(e.to_string());
            std::fs::create_dir_all(data_dir)
                .map_err(|source| DistillError::Write { path: data_dir.clone(), source })?;
            output::write_json(&data_dir.join("distill.json"), &report)?;
            Err(e)
        }
    }
}

async fn drive(ctx: &Ctx<'_>, run: &mut Run, progress: &dyn Progress) -> Result<(), DistillError> {
    let target = ctx.d.target_examples as usize;
    match &ctx.d.inputs {
        Inputs::File(f) => {
            let all = inputs::read_file(f)?;
            while run.kept.len() < target && run.inputs_used < all.len() {
                let need = target - run.kept.len();
                let size =
                    wave_size(need, run.inputs_used, run.kept.len(), 1.0).min(all.len() - run.inputs_used);
                let wave: Vec<Input> = all[run.inputs_used..run.inputs_used + size].to_vec();
                run.inputs_used += size;
                answer_wave(ctx, run, wave, progress).await?;
            }
        }
        Inputs::Generate(g) => {
            let grid = inputs::grid(g)?;
            let cap = (target as f64 * g.oversample * GENERATE_CAP).ceil() as usize;
            let mut slot = 0usize;
            while run.kept.len() < target && slot < cap {
                let need = target - run.kept.len();
                let size = wave_size(need, run.inputs_used, run.kept.len(), g.oversample).min(cap - slot);
                let made = generate_inputs(ctx, g, &grid, slot..slot + size, run, progress).await?;
                slot += size;
                run.inputs_used += size;
                answer_wave(ctx, run, made, progress).await?;
            }
        }
    }
    Ok(())
}

async fn answer_wave(
    ctx: &Ctx<'_>,
    run: &mut Run,
    wave: Vec<Input>,
    progress: &dyn Progress,
) -> Result<(), DistillError> {
    let task = progress.task("answers", wave.len() as u64);
    let answered = ctx.each(wave, task.as_ref(), |input| ctx.answer(input)).await;
    task.finish();
    let mut alive = Vec::new();
    for a in answered? {
        match a {
            Some(Ok(c)) => alive.push(c),
            Some(Err(r)) => run.rejected.push(r),
            None => {}
        }
    }
    run.filter(ctx, alive, progress).await
}

fn finish(
    ctx: &Ctx<'_>,
    mut run: Run,
    started: Instant,
    data_dir: &std::path::Path,
) -> Result<Outcome, DistillError> {
    let target = ctx.d.target_examples as usize;
    run.kept.truncate(target);
    let teacher_name = format!("{}:{}", ctx.t.provider.as_str(), ctx.t.model);
    let examples: Vec<Example> = run
        .kept
        .iter()
        .map(|c| {
            let mut scores = Map::new();
            if let Some(s) = c.judge {
                scores.insert("judge".into(), json!(s));
            }
            if let Some(a) = c.agreement {
                scores.insert("agreement".into(), json!((a * 1000.0).round() / 1000.0));
            }
            Example {
                system: ctx.d.system_prompt.clone(),
                user: c.user.clone(),
                assistant: c.answer.clone(),
                provenance: json!({"teacher": teacher_name, "request": c.key, "input": c.input.id, "scores": scores}),
            }
        })
        .collect();
    let threshold = ctx.d.filters.iter().find_map(|f| match f {
        Filter::Dedup(x) if x.near => Some(x.threshold),
        _ => None,
    });
    let [mut train, mut val, test] =
        output::split(&examples, &ctx.d.split, ctx.recipe.project.seed, threshold.unwrap_or(0.85));
    // Decontaminate against the test split: train and val rows sharing an n-gram with it go.
    if let Some((fi, n)) = ctx.d.filters.iter().enumerate().find_map(|(i, f)| match f {
        Filter::Decontaminate(x) => Some((i, x.ngram as usize)),
        _ => None,
    }) {
        let mut grams: HashMap<u64, usize> = HashMap::new();
        for &i in &test {
            for t in [&examples[i].user, &examples[i].assistant] {
                for g in text::strict_ngram_hashes(t, n) {
                    grams.entry(g).or_insert(i);
                }
            }
        }
        for split in [&mut train, &mut val] {
            split.retain(|&i| {
                let e = &examples[i];
                let hit = [&e.user, &e.assistant].iter().find_map(|t| {
                    text::strict_ngram_hashes(t, n).into_iter().find_map(|g| grams.get(&g).copied())
                });
                match hit {
                    Some(ti) => {
                        let why = format!(
                            "shares a {n}-word sequence with test example from input `{}`",
                            run.kept[ti].input.id
                        );
                        run.rejected.push(run.kept[i].reject(&ctx.names[fi], why));
                        false
                    }
                    None => true,
                }
            });
        }
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|source| DistillError::Write { path: data_dir.to_path_buf(), source })?;
    let format = ctx.d.format;
    for (name, idx) in [("train", &train), ("val", &val), ("test", &test)] {
        let rows: Vec<Value> = idx.iter().map(|&i| examples[i].row(format)).collect();
        output::write_jsonl(&data_dir.join(format!("{name}.jsonl")), rows.iter())?;
    }
    let rejected_rows: Vec<Value> = run
        .rejected
        .iter()
        .map(|r| {
            json!({"input_id": r.input.id, "input": r.input.text, "prompt": r.user, "output": r.output,
                   "filter": r.filter, "reason": r.reason, "request": r.key})
        })
        .collect();
    output::write_jsonl(&data_dir.join("rejected.jsonl"), rejected_rows.iter())?;
    let counts = [train.len(), val.len(), test.len()];
    let mut rep = report(ctx, &run, started, counts);
    let kept: Vec<&Example> = train.iter().chain(&val).chain(&test).map(|&i| &examples[i]).collect();
    rep["diversity"] = diversity(&kept);
    rep["status"] = json!(if kept.len() >= target { "complete" } else { "inputs_exhausted" });
    output::write_json(&data_dir.join("distill.json"), &rep)?;
    Ok(Outcome { report: rep, counts, rejected: run.rejected.len() })
}

fn diversity(kept: &[&Example]) -> Value {
    let users: Vec<&str> = kept.iter().map(|e| e.user.as_str()).collect();
    let answers: Vec<&str> = kept.iter().map(|e| e.assistant.as_str()).collect();
    let mut nd = NearDup::new(0.85, 5, 64);
    let mut near = 0usize;
    for u in &users {
        let sig = nd.signature(u);
        if nd.query(&sig).is_some() {
            near += 1;
        }
        nd.insert(sig);
    }
    let r = |x: f64| (x * 10_000.0).round() / 10_000.0;
    json!({
        "input_distinct_1": r(text::distinct_n(users.iter().copied(), 1)),
        "input_distinct_2": r(text::distinct_n(users.iter().copied(), 2)),
        "output_distinct_1": r(text::distinct_n(answers.iter().copied(), 1)),
        "output_distinct_2": r(text::distinct_n(answers.iter().copied(), 2)),
        "input_near_dup_rate": r(if users.is_empty() { 0.0 } else { near as f64 / users.len() as f64 }),
    })
}

fn report(ctx: &Ctx<'_>, run: &Run, started: Instant, counts: [usize; 3]) -> Value {
    let s = ctx.teacher.stats();
    let mut per_filter: BTreeMap<String, usize> = BTreeMap::new();
    for name in
        ["generate", "teacher", "output"].iter().map(|s| s.to_string()).chain(ctx.names.iter().cloned())
    {
        per_filter.insert(name, 0);
    }
    for r in &run.rejected {
        *per_filter.entry(r.filter.clone()).or_default() += 1;
    }
    let order: Vec<Value> = ["generate", "teacher", "output"]
        .iter()
        .map(|s| s.to_string())
        .chain(ctx.names.iter().cloned())
        .map(|n| json!({"filter": n, "rejected": per_filter.get(&n).copied().unwrap_or(0)}))
        .collect();
    let r = |x: f64| (x * 1e6).round() / 1e6;
    json!({
        "status": "running",
        "recipe": ctx.recipe.project.name,
        "teacher": {"provider": ctx.t.provider.as_str(), "model": ctx.t.model, "batch": ctx.t.batch},
        "requests": {
            "sent": s.sent,
            "cache_hits": s.cache_hits,
            "unanswered_before_restart": s.unanswered_before_restart,
            "retries": s.retries,
            "batches_submitted": s.batches_submitted,
            "batches_resumed": s.batches_resumed,
        },
        "tokens": {"input": s.input_tokens, "cached_input": s.cached_input_tokens, "output": s.output_tokens},
        "cost_usd": {"this_run": r(s.cost_usd) + 0.0, "earlier_runs": r(s.cost_before_usd) + 0.0, "total": r(s.cost_usd + s.cost_before_usd) + 0.0, "budget": ctx.t.budget_usd},
        "inputs_used": run.inputs_used,
        "rows": {"kept": counts.iter().sum::<usize>(), "train": counts[0], "val": counts[1], "test": counts[2], "rejected": run.rejected.len()},
        "rejected_by_filter": order,
        "wall_time_s": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    })
}

/// Counts what a run's first pass would send, without sending anything.
pub fn estimate(recipe: &Recipe, api_key: Option<String>) -> Result<Estimate, DistillError> {
    let ctx = Ctx::new(recipe, api_key, &Options::default())?;
    let target = ctx.d.target_examples as usize;
    let n = ctx.sc.map_or(1, |(n, _)| n) as u64;
    let mut reqs: Vec<ChatRequest> = Vec::new();
    let mut notes = Vec::new();
    let mut unknown = 0u64;
    match &ctx.d.inputs {
        Inputs::File(f) => {
            let all = inputs::read_file(f)?;
            for input in all.iter().take(target) {
                let user = ctx.render("prompt", "distill.prompt", input, Some(&input.text))?;
                for s in 0..n as u32 {
                    reqs.push(ctx.answer_request(ctx.base_messages(&user), s));
                }
            }
        }
        Inputs::Generate(g) => {
            let grid = inputs::grid(g)?;
            let slots = (target as f64 * g.oversample).ceil() as usize;
            for i in 0..slots {
                let (topic, persona, index) = inputs::slot(&grid, i);
                let mut fields = Map::new();
                fields.insert("topic".into(), json!(topic));
                fields.insert("persona".into(), json!(persona));
                fields.insert("index".into(), json!(index));
                let slot = Input {
                    id: format!("gen-{i}"),
                    origin: format!("generated slot {i}"),
                    text: String::new(),
                    fields,
                };
                let prompt = ctx.render("generate", "distill.inputs.prompt", &slot, None)?;
                reqs.push(ChatRequest {
                    model: ctx.t.model.clone(),
                    messages: vec![Message::new("user", prompt)],
                    temperature: g.temperature,
                    max_tokens: ctx.t.max_tokens,
                    schema: None,
                    sample: index as u32,
                });
            }
            unknown += slots as u64 * n;
            notes.push(format!(
                "{} answer requests for generated inputs are counted with the size of their prompt template",
                slots as u64 * n
            ));
        }
    }
    let judges = ctx.d.filters.iter().filter(|f| matches!(f, Filter::Judge(_))).count() as u64;
    if judges > 0 {
        notes.push(format!(
            "{} judge requests (one per answer that reaches the judge) are counted at most",
            target as u64 * judges
        ));
    }
    if ctx.reask == Some(true) {
        notes.push("re-asks after schema failures and retries of unusable answers come on top".into());
    }
    if target > 0 {
        notes.push("rejected rows are made up for by further passes over more inputs".into());
    }
    let pricing = ctx.teacher.pricing();
    if ctx.teacher.is_batch() {
        let discount = pricing.price.as_ref().map_or(0.5, |p| p.batch_discount);
        notes.push(format!(
            "costs are at the batch price ({}% of the online price); answers arrive when the provider ends the batch, within 24 hours",
            (discount * 100.0).round()
        ));
    }
    let mut est = Estimate {
        requests: 0,
        cached: 0,
        input_tokens: 0,
        max_output_tokens: 0,
        input_cost_usd: 0.0,
        max_cost_usd: 0.0,
        spent_usd: ctx.teacher.store().spent_at_open(),
        budget_usd: ctx.t.budget_usd,
        priced: pricing.price.is_some(),
        notes,
    };
    let mut add = |input_tokens: u64, max_tokens: u32, cached: bool| {
        est.requests += 1;
        if cached {
            est.cached += 1;
            return;
        }
        est.input_tokens += input_tokens;
        est.max_output_tokens += u64::from(max_tokens);
        est.input_cost_usd += pricing.worst_case(input_tokens, 0);
        est.max_cost_usd += pricing.worst_case(input_tokens, max_tokens);
    };
    let replay = ctx.t.provider == retort_recipe::schema::teacher::Provider::Replay;
    for r in &reqs {
        add(r.estimated_input_tokens(), r.max_tokens, !replay && ctx.teacher.is_cached(r));
    }
    let avg_answer_tokens = (ctx.d.system_prompt.len() as u64 + 200).div_ceil(4);
    for _ in 0..unknown {
        add(avg_answer_tokens, ctx.t.max_tokens, false);
    }
    for _ in 0..target as u64 * judges {
        add(avg_answer_tokens + 200, 256, false);
    }
    Ok(est)
}

/// Turns a teacher error raised outside any input into a distill error.
impl From<(Input, TeacherError)> for DistillError {
    fn from((input, source): (Input, TeacherError)) -> Self {
        DistillError::Teacher { input: describe(&input), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_majority_answer_and_its_share() {
        let v =
            vec![("a".to_string(), "k1".to_string()), ("b".into(), "k2".into()), ("b".into(), "k3".into())];
        assert_eq!(majority(&v, 4, OutputKind::Label), ("b".into(), "k2".into(), Some(0.5)));
        assert_eq!(majority(&v[..1], 1, OutputKind::Label), ("a".into(), "k1".into(), None));
        let j = vec![
            ("{\"a\":1,\"b\":2}".to_string(), "x".to_string()),
            ("{\"b\":2,\"a\":1}".into(), "y".into()),
        ];
        assert_eq!(majority(&j, 2, OutputKind::Json).2, Some(1.0));
    }

    #[test]
    fn waves_grow_with_the_rejection_rate() {
        assert_eq!(wave_size(100, 0, 0, 1.0), 100);
        assert_eq!(wave_size(100, 0, 0, 1.3), 130);
        assert_eq!(wave_size(10, 100, 50, 1.0), 22);
        assert_eq!(wave_size(10, 100, 0, 1.0), 20);
    }

    #[test]
    fn repeated_filter_kinds_get_numbered_names() {
        use retort_recipe::schema::distill::{DedupFilter, LengthFilter};
        let f = vec![
            Filter::Length(LengthFilter::default()),
            Filter::Dedup(DedupFilter::default()),
            Filter::Length(LengthFilter::default()),
        ];
        assert_eq!(filter_names(&f), ["length", "dedup", "length#2"]);
    }
}
