//! The key/value cache of incremental decoding, owned by the caller. Decoder self-attention
//! appends one position per step; cross-attention keys and values are computed once per source
//! (§3.2.3: every decoder position attends over all encoder positions, which do not change).
//!
//! Rows are what is being decoded (batch × beam). Beam search reorders rows with
//! [`KvCache::reorder`]; the cross-attention blocks stay per source and rows point at them.
//! Rows need not be at the same position: [`KvCache::absorb`] adds the rows of a freshly
//! started cache to one whose rows are part-way through their outputs (continuous batching:
//! a batch's last, longest outputs are decoded together with the next batch's first tokens).
//!
//! The blocks live on the model's backend (`KvCache<B>`): a step's layers write and read them
//! through the seam's ops, and [`Decoding`] says how a backend allocates and hands over
//! blocks. The rows' bookkeeping (positions, block and source indices) stays on the host,
//! where the search that reorders them runs; a device is sent it with each step's launches.

use super::embedding::Embedding;
use super::linear::project_out;
use super::stack::Stack;
use crate::backend::{Backend, Cpu, Cuda};
use crate::cuda::view::DevRef;
use crate::error::{shape_err, Error, Result};
use crate::kernels::packed::{PackedScope, PackedWeights};
use crate::params::Param;
use std::borrow::Cow;

/// One layer's keys and values: `blocks` blocks of `rows` positions of `[K | V]` (2C floats).
/// A linear-attention layer keeps instead a fixed recurrent state of `state` floats per block
/// (its (S, z) per head), whatever the position.
#[derive(Clone, Debug)]
pub struct LayerKv<B: Backend = Cpu> {
    pub data: B::Buf,
    pub rows: usize,
    pub state: usize,
}

impl<B: Backend> LayerKv<B> {
    /// `state == 0`: blocks of room for `rows` positions, allocated at the first step
    /// ([`Decoding::ensure_blocks`]); otherwise one zeroed recurrent state per block.
    pub(crate) fn new(be: &B, blocks: usize, rows: usize, state: usize) -> Self {
        let data = match blocks * state {
            0 => B::Buf::default(),
            n => be.upload(vec![0.0; n]),
        };
        Self { data, rows, state }
    }
}

/// A backend that decodes: how a cache's self-attention blocks are allocated and handed
/// between rows there (the layers' step ops are the seam's, [`Backend::kv_append`] and
/// [`Backend::attention_one_query`]).
pub trait Decoding: Backend {
    /// Whether decoding runs on host threads: batches decode in parallel on copies of the
    /// model, and greedy decoding batches continuously (caches absorb rows). A device decodes
    /// one batch at a time, each as large as the token budget allows.
    const HOST: bool;
    /// Softmax-attention layers' blocks, up to the last one a row holds.
    fn ensure_blocks(cache: &mut KvCache<Self>);
    /// [`KvCache::reorder`].
    fn reorder(cache: &mut KvCache<Self>, order: &[usize]);
    /// Whether `cache` may take rows part-way ([`KvCache::absorb`]).
    fn absorbs_rows(cache: &KvCache<Self>) -> bool;
    /// [`KvCache::absorb`].
    fn absorb(cache: &mut KvCache<Self>, other: KvCache<Self>) -> Result<()>;
    /// Runs `step` (a step's products) in the cache's decoding session.
    fn in_session<R>(
        cache: &mut KvCache<Self>,
        p: Self::Ref<'_>,
        step: impl FnOnce(&mut KvCache<Self>) -> R,
    ) -> R;
}

