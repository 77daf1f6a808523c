//! Translation: tokenized sentence pairs, epoch batches, batched beam/greedy translation and
//! sacreBLEU-exact scoring. Source and target tokenizers may be one (a joint vocabulary) or
//! two (one per side); their special-token ids must agree.

use super::{read_pairs, tokenizer_for, Prepared, Report, Task};
use crate::data::{batches_by_tokens, Seq2SeqBatch, Tokenizer};
use crate::decode::{argmax, beam_search, greedy, sample_outputs, DecodeConfig};
use crate::error::{Error, Result};
use crate::job::{Job, TaskKind};
use crate::mbr::{self, Utility};
use crate::metrics::rouge::{self, Rouge};
use crate::metrics::sacrebleu::{corpus_bleu, corpus_chrf, BleuOptions, BleuScore};
use crate::metrics::sacrebleu::{ChrfOptions, ChrfScore};
use crate::model::{Decoding, EncoderDecoder, KvCache, ModelConfig, Seq2Seq, Tokens};
use crate::model_dir::{ModelFiles, TARGET_TOKENIZER_FILE, TOKENIZER_FILE};
use crate::rng::hash;
use crate::train::{loss_tally, BestMetric, Observer, Part, Tally, TrainData};
use rayon::prelude::*;
use std::fmt;
use std::path::Path;
use std::time::Instant;

/// Tokenized pairs (without BOS/EOS).
#[derive(Clone, Debug, Default)]
pub struct ParallelData {
    pub pairs: Vec<(Vec<u32>, Vec<u32>)>,
    /// Pairs dropped because a side did not fit `max_len`.
    pub dropped_long: usize,
    /// Sources cut to fit `max_len` (with `truncate_source`).
    pub truncated: usize,
}

/// Tokenize `pairs`; pairs with a side longer than `max_len - 1` tokens (room for BOS/EOS)
/// are dropped and counted (fairseq's `--skip-invalid-size-inputs-valid-test`), or, with
/// `truncate_source`, a long source keeps its first `max_len - 1` tokens (fairseq's
/// `--truncate-source`, as summarization reads the start of a long document).
pub fn encode_pairs(
    src_tok: &Tokenizer,
    tgt_tok: &Tokenizer,
    pairs: &[(String, String)],
    max_len: usize,
    truncate_source: bool,
) -> Result<ParallelData> {
    let mut out = ParallelData::default();
    for (s, t) in pairs {
        let (mut s, t) = (src_tok.encode(s)?, tgt_tok.encode(t)?);
        if truncate_source && s.len() + 1 > max_len {
            s.truncate(max_len - 1);
            out.truncated += 1;
        }
        if s.len() + 1 > max_len || t.len() + 1 > max_len {
            out.dropped_long += 1;
        } else {
            out.pairs.push((s, t));
        }
    }
    Ok(out)
}

impl ParallelData {
    /// The batches of one epoch: ~`max_tokens` padded tokens each, order fixed by (seed, epoch).
    pub fn epoch_batches(
        &self,
        tok: &Tokenizer,
        max_tokens: usize,
        seed: u64,
        epoch: u64,
    ) -> Vec<Seq2SeqBatch> {
        let lengths: Vec<usize> = self
            .pairs
            .iter()
            .map(|(s, t)| s.len().max(t.len()) + 1)
            .collect();
        batches_by_tokens(&lengths, max_tokens, seed, epoch)
            .into_iter()
            .map(|idx| {
                let pairs: Vec<(&[u32], &[u32])> = idx
                    .iter()
                    .map(|&i| (self.pairs[i].0.as_slice(), self.pairs[i].1.as_slice()))
                    .collect();
                Seq2SeqBatch::new(&pairs, tok.pad, tok.bos, tok.eos)
            })
            .collect()
    }
}

/// How sentences are translated: the model's decoding defaults, outputs per input, and the
/// source tokens per decoding batch.
#[derive(Clone, Debug)]
pub struct TranslateOptions {
    pub decode: DecodeConfig,
    /// Hypotheses per input (≤ beam).
    pub nbest: usize,
    pub max_tokens: usize,
    /// What seeds each source's samples (`decode.sampling`, `decode.mbr_references`): empty,
    /// the source's index; otherwise one id per source. A service decoding several requests
    /// as one batch gives each text its index within its own request, so a request draws
    /// the same samples whatever it is batched with.
    pub sample_ids: Vec<u64>,
}

impl TranslateOptions {
    pub fn new(decode: &DecodeConfig) -> Self {
        Self {
            decode: decode.clone(),
            nbest: 1,
            max_tokens: 4096,
            sample_ids: Vec::new(),
        }
    }

    /// These options decoding as many outputs per input as [`select`] chooses among.
    pub fn widened(&self) -> Self {
        Self {
            nbest: self.decode.candidates(self.nbest),
            ..self.clone()
        }
    }
}

/// The longest source a model reads: `max_len` positions, one of them EOS.
pub fn source_limit<B: Decoding, M: EncoderDecoder<B>>(model: &M) -> usize {
    model.max_len() - 1
}

/// Each text as the encoder reads it (tokens + EOS). A text over `limit` tokens is an
/// [`Error::InputTooLong`] naming its index, unless `cut` is given: then it is shortened
/// and counted there.
pub fn encode_sources(
    tok: &Tokenizer,
    texts: &[String],
    limit: usize,
    mut cut: Option<&mut usize>,
) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::with_capacity(texts.len());
    for (index, text) in texts.iter().enumerate() {
        let mut ids = tok.encode(text)?;
        if ids.len() > limit {
            match cut.as_deref_mut() {
                Some(n) => {
                    ids.truncate(limit);
                    *n += 1;
                }
                None => {
                    return Err(Error::InputTooLong {
                        index,
                        len: ids.len(),
                        limit,
                    })
                }
            }
        }
        ids.push(tok.eos);
        out.push(ids);
    }
    Ok(out)
}

/// Translate encoded sources (each ending in EOS, within the model's `max_len`): per
/// source, `nbest` outputs (best first) as target ids, followed by `decode.references()`
/// samples as MBR's references (which [`select`] takes off). Sources are decoded longest
/// first in batches of about `max_tokens` source tokens; greedy decoding starts the next
/// batch (of an eighth as many) as soon as a row of the last one ends (see
/// [`greedy_continuous`]).
///
/// With more than one thread in the pool, whole batches go to workers, each decoding on one
/// thread with its own copy of the model's buffers: a decoding step's products are too small
/// to keep two cores busy (one thread runs `gemm` at ~92 GFLOP/s on a Zen3 core, two at
/// ~150–170 on the step's shapes), and beam bookkeeping between the products is serial. A
/// batch decodes the same whichever worker takes it, so outputs do not depend on threads.
pub fn translate_ids<B: Decoding, M: EncoderDecoder<B>>(
    model: &mut M,
    sources: &[Vec<u32>],
    bos: u32,
    eos: u32,
    pad: u32,
    opts: &TranslateOptions,
) -> Result<Vec<Vec<Vec<u32>>>> {
    let mut workers = DecodeWorkers::default();
    translate_ids_with(model, &mut workers, sources, bos, eos, pad, opts)
}

