//! Decoding over a caller-owned [`KvCache`]: greedy, beam search (length penalty, n-best) and
//! sampling (temperature, top-k, top-p), for any [`Incremental`] model and for many inputs at
//! once. Rows that finish leave the cache, so long outputs do not slow down short ones.

use crate::error::{Error, Result};
use crate::model::{Decoding, Incremental, KvCache};
use crate::rng::{hash, Rng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How a model decodes unless a flag or request says otherwise: a job's `decode` section,
/// saved in every model directory it trains (`decode.json`), so `translate`, `eval`,
/// `generate`, `serve` and `attention` decode as the job did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecodeConfig {
    /// Beam width; 1 is greedy decoding (default 4).
    pub beam: usize,
    /// fairseq's `--lenpen` (default 1.0).
    pub length_penalty: f32,
    /// Output length limit `a · source_len + b` (fairseq's `--max-len-a/b`; 1.5 and 10).
    pub max_len_a: f32,
    pub max_len_b: usize,
    /// No EOS before this many tokens (fairseq's `--min-len`; default 0).
    pub min_len: usize,
    /// Never repeat an n-gram of this size within an output (fairseq's
    /// `--no-repeat-ngram-size`; 0, the default, allows repeats).
    pub no_repeat_ngram_size: usize,
    /// Minimum Bayes risk: return, of the beam's best `mbr` outputs (with `sampling`, the
    /// first `mbr` samples; at most the beam), the
    /// one most alike the others ([`crate::mbr`]; ROUGE-L for summaries, chrF for
    /// translations). 0 or 1, the default, returns the most probable output.
    pub mbr: usize,
    /// With `mbr`: score each candidate against this many samples per input (drawn by
    /// `temperature`, `top_k`, `top_p` and `seed`, under `min_len` and
    /// `no_repeat_ngram_size`) instead of against the other candidates. Samples at
    /// temperature 1 estimate the model's distribution without bias, and the beam's outputs
    /// are better candidates than samples (Eikema & Aziz, 2020, separate hypotheses from
    /// pseudo-references). 0, the default, scores candidates against each other.
    pub mbr_references: usize,
    /// Translation and summaries: draw `beam` outputs per input by sampling (`temperature`,
    /// `top_k`, `top_p`) instead of beam search (fairseq's `--sampling`); MBR's usual
    /// candidates. Off by default.
    pub sampling: bool,
    /// With `sampling`: source `i`'s samples draw from `hash(seed, i)` (default 0).
    pub seed: u64,
    /// Language models: new tokens per prompt (default 200).
    pub max_new_tokens: usize,
    /// Sampling temperature of language models and of `sampling` (default 0.8).
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            beam: 4,
            length_penalty: 1.0,
            max_len_a: 1.5,
            max_len_b: 10,
            min_len: 0,
            no_repeat_ngram_size: 0,
            mbr: 0,
            mbr_references: 0,
            sampling: false,
            seed: 0,
            max_new_tokens: 200,
            temperature: 0.8,
            top_k: None,
            top_p: None,
        }
    }
}

impl DecodeConfig {
    /// Reject settings decoding cannot use, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.beam == 0 {
            return Err(Error::Config("decode.beam must be at least 1".into()));
        }
        if !(self.max_len_a >= 0.0 && self.max_len_a.is_finite()) {
            return Err(Error::Config(format!(
                "decode.max_len_a must be ≥ 0, got {}",
                self.max_len_a
            )));
        }
        if !self.length_penalty.is_finite() {
            return Err(Error::Config("decode.length_penalty must be finite".into()));
        }
        self.sampling(0).validate()
    }

    /// Beam search settings with `nbest` outputs.
    pub fn beam(&self, nbest: usize) -> BeamConfig {
        BeamConfig {
            beam: self.beam,
            length_penalty: self.length_penalty,
            nbest,
            min_len: self.min_len,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
        }
    }

    /// Sampling settings with `seed`.
    pub fn sampling(&self, seed: u64) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed,
        }
    }

    /// Outputs to decode per input for `nbest` results: enough for MBR's candidates, never
    /// more than the beam.
    pub fn candidates(&self, nbest: usize) -> usize {
        nbest.max(self.mbr).min(self.beam).max(1)
    }

    /// Samples drawn per input as MBR's references (`mbr_references`, when MBR is on).
    pub fn references(&self) -> usize {
        if self.mbr > 1 {
            self.mbr_references
        } else {
            0
        }
    }

    /// Most output positions (EOS included) for a source of `src_len` tokens, within the
    /// model's `max_len`.
    pub fn max_output(&self, src_len: usize, max_len: usize) -> usize {
        ((self.max_len_a.max(0.0) * src_len as f32) as usize)
            .saturating_add(self.max_len_b)
            .clamp(1, max_len)
    }
}

