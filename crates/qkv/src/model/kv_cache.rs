//! The key/value cache of incremental decoding, owned by the caller. Decoder self-attention
//! appends one position per step; cross-attention keys and values are computed once per source
//! (§3.2.3: every decoder position attends over all encoder positions, which do not change).
//!
//! Rows are what is being decoded (batch × beam). Beam search reorders rows with
//! [`KvCache::reorder`]; the cross-attention blocks stay per source and rows point at them.

use super::embedding::Embedding;
use super::linear::project_out;
use super::stack::Stack;
use crate::error::{shape_err, Error, Result};
use crate::kernels::packed::{PackedScope, PackedWeights};
use crate::params::Param;

/// One layer's keys and values: `blocks` blocks of `rows` positions of `[K | V]` (2C floats).
/// A linear-attention layer keeps instead a fixed recurrent state of `state` floats per block
/// (its (S, z) per head), whatever the position.
#[derive(Clone, Debug, Default)]
pub struct LayerKv {
    pub data: Vec<f32>,
    pub rows: usize,
    pub state: usize,
}

impl LayerKv {
    /// `state == 0`: room for `rows` positions per block; otherwise one recurrent state each.
    pub(crate) fn zeros(blocks: usize, rows: usize, c: usize, state: usize) -> Self {
        let per_block = if state > 0 { state } else { rows * 2 * c };
        Self {
            data: vec![0.0; blocks * per_block],
            rows,
            state,
        }
    }
}

#[derive(Clone, Debug)]
pub struct KvCache {
    /// Positions decoded so far; the next token goes to position `len`.
    pub len: usize,
    /// Most positions this cache can hold.
    pub capacity: usize,
    pub(crate) c: usize,
    /// Per decoder layer: self-attention keys/values in blocks of (capacity, 2C); row r's is
    /// block `own[r]`.
    pub(crate) self_kv: Vec<LayerKv>,
    /// Per decoder layer: cross-attention keys/values, one block per source: (B, S, 2C).
    /// Empty for decoder-only models.
    pub(crate) cross_kv: Vec<LayerKv>,
    /// (B, S): `true` where the source is padding.
    pub(crate) src_padding: Vec<bool>,
    /// Which source block each row reads in cross-attention.
    pub(crate) source_of: Vec<usize>,
    /// Row r's self-attention block.
    pub(crate) own: Vec<usize>,
    /// Per decoder layer, the buffer `reorder` gathers into before swapping it with the
    /// layer's (reused, so a step allocates and zeroes nothing).
    spare: Vec<Vec<f32>>,
    /// The decoder's weights packed for this session's steps (packed at first use).
    pub(crate) packed: PackedWeights,
}

impl KvCache {
    /// `state`: floats of recurrent state per row for linear-attention layers, else 0.
    pub(crate) fn new(rows: usize, capacity: usize, c: usize, layers: usize, state: usize) -> Self {
        Self {
            len: 0,
            capacity,
            c,
            self_kv: (0..layers)
                .map(|_| LayerKv::zeros(rows, capacity, c, state))
                .collect(),
            cross_kv: Vec::new(),
            src_padding: Vec::new(),
            source_of: (0..rows).collect(),
            own: (0..rows).collect(),
            spare: vec![Vec::new(); layers],
            packed: PackedWeights::default(),
        }
    }

    /// Rows being decoded.
    pub fn rows(&self) -> usize {
        self.own.len()
    }

    /// The source (batch row of the encoded input) that row `r` translates.
    pub fn source_of(&self, r: usize) -> usize {
        self.source_of[r]
    }