/// Copies of a model that [`translate_ids_with`] decodes on besides the model itself, kept by
/// a caller that translates again and again (a server), so their buffers stay allocated;
/// every call refreshes their parameters from the model.
pub struct DecodeWorkers<M = Seq2Seq> {
    copies: Vec<M>,
}

impl<M> Default for DecodeWorkers<M> {
    fn default() -> Self {
        Self { copies: Vec::new() }
    }
}

impl<M> DecodeWorkers<M> {
    /// `n` copies holding `model`'s current parameters.
    fn refresh<B: Decoding>(&mut self, model: &M, n: usize)
    where
        M: EncoderDecoder<B>,
    {
        self.copies.truncate(n);
        for c in &mut self.copies {
            c.refresh_from(model);
        }
        while self.copies.len() < n {
            self.copies.push(model.clone());
        }
    }
}

/// [`translate_ids`] on the caller's [`DecodeWorkers`].
#[allow(clippy::too_many_arguments)]
pub fn translate_ids_with<B: Decoding, M: EncoderDecoder<B>>(
    model: &mut M,
    workers: &mut DecodeWorkers<M>,
    sources: &[Vec<u32>],
    bos: u32,
    eos: u32,
    pad: u32,
    opts: &TranslateOptions,
) -> Result<Vec<Vec<Vec<u32>>>> {
    if !opts.sample_ids.is_empty() && opts.sample_ids.len() != sources.len() {
        return Err(Error::Usage(format!(
            "sample_ids holds {} ids for {} sources: give one per source, or none",
            opts.sample_ids.len(),
            sources.len()
        )));
    }
    let order = longest_first(sources);
    let (continuous, chunk_tokens) = batching::<B>(opts);
    let chunks = chunk_by_tokens(sources, &order, chunk_tokens);
    let mut out = vec![Vec::new(); sources.len()];
    // One worker's share: the chunks `take` hands it, as (source index, outputs).
    let decode = |m: &mut M, take: &mut TakeChunk<'_>| {
        if continuous {
            return greedy_continuous(m, sources, take, bos, eos, pad, opts);
        }
        let mut mine = Vec::new();
        while let Some(chunk) = take() {
            let outputs = translate_batch(m, sources, chunk, bos, eos, pad, opts)?;
            mine.extend(chunk.iter().copied().zip(outputs));
        }
        Ok(mine)
    };
    // A device decodes on the model alone (copies would queue on the same device).
    let threads = match B::HOST {
        true => rayon::current_num_threads().min(chunks.len()),
        false => 1,
    };
    if threads <= 1 {
        let mut all = chunks.iter().copied();
        for (i, h) in decode(model, &mut || all.next())? {
            out[i] = h;
        }
        return Ok(out);
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let precision = crate::kernels::matmul::matmul_precision();
    workers.refresh(model, threads - 1);
    let copies = &mut workers.copies;
    // Every copy now holds the model's values, so they can share one set of packed weights
    // (per model of an ensemble).
    let packs: Vec<_> = (0..model.parameter_sets())
        .map(|_| std::sync::Arc::new(crate::kernels::packed::SharedPacks::default()))
        .collect();
    // Per worker: (source index, its outputs) for each source it decoded.
    type Decoded = Vec<(usize, Vec<Vec<u32>>)>;
    let done: Vec<Result<Decoded>> = std::thread::scope(|s| {
        let handles: Vec<_> = std::iter::once(&mut *model)
            .chain(copies.iter_mut())
            .map(|m| {
                let (chunks, next, decode) = (&chunks, &next, &decode);
                let packs = packs.clone();
                s.spawn(move || -> Result<Decoded> {
                    let _precision = crate::kernels::matmul::set_matmul_precision(precision);
                    let sharing = SharingPacks::new(m, packs);
                    let m = &mut *sharing.0;
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .build()
                        .map_err(|e| Error::Usage(format!("starting a decoding thread: {e}")))?;
                    pool.install(|| {
                        let mut take = || {
                            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            chunks.get(k).copied()
                        };
                        decode(m, &mut take)
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    for worker in done {
        for (i, h) in worker? {
            out[i] = h;
        }
    }
    Ok(out)
}

/// Whether decoding batches continuously (greedy decoding does), and the source tokens of a
/// chunk: an eighth of `max_tokens`. A continuous worker holds up to two chunks' rows, and
/// the fewer rows a step has, the more of their keys and values stay in the CPU's caches
/// while the step's products lose little (the packed kernel runs at ~90 GFLOP/s from 6 rows
/// up). Measured on the default job's test set (Zen3, 2 threads, BENCHMARKS.md): chunks of
/// 1,024 / 768 / 512 / 320 / 256 / 192 / 128 tokens took 2.97 / 2.95 / 2.83 / 2.83 / 2.63 /
/// 2.69 / 3.19 s (medians of alternating runs), peak memory 0.50 → 0.33 GB. A device
/// ([`Decoding::HOST`] false) decodes whole batches of `max_tokens`: its steps are launches,
/// and fewer, larger ones keep it busy.
fn batching<B: Decoding>(opts: &TranslateOptions) -> (bool, usize) {
    let beam = opts.decode.beam(opts.nbest);
    let continuous = B::HOST
        && beam.beam <= 1
        && beam.nbest <= 1
        && !beam.constrains()
        && !opts.decode.sampling
        && opts.decode.references() == 0;
    match continuous {
        true => (true, (opts.max_tokens / 8).max(1)),
        false => (false, opts.max_tokens),
    }
}

/// Source indices, longest source first.
fn longest_first(sources: &[Vec<u32>]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sources.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sources[i].len()));
    order
}

/// `order` cut into batches of about `max_tokens` source tokens (padded to each batch's
/// first, longest source).
fn chunk_by_tokens<'a>(
    sources: &[Vec<u32>],
    order: &'a [usize],
    max_tokens: usize,
) -> Vec<&'a [usize]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let longest = sources[order[start]].len();
        let rows = (max_tokens / longest.max(1))
            .max(1)
            .min(order.len() - start);
        chunks.push(&order[start..start + rows]);
        start += rows;
    }
    chunks
}

/// A model copy that decodes on the call's shared packed weights until dropped (also when
/// its thread unwinds), so no later decoding can meet packs of older parameter values.
struct SharingPacks<'a, B: Decoding, M: EncoderDecoder<B>>(&'a mut M, std::marker::PhantomData<B>);

impl<'a, B: Decoding, M: EncoderDecoder<B>> SharingPacks<'a, B, M> {
    fn new(m: &'a mut M, packs: Vec<std::sync::Arc<crate::kernels::packed::SharedPacks>>) -> Self {
        m.share_packs(packs);
        Self(m, std::marker::PhantomData)
    }
}

impl<B: Decoding, M: EncoderDecoder<B>> Drop for SharingPacks<'_, B, M> {
    fn drop(&mut self) {
        self.0.share_packs(Vec::new());
    }
}

/// Hands a decoding worker its next chunk of sources (indices), until there are none.
type TakeChunk<'c> = dyn FnMut() -> Option<&'c [usize]> + 'c;

/// The sources `chunk` (indices into `sources`) as one padded batch: the encoder run over
/// them and a decoding cache for their outputs.
fn start_batch<B: Decoding, M: EncoderDecoder<B>>(
    model: &mut M,
    sources: &[Vec<u32>],
    chunk: &[usize],
    pad: u32,
    opts: &TranslateOptions,
) -> Result<KvCache<B>> {
    let rows = chunk.len();
    let longest = longest_of(sources, chunk);
    let mut src = Vec::with_capacity(rows * longest);
    for &i in chunk {
        src.extend_from_slice(&sources[i]);
        src.extend(std::iter::repeat_n(pad, longest - sources[i].len()));
    }
    model.start_decoding(
        Tokens::new(&src, rows, longest)?,
        out_len(model, sources, chunk, opts),
    )
}

fn longest_of(sources: &[Vec<u32>], chunk: &[usize]) -> usize {
    chunk.iter().map(|&i| sources[i].len()).max().unwrap_or(0)
}

/// The output positions of a chunk's cache (its capacity): each position fed (BOS first)
/// yields one token, so outputs hold at most this many tokens, EOS included.
fn out_len<B: Decoding, M: EncoderDecoder<B>>(
    model: &M,
    sources: &[Vec<u32>],
    chunk: &[usize],
    opts: &TranslateOptions,
) -> usize {
    let longest = longest_of(sources, chunk);
    opts.decode.max_output(longest, model.max_len())
}

/// Greedy decoding of the chunks `take` hands out, continuously (continuous batching, as
/// vLLM's scheduler does): once fewer rows are decoding than the last chunk brought, the
/// next chunk is encoded and its rows join the same cache ([`KvCache::absorb`]), so a
/// batch's few longest outputs are decoded alongside the next batch instead of in steps of
/// a few rows (measured: a one-row step costs 5× a row of a 64-row step). Refilling at half
/// the chunk's rows instead measured 7–10% slower, with 1.5× about the same. Every row decodes
/// as it would in its own batch: its own positions, its source's keys, its batch's length
/// limit. Returns (source index, outputs) for every source of every chunk taken.
fn greedy_continuous<B: Decoding, M: EncoderDecoder<B>>(
    model: &mut M,
    sources: &[Vec<u32>],
    take: &mut TakeChunk<'_>,
    bos: u32,
    eos: u32,
    pad: u32,
    opts: &TranslateOptions,
) -> Result<Vec<(usize, Vec<Vec<u32>>)>> {
    /// A cache row: its source, the tokens chosen so far, and how many it may hold.
    struct Row {
        source: usize,
        out: Vec<u32>,
        limit: usize,
    }
    let mut done = Vec::new();
    let mut cache: Option<KvCache<B>> = None;
    let (mut rows, mut next) = (Vec::<Row>::new(), Vec::<u32>::new());
    let mut pending = take();
    let mut refill_below = 0;
    let vocab = model.vocab();
    loop {
        while let Some(chunk) = pending.filter(|_| rows.len() < refill_below.max(1)) {
            let fits = (cache.as_ref()).is_some_and(|c| {
                c.absorbs_rows() && out_len(model, sources, chunk, opts) <= c.capacity
            });
            if !rows.is_empty() && !fits {
                break; // the rows decoding now end first, then a new cache starts
            }
            let fresh = start_batch(model, sources, chunk, pad, opts)?;
            // Outputs hold at most capacity − 1 tokens: a token chosen at the last position
            // could never be fed back (see `decode::generate`).
            let limit = fresh.capacity.saturating_sub(1);
            match cache.as_mut() {
                Some(c) if !rows.is_empty() => c.absorb(fresh)?,
                _ => cache = Some(fresh),
            }
            rows.extend(chunk.iter().map(|&source| Row {
                source,
                out: Vec::new(),
                limit,
            }));
            next.resize(rows.len(), bos);
            refill_below = chunk.len();
            pending = take();
        }
        let Some(cache) = cache.as_mut().filter(|_| !rows.is_empty()) else {
            break;
        };
        // A row with no room for a token ends before its first step.
        let logits = if rows.iter().any(|r| r.limit > 0) {
            model.step(cache, &next)?
        } else {
            &[]
        };
        let mut keep = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter_mut().enumerate() {
            if row.limit > 0 {
                let t = argmax(&logits[i * vocab..(i + 1) * vocab]) as u32;
                if t != eos {
                    row.out.push(t);
                    if row.out.len() < row.limit {
                        next[keep.len()] = t;
                        keep.push(i);
                    }
                }
            }
        }
        if keep.len() != rows.len() {
            cache.reorder(&keep);
            let mut kept = keep.iter().peekable();
            for (i, row) in std::mem::take(&mut rows).into_iter().enumerate() {
                if kept.peek() == Some(&&i) {
                    kept.next();
                    rows.push(row);
                } else {
                    done.push((row.source, vec![row.out]));
                }
            }
            next.truncate(rows.len());
        }
    }
    Ok(done)
}

/// Decode the sources `chunk` (indices into `sources`) as one padded batch.
fn translate_batch<B: Decoding, M: EncoderDecoder<B>>(
    model: &mut M,
    sources: &[Vec<u32>],
    chunk: &[usize],
    bos: u32,
    eos: u32,
    pad: u32,
    opts: &TranslateOptions,
) -> Result<Vec<Vec<Vec<u32>>>> {
    let mut cache = start_batch(model, sources, chunk, pad, opts)?;
    let beam = opts.decode.beam(opts.nbest);
    // Seeded by the source's index (or id), so a source's samples do not depend on its batch.
    let seeds = |stream: u64| -> Vec<u64> {
        chunk
            .iter()
            .map(|&i| {
                let id = opts.sample_ids.get(i).copied().unwrap_or(i as u64);
                hash(opts.decode.seed ^ stream, id)
            })
            .collect()
    };
    let sampling = opts.decode.sampling(0);
    let references = opts.decode.references();
    // The references decode on a copy of the encoded batch, drawn apart from the candidates.
    let mut reference_cache = (references > 0).then(|| cache.duplicate());
    let mut outputs = if opts.decode.sampling {
        sample_outputs(
            model,
            &mut cache,
            bos,
            eos,
            opts.nbest,
            &beam,
            &sampling,
            &seeds(CANDIDATE_STREAM),
        )?
    } else if beam.beam <= 1 && beam.nbest <= 1 && !beam.constrains() {
        greedy(model, &mut cache, bos, eos)?
            .into_iter()
            .map(|t| vec![t])
            .collect()
    } else {
        // Beam search returns at least one hypothesis per input: EOS is forced at the length
        // limit.
        beam_search(model, &mut cache, bos, eos, &beam)?
            .into_iter()
            .map(|h| h.into_iter().map(|h| h.tokens).collect())
            .collect()
    };
    if let Some(cache) = reference_cache.as_mut() {
        let drawn = sample_outputs(
            model,
            cache,
            bos,
            eos,
            references,
            &beam,
            &sampling,
            &seeds(REFERENCE_STREAM),
        )?;
        for (o, r) in outputs.iter_mut().zip(drawn) {
            o.extend(r);
        }
    }
    Ok(outputs)
}

/// Sample streams of a `decode.seed`: the candidates' (`decode.sampling`) and MBR's
/// references' (`decode.mbr_references`), so the two never draw alike. The references of
/// seed `s` are the samples `decode.sampling` draws with seed `s ^ REFERENCE_STREAM`.
const CANDIDATE_STREAM: u64 = 0;
pub const REFERENCE_STREAM: u64 = 0x4d42_525f_5245_4653;

/// Outputs of [`translate`]: per text, `nbest` outputs (best first).
pub struct Translated {
    pub outputs: Vec<Vec<String>>,
    /// Texts a summarizer read only the start of (longer than its `max_len`).
    pub cut: usize,
}

/// Translate (or summarize) `texts`. A text longer than the model reads is an error naming
/// it for a translation model; a summarizer (`files.task`) reads its start, as it was
/// trained to, and counts it in [`Translated::cut`].
pub fn translate<B: Decoding, M: EncoderDecoder<B>>(
    model: &mut M,
    files: &ModelFiles,
    texts: &[String],
    opts: &TranslateOptions,
) -> Result<Translated> {
    let mut cut = 0;
    let summarizer = files.task == Some(TaskKind::Summarize);
    let limit = source_limit(model);
    let src = encode_sources(
        &files.tokenizer,
        texts,
        limit,
        summarizer.then_some(&mut cut),
    )?;
    let tgt = files.target_tokenizer();
    let hyps = translate_ids(model, &src, tgt.bos, tgt.eos, tgt.pad, &opts.widened())?;
    let outputs = select(hyps, tgt, opts, Utility::for_task(files.task))?
        .into_iter()
        .map(|hyps| hyps.into_iter().map(|(_, text)| text).collect())
        .collect();
    Ok(Translated { outputs, cut })
}

/// One output: its target ids and its text.
pub type Output = (Vec<u32>, String);

/// Per input, its `opts.nbest` outputs as (ids, text), best first, from the
/// `opts.widened()` hypotheses decoding gave it: in the beam's order, or with MBR
/// (`decode.mbr` > 1) the first `mbr` ordered by expected `utility` ([`mbr::rank`]) and any
/// others after them.
pub fn select(
    hyps: Vec<Vec<Vec<u32>>>,
    tgt: &Tokenizer,
    opts: &TranslateOptions,
    utility: Utility,
) -> Result<Vec<Vec<Output>>> {
    let mbr = opts.decode.mbr;
    let references = opts.decode.references();
    hyps.into_par_iter()
        .map(|mut ids| {
            let drawn = ids.split_off(ids.len().saturating_sub(references));
            let decode = |ids: &[Vec<u32>]| {
                ids.iter()
                    .map(|h| tgt.decode(h))
                    .collect::<Result<Vec<_>>>()
            };
            let (texts, drawn) = (decode(&ids)?, decode(&drawn)?);
            let mut order: Vec<usize> = (0..ids.len()).collect();
            if mbr > 1 {
                let k = mbr.min(ids.len());
                order = mbr::rank_against(&texts[..k], &drawn, utility)?;
                order.extend(k..ids.len());
            }
            let mut pairs: Vec<Option<Output>> = ids.into_iter().zip(texts).map(Some).collect();
            Ok(order
                .into_iter()
                .take(opts.nbest)
                .filter_map(|i| pairs[i].take())
                .collect())
        })
        .collect()
}

/// Per-side tokenizers must agree on the special ids the model and batches use.
pub fn check_specials(src_tok: &Tokenizer, tgt_tok: &Tokenizer) -> Result<()> {
    let ids = |t: &Tokenizer| (t.pad, t.bos, t.eos);
    if ids(src_tok) != ids(tgt_tok) {
        return Err(Error::Tokenizer(format!(
            "source and target tokenizers disagree on (pad, bos, eos): {:?} vs {:?}",
            ids(src_tok),
            ids(tgt_tok)
        )));
    }
    Ok(())
}

/// BLEU and chrF of a model's translations of a test set.
#[derive(Clone, Debug)]
pub struct TranslateReport {
    pub sentences: usize,
    pub beam: usize,
    /// Candidates MBR chose each output among (`decode.candidates(1)` when `decode.mbr` > 1,
    /// else 0).
    pub mbr: usize,
    /// Samples per input MBR scored the candidates against (`decode.references()`; 0: each
    /// other).
    pub mbr_references: usize,
    /// Tokenizing, decoding and detokenizing (not scoring).
    pub seconds: f64,
    /// Sources longer than the model reads, cut to its limit to be translated at all.
    pub cut: usize,
    pub limit: usize,
    /// Tokens the decoder produced for the kept hypotheses, each one's EOS included (a
    /// throughput's numerator: target tokens per second).
    pub target_tokens: usize,
    pub bleu: BleuScore,
    pub chrf: ChrfScore,
    /// Summaries are scored by ROUGE (rouge-score's, stemmer on) instead of BLEU and chrF.
    pub rouge: Option<Rouge>,
    pub hypotheses: Vec<String>,
    /// (source, reference, translation) of a few sentences spread over the set.
    pub samples: Vec<(String, String, String)>,
}

impl fmt::Display for TranslateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} sentences, beam {}", self.sentences, self.beam)?;
        if self.mbr > 1 {
            write!(f, ", MBR over {}", self.mbr)?;
            if self.mbr_references > 0 {
                write!(f, " against {} samples", self.mbr_references)?;
            }
        }
        writeln!(f, ", {:.1} s", self.seconds)?;
        if self.cut > 0 {
            writeln!(
                f,
                "{} sources were longer than the model's {} tokens and were cut to them",
                self.cut, self.limit
            )?;
        }
        match &self.rouge {
            Some(r) => write!(f, "{r}")?,
            None => write!(f, "{}\n{}", self.bleu, self.chrf)?,
        }
        for (s, r, h) in &self.samples {
            write!(f, "\n\nsource:    {s}\nreference: {r}\nqkv:       {h}")?;
        }
        Ok(())
    }
}

