//! Layers, blocks and the three model families. Files read in paper order:
//! `config` → `linear`, `norm`, `embedding` (leaf layers) → `attention`, `feed_forward`
//! (sublayers, §3.2–3.3) → `encoder`, `decoder` (blocks and stacks, Figure 1) →
//! `seq2seq`, `classifier`, `lm` (models). Models do no IO.
//!
//! Every layer has an explicit `forward` that keeps what its `backward` needs in buffers it
//! owns (allocated on first use, reused while shapes do not grow) and a `backward` that
//! accumulates parameter gradients into the flat gradient buffer.

pub mod attention;
pub mod classifier;
pub mod config;
pub mod decoder;
pub mod embedding;
pub mod encoder;
pub mod feed_forward;
pub mod kv_cache;
pub mod linear;
pub mod lm;
pub mod norm;
pub mod seq2seq;

pub use classifier::Classifier;
pub use config::{AttentionKind, Family, ModelConfig, NormPlacement, Pooling, Positional};
pub use kv_cache::{Incremental, KvCache};
pub use lm::LanguageModel;
pub use seq2seq::Seq2Seq;

use crate::error::{shape_err, Error, Result};
use crate::kernels::dropout::Dropout;
use crate::params::Params;
use crate::rng;

/// Train or evaluate: dropout is active only in training, with a fresh seed per step.
#[derive(Clone, Copy, Debug)]
pub struct Mode {
    pub dropout: f32,
    pub seed: u64,
}

impl Mode {
    pub const EVAL: Mode = Mode {
        dropout: 0.0,
        seed: 0,
    };
    pub fn train(dropout: f32, step_seed: u64) -> Self {
        Self {
            dropout,
            seed: step_seed,
        }
    }
    /// The dropout of one site (`id` unique per place in the model).
    pub fn site(&self, id: u64) -> Option<Dropout> {
        Dropout::new(self.dropout, rng::hash(self.seed, id))
    }
}

/// Hands out unique dropout-site ids while a model is built.
#[derive(Default)]
pub struct SiteIds(u64);
impl SiteIds {
    pub fn next(&mut self) -> u64 {
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

/// What the trainer, benchmarks and checkpoints need from any model.
pub trait Model {
    fn config(&self) -> &ModelConfig;
    fn params(&self) -> &Params;
    fn params_mut(&mut self) -> &mut Params;
}

/// Grow-only scratch buffer: `&mut v[..n]`, reallocating only when `n` exceeds the capacity seen so far.
pub(crate) fn buf(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
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