/// The keys and values decoded so far, on backend `B` (the rows' bookkeeping is on the host).
#[derive(Clone, Debug)]
pub struct KvCache<B: Backend = Cpu> {
    /// The backend the blocks are on.
    pub(crate) be: B,
    /// Steps taken; for a cache whose rows started together (every cache but an absorbing
    /// one), each row's position: the next token goes to position `len`.
    pub len: usize,
    /// Row r's position: the positions it has decoded, where its next token goes.
    pub(crate) pos: Vec<usize>,
    /// Most positions this cache can hold.
    pub capacity: usize,
    pub(crate) c: usize,
    /// Per decoder layer: self-attention keys/values in blocks of (capacity, 2C); row r's is
    /// block `own[r]`.
    pub(crate) self_kv: Vec<LayerKv<B>>,
    /// Per decoder layer: cross-attention keys/values, one block per source: (B, S, 2C).
    /// Empty for decoder-only models.
    pub(crate) cross_kv: Vec<LayerKv<B>>,
    /// (B, S): `true` where the source is padding.
    pub(crate) src_padding: Vec<bool>,
    /// (B): keys in each source block (S, or fewer for a block absorbed from a batch of
    /// shorter sources).
    pub(crate) src_len: Vec<usize>,
    /// Which source block each row reads in cross-attention.
    pub(crate) source_of: Vec<usize>,
    /// Row r's self-attention block.
    pub(crate) own: Vec<usize>,
    /// Per decoder layer, the buffer `reorder` gathers into before swapping it with the
    /// layer's (reused, so a step allocates and zeroes nothing).
    spare: Vec<Vec<f32>>,
    /// The decoder's weights packed for this session's steps (packed at first use).
    pub(crate) packed: PackedWeights,
    /// An ensemble's caches of its other models ([`super::ensemble`]), one each, with the same
    /// rows: [`Self::reorder`] and [`Self::absorb`] apply to them too, so they stay in step.
    pub(crate) members: Vec<KvCache<B>>,
}

impl<B: Decoding> KvCache<B> {
    /// `state`: floats of recurrent state per row for linear-attention layers, else 0.
    pub(crate) fn new(
        be: &B,
        rows: usize,
        capacity: usize,
        c: usize,
        layers: usize,
        state: usize,
    ) -> Self {
        Self {
            be: be.clone(),
            len: 0,
            pos: vec![0; rows],
            capacity,
            c,
            self_kv: (0..layers)
                .map(|_| LayerKv::new(be, rows, capacity, state))
                .collect(),
            cross_kv: Vec::new(),
            src_padding: Vec::new(),
            src_len: Vec::new(),
            source_of: (0..rows).collect(),
            own: (0..rows).collect(),
            spare: vec![Vec::new(); layers],
            packed: PackedWeights::default(),
            members: Vec::new(),
        }
    }

    /// Rows being decoded.
    pub fn rows(&self) -> usize {
        self.own.len()
    }

    /// Positions in each source block (the longest source of the batch that started it).
    pub fn source_len(&self) -> usize {
        self.cross_kv.first().map_or(0, |l| l.rows)
    }

    /// The source (batch row of the encoded input) that row `r` translates.
    pub fn source_of(&self, r: usize) -> usize {
        self.source_of[r]
    }

    /// Self-attention blocks the rows hold (the last one's index + 1).
    pub(crate) fn blocks(&self) -> usize {
        self.own.iter().max().map_or(0, |&b| b + 1)
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
        B::reorder(self, order);
        self.source_of = order.iter().map(|&r| self.source_of[r]).collect();
        self.pos = order.iter().map(|&r| self.pos[r]).collect();
        self.members.iter_mut().for_each(|m| m.reorder(order));
    }

    /// A copy of this cache, its blocks copied on the backend (a device that runs out of
    /// memory reports it at the next step, as every op does, where `clone` would panic).
    pub fn duplicate(&self) -> Self {
        let be = &self.be;
        let copy = |layers: &[LayerKv<B>]| -> Vec<LayerKv<B>> {
            (layers.iter())
                .map(|l| {
                    let (n, mut data) = (B::buf_len(&l.data), B::Buf::default());
                    if n > 0 {
                        be.copy(be.grow(&mut data, n), B::view(&l.data, n));
                    }
                    LayerKv {
                        data,
                        rows: l.rows,
                        state: l.state,
                    }
                })
                .collect()
        };
        Self {
            be: be.clone(),
            len: self.len,
            pos: self.pos.clone(),
            capacity: self.capacity,
            c: self.c,
            self_kv: copy(&self.self_kv),
            cross_kv: copy(&self.cross_kv),
            src_padding: self.src_padding.clone(),
            src_len: self.src_len.clone(),
            source_of: self.source_of.clone(),
            own: self.own.clone(),
            spare: vec![Vec::new(); self.spare.len()],
            packed: self.packed.clone(),
            members: self.members.iter().map(|m| m.duplicate()).collect(),
        }
    }