/// Translate the sources of `pairs` and score against their targets (sacreBLEU's BLEU and
/// chrF, and ROUGE for a summarizer: `files.task`); `samples` sentences are kept as examples.
pub fn evaluate<B: Decoding, M: EncoderDecoder<B>>(
    model: &mut M,
    files: &ModelFiles,
    pairs: &[(String, String)],
    opts: &TranslateOptions,
    samples: usize,
) -> Result<TranslateReport> {
    let t = Instant::now();
    let sources: Vec<String> = pairs.iter().map(|(s, _)| s.clone()).collect();
    let refs: Vec<String> = pairs.iter().map(|(_, t)| t.clone()).collect();
    let limit = source_limit(model);
    let mut cut = 0;
    let src = encode_sources(&files.tokenizer, &sources, limit, Some(&mut cut))?;
    let tgt = files.target_tokenizer();
    let one = TranslateOptions {
        nbest: 1,
        ..opts.clone()
    };
    let hyps = translate_ids(model, &src, tgt.bos, tgt.eos, tgt.pad, &one.widened())?;
    let mut hypotheses = Vec::with_capacity(src.len());
    let mut target_tokens = 0;
    for h in select(hyps, tgt, &one, Utility::for_task(files.task))? {
        for (ids, text) in h {
            target_tokens += ids.len() + 1;
            hypotheses.push(text);
        }
    }
    // The clock covers tokenizing, decoding and detokenizing, as a throughput's peer
    // (`scripts/bench/translate_ct2.py`) times it; scoring is not translation.
    let seconds = t.elapsed().as_secs_f64();
    let rouge = (files.task == Some(TaskKind::Summarize)).then(|| {
        let scored: Vec<(&str, &str)> = refs
            .iter()
            .zip(&hypotheses)
            .map(|(r, h)| (r.as_str(), h.as_str()))
            .collect();
        rouge::corpus(&scored, true)
    });
    let refs = [refs];
    let bleu = corpus_bleu(&hypotheses, &refs, &BleuOptions::default())?;
    let chrf = corpus_chrf(&hypotheses, &refs, &ChrfOptions::default())?;
    let n = hypotheses.len();
    let samples = (0..samples.min(n))
        .map(|i| {
            let k = i * n / samples;
            (
                pairs[k].0.clone(),
                pairs[k].1.clone(),
                hypotheses[k].clone(),
            )
        })
        .collect();
    Ok(TranslateReport {
        sentences: n,
        beam: opts.decode.beam,
        mbr: if opts.decode.mbr > 1 {
            opts.decode.candidates(1)
        } else {
            0
        },
        mbr_references: opts.decode.references(),
        seconds,
        cut,
        limit,
        target_tokens,
        bleu,
        chrf,
        rouge,
        hypotheses,
        samples,
    })
}