    /// Keep rows `order[i]` as the new row i (rows may repeat or be dropped): beam search calls
    /// this after choosing which hypotheses continue.
    ///
    /// Softmax-attention layers move no data for a row that continues alone: its block is
    /// handed to it (`own`). Only a row whose parent continues more than once gets a copy
    /// of the parent's decoded positions, in a block no continuing row uses (a dropped
    /// row's, or a new one). Copying every row each step instead moved as many bytes as
    /// attention reads (7.7% of a beam-4 translation's time). Linear-attention layers keep a
    /// fixed-size state per row and are copied into place.
    pub fn reorder(&mut self, order: &[usize]) {
        let (n, w) = (self.len, 2 * self.c);
        let recurrent = self.self_kv.iter().any(|l| l.state > 0);
        if recurrent {
            for (layer, spare) in self.self_kv.iter_mut().zip(&mut self.spare) {
                let block = layer.state;
                let mut data = std::mem::take(spare);
                data.resize(order.len() * block, 0.0);
                data.truncate(order.len() * block);
                for (dst, &src) in order.iter().enumerate() {
                    data[dst * block..][..block]
                        .copy_from_slice(&layer.data[src * block..][..block]);
                }
                *spare = std::mem::replace(&mut layer.data, data);
            }
            self.own = (0..order.len()).collect();
        } else {
            let blocks = self
                .self_kv
                .first()
                .map_or(0, |l| l.data.len() / (l.rows * w));
            if order.len() > blocks {
                // More rows than blocks (beam search's first step): a new, lazily zeroed
                // buffer, so positions never decoded are never touched (resident memory
                // follows the outputs' lengths, not the capacity).
                for layer in &mut self.self_kv {
                    let block = layer.rows * w;
                    let mut data = vec![0.0; order.len() * block];
                    for b in 0..blocks {
                        data[b * block..][..n * w]
                            .copy_from_slice(&layer.data[b * block..][..n * w]);
                    }
                    layer.data = data;
                }
            }
            let mut taken = vec![false; blocks.max(order.len())];
            let mut own = vec![usize::MAX; order.len()];
            for (i, &parent) in order.iter().enumerate() {
                let b = self.own[parent];
                if !taken[b] {
                    taken[b] = true;
                    own[i] = b;
                }
            }
            // Blocks no continuing row holds; none of them is a copy's source (every source
            // block is held by its parent's first continuation).
            let mut free = (0..taken.len()).filter(|&b| !taken[b]);
            for (i, &parent) in order.iter().enumerate() {
                if own[i] != usize::MAX {
                    continue;
                }
                // `taken` has a slot per continuing row, so a slot is free for each copy.
                let to = free.next().expect("a free block for every copy");
                let from = self.own[parent];
                own[i] = to;
                for layer in &mut self.self_kv {
                    let block = layer.rows * w;
                    layer
                        .data
                        .copy_within(from * block..from * block + n * w, to * block);
                }
            }
            self.own = own;
        }
        self.source_of = order.iter().map(|&r| self.source_of[r]).collect();
    }
}

impl KvCache {
    /// Errors (not panics) for a step that does not fit this cache.
    pub(crate) fn check_step(&self, tokens: &[u32], layers: usize, cross: bool) -> Result<()> {
        if tokens.len() != self.rows() {
            return Err(shape_err(
                "decoding step",
                format!("{} tokens (one per row)", self.rows()),
                tokens.len(),
            ));
        }
        if self.self_kv.len() != layers || (cross && self.cross_kv.len() != layers) {
            return Err(Error::Config(
                "this cache was started by a different model".into(),
            ));
        }
        if self.len >= self.capacity {
            return Err(Error::SequenceTooLong {
                input: "decoded sequence",
                len: self.len + 1,
                max_len: self.capacity,
            });
        }
        Ok(())
    }
}

/// A model that extends every row by one token per call, over a cache owned by the caller
/// (greedy, beam search and sampling in `decode` are written against this).
pub trait Incremental {
    fn vocab(&self) -> usize;
    /// tokens: (R) the newest token of each row → logits (R, V) for the next position.
    fn step(&mut self, cache: &mut KvCache, tokens: &[u32]) -> Result<&[f32]>;
}

/// One incremental step of a decoder stack (a Seq2Seq's decoder or a language model): embed
/// each row's newest token at position `cache.len`, run the stack over the cache, project to
/// logits (R, V).
pub(crate) fn decoder_step<'a>(
    p: &[f32],
    embed: &mut Embedding,
    stack: &mut Stack,
    output: Param,
    logits: &'a mut Vec<f32>,
    cache: &mut KvCache,
    tokens: &[u32],
) -> Result<&'a [f32]> {
    let cross = stack.layers.iter().any(|l| l.cross.is_some());
    cache.check_step(tokens, stack.layers.len(), cross)?;
    let x = embed.step(p, tokens, cache.len)?;
    // The step's products run on this session's packed weights (see kernels::packed).
    cache.packed.set_params(p);
    let scope = PackedScope::install(std::mem::take(&mut cache.packed));
    let h = stack.step(p, x, cache);
    let v = project_out(p, output, h, logits, embed.c);
    cache.packed = scope.finish();
    cache.len += 1;
    Ok(&logits[..tokens.len() * v])
}

/// What one decoding step of a layer needs besides its own cache.
#[derive(Clone, Copy)]
pub(crate) struct StepCtx<'a> {
    /// Position of the token being decoded.
    pub pos: usize,
    pub own: &'a [usize],
    pub source_of: &'a [usize],
    pub src_padding: &'a [bool],
}
