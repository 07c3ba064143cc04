//! Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p, repetition penalty,
//! applied in that order as transformers' logits processors do), seeded, batched with left padding,
//! stopping per row at any end-of-sequence id.

use burn::tensor::DType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::batch::Batch;
use crate::error::ModelError;
use crate::model::{KvCache, Transformer};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 is greedy; otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p`.
    pub top_p: Option<f32>,
    /// Penalise tokens already in the prompt or the answer (1.0 is none; transformers' rule).
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Sampling {
    /// Greedy decoding.
    pub fn greedy() -> Sampling {
        Sampling { temperature: 0.0, top_k: None, top_p: None, repetition_penalty: None, seed: 0 }
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most new tokens per row.
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// A row stops after producing any of these (included in its output).
    pub eos: Vec<u32>,
    /// Padding id for left padding and for rows that already stopped.
    pub pad: u32,
}

/// The result of [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// New tokens per row (up to and including the end-of-sequence token, if one came).
    pub tokens: Vec<Vec<u32>>,
    /// Whether each row stopped on an end-of-sequence token (else it hit `max_new_tokens`).
    pub stopped: Vec<bool>,
}

fn argmax(v: &[f32]) -> usize {
    // First index of the maximum, as torch.argmax.
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Picks the next token from one row's logits.
pub fn choose(logits: &mut [f32], history: &[u32], s: &Sampling, rng: &mut StdRng) -> u32 {
    if let Some(p) = s.repetition_penalty.filter(|p| *p != 1.0) {
        let mut seen = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            if let Some(x) = logits.get_mut(t as usize) {
                *x = if *x < 0.0 { *x * p } else { *x / p };
            }
        }
    }
    if s.temperature <= 0.0 {
        return argmax(logits) as u32;
    }
    for x in logits.iter_mut() {
        *x /= s.temperature;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let mut keep = order.len();
    if let Some(k) = s.top_k.filter(|k| *k > 0) {
        keep = keep.min(k);
    }
    let max = logits[order[0]];
    let mut probs: Vec<f64> = order[..keep].iter().map(|&i| f64::from(logits[i] - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    for p in &mut probs {
        *p /= total;
    }
    if let Some(top_p) = s.top_p.filter(|p| *p < 1.0) {
        let mut acc = 0.0;
        let mut n = 0;
        for p in &probs {
            n += 1;
            acc += p;
            if acc >= f64::from(top_p) {
                break;
            }
        }
        probs.truncate(n.max(1));
        let t: f64 = probs.iter().sum();
        for p in &mut probs {
            *p /= t;
        }
    }
    let mut r: f64 = rng.random();
    for (i, p) in probs.iter().enumerate() {
        if r < *p {
            return order[i] as u32;
        }
        r -= p;
    }
    order[probs.len() - 1] as u32
}

/// Generates continuations of `prompts` together, calling `on_token(row, token)` as each token is
/// chosen (for streaming).
pub fn generate(
    model: &Transformer,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Generated, ModelError> {
    if prompts.is_empty() {
        return Ok(Generated { tokens: Vec::new(), stopped: Vec::new() });
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(ModelError::Input(format!("prompt {i} is empty; generation needs at least one token")));
    }
    let vocab = model.config.vocab_size;
    if let Some(bad) = prompts.iter().flatten().find(|t| **t as usize >= vocab) {
        return Err(ModelError::Input(format!(
            "token id {bad} is outside the model's vocabulary of {vocab}"
        )));
    }
    let rows = prompts.len();
    let mut rng = StdRng::seed_from_u64(opts.sampling.seed);
    let mut cache = KvCache::new();
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); rows];
    let mut stopped = vec![false; rows];
    let mut positions: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut batch = Batch::left_padded(prompts, opts.pad);
    for step in 0..opts.max_new_tokens {
        let hidden = model.hidden(&batch, Some(&mut cache));
        let len = batch.len;
        let last = hidden.narrow(1, len - 1, 1);
        let logits = model.logits(last).cast(DType::F32).into_data();
        let logits: Vec<f32> =
            logits.try_into_vec().map_err(|e| ModelError::Input(format!("cannot read logits: {e:?}")))?;
        let mut next = vec![opts.pad; rows];
        for r in 0..rows {
            if stopped[r] {
                continue;
            }
            let row = &mut logits[r * vocab..(r + 1) * vocab].to_vec();
            let history: Vec<u32> = prompts[r].iter().chain(&tokens[r]).copied().collect();
            let t = choose(row, &history, &opts.sampling, &mut rng);
            tokens[r].push(t);
            on_token(r, t);
            next[r] = t;
            if opts.eos.contains(&t) {
                stopped[r] = true;
            }
        }
        if stopped.iter().all(|s| *s) || step + 1 == opts.max_new_tokens {
            break;
        }
        batch = Batch {
            rows,
            len: 1,
            ids: next,
            positions: positions.clone(),
            valid: vec![true; rows],
            segments: vec![0; rows],
        };
        for p in &mut positions {
            *p += 1;
        }
    }
    Ok(Generated { tokens, stopped })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut rng = StdRng::seed_from_u64(0);
        let mut l = vec![0.1, 3.0, 3.0, -1.0];
        assert_eq!(choose(&mut l, &[], &Sampling::greedy(), &mut rng), 1);
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        let mut rng = StdRng::seed_from_u64(0);
        // Token 0 was seen: 2.0 / 4 = 0.5 < 1.0, so token 1 wins.
        let mut l = vec![2.0, 1.0];
        let s = Sampling { repetition_penalty: Some(4.0), ..Sampling::greedy() };
        assert_eq!(choose(&mut l, &[0], &s, &mut rng), 1);
        // A negative logit is multiplied, so it gets worse.
        let mut l = vec![-1.0, -2.0];
        assert_eq!(choose(&mut l, &[0], &s, &mut rng), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_sampling_is_seeded() {
        let s = Sampling { temperature: 1.0, top_k: Some(1), top_p: None, repetition_penalty: None, seed: 3 };
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..20 {
            assert_eq!(choose(&mut [0.0, 5.0, 4.9], &[], &s, &mut rng), 1);
        }
        let s =
            Sampling { temperature: 1.0, top_k: None, top_p: Some(0.9), repetition_penalty: None, seed: 3 };
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..50).map(|_| choose(&mut [1.0, 1.0, 1.0, -20.0], &[], &s, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        assert!(!draw(7).contains(&3), "top-p removes the improbable token");
    }
}