    /// Whether rows may join this cache part-way ([`Self::absorb`]): on the CPU, with softmax
    /// attention in every layer, its own and its ensemble members' (a linear attention
    /// layer's state is not kept per block).
    pub fn absorbs_rows(&self) -> bool {
        B::absorbs_rows(self)
    }

    /// Continuous batching: add the rows of `other`, a freshly started cache (other sources,
    /// same model), after this cache's rows, at position 0 while this cache's rows go on
    /// from theirs. Source blocks and self-attention blocks that no row reads any more are
    /// dropped, so a cache that absorbs batch after batch holds only the rows being decoded.
    pub fn absorb(&mut self, other: KvCache<B>) -> Result<()> {
        B::absorb(self, other)
    }
}

/// Which block each row holds after `reorder(order)` when the buffer has `blocks` blocks
/// (at least `order.len()`), and the copies that give every continuation of a parent but its
/// first a block of its own: (parent row, from block, to block). A copy's target is a block
/// no continuing row holds; none is another copy's source (every source block is held by its
/// parent's first continuation).
fn hand_blocks(own: &[usize], order: &[usize], blocks: usize) -> (Vec<usize>, Vec<[usize; 3]>) {
    let mut taken = vec![false; blocks];
    let mut mine = vec![usize::MAX; order.len()];
    for (i, &parent) in order.iter().enumerate() {
        let b = own[parent];
        if !taken[b] {
            taken[b] = true;
            mine[i] = b;
        }
    }
    let mut free = (0..taken.len()).filter(|&b| !taken[b]);
    let mut copies = Vec::new();
    for (i, &parent) in order.iter().enumerate() {
        if mine[i] == usize::MAX {
            // `taken` has a slot per continuing row, so a slot is free for each copy.
            let to = free.next().expect("a free block for every copy");
            mine[i] = to;
            copies.push([parent, own[parent], to]);
        }
    }
    (mine, copies)
}

impl Decoding for Cpu {
    const HOST: bool = true;

    fn absorbs_rows(cache: &KvCache) -> bool {
        cache.self_kv.iter().all(|l| l.state == 0) && cache.members.iter().all(|m| m.absorbs_rows())
    }

    fn absorb(cache: &mut KvCache, other: KvCache) -> Result<()> {
        cache.absorb_rows(other)
    }
    /// Allocated when first stepped: a fresh buffer is zeroed lazily by the allocator, so
    /// positions never decoded are never touched, and a cache absorbed before its first step
    /// (continuous batching's chunks) allocates none.
    fn ensure_blocks(cache: &mut KvCache) {
        let blocks = cache.blocks();
        for layer in cache.self_kv.iter_mut().filter(|l| l.state == 0) {
            let need = blocks * layer.rows * 2 * cache.c;
            if layer.data.is_empty() {
                layer.data = vec![0.0; need];
            } else if layer.data.len() < need {
                layer.data.resize(need, 0.0);
            }
        }
    }

    fn reorder(cache: &mut KvCache, order: &[usize]) {
        cache.reorder_blocks(order);
    }

    /// The step's products run on this session's packed weights (see kernels::packed).
    fn in_session<R>(cache: &mut KvCache, p: &[f32], step: impl FnOnce(&mut KvCache) -> R) -> R {
        cache.packed.set_params(p);
        let scope = PackedScope::install(std::mem::take(&mut cache.packed));
        let out = step(cache);
        cache.packed = scope.finish();
        out
    }
}

impl Decoding for Cuda {
    const HOST: bool = false;

    fn absorbs_rows(_: &KvCache<Cuda>) -> bool {
        false
    }

    fn absorb(_: &mut KvCache<Cuda>, _: KvCache<Cuda>) -> Result<()> {
        Err(Error::Usage(
            "continuous batching (a cache absorbing rows) runs on the CPU only".into(),
        ))
    }
    fn ensure_blocks(cache: &mut KvCache<Cuda>) {
        device_ensure_blocks(cache);
    }

    fn reorder(cache: &mut KvCache<Cuda>, order: &[usize]) {
        device_reorder(cache, order);
    }

