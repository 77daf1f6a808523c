//! Layers, blocks and the three model families. Files read in paper order:
//! `config` → `linear`, `norm`, `embedding` (leaf layers) → `attention`, `feed_forward`
//! (sublayers, §3.2–3.3) → `stack` (blocks and stacks, Figure 1) → `seq2seq`, `classifier`,
//! `lm` (models). Models do no IO.
//!
//! Every layer has an explicit `forward` that keeps what its `backward` needs in buffers it
//! owns (allocated on first use, reused while shapes do not grow) and a `backward` that
//! accumulates parameter gradients into the flat gradient buffer.
//!
//! The model contract ([`Model`]), as llm.c's: `forward(batch, mode)` returns the loss
//! against the batch's targets; after a training-mode forward, `backward(scale)` adds
//! `scale × ∂loss/∂θ` into `params.grad`. Nothing zeroes the gradients but the caller (the
//! trainer), so gradient accumulation is a sequence of forward/backward pairs.

pub mod attention;
pub mod classifier;
pub mod config;
pub mod embedding;
pub mod ensemble;
pub mod feed_forward;
pub mod kv_cache;
pub mod linear;
pub mod lm;
pub mod norm;
pub mod seq2seq;
pub mod stack;

pub use classifier::Classifier;
pub use config::{AttentionKind, Family, ModelConfig, NormPlacement, Pooling, Positional};
pub use ensemble::{EncoderDecoder, Ensemble};
pub use kv_cache::{Decoding, Incremental, KvCache};
pub use lm::LanguageModel;
pub use seq2seq::Seq2Seq;

use crate::backend::{Backend, Cpu};
use crate::error::{shape_err, Error, Result};
use crate::kernels::dropout::Dropout;
use crate::kernels::loss::CrossEntropy;
use crate::params::Params;
use crate::rng;
use std::ops::Range;

/// How a forward runs: evaluation, or training (dropout with a fresh seed per micro-batch,
/// label smoothing, and the loss gradient kept for `backward`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mode {
    pub dropout: f32,
    pub seed: u64,
    /// §5.4: ε_ls of the training objective.
    pub label_smoothing: f32,
    /// Keep ∂loss/∂logits for a `backward` (training); evaluation computes the loss only.
    pub grad: bool,
    /// Rows of a larger batch before this one, and this batch's rows, when a batch was split
    /// across data-parallel ranks ([`crate::dist`]): dropout masks are indexed by the whole
    /// batch's elements, so every split draws the masks one process would have drawn.
    pub row_offset: usize,
    pub rows: usize,
}

impl Mode {
    pub const EVAL: Mode = Mode {
        dropout: 0.0,
        seed: 0,
        label_smoothing: 0.0,
        grad: false,
        row_offset: 0,
        rows: 0,
    };
    pub fn train(dropout: f32, label_smoothing: f32, seed: u64) -> Self {
        Self {
            dropout,
            seed,
            label_smoothing,
            grad: true,
            row_offset: 0,
            rows: 0,
        }
    }
    /// This forward's batch is rows `offset..offset + rows` of a larger batch (padded to the
    /// same lengths).
    pub fn rows_of(self, offset: usize, rows: usize) -> Self {
        Self {
            row_offset: offset,
            rows,
            ..self
        }
    }
    /// The dropout of one site (`id` unique per place in the model) over a buffer of `len`
    /// elements, (B, ·) row-major.
    pub fn site(&self, id: u64, len: usize) -> Option<Dropout> {
        let offset = match self.rows {
            0 => 0,
            rows => self.row_offset * (len / rows),
        };
        Dropout::new(self.dropout, rng::hash(self.seed, id)).map(|d| d.at(offset as u64))
    }
}

/// Hands out unique dropout-site ids while a model is built.
#[derive(Default)]
pub struct SiteIds(u64);
impl SiteIds {
    pub fn next_id(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
}

/// A batch of token ids, (B, T) row-major.
#[derive(Clone, Copy, Debug)]
pub struct Tokens<'a> {
    pub ids: &'a [u32],
    pub batch: usize,
    pub len: usize,
}