/// The translate task of a job: training pairs, validation batches, test pairs.
pub struct Translate {
    train: ParallelData,
    valid: Vec<Seq2SeqBatch>,
    /// Set when the job chooses its best checkpoint by a decoding metric.
    valid_decode: Option<ValidDecode>,
    test: Option<Vec<(String, String)>>,
    target: Tokenizer,
    max_tokens: usize,
    seed: u64,
}

/// Scoring a checkpoint by decoding the validation sources (`train.best_metric` "bleu",
/// "chrf" or a ROUGE), as fairseq's `--eval-bleu` and Hugging Face's
/// `predict_with_generate` do: the job's `decode` settings, so the checkpoint kept is the
/// one that decodes best the way the model will be used.
struct ValidDecode {
    metric: BestMetric,
    pairs: Vec<(String, String)>,
    files: ModelFiles,
}

impl ValidDecode {
    /// The metric over every validation pair (× 100, as reported).
    fn score<B: Decoding>(&mut self, model: &mut Seq2Seq<B>) -> Result<f64>
    where
        Seq2Seq<B>: EncoderDecoder<B>,
    {
        let opts = TranslateOptions::new(&self.files.decode);
        let report = evaluate(model, &self.files, &self.pairs, &opts, 0)?;
        let rouge = |pick: fn(&Rouge) -> f64| -> Result<f64> {
            report
                .rouge
                .as_ref()
                .map(|r| 100.0 * pick(r))
                .ok_or_else(|| {
                    Error::Config(format!(
                        "train.best_metric {} needs a summarize job",
                        self.metric.name()
                    ))
                })
        };
        match self.metric {
            BestMetric::Bleu => Ok(report.bleu.score),
            BestMetric::Chrf => Ok(report.chrf.score),
            BestMetric::Rouge1 => rouge(|r| r.rouge1.fmeasure),
            BestMetric::Rouge2 => rouge(|r| r.rouge2.fmeasure),
            BestMetric::RougeL => rouge(|r| r.rouge_l.fmeasure),
            m @ (BestMetric::Loss | BestMetric::Accuracy) => Err(Error::Config(format!(
                "train.best_metric {} is not a decoding metric",
                m.name()
            ))),
        }
    }
}