    fn in_session<R>(
        cache: &mut KvCache<Cuda>,
        _: DevRef<'_>,
        step: impl FnOnce(&mut KvCache<Cuda>) -> R,
    ) -> R {
        step(cache)
    }
}

/// A device's [`Decoding::ensure_blocks`], written against the seam (the CPU runs it in
/// tests): blocks are allocated when first stepped (a row's positions are written before
/// they are read), and a grown buffer is a new one with the blocks already held copied over.
fn device_ensure_blocks<B: Decoding>(cache: &mut KvCache<B>) {
    let (blocks, be) = (cache.blocks(), cache.be.clone());
    for layer in cache.self_kv.iter_mut().filter(|l| l.state == 0) {
        let need = blocks * layer.rows * 2 * cache.c;
        grow_copying(&be, &mut layer.data, need);
    }
}

/// `data` holding at least `n` elements, its contents kept: a new buffer, the old copied in.
fn grow_copying<B: Backend>(be: &B, data: &mut B::Buf, n: usize) {
    let have = B::buf_len(data);
    if have < n {
        let mut grown = B::Buf::default();
        if have > 0 {
            be.copy(
                B::prefix_mut(be.grow(&mut grown, n), have),
                B::view(data, have),
            );
        } else {
            be.grow(&mut grown, n);
        }
        *data = grown;
    }
}

/// A device's [`Decoding::reorder`] of the blocks, written against the seam (the CPU runs it
/// in tests): as the CPU's, blocks are handed to the rows that continue alone and copied for
/// repeated parents only, all of a layer's copies in one op (a copy per row per layer would
/// be a launch each). Linear-attention states are gathered into a new buffer.
fn device_reorder<B: Decoding>(cache: &mut KvCache<B>, order: &[usize]) {
    let (be, w) = (cache.be.clone(), 2 * cache.c);
    if cache.self_kv.iter().any(|l| l.state > 0) {
        for layer in &mut cache.self_kv {
            let block = layer.state;
            let mut data = B::Buf::default();
            {
                let mut out = be.grow(&mut data, order.len() * block);
                let old = B::view(&layer.data, B::buf_len(&layer.data));
                for (dst, &src) in order.iter().enumerate() {
                    let to = B::sub_mut(B::reborrow(&mut out), dst * block..(dst + 1) * block);
                    be.copy(to, B::sub(old, src * block..(src + 1) * block));
                }
            }
            layer.data = data;
        }
        cache.own = (0..order.len()).collect();
        return;
    }
    let blocks = cache
        .self_kv
        .first()
        .map_or(0, |l| B::buf_len(&l.data) / (l.rows * w).max(1));
    if order.len() > blocks {
        for layer in &mut cache.self_kv {
            grow_copying(&be, &mut layer.data, order.len() * layer.rows * w);
        }
    }
    let (own, copies) = hand_blocks(&cache.own, order, blocks.max(order.len()));
    if !copies.is_empty() {
        for layer in &mut cache.self_kv {
            let block = layer.rows * w;
            let spans: Vec<_> = (copies.iter())
                .map(|&[parent, from, to]| (from * block, to * block, cache.pos[parent] * w))
                .collect();
            let n = B::buf_len(&layer.data);
            be.copy_within(be.grow(&mut layer.data, n), &spans);
        }
    }
    cache.own = own;
}