impl<'a> Tokens<'a> {
    pub fn new(ids: &'a [u32], batch: usize, len: usize) -> Result<Self> {
        if ids.len() != batch * len || batch == 0 || len == 0 {
            return Err(shape_err(
                "token batch",
                format!("{batch} x {len} = {} ids (both > 0)", batch * len),
                ids.len(),
            ));
        }
        Ok(Self { ids, batch, len })
    }

    /// Every id must be in the vocabulary; names the first offender and its position.
    pub fn check_vocab(&self, input: &'static str, vocab: usize) -> Result<()> {
        match self.ids.iter().position(|&t| t as usize >= vocab) {
            Some(i) => Err(Error::TokenOutOfRange {
                input,
                value: self.ids[i],
                row: i / self.len,
                pos: i % self.len,
                vocab,
            }),
            None => Ok(()),
        }
    }

    pub fn padding_mask(&self, pad: u32, out: &mut Vec<bool>) {
        out.clear();
        out.extend(self.ids.iter().map(|&t| t == pad));
    }
}

/// The loss of one forward against its batch's targets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Loss {
    /// The training objective (label smoothing included), mean over the counted targets:
    /// what `backward` differentiates.
    pub mean: f32,
    /// Σ −log p(target) over the counted targets, without smoothing (validation, perplexity).
    pub nll_sum: f64,
    /// Targets counted: non-padding tokens, or examples.
    pub count: usize,
}

/// What a forward returns: the loss and the logits it came from.
pub struct Forward<'a, B: Backend = Cpu> {
    pub loss: Loss,
    /// (B, T, V) for sequence models, (B, K) for the classifier.
    pub logits: B::Ref<'a>,
}