impl<B: Decoding> TrainData<Seq2Seq<B>, B> for Translate
where
    Seq2Seq<B>: EncoderDecoder<B>,
{
    fn epoch(&self, epoch: u64) -> Result<Vec<Seq2SeqBatch>> {
        Ok(self
            .train
            .epoch_batches(&self.target, self.max_tokens, self.seed, epoch))
    }

    fn validate(&mut self, model: &mut Seq2Seq<B>, part: Part) -> Result<Tally> {
        let mut tally = loss_tally(model, &self.valid, part)?;
        if let Some(d) = &mut self.valid_decode {
            // Rank 0 decodes every pair and the ranks' sums hold its score once: corpus
            // BLEU and chrF do not split into shares, and sampling draws by a source's
            // index, which a share would renumber.
            let (value, weight) = if part.rank == 0 {
                (d.score(model)?, 1.0)
            } else {
                (0.0, 0.0)
            };
            tally.metric = Some((d.metric.name().to_string(), value, weight));
        }
        Ok(tally)
    }
}

impl Translate {
    /// Read, tokenize and batch the job's pairs; a summarizer cuts long sources instead of
    /// dropping their pairs.
    fn prepare_pairs(
        job: &Job,
        run: &Path,
        observer: &mut dyn Observer,
        kind: TaskKind,
    ) -> Result<Prepared<Self>> {
        let truncate_source = kind == TaskKind::Summarize;
        let train_pairs = read_pairs(job, &job.data.train, false, observer)?;
        let valid_pairs = read_pairs(job, &job.data.valid, false, observer)?;
        let test = job
            .data
            .test
            .as_deref()
            .map(|p| read_pairs(job, p, false, observer))
            .transpose()?;
        let side = |pick: fn(&(String, String)) -> &String| {
            let pairs = &train_pairs;
            move || pairs.iter().map(move |p| pick(p).clone())
        };
        let (tok, target_tokenizer) = if job.tokenizer.joint {
            let both = || train_pairs.iter().flat_map(|(s, t)| [s.clone(), t.clone()]);
            (
                tokenizer_for(job, run, TOKENIZER_FILE, both, observer)?,
                None,
            )
        } else {
            if job.tokenizer.path.is_some() {
                return Err(Error::Config(
                    "tokenizer.path gives one vocabulary; per-side vocabularies \
                     (joint: false) are trained from the data"
                        .into(),
                ));
            }
            let src = tokenizer_for(job, run, TOKENIZER_FILE, side(|p| &p.0), observer)?;
            let tgt = tokenizer_for(job, run, TARGET_TOKENIZER_FILE, side(|p| &p.1), observer)?;
            check_specials(&src, &tgt)?;
            (src, Some(tgt))
        };
        let mut config = job.model_config(None, tok.vocab_size(), tok.pad, 0)?;
        if let Some(tgt) = &target_tokenizer {
            if config.share_embeddings {
                return Err(Error::Config(
                    "share_embeddings needs one vocabulary for both sides (tokenizer.joint: true)"
                        .into(),
                ));
            }
            config.tgt_vocab_size = Some(tgt.vocab_size());
            config.validate()?;
        }
        let files = ModelFiles {
            tokenizer: tok,
            target_tokenizer,
            labels: None,
            decode: job.decode.clone(),
            task: (kind == TaskKind::Summarize).then_some(kind),
        };
        let (src_tok, tgt_tok) = (&files.tokenizer, files.target_tokenizer());
        let cut = truncate_source;
        let train = encode_pairs(src_tok, tgt_tok, &train_pairs, config.max_len, cut)?;
        let valid_data = encode_pairs(src_tok, tgt_tok, &valid_pairs, config.max_len, cut)?;
        if valid_data.pairs.is_empty() {
            return Err(Error::Config(format!(
                "{}: no validation pairs (within max_len {})",
                job.data.valid.display(),
                config.max_len
            )));
        }
        if test.as_ref().is_some_and(|t| t.is_empty()) {
            return Err(Error::Config("the test set is empty".into()));
        }
        let fit = if truncate_source {
            format!(
                "{} sources cut to {} tokens",
                train.truncated,
                config.max_len - 1
            )
        } else {
            format!(
                "{} dropped as longer than {} tokens",
                train.dropped_long, config.max_len
            )
        };
        observer.on_message(&format!(
            "train: {} pairs ({fit}), valid: {}, vocabulary {} / {}",
            train.pairs.len(),
            valid_data.pairs.len(),
            src_tok.vocab_size(),
            tgt_tok.vocab_size()
        ));
        let max_tokens = job.train.max_tokens;
        let valid_decode = job
            .train
            .best_metric
            .filter(|m| !matches!(m, BestMetric::Loss | BestMetric::Accuracy))
            .map(|metric| ValidDecode {
                metric,
                pairs: valid_pairs,
                files: files.clone(),
            });
        let task = Translate {
            valid: valid_data.epoch_batches(tgt_tok, max_tokens, 0, 0),
            valid_decode,
            train,
            test,
            target: tgt_tok.clone(),
            max_tokens,
            seed: job.train.seed,
        };
        Ok(Prepared {
            task,
            files,
            config,
        })
    }
}