/// How the next token of a row is chosen from its logits.
#[derive(Clone, Debug, PartialEq)]
pub enum Choice {
    Greedy,
    Sample(Sampling),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Logits are divided by this (> 0); below 1 sharpens, above 1 flattens.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (nucleus).
    pub top_p: Option<f32>,
    pub seed: u64,
}

impl Sampling {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(Error::Config(format!(
                "temperature must be > 0, got {}",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::Config("top-k must be at least 1".into()));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Config(format!("top-p must be in (0, 1], got {p}")));
            }
        }
        Ok(())
    }
}

/// The stream of a sampling seed that token choices draw from (seeds name streams of the
/// counter-based generator; this keeps sampling's apart from dropout's and init's).
const SAMPLING_STREAM: u64 = 0x5a4d_504c_494e_4721;

crate::simd::multiversion! {
    /// Index of the largest value (the first of equal ones; NaN is never the largest, and a
    /// NaN first value gives 0). Two vectorized passes, the maximum and then its first
    /// position: the one-pass scalar loop was 2% of greedy translation's time.
    pub fn argmax(x: &[f32]) -> usize {
        if x.first().is_none_or(|v| v.is_nan()) {
            return 0;
        }
        let m = crate::simd::max(x);
        // A block at a time, with a branch-free test per block, so the search vectorizes.
        let mut at = 0;
        for block in x.chunks(16) {
            if block.iter().fold(false, |hit, &v| hit | (v == m)) {
                return at + block.iter().position(|&v| v == m).unwrap_or(0);
            }
            at += block.len();
        }
        0
    }
}