impl KvCache {
    /// The CPU's [`Decoding::reorder`] of the blocks (see [`KvCache::reorder`]).
    fn reorder_blocks(&mut self, order: &[usize]) {
        // Positions every block may hold (rows of an absorbing cache differ).
        let (n, w) = (self.pos.iter().copied().max().unwrap_or(0), 2 * self.c);
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
            return;
        }
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
                    data[b * block..][..n * w].copy_from_slice(&layer.data[b * block..][..n * w]);
                }
                layer.data = data;
            }
        }
        let (own, copies) = hand_blocks(&self.own, order, blocks.max(order.len()));
        for [parent, from, to] in copies {
            let n = self.pos[parent];
            for layer in &mut self.self_kv {
                let block = layer.rows * w;
                layer
                    .data
                    .copy_within(from * block..from * block + n * w, to * block);
            }
        }
        self.own = own;
    }

    /// Whether [`Self::absorb`] can take `other`'s rows: a fresh cache of the same model
    /// whose outputs fit this one's capacity, with softmax attention (a linear
    /// attention layer's state is not kept per block).
    pub fn can_absorb(&self, other: &KvCache) -> bool {
        other.len == 0
            && self.c == other.c
            && self.self_kv.len() == other.self_kv.len()
            && self.cross_kv.len() == other.cross_kv.len()
            && self.self_kv.iter().all(|l| l.state == 0)
            && other.self_kv.iter().all(|l| l.state == 0)
            && other.capacity <= self.capacity
            && self.members.len() == other.members.len()
            && (self.members.iter().zip(&other.members)).all(|(a, b)| a.can_absorb(b))
    }

    /// The CPU's [`KvCache::absorb`].
    fn absorb_rows(&mut self, mut other: KvCache) -> Result<()> {
        if !self.can_absorb(&other) {
            return Err(Error::Usage(
                "a cache absorbs only a fresh cache of the same model whose outputs fit \
                 its capacity"
                    .into(),
            ));
        }
        for (mine, theirs) in self
            .members
            .iter_mut()
            .zip(std::mem::take(&mut other.members))
        {
            mine.absorb(theirs)?;
        }
        let w = 2 * self.c;
        // Source blocks: those some row still reads, then `other`'s, in new buffers whose
        // stride is the longest of their sources (sources come longest first, so padding
        // every new source to the first one's length would hold ever more padding: 0.25 GB
        // on the default job's test set).
        let mut read = vec![false; self.src_len.len()];
        self.source_of.iter().for_each(|&b| read[b] = true);
        let kept: Vec<usize> = (0..read.len()).filter(|&b| read[b]).collect();
        let (s_old, s_new) = (self.source_len(), other.source_len());
        // (cache, block, stride, keys) of every block of the new layout.
        let blocks: Vec<(&KvCache, usize, usize, usize)> = kept
            .iter()
            .map(|&b| (&*self, b, s_old, self.src_len[b]))
            .chain((0..other.src_len.len()).map(|b| (&other, b, s_new, other.src_len[b])))
            .collect();
        let s = blocks.iter().map(|b| b.3).max().unwrap_or(0);
        let cross_kv: Vec<LayerKv> = (0..self.cross_kv.len())
            .map(|l| {
                let mut data = vec![0.0; blocks.len() * s * w];
                for (i, &(cache, b, stride, n)) in blocks.iter().enumerate() {
                    data[i * s * w..][..n * w]
                        .copy_from_slice(&cache.cross_kv[l].data[b * stride * w..][..n * w]);
                }
                LayerKv {
                    data,
                    rows: s,
                    state: 0,
                }
            })
            .collect();
        let mut src_padding = vec![true; blocks.len() * s];
        for (i, &(cache, b, stride, n)) in blocks.iter().enumerate() {
            src_padding[i * s..][..n].copy_from_slice(&cache.src_padding[b * stride..][..n]);
        }
        let src_len: Vec<usize> = blocks.iter().map(|b| b.3).collect();
        let mut new_index = vec![usize::MAX; read.len()];
        kept.iter()
            .enumerate()
            .for_each(|(to, &b)| new_index[b] = to);
        let source_of: Vec<usize> = (self.source_of.iter().map(|&b| new_index[b]))
            .chain(other.source_of.iter().map(|&b| b + kept.len()))
            .collect();
        (self.cross_kv, self.src_padding, self.src_len) = (cross_kv, src_padding, src_len);
        self.source_of = source_of;
        // Self-attention blocks: the going-on rows' decoded positions move to blocks
        // 0..own.len(), and the new rows take the blocks after them. Where the buffer has
        // room and the rows' blocks are in order (greedy decoding, which only drops rows),
        // that is a compaction in place; the blocks past the last row keep stale positions,
        // which no row reads before writing them. Otherwise a new, lazily zeroed buffer (as
        // `reorder`'s). A new buffer per absorb cost greedy decoding ~1.3% of its time in
        // zeroing alone.
        let rows = self.own.len() + other.rows();
        let in_order = self.own.windows(2).all(|b| b[0] < b[1]);
        for layer in &mut self.self_kv {
            let block = layer.rows * w;
            let moves = self.own.iter().zip(&self.pos).enumerate();
            if in_order && layer.data.len() >= rows * block {
                // own[i] >= i, increasing: each block moves down onto one already moved.
                for (i, (&b, &n)) in moves.filter(|(i, (&b, _))| b != *i) {
                    layer
                        .data
                        .copy_within(b * block..b * block + n * w, i * block);
                }
            } else {
                let mut data = vec![0.0; rows * block];
                // n > 0: a cache not yet stepped has no blocks.
                for (i, (&b, &n)) in moves.filter(|(_, (_, &n))| n > 0) {
                    data[i * block..][..n * w].copy_from_slice(&layer.data[b * block..][..n * w]);
                }
                layer.data = data;
            }
        }
        self.own = (0..rows).collect();
        self.pos.extend(std::iter::repeat_n(0, other.rows()));
        Ok(())
    }
}