impl Task for Translate {
    type Model = Seq2Seq;

    fn prepare(job: &Job, run: &Path, observer: &mut dyn Observer) -> Result<Prepared<Self>> {
        Self::prepare_pairs(job, run, observer, TaskKind::Translate)
    }

    fn new_model(&self, config: ModelConfig, job: &Job) -> Result<Seq2Seq> {
        Seq2Seq::new(config, job.train.seed)
    }

    fn test(
        &mut self,
        model: &mut Seq2Seq,
        files: &ModelFiles,
        job: &Job,
    ) -> Result<Option<Report>> {
        let Some(test) = &self.test else {
            return Ok(None);
        };
        let opts = TranslateOptions::new(&files.decode);
        let report = evaluate(model, files, test, &opts, job.samples)?;
        Ok(Some(Report::Translate(report)))
    }
}

/// Summarization: a translation task over `passage<TAB>summary` pairs whose model directory
/// says it summarizes (`task.json`), so its test set and `qkv eval` are scored by ROUGE.
pub struct Summarize(Translate);

impl<B: Decoding> TrainData<Seq2Seq<B>, B> for Summarize
where
    Seq2Seq<B>: EncoderDecoder<B>,
{
    fn epoch(&self, epoch: u64) -> Result<Vec<Seq2SeqBatch>> {
        TrainData::<Seq2Seq<B>, B>::epoch(&self.0, epoch)
    }
    fn validate(&mut self, model: &mut Seq2Seq<B>, part: Part) -> Result<Tally> {
        self.0.validate(model, part)
    }
}

impl Task for Summarize {
    type Model = Seq2Seq;

    fn prepare(job: &Job, run: &Path, observer: &mut dyn Observer) -> Result<Prepared<Self>> {
        let p = Translate::prepare_pairs(job, run, observer, TaskKind::Summarize)?;
        Ok(Prepared {
            task: Summarize(p.task),
            files: p.files,
            config: p.config,
        })
    }

    fn new_model(&self, config: ModelConfig, job: &Job) -> Result<Seq2Seq> {
        self.0.new_model(config, job)
    }