/// Draw one token from `logits` after temperature, top-k and top-p filtering.
fn sample_token(logits: &[f32], s: &Sampling, rng: &mut Rng) -> usize {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    idx.truncate(s.top_k.unwrap_or(idx.len()).max(1));
    let max = logits[idx[0]];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i] - max) / s.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = s.top_p {
        let mut cum = 0.0;
        let keep = probs
            .iter()
            .position(|&p| {
                cum += p;
                cum >= top_p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.uniform() as f64 * total;
    for (k, &p) in probs.iter().enumerate() {
        if u < p {
            return idx[k];
        }
        u -= p;
    }
    idx[probs.len() - 1]
}

/// Extend each row of `cache` token by token. `prefixes[r]` is fed first (e.g. `[BOS]`, or BOS
/// and a prompt); after it, tokens are chosen by `choices[r]` (or `choices[0]` for every row)
/// until `eos` or the cache is full (so a row holds at most `capacity - prefix length` new
/// tokens). Returns, per row, the chosen tokens after the prefix, without `eos`.
///
/// A sampled row draws from a generator seeded by its own choice's seed alone, so its sample
/// is the same whatever it is batched with and at whichever row.
pub fn generate<B: Decoding, M: Incremental<B>>(
    model: &mut M,
    cache: &mut KvCache<B>,
    prefixes: &[Vec<u32>],
    eos: u32,
    choices: &[Choice],
) -> Result<Vec<Vec<u32>>> {
    generate_within(model, cache, prefixes, eos, choices, None)
}

/// [`generate`], and with `rules` a row never takes a token they ban after its output so far
/// (`min_len`, `no_repeat_ngram_size`, with the prefix's first token as BOS).
fn generate_within<B: Decoding, M: Incremental<B>>(
    model: &mut M,
    cache: &mut KvCache<B>,
    prefixes: &[Vec<u32>],
    eos: u32,
    choices: &[Choice],
    rules: Option<&BeamConfig>,
) -> Result<Vec<Vec<u32>>> {
    if prefixes.len() != cache.rows() || prefixes.iter().any(|p| p.is_empty()) {
        return Err(Error::Config(format!(
            "generate needs one non-empty prefix per cache row ({} rows, {} prefixes)",
            cache.rows(),
            prefixes.len()
        )));
    }
    if choices.len() != 1 && choices.len() != prefixes.len() {
        return Err(Error::Config(format!(
            "generate needs one choice for all rows or one per row ({} rows, {} choices)",
            prefixes.len(),
            choices.len()
        )));
    }
    let choice = |row: usize| &choices[if choices.len() == 1 { 0 } else { row }];
    if cache.len != 0 {
        return Err(Error::Config(
            "generate needs a freshly started cache".into(),
        ));
    }
    for c in choices {
        if let Choice::Sample(s) = c {
            s.validate()?;
        }
    }
    let n = prefixes.len();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut rngs: Vec<Rng> = (0..n)
        .map(|r| match choice(r) {
            Choice::Sample(s) => Rng::new(hash(s.seed, SAMPLING_STREAM)),
            Choice::Greedy => Rng::new(0),
        })
        .collect();
    let mut live: Vec<usize> = (0..n).collect(); // cache row i decodes input row live[i]
    let mut next: Vec<u32> = prefixes.iter().map(|p| p[0]).collect();
    while !live.is_empty() && cache.len < cache.capacity {
        let pos = cache.len;
        let vocab = model.vocab();
        let logits = model.step(cache, &next)?;
        if pos + 1 >= cache.capacity {
            // The length limit: a token chosen here could never be fed back, so the rows end
            // (as beam search, which forces EOS at the limit).
            break;
        }
        let mut keep = Vec::with_capacity(live.len());
        for (i, &row) in live.iter().enumerate() {
            let prefix = &prefixes[row];
            let token = if pos + 1 < prefix.len() {
                prefix[pos + 1]
            } else {
                let mut l = &logits[i * vocab..(i + 1) * vocab];
                let banned = rules.map_or(Vec::new(), |r| r.banned(prefix[0], &out[row], eos));
                let masked;
                if !banned.is_empty() {
                    let mut m = l.to_vec();
                    for &b in &banned {
                        m[b as usize] = f32::NEG_INFINITY;
                    }
                    masked = m;
                    l = &masked;
                }
                let t = match choice(row) {
                    Choice::Greedy => argmax(l),
                    Choice::Sample(s) => sample_token(l, s, &mut rngs[row]),
                } as u32;
                if t == eos {
                    continue;
                }
                out[row].push(t);
                t
            };
            next[keep.len()] = token;
            keep.push(i);
        }
        if keep.len() != live.len() {
            cache.reorder(&keep);
            live = keep.iter().map(|&i| live[i]).collect();
            next.truncate(live.len());
        }
    }
    Ok(out)
}

/// Greedy decoding of every row from `bos`.
pub fn greedy<B: Decoding, M: Incremental<B>>(
    model: &mut M,
    cache: &mut KvCache<B>,
    bos: u32,
    eos: u32,
) -> Result<Vec<Vec<u32>>> {
    let prefixes = vec![vec![bos]; cache.rows()];
    generate(model, cache, &prefixes, eos, &[Choice::Greedy])
}

/// `n` sampled outputs (tokens after `bos`, without EOS) for every row of a freshly started
/// `cache` (one row per input), under `rules`' `min_len` and `no_repeat_ngram_size`
/// (fairseq's `--sampling` with `--beam n`). Sample `k` of input `i` draws from
/// `sampling` seeded by `hash(seeds[i], k)`, so it is the same whatever it is batched with.
#[allow(clippy::too_many_arguments)]
pub fn sample_outputs<B: Decoding, M: Incremental<B>>(
    model: &mut M,
    cache: &mut KvCache<B>,
    bos: u32,
    eos: u32,
    n: usize,
    rules: &BeamConfig,
    sampling: &Sampling,
    seeds: &[u64],
) -> Result<Vec<Vec<Vec<u32>>>> {
    let inputs = cache.rows();
    if n == 0 || seeds.len() != inputs {
        return Err(Error::Config(format!(
            "sampling needs n >= 1 and one seed per input (n {n}, {} seeds, {inputs} inputs)",
            seeds.len()
        )));
    }
    let rows: Vec<usize> = (0..inputs)
        .flat_map(|i| std::iter::repeat_n(i, n))
        .collect();
    cache.reorder(&rows);
    let choices: Vec<Choice> = rows
        .iter()
        .enumerate()
        .map(|(r, &i)| {
            Choice::Sample(Sampling {
                seed: hash(seeds[i], (r % n) as u64),
                ..sampling.clone()
            })
        })
        .collect();
    let prefixes = vec![vec![bos]; rows.len()];
    let mut out = generate_within(model, cache, &prefixes, eos, &choices, Some(rules))?.into_iter();
    Ok((0..inputs)
        .map(|_| out.by_ref().take(n).collect())
        .collect())
}

#[derive(Clone, Debug, PartialEq)]
pub struct BeamConfig {
    pub beam: usize,
    /// Finished hypotheses are ranked by `log p / length^length_penalty` (fairseq's `--lenpen`;
    /// length counts EOS): above 1 favours longer outputs, 0 ranks by raw log-probability.
    pub length_penalty: f32,
    /// How many hypotheses to return per input (≤ beam).
    pub nbest: usize,
    /// No EOS before this many tokens (EOS is still forced at the length limit).
    pub min_len: usize,
    /// Ban a token that would complete an n-gram already in the hypothesis (BOS included,
    /// as fairseq); 0 is off.
    pub no_repeat_ngram_size: usize,
}

impl BeamConfig {
    /// Whether it constrains outputs beyond greedy/beam choice (then greedy decoding goes
    /// through beam search with one beam).
    pub fn constrains(&self) -> bool {
        self.min_len > 0 || self.no_repeat_ngram_size > 0
    }

    /// The tokens this hypothesis (`tokens` after `bos`) may not take next.
    fn banned(&self, bos: u32, tokens: &[u32], eos: u32) -> Vec<u32> {
        let mut out = Vec::new();
        if tokens.len() < self.min_len {
            out.push(eos);
        }
        let n = self.no_repeat_ngram_size;
        if n == 0 || tokens.len() + 1 < n {
            return out;
        }
        let seq: Vec<u32> = std::iter::once(bos).chain(tokens.iter().copied()).collect();
        let prefix = &seq[seq.len() + 1 - n..];
        out.extend(
            seq.windows(n)
                .filter(|g| &g[..n - 1] == prefix)
                .map(|g| g[n - 1]),
        );
        out
    }
}

impl Default for BeamConfig {
    fn default() -> Self {
        Self {
            beam: 4,
            length_penalty: 1.0,
            nbest: 1,
            min_len: 0,
            no_repeat_ngram_size: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Hypothesis {
    /// Tokens after BOS, without EOS.
    pub tokens: Vec<u32>,
    /// Sum of the tokens' log-probabilities (EOS included when the hypothesis ended with it).
    pub log_prob: f32,
    /// The ranking score: `log_prob / length^length_penalty`.
    pub score: f32,
}

crate::simd::multiversion! {
    /// log Σ e^x of one logits row (the log-softmax's normaliser).
    fn log_sum_exp(x: &[f32]) -> f32 {
        let max = crate::simd::max(x);
        if !max.is_finite() {
            return max;
        }
        crate::simd::sum_exp(x, max).ln() + max
    }
}

crate::simd::multiversion! {
    /// The `k` largest entries of `x` whose index is not `banned`, as (index, value), best
    /// first (the lower index first among equal values). One pass that keeps a sorted list
    /// of k; once it is full, a block of 16 whose maximum does not beat the k-th best is
    /// skipped whole, so a vocabulary-sized row costs little more than reading it.
    fn top_k(x: &[f32], k: usize, banned: &[u32]) -> Vec<(u32, f32)> {
        const BLOCK: usize = 16;
        let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
        if k == 0 {
            return best;
        }
        let mut floor = f32::NEG_INFINITY;
        for (b, block) in x.chunks(BLOCK).enumerate() {
            if best.len() == k && crate::simd::max(block) <= floor {
                continue;
            }
            for (o, &v) in block.iter().enumerate() {
                let i = (b * BLOCK + o) as u32;
                // Below the k-th best so far (or NaN).
                if !(v > floor || (best.len() < k && v >= floor)) || banned.contains(&i) {
                    continue;
                }
                let at = best.partition_point(|&(_, b)| b >= v);
                best.insert(at, (i, v));
                best.truncate(k);
                if best.len() == k {
                    floor = best[k - 1].1;
                }
            }
        }
        best
    }
}

/// Beam search for every row of a freshly started `cache` (one row per input), as fairseq: each
/// step keeps the best `beam` continuations per input from the 2·`beam` best candidates; an
/// EOS among the top `beam` finishes a hypothesis; an input is done once it has `beam`
/// finished hypotheses; at the length limit (the cache's capacity) EOS is forced. Returns, per input, up to
/// `nbest` hypotheses, best first.
pub fn beam_search<B: Decoding, M: Incremental<B>>(
    model: &mut M,
    cache: &mut KvCache<B>,
    bos: u32,
    eos: u32,
    cfg: &BeamConfig,
) -> Result<Vec<Vec<Hypothesis>>> {
    if cfg.beam == 0 || cfg.nbest == 0 || cfg.nbest > cfg.beam {
        return Err(Error::Config(format!(
            "beam search needs 1 <= nbest <= beam, got nbest {} and beam {}",
            cfg.nbest, cfg.beam
        )));
    }
    if cache.len != 0 {
        return Err(Error::Config(
            "beam search needs a freshly started cache".into(),
        ));
    }
    if eos as usize >= model.vocab() {
        return Err(Error::Config(format!(
            "EOS id {eos} is outside the vocabulary ({})",
            model.vocab()
        )));
    }
    let n_inputs = cache.rows();
    let norm = |log_prob: f32, len: usize| log_prob / (len as f32).powf(cfg.length_penalty);
    let mut finished: Vec<Vec<Hypothesis>> = vec![Vec::new(); n_inputs];
    // Live hypotheses, one per cache row: (input, tokens, log_prob).
    let mut live: Vec<(usize, Vec<u32>, f32)> =
        (0..n_inputs).map(|i| (i, Vec::new(), 0.0)).collect();
    let mut next: Vec<u32> = vec![bos; n_inputs];
    while !live.is_empty() {
        let vocab = model.vocab();
        let last_step = cache.len + 1 >= cache.capacity;
        let logits = model.step(cache, &next)?;
        // Per live row: the log-softmax's normaliser and the best 2·beam allowed tokens
        // (log-softmax keeps the order of logits, so only those are normalised).
        let k = if last_step { 0 } else { 2 * cfg.beam };
        let tops: Vec<(f32, Vec<(u32, f32)>)> = live
            .par_iter()
            .enumerate()
            .map(|(r, (_, tokens, _))| {
                let row = &logits[r * vocab..(r + 1) * vocab];
                (
                    log_sum_exp(row),
                    top_k(row, k, &cfg.banned(bos, tokens, eos)),
                )
            })
            .collect();
        // Candidates per input: (score, cache row, token), the best 2·beam of each row.
        let mut cands: Vec<Vec<(f32, usize, u32)>> = vec![Vec::new(); n_inputs];
        for (r, ((input, _, lp), (lse, top))) in live.iter().zip(tops).enumerate() {
            let eos_lp = logits[r * vocab + eos as usize] - lse;
            if last_step {
                // The length limit: every live hypothesis ends here, with EOS forced (fairseq).
                cands[*input].push((lp + eos_lp, r, eos));
                continue;
            }
            let before = cands[*input].len();
            for (tok, v) in top {
                if v.is_finite() {
                    cands[*input].push((lp + (v - lse), r, tok));
                }
            }
            if cands[*input].len() == before {
                // Every token is banned (a tiny vocabulary): the hypothesis can only end.
                cands[*input].push((lp + eos_lp, r, eos));
            }
        }
        let mut new_live = Vec::new();
        let mut order = Vec::new();
        for (input, mut c) in cands.into_iter().enumerate() {
            if c.is_empty() {
                continue;
            }
            c.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut kept = 0;
            for (rank, (score, r, tok)) in c.into_iter().enumerate() {
                if finished[input].len() >= cfg.beam || kept >= cfg.beam {
                    break;
                }
                let tokens = &live[r].1;
                if tok == eos {
                    // As fairseq: an EOS candidate finishes a hypothesis only if it ranks among
                    // the best `beam` candidates of this step.
                    if rank < cfg.beam {
                        finished[input].push(Hypothesis {
                            score: norm(score, tokens.len() + 1),
                            tokens: tokens.clone(),
                            log_prob: score,
                        });
                    }
                } else {
                    let mut t = tokens.clone();
                    t.push(tok);
                    new_live.push((input, t, score));
                    order.push(r);
                    kept += 1;
                }
            }
        }
        // An input stops expanding once it has `beam` finished hypotheses.
        let keep: Vec<usize> = (0..new_live.len())
            .filter(|&i| finished[new_live[i].0].len() < cfg.beam)
            .collect();
        order = keep.iter().map(|&i| order[i]).collect();
        live = keep.into_iter().map(|i| new_live[i].clone()).collect();
        cache.reorder(&order);
        next = live.iter().map(|h| *h.1.last().unwrap_or(&bos)).collect();
    }
    Ok(finished
        .into_iter()
        .map(|mut hyps| {
            hyps.sort_by(|a, b| b.score.total_cmp(&a.score));
            hyps.truncate(cfg.nbest);
            hyps
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// argmax against the one-pass scalar loop it replaced, on random rows of every length
    /// around its 16-value blocks, with ties, −∞, and NaN anywhere but first.
    #[test]
    fn argmax_is_the_first_largest() {
        let scalar = |x: &[f32]| {
            let mut best = 0;
            for (i, &v) in x.iter().enumerate() {
                if v > x[best] {
                    best = i;
                }
            }
            best
        };
        for n in 1..70 {
            for seed in 0..20u64 {
                // Values from a few levels, so equal maxima are common.
                let mut x: Vec<f32> = (0..n)
                    .map(|i| (crate::rng::normal(seed, i as u64) * 2.0).round())
                    .collect();
                if seed % 4 == 1 {
                    x[(seed as usize * 7) % n] = f32::NEG_INFINITY;
                }
                if seed % 4 == 2 && n > 1 {
                    x[1 + (seed as usize * 5) % (n - 1)] = f32::NAN;
                }
                assert_eq!(argmax(&x), scalar(&x), "{x:?}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, 3.0, 5.0]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 20]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    /// The reference twin of `top_k`: sort every allowed index by value (stable, so the lower
    /// index first among equal values) and keep k.
    fn top_k_by_sorting(x: &[f32], k: usize, banned: &[u32]) -> Vec<(u32, f32)> {
        let mut idx: Vec<u32> = (0..x.len() as u32)
            .filter(|i| !banned.contains(i))
            .collect();
        idx.sort_by(|&a, &b| x[b as usize].total_cmp(&x[a as usize]));
        idx.into_iter()
            .take(k)
            .map(|i| (i, x[i as usize]))
            .collect()
    }

    #[test]
    fn top_k_equals_sorting_with_ties_bans_and_infinities() {
        let mut rng = Rng::new(7);
        for case in 0..200 {
            let n = 1 + case % 37;
            // Few distinct values, so ties are common; some −∞ (banned by a model).
            let x: Vec<f32> = (0..n)
                .map(|_| match (rng.uniform() * 6.0) as u32 {
                    0 => f32::NEG_INFINITY,
                    v => v as f32 - 2.5,
                })
                .collect();
            let banned: Vec<u32> = (0..n as u32).filter(|_| rng.uniform() < 0.2).collect();
            for k in [0, 1, 3, 8, n, n + 2] {
                assert_eq!(
                    top_k(&x, k, &banned),
                    top_k_by_sorting(&x, k, &banned),
                    "x {x:?} k {k} banned {banned:?}"
                );
            }
        }
    }

    #[test]
    fn log_sum_exp_equals_the_f64_sum() {
        let mut rng = Rng::new(3);
        for n in [1, 15, 16, 17, 6000] {
            let x: Vec<f32> = (0..n).map(|_| (rng.uniform() - 0.5) * 40.0).collect();
            let max = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let want = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
            let got = log_sum_exp(&x) as f64;
            assert!(
                (got - want).abs() < 1e-5 * want.abs().max(1.0),
                "n {n}: {got} vs {want}"
            );
        }
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
    }

    #[test]
    fn banned_tokens_are_eos_before_min_len_and_repeated_ngram_ends() {
        let cfg = BeamConfig {
            min_len: 3,
            no_repeat_ngram_size: 2,
            ..BeamConfig::default()
        };
        // BOS 1, EOS 2: after "1 5 6 5" the bigrams starting with 5 end in 6.
        assert_eq!(cfg.banned(1, &[5, 6, 5], 2), vec![6]);
        assert_eq!(cfg.banned(1, &[5, 6], 2), vec![2]);
        assert_eq!(cfg.banned(1, &[5], 2), vec![2]);
    }
}