impl<B: Decoding> KvCache<B> {
    /// Errors (not panics) for a step that does not fit this cache.
    pub(crate) fn check_step(&self, tokens: &[u32], layers: usize, cross: bool) -> Result<()> {
        if tokens.len() != self.rows() {
            return Err(shape_err(
                "decoding step",
                format!("{} tokens (one per row)", self.rows()),
                tokens.len(),
            ));
        }
        if !self.members.is_empty() {
            return Err(Error::Config(
                "this cache was started by an ensemble: step it with the ensemble".into(),
            ));
        }
        if self.self_kv.len() != layers || (cross && self.cross_kv.len() != layers) {
            return Err(Error::Config(
                "this cache was started by a different model".into(),
            ));
        }
        let longest = self.pos.iter().copied().max().unwrap_or(0);
        if longest >= self.capacity {
            return Err(Error::SequenceTooLong {
                input: "decoded sequence",
                len: longest + 1,
                max_len: self.capacity,
            });
        }
        Ok(())
    }
}

/// A model that extends every row by one token per call, over a cache owned by the caller
/// (greedy, beam search and sampling in `decode` are written against this), on backend `B`.
pub trait Incremental<B: Decoding = Cpu> {
    fn vocab(&self) -> usize;
    /// tokens: (R) the newest token of each row → logits (R, V) for the next position, on the
    /// host (the search that picks tokens runs there).
    fn step(&mut self, cache: &mut KvCache<B>, tokens: &[u32]) -> Result<&[f32]>;
}

/// A step's logits on the host: the CPU's as they are; a device's copied into `host` (which
/// also reports a launch of the step that failed).
pub(crate) fn host_logits<'a, B: Backend>(
    be: &B,
    logits: B::Ref<'a>,
    host: &'a mut Vec<f32>,
) -> Result<&'a [f32]> {
    Ok(match be.to_host(logits)? {
        Cow::Borrowed(x) => x,
        Cow::Owned(x) => {
            *host = x;
            host
        }
    })
}

/// One incremental step of a decoder stack (a Seq2Seq's decoder or a language model): embed
/// each row's newest token at position `cache.len`, run the stack over the cache, project to
/// logits (R, V).
#[allow(clippy::too_many_arguments)]
pub(crate) fn decoder_step<'a, B: Decoding>(
    be: &B,
    p: B::Ref<'_>,
    embed: &mut Embedding<B>,
    stack: &mut Stack<B>,
    output: Param,
    logits: &'a mut B::Buf,
    cache: &mut KvCache<B>,
    tokens: &[u32],
) -> Result<B::Ref<'a>> {
    let cross = stack.layers.iter().any(|l| l.cross.is_some());
    cache.check_step(tokens, stack.layers.len(), cross)?;
    if cache.packed.int8 && !B::HOST {
        return Err(Error::Config(
            "int8 decoding steps run on the CPU's int8 kernels: turn int8_steps off on a \
             device"
                .into(),
        ));
    }
    B::ensure_blocks(cache);
    let c = embed.c;
    let x = embed.step(be, p, tokens, &cache.pos)?;
    let v = B::in_session(cache, p, |cache| {
        let h = stack.step(be, p, x, cache);
        project_out(be, p, output, h, logits, c)
    });
    cache.len += 1;
    cache.pos.iter_mut().for_each(|p| *p += 1);
    Ok(B::view(logits, tokens.len() * v))
}