    fn test(
        &mut self,
        model: &mut Seq2Seq,
        files: &ModelFiles,
        job: &Job,
    ) -> Result<Option<Report>> {
        self.0.test(model, files, job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decoding threads share one set of packed weights, found by offset in their own copies'
    /// parameters: any mix-up (a wrong weight, a stale pack) would change outputs against one
    /// thread, which packs per batch by address.
    #[test]
    fn decoding_threads_share_packs_and_give_one_threads_outputs() {
        use crate::model::{Family, ModelConfig};
        let mut cfg = ModelConfig::preset("tiny", Family::Seq2seq, 13).unwrap();
        cfg.max_len = 16;
        cfg.dropout = 0.0;
        let mut model = Seq2Seq::new(cfg, 3).unwrap();
        let sources: Vec<Vec<u32>> = (0..12u32)
            .map(|i| (0..3 + i % 5).map(|j| 3 + (i * 7 + j * 3) % 10).collect())
            .collect();
        let pool = |n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
        };
        for (beam, int8) in [(1, false), (3, false), (1, true)] {
            model.int8_steps = int8 && crate::kernels::packed::available();
            let mut opts = TranslateOptions::new(&DecodeConfig {
                beam,
                ..DecodeConfig::default()
            });
            opts.max_tokens = 8; // several batches, so both threads decode
            let mut run = |threads| {
                pool(threads).install(|| translate_ids(&mut model, &sources, 1, 2, 0, &opts))
            };
            let one = run(1).unwrap();
            let two = run(2).unwrap();
            assert_eq!(one, two, "beam {beam}, int8 {int8}");
            assert!(model.shared_packs.is_none(), "the packs outlived the call");
        }
    }

    /// With `mbr_references`, a source's outputs are its candidates (as without references)
    /// followed by that many samples: those `decode.sampling` draws with the references'
    /// seed, whatever the batching. Without MBR there are none.
    #[test]
    fn mbr_references_follow_the_candidates_and_draw_their_own_seed() {
        use crate::model::{Family, ModelConfig};
        let mut cfg = ModelConfig::preset("tiny", Family::Seq2seq, 13).unwrap();
        cfg.max_len = 16;
        cfg.dropout = 0.0;
        let mut model = Seq2Seq::new(cfg, 5).unwrap();
        let sources: Vec<Vec<u32>> = (0..9u32)
            .map(|i| (0..3 + i % 4).map(|j| 3 + (i * 5 + j * 3) % 10).collect())
            .collect();
        let base = DecodeConfig {
            beam: 3,
            mbr: 3,
            temperature: 1.5,
            seed: 9,
            ..DecodeConfig::default()
        };
        let mut decode = |d: &DecodeConfig, nbest: usize, max_tokens: usize| {
            let opts = TranslateOptions {
                decode: d.clone(),
                nbest,
                max_tokens,
                sample_ids: vec![],
            };
            translate_ids(&mut model, &sources, 1, 2, 0, &opts).unwrap()
        };
        let with = DecodeConfig {
            mbr_references: 5,
            ..base.clone()
        };
        let sampling = DecodeConfig {
            sampling: true,
            beam: 5,
            mbr: 0,
            seed: 9 ^ REFERENCE_STREAM,
            ..base.clone()
        };
        // Batches of 8 tokens cut the sources into several, each with its own length limit.
        for max_tokens in [4096, 8] {
            let candidates = decode(&base, 3, max_tokens);
            let drawn = decode(&sampling, 5, max_tokens);
            let all = decode(&with, 3, max_tokens);
            for ((a, c), d) in all.iter().zip(&candidates).zip(&drawn) {
                assert_eq!(&a[..c.len()], &c[..], "max_tokens {max_tokens}");
                assert_eq!(&a[c.len()..], &d[..], "max_tokens {max_tokens}");
            }
            assert!(
                drawn.iter().any(|d| d.windows(2).any(|w| w[0] != w[1])),
                "the samples never differ: {drawn:?}"
            );
        }
        let off = DecodeConfig {
            mbr: 0,
            ..with.clone()
        };
        assert_eq!(decode(&off, 3, 4096), decode(&base, 3, 4096));

        // Two requests decoded as one batch (sources 0-3 and 4-8), each text seeded by its
        // index within its request, draw what each request draws alone.
        let opts = |sample_ids: Vec<u64>| TranslateOptions {
            decode: with.clone(),
            nbest: 3,
            max_tokens: 4096,
            sample_ids,
        };
        let ids: Vec<u64> = (0..4).chain(0..5).collect();
        let together = translate_ids(&mut model, &sources, 1, 2, 0, &opts(ids)).unwrap();
        let first = translate_ids(&mut model, &sources[..4], 1, 2, 0, &opts(vec![])).unwrap();
        let second = translate_ids(&mut model, &sources[4..], 1, 2, 0, &opts(vec![])).unwrap();
        assert_eq!(together[..4], first[..]);
        assert_eq!(together[4..], second[..]);
        // Ids for some of the sources only is an error, not the index for the others.
        let err = translate_ids(&mut model, &sources, 1, 2, 0, &opts(vec![0, 1]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 ids for 9 sources"), "{err}");
    }

    /// Greedy decoding with continuous batching gives every source what decoding its batch
    /// alone gives: rows joining part-way keep their own positions (and sliding windows),
    /// source lengths and length limits.
    #[test]
    fn continuous_greedy_equals_decoding_each_batch_alone() {
        use crate::model::{AttentionKind, Family, ModelConfig, NormPlacement};
        let sources: Vec<Vec<u32>> = (0..80u32)
            .map(|i| {
                (0..2 + (i * 5) % 11)
                    .map(|j| 3 + (i * 7 + j * 3) % 20)
                    .collect()
            })
            .collect();
        // Linear self-attention keeps one state per row, so its rows cannot join part-way:
        // each batch waits for the last to end, with the same outputs.
        for (norm, window, attention, seed) in [
            (NormPlacement::Pre, None, AttentionKind::Flash, 3),
            (NormPlacement::Post, Some(3), AttentionKind::Flash, 4),
            (NormPlacement::Pre, None, AttentionKind::Linear, 5),
        ] {
            let mut cfg = ModelConfig::preset("tiny", Family::Seq2seq, 23).unwrap();
            cfg.max_len = 24;
            cfg.dropout = 0.0;
            cfg.norm = norm;
            cfg.attention_window = window;
            cfg.attention = attention;
            let mut model = Seq2Seq::new(cfg, seed).unwrap();
            // Larger weights than initialisation's, so outputs depend on their sources.
            model.params.data.iter_mut().for_each(|v| *v *= 4.0);
            let mut opts = TranslateOptions::new(&DecodeConfig {
                beam: 1,
                ..DecodeConfig::default()
            });
            opts.max_tokens = 960; // chunks of 120 tokens
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let mut run = |eos| {
                pool.install(|| translate_ids(&mut model, &sources, 1, eos, 0, &opts))
                    .unwrap()
            };
            // An untrained model rarely chooses any given EOS, so every row of a batch would
            // run to the batch's limit and end in one step. As EOS, the token whose first
            // occurrence (after the first position) varies most ends rows at many different
            // steps, and later batches join part-way.
            let outputs = run(2);
            let firsts = |t: u32| {
                let at = outputs
                    .iter()
                    .filter_map(|o| o[0].iter().position(|&x| x == t));
                at.filter(|&p| p > 0)
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
            };
            let eos = (3..23).max_by_key(|&t| firsts(t)).unwrap();
            let continuous = run(eos);
            let order = longest_first(&sources);
            let (batched_continuously, chunk_tokens) = batching::<crate::backend::Cpu>(&opts);
            assert!(batched_continuously);
            let chunks = chunk_by_tokens(&sources, &order, chunk_tokens);
            assert!(chunks.len() > 4, "{} batches", chunks.len());
            let mut lengths = std::collections::BTreeSet::new();
            for chunk in chunks {
                let alone = translate_batch(&mut model, &sources, chunk, 1, eos, 0, &opts).unwrap();
                for (&i, out) in chunk.iter().zip(alone) {
                    lengths.insert(out[0].len());
                    assert_eq!(
                        continuous[i], out,
                        "source {i}, {norm:?}, window {window:?}, {attention:?}"
                    );
                }
            }
            // Outputs that end early and outputs that run to their batch's limit.
            assert!(lengths.len() > 3, "output lengths {lengths:?}");
        }
    }

    /// An ensemble decodes as the average of its models, whatever the decoding: one model
    /// alone decodes exactly as that model, two copies of one model as the model (their
    /// caches reordered by beam search, absorbed by continuous batching, copied to decoding
    /// threads in step), and two different models otherwise.
    #[test]
    fn an_ensemble_of_one_model_or_of_copies_decodes_as_the_model() {
        use crate::model::{Ensemble, Family, ModelConfig};
        let model = |seed| {
            let mut cfg = ModelConfig::preset("tiny", Family::Seq2seq, 23).unwrap();
            cfg.max_len = 24;
            cfg.dropout = 0.0;
            let mut m = Seq2Seq::new(cfg, seed).unwrap();
            m.params.data.iter_mut().for_each(|v| *v *= 4.0);
            m
        };
        let sources: Vec<Vec<u32>> = (0..30u32)
            .map(|i| {
                (0..2 + (i * 5) % 11)
                    .map(|j| 3 + (i * 7 + j * 3) % 20)
                    .collect()
            })
            .collect();
        let (a, b) = (model(3), model(4));
        let pool = |n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
        };
        for (beam, threads) in [(1, 1), (1, 2), (3, 1), (3, 2)] {
            let mut opts = TranslateOptions::new(&DecodeConfig {
                beam,
                ..DecodeConfig::default()
            });
            opts.nbest = beam;
            opts.max_tokens = 96; // several batches (greedy: chunks of 12 tokens)
            let run = |m: &mut dyn FnMut(&TranslateOptions) -> Vec<Vec<Vec<u32>>>| m(&opts);
            let mut single = a.clone();
            let want = run(&mut |o| {
                pool(threads).install(|| translate_ids(&mut single, &sources, 1, 2, 0, o).unwrap())
            });
            for models in [
                vec![a.clone()],
                vec![a.clone(), a.clone()],
                vec![a.clone(), b.clone()],
            ] {
                let n = models.len();
                let same = n == 1 || models[1].params.data == a.params.data;
                let mut ens = Ensemble::new(models).unwrap();
                let got = run(&mut |o| {
                    pool(threads).install(|| translate_ids(&mut ens, &sources, 1, 2, 0, o).unwrap())
                });
                let what = format!("{n} models, beam {beam}, {threads} threads");
                let sharing = ens.models.iter().any(|m| m.shared_packs.is_some());
                assert!(!sharing, "{what}: the packs outlived the call");
                match same {
                    true => assert_eq!(got, want, "{what}"),
                    false => assert_ne!(got, want, "{what}: the second model changed nothing"),
                }
            }
        }
    }

    /// A cache absorbs only a fresh cache whose outputs fit its capacity.
    #[test]
    fn a_cache_absorbs_rows_whose_outputs_fit_its_capacity() {
        use crate::model::{Family, ModelConfig};
        let mut cfg = ModelConfig::preset("tiny", Family::Seq2seq, 13).unwrap();
        cfg.max_len = 16;
        let mut model = Seq2Seq::new(cfg, 3).unwrap();
        let mut start = |len: usize, out: usize| {
            let src: Vec<u32> = (0..len as u32).map(|i| 3 + i % 9).collect();
            model
                .start_decoding(Tokens::new(&src, 1, len).unwrap(), out)
                .unwrap()
        };
        let mut cache = start(5, 8);
        assert!(cache.absorb(start(5, 9)).is_err(), "longer outputs");
        cache.absorb(start(4, 8)).unwrap();
        assert_eq!((cache.rows(), cache.source_len()), (2, 5));
        // Source blocks take the longest source's length.
        cache.absorb(start(7, 8)).unwrap();
        assert_eq!((cache.rows(), cache.source_len()), (3, 7));
    }

    #[test]
    fn long_sources_are_dropped_or_cut() {
        let text = ["a b c d e f g h", "a b", "c d e"];
        let tok = Tokenizer::train_bpe(text.iter(), 40, false).unwrap();
        let pair = |s: &str, t: &str| (s.to_string(), t.to_string());
        let pairs = [
            pair("a b c d e f g h", "a b"),
            pair("a", "b"),
            pair("a", "a b c d e f g h"),
        ];
        let long = tok.encode(&pairs[0].0).unwrap();
        let max_len = 4;
        assert!(long.len() + 1 > max_len);
        // Translation drops a pair with a side too long for the model.
        let kept = encode_pairs(&tok, &tok, &pairs, max_len, false).unwrap();
        assert_eq!(
            (kept.pairs.len(), kept.dropped_long, kept.truncated),
            (1, 2, 0)
        );
        // Summarization keeps the start of a long source; a long target still drops its pair.
        let cut = encode_pairs(&tok, &tok, &pairs, max_len, true).unwrap();
        assert_eq!(
            (cut.pairs.len(), cut.dropped_long, cut.truncated),
            (2, 1, 1)
        );
        assert_eq!(cut.pairs[0].0, long[..max_len - 1]);
    }
}