/// What the trainer, evaluation, benchmarks and checkpoints need from any model family, on
/// backend `B` (its parameters, activations and gradients live there).
pub trait Model<B: Backend = Cpu> {
    /// Inputs and targets of one forward (`data::Seq2SeqBatch`, …).
    type Batch: crate::data::Rows;
    fn config(&self) -> &ModelConfig;
    fn params(&self) -> &Params<B>;
    fn params_mut(&mut self) -> &mut Params<B>;
    /// Where the parameters live and the kernels run.
    fn backend(&self) -> &B;
    /// Targets the loss of `batch` averages over (what the trainer weights micro-batches by).
    fn loss_count(&self, batch: &Self::Batch) -> usize;
    /// Forward over `batch` and its loss. In a training `mode` the activations and the loss
    /// gradient stay for [`Model::backward`]; an evaluation forward runs forward only.
    fn forward(&mut self, batch: &Self::Batch, mode: Mode) -> Result<Forward<'_, B>>;
    /// Add `scale × ∂loss/∂θ` of the last training forward into `params.grad` (the caller
    /// zeroes it). An error, never a wrong gradient, when something replaced that forward's
    /// activations (another forward, decoding) or there was none.
    fn backward(&mut self, scale: f32) -> Result<()> {
        self.backward_with(scale, &mut |_, _| {})
    }
    /// [`Model::backward`], calling `ready(k, grad)` each time the first `k` ranges of
    /// [`Model::grad_order`] hold their final values: data-parallel training starts summing
    /// them across ranks while the rest of the backward runs.
    fn backward_with(&mut self, scale: f32, ready: &mut dyn FnMut(usize, B::Ref<'_>))
        -> Result<()>;
    /// The gradient buffer as ranges (covering it once) in the order `backward_with`
    /// finishes them.
    fn grad_order(&self) -> Vec<Range<usize>>;
}

/// A model family on the CPU that can make its twin on another backend: the same config and
/// parameters (a job builds and warm-starts its model on the host, then trains the twin).
pub trait ToBackend: Model + Sized {
    /// This family on backend `B`.
    type On<B: Backend>: Model<B, Batch = Self::Batch>;
    /// A copy on `be`, with this model's parameters and zero gradients.
    fn to_backend<B: Backend>(&self, be: B) -> Result<Self::On<B>>;
}

macro_rules! to_backend {
    ($family:ident) => {
        impl ToBackend for $family {
            type On<B: Backend> = $family<B>;
            fn to_backend<B: Backend>(&self, be: B) -> Result<$family<B>> {
                be.runs_attention(self.config.attention)?;
                let mut twin = $family::on(be.clone(), self.config.clone(), 0)?;
                twin.params.data = be.upload(self.params.data.clone());
                be.sync()?;
                Ok(twin)
            }
        }
    };
}
to_backend!(Seq2Seq);
to_backend!(Classifier);
to_backend!(LanguageModel);

/// A stack's per-block callback that tells `ready` how many blocks are finished.
pub(crate) fn count_blocks<'a, B: Backend>(
    ready: &'a mut dyn FnMut(usize, B::Ref<'_>),
) -> impl FnMut(B::Ref<'_>) + 'a {
    let mut finished = 0;
    move |g| {
        finished += 1;
        ready(finished, g)
    }
}

/// `blocks` in the order a backward finishes them, then every other parameter (embeddings,
/// final norms, heads: finished only at the end, tied tables last of all).
pub(crate) fn grad_order(
    blocks: impl Iterator<Item = Range<usize>>,
    len: usize,
) -> Vec<Range<usize>> {
    let mut order: Vec<Range<usize>> = blocks.collect();
    let mut taken = order.clone();
    taken.sort_by_key(|r| r.start);
    let mut at = 0;
    for r in taken {
        if r.start > at {
            order.push(at..r.start);
        }
        at = at.max(r.end);
    }
    if at < len {
        order.push(at..len);
    }
    order
}

/// What a model's buffers hold, so `backward` can refuse activations that are not its
/// training forward's. `S` is the shape of that forward.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) enum LastPass<S> {
    #[default]
    Nothing,
    /// A training forward of this shape; backward may follow (once).
    Train(S),
    /// Something else ran last (named for the error).
    Other(&'static str),
}

impl<S: Copy> LastPass<S> {
    /// What a forward of `shape` in `mode` leaves: activations for backward, or (evaluation)
    /// nothing to differentiate.
    pub(crate) fn after_forward(mode: Mode, shape: S) -> Self {
        if mode.grad {
            LastPass::Train(shape)
        } else {
            LastPass::Other("an evaluation forward")
        }
    }

    /// The training forward's shape, consuming it: a second backward is an error too.
    pub(crate) fn take_for_backward(&mut self) -> Result<S> {
        match std::mem::replace(self, LastPass::Other("backward")) {
            LastPass::Train(s) => Ok(s),
            LastPass::Nothing => Err(Error::Usage(
                "backward needs a training-mode forward first".into(),
            )),
            LastPass::Other(what) => Err(Error::Usage(format!(
                "backward after {what}: the training forward's activations are gone \
                 (run forward in training mode again)"
            ))),
        }
    }
}

/// The loss of `logits` (N, V) against `targets` (N), ignoring `ignore`; in a training
/// `mode` ∂loss/∂logits goes to `dlogits`. A non-finite loss is an error.
pub(crate) fn loss_of<B: Backend>(
    be: &B,
    logits: B::Ref<'_>,
    dlogits: &mut B::Buf,
    targets: &[u32],
    v: usize,
    ignore: Option<u32>,
    mode: Mode,
) -> Result<Loss> {
    let d = mode.grad.then(|| be.grow(dlogits, B::len(logits)));
    let smoothing = mode.label_smoothing;
    let CrossEntropy {
        mean,
        nll_sum,
        count,
    } = be.cross_entropy(d, logits, targets, v, ignore, smoothing);
    be.sync()?;
    finite("loss", mean)?;
    Ok(Loss {
        mean,
        nll_sum,
        count,
    })
}

/// Multiply a loss gradient by `scale` (gradient accumulation weights micro-batches).
pub(crate) fn scale_grad<B: Backend>(be: &B, d: B::Mut<'_>, scale: f32) {
    if scale != 1.0 {
        be.scale(d, scale);
    }
}

/// A model of any family, on backend `B`: the one place that switches on [`Family`].
// One per loaded model directory: boxing the variants would save nothing worth an indirection.
#[allow(clippy::large_enum_variant)]
pub enum AnyModel<B: Backend = Cpu> {
    Seq2Seq(Seq2Seq<B>),
    Classifier(Classifier<B>),
    Lm(LanguageModel<B>),
}

impl AnyModel {
    /// The same model on `be` (its [`ToBackend`] twin): the GPU copy of a loaded directory.
    pub fn to_backend<B: Backend>(&self, be: B) -> Result<AnyModel<B>> {
        Ok(match self {
            AnyModel::Seq2Seq(m) => AnyModel::Seq2Seq(m.to_backend(be)?),
            AnyModel::Classifier(m) => AnyModel::Classifier(m.to_backend(be)?),
            AnyModel::Lm(m) => AnyModel::Lm(m.to_backend(be)?),
        })
    }

    /// Run decoding steps' products in int8 (per-channel weight scales, per-row activation
    /// scales; `--dtype int8`). Only models that decode have steps; the CPU needs AVX2.
    pub fn set_int8_steps(&mut self, on: bool) -> Result<()> {
        if on && !crate::kernels::packed::available() {
            return Err(Error::Config(
                "int8 decoding needs a CPU with AVX2 and FMA".into(),
            ));
        }
        match self {
            AnyModel::Seq2Seq(m) => m.int8_steps = on,
            AnyModel::Lm(m) => m.int8_steps = on,
            AnyModel::Classifier(_) if on => {
                return Err(Error::Config(
                    "int8 quantizes decoding steps (translate, generate, serve); a classifier \
                     does not decode"
                        .into(),
                ))
            }
            AnyModel::Classifier(_) => {}
        }
        Ok(())
    }

    /// A freshly initialised model of `config`'s family.
    pub fn new(config: ModelConfig, seed: u64) -> Result<Self> {
        Ok(match config.family {
            Family::Seq2seq => AnyModel::Seq2Seq(Seq2Seq::new(config, seed)?),
            Family::Classifier => AnyModel::Classifier(Classifier::new(config, seed)?),
            Family::Lm => AnyModel::Lm(LanguageModel::new(config, seed)?),
        })
    }
}

impl<B: Backend> AnyModel<B> {
    pub fn config(&self) -> &ModelConfig {
        match self {
            AnyModel::Seq2Seq(m) => &m.config,
            AnyModel::Classifier(m) => &m.config,
            AnyModel::Lm(m) => &m.config,
        }
    }

    pub fn params(&self) -> &Params<B> {
        match self {
            AnyModel::Seq2Seq(m) => &m.params,
            AnyModel::Classifier(m) => &m.params,
            AnyModel::Lm(m) => &m.params,
        }
    }

    pub fn params_mut(&mut self) -> &mut Params<B> {
        match self {
            AnyModel::Seq2Seq(m) => &mut m.params,
            AnyModel::Classifier(m) => &mut m.params,
            AnyModel::Lm(m) => &mut m.params,
        }
    }
}

/// Refuse a config of another family (each family's constructor calls this first).
pub(crate) fn check_family(config: &ModelConfig, family: Family) -> Result<()> {
    config.validate()?;
    if config.family != family {
        return Err(Error::Config(format!(
            "expected family {}, got {}",
            family.name(),
            config.family.name()
        )));
    }
    Ok(())
}

/// Check a loss (or any scalar) is finite, naming it.
pub(crate) fn finite(what: &str, value: f32) -> Result<f32> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(Error::NonFinite {
            what: what.to_string(),
            value,
        })
    }
}