/// What one decoding step of a layer needs besides its own cache.
#[derive(Clone, Copy)]
pub(crate) struct StepCtx<'a> {
    /// Per row, the position of the token being decoded.
    pub pos: &'a [usize],
    pub own: &'a [usize],
    pub source_of: &'a [usize],
    pub src_padding: &'a [bool],
    /// Per source block, its keys.
    pub src_len: &'a [usize],
    /// Self-attention blocks the rows hold ([`KvCache::blocks`]).
    pub blocks: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AttentionKind, Family, ModelConfig, Seq2Seq, Tokens};
    use crate::rng::Rng;

    /// The GPU's block logic ([`device_ensure_blocks`], [`device_reorder`]: new buffers with
    /// the old blocks copied in, copies between blocks of one buffer in either direction)
    /// run on CPU buffers: through beam search's reorders (rows repeated, dropped, permuted;
    /// blocks grown past the batch) every step's logits equal the full forward over each
    /// row's history, with softmax attention (blocks) and linear attention (states); a
    /// duplicated cache steps as the cache does.
    #[test]
    fn the_devices_block_logic_keeps_every_rows_history() {
        for attention in [AttentionKind::Flash, AttentionKind::Linear] {
            let mut cfg = ModelConfig::preset("tiny", Family::Seq2seq, 13).unwrap();
            (cfg.max_len, cfg.dropout, cfg.attention) = (16, 0.0, attention);
            let mut model = Seq2Seq::new(cfg, 9).unwrap();
            let mut rng = Rng::new(4);
            let (b, s, t) = (3, 5, 6);
            let src: Vec<u32> = (0..b * s).map(|_| 3 + rng.below(10) as u32).collect();
            let v = model.config.tgt_vocab();
            let mut cache = model
                .start_decoding(Tokens::new(&src, b, s).unwrap(), t)
                .unwrap();
            let mut rows: Vec<(usize, Vec<u32>)> = (0..b).map(|i| (i, Vec::new())).collect();
            let orders: [&[usize]; 5] = [
                &[0, 0, 1, 1, 1, 2],
                &[5, 1, 1, 0, 3],
                &[4, 4, 4, 0],
                &[3, 1, 1],
                &[2, 0, 1, 2, 2],
            ];
            for (pos, order) in std::iter::once(&[][..]).chain(orders).enumerate() {
                if pos > 0 {
                    device_reorder(&mut cache, order);
                    cache.source_of = order.iter().map(|&r| cache.source_of[r]).collect();
                    cache.pos = order.iter().map(|&r| cache.pos[r]).collect();
                    rows = order.iter().map(|&r| rows[r].clone()).collect();
                }
                // The CPU's own `ensure_blocks` then finds the blocks already there.
                device_ensure_blocks(&mut cache);
                let ids: Vec<u32> = (0..rows.len()).map(|_| 1 + rng.below(12) as u32).collect();
                for (row, &id) in rows.iter_mut().zip(&ids) {
                    row.1.push(id);
                }
                // A duplicate (blocks copied through the seam) takes the step to the same
                // logits.
                let mut copy = cache.duplicate();
                let stepped = model.step(&mut copy, &ids).unwrap().to_vec();
                let step = model.step(&mut cache, &ids).unwrap().to_vec();
                assert_eq!(
                    stepped, step,
                    "{attention:?} step {pos}: the duplicate's step"
                );
                for (r, (source, history)) in rows.iter().enumerate() {
                    let one = Tokens::new(&src[source * s..(source + 1) * s], 1, s).unwrap();
                    let tgt = Tokens::new(history, 1, history.len()).unwrap();
                    let full = model.logits(one, tgt).unwrap();
                    let want = &full[pos * v..(pos + 1) * v];
                    let got = &step[r * v..(r + 1) * v];
                    let err = got
                        .iter()
                        .zip(want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0f32, f32::max);
                    assert!(
                        err < 1e-4,
                        "{attention:?} step {pos} row {r}: max error {err}"
                    );
                }
            }
        }
    }
}
