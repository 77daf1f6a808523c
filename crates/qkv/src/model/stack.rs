//! The layer stacks of Figure 1. One [`Block`] serves both sides: self-attention and a
//! feed-forward network (§3.3), each wrapped in Add & Norm (§3.1); a decoder block adds
//! cross-attention over the encoder output between them (§3.2.3). With a causal mask and no
//! cross-attention the same block is a decoder-only language model's layer.
//!
//! A block runs one of two ways, through one `forward`: over whole sequences (training,
//! scoring, encoding; on any [`Backend`]), or one new position per row over a caller-owned
//! [`KvCache`] (incremental decoding, on any [`Decoding`] backend). Only the attention sublayers differ between
//! the two: a `Keys` value says which.

use super::attention::{CrossAttention, SelfAttention};
use super::config::{ModelConfig, NormPlacement};
use super::feed_forward::FeedForward;
use super::kv_cache::{Decoding, KvCache, LayerKv, StepCtx};
use super::norm::{final_output, AddNorm, LayerNorm, SublayerGrad};
use super::{Mode, SiteIds};
use crate::backend::{Backend, Cpu};
use crate::kernels::attention::Masks;
use crate::kernels::Acc;
use crate::params::ParamBuilder;
use std::ops::Range;

/// The encoder output every decoder block attends over. states: (B, S, C); padding: (B, S)
pub struct Memory<'a, B: Backend = Cpu> {
    pub states: B::Ref<'a>,
    pub len: usize,
    pub padding: Option<&'a [bool]>,
}

impl<B: Backend> Clone for Memory<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Memory<'_, B> {}

/// Whether a stack's backward must produce the gradient of its input (an embedding below
/// needs it; a benchmark's random input, like PyTorch's input without `requires_grad`, does
/// not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputGrad {
    Wanted,
    Skip,
}

/// What a block's attention sublayers read besides their input rows: the only part of a
/// block that differs between whole sequences and decoding steps.
trait Keys<B: Backend> {
    /// Self-attention of `x`'s rows. x: (N, C) → (N, C)
    fn self_attention<'a>(
        &mut self,
        be: &B,
        attn: &'a mut SelfAttention<B>,
        p: B::Ref<'_>,
        x: B::Ref<'_>,
    ) -> B::Ref<'a>;
    /// Whether there is a source for cross-attention (decoder blocks read it).
    fn has_source(&self) -> bool;
    /// Cross-attention of `x`'s rows over the source. x: (N, C) → (N, C)
    fn cross_attention<'a>(
        &mut self,
        be: &B,
        attn: &'a mut CrossAttention<B>,
        p: B::Ref<'_>,
        x: B::Ref<'_>,
    ) -> B::Ref<'a>;
}

/// Whole sequences: (B, T) rows, their masks, and the encoder output for decoder blocks.
pub(crate) struct Sequence<'m, 'a, B: Backend = Cpu> {
    pub batch: usize,
    pub t: usize,
    pub masks: &'m Masks<'m>,
    pub memory: Option<Memory<'a, B>>,
}

impl<B: Backend> Clone for Sequence<'_, '_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Sequence<'_, '_, B> {}

impl<B: Backend> Keys<B> for Sequence<'_, '_, B> {
    fn self_attention<'a>(
        &mut self,
        be: &B,
        attn: &'a mut SelfAttention<B>,
        p: B::Ref<'_>,
        x: B::Ref<'_>,
    ) -> B::Ref<'a> {
        attn.forward(be, p, x, self.batch, self.t, self.masks)
    }
    fn has_source(&self) -> bool {
        self.memory.is_some()
    }
    fn cross_attention<'a>(
        &mut self,
        be: &B,
        attn: &'a mut CrossAttention<B>,
        p: B::Ref<'_>,
        x: B::Ref<'_>,
    ) -> B::Ref<'a> {
        let m = self.memory.expect("cross-attention without a source");
        attn.forward(be, p, x, m.states, self.batch, self.t, m.len, m.padding)
    }
}

/// One new position per row: earlier positions (and the source's keys and values) are in
/// this block's cache slots, and self-attention appends this position's keys and values.
struct Step<'a, B: Backend> {
    self_kv: &'a mut LayerKv<B>,
    cross_kv: Option<&'a LayerKv<B>>,
    ctx: StepCtx<'a>,
}

impl<B: Backend> Keys<B> for Step<'_, B> {
    fn self_attention<'a>(
        &mut self,
        be: &B,
        attn: &'a mut SelfAttention<B>,
        p: B::Ref<'_>,
        x: B::Ref<'_>,
    ) -> B::Ref<'a> {
        attn.step(be, p, x, self.self_kv, self.ctx)
    }
    fn has_source(&self) -> bool {
        self.cross_kv.is_some()
    }
    fn cross_attention<'a>(
        &mut self,
        be: &B,
        attn: &'a mut CrossAttention<B>,
        p: B::Ref<'_>,
        x: B::Ref<'_>,
    ) -> B::Ref<'a> {
        let kv = self.cross_kv.expect("cross-attention without a source");
        attn.step(be, p, x, kv, self.ctx)
    }
}

/// A decoder block's cross-attention sublayer and the Add & Norm around it.
#[derive(Clone, Debug)]
pub struct CrossSublayer<B: Backend = Cpu> {
    pub attn: CrossAttention<B>,
    pub norm: AddNorm<B>,
}

/// One layer: self-attention → (cross-attention →) feed-forward, each in Add & Norm.
#[derive(Clone, Debug)]
pub struct Block<B: Backend = Cpu> {
    pub self_attn: SelfAttention<B>,
    pub self_attn_norm: AddNorm<B>,
    /// Decoder blocks only.
    pub cross: Option<CrossSublayer<B>>,
    pub ffn: FeedForward<B>,
    pub ffn_norm: AddNorm<B>,
    /// Where this block's parameters lie in the flat buffers (registered one after another):
    /// its gradients are final once its backward is done.
    pub params: Range<usize>,
    after_self_attn: B::Buf,    // (N, C)
    after_cross_attn: B::Buf,   // (N, C), decoder blocks
    d_after_self_attn: B::Buf,  // (N, C)
    d_after_cross_attn: B::Buf, // (N, C), decoder blocks
}

impl<B: Backend> Block<B> {
    /// Parameters are registered in checkpoint order: self-attention, its norm,
    /// cross-attention and its norm (decoder), feed-forward, its norm.
    pub fn new(
        pb: &mut ParamBuilder,
        name: &str,
        cfg: &ModelConfig,
        cross_attention: bool,
        sites: &mut SiteIds,
    ) -> Self {
        let (c, eps, placement) = (cfg.d_model, cfg.layer_norm_eps, cfg.norm);
        let start = pb.len();
        let mut add_norm = |pb: &mut ParamBuilder, sublayer: &str| {
            AddNorm::new(
                pb,
                &format!("{name}.{sublayer}_norm"),
                c,
                eps,
                placement,
                sites.next_id(),
            )
        };
        let self_attn = SelfAttention::new(pb, &format!("{name}.self_attn"), cfg);
        let self_attn_norm = add_norm(pb, "self_attn");
        let cross = cross_attention.then(|| CrossSublayer {
            attn: CrossAttention::new(pb, &format!("{name}.cross_attn"), cfg),
            norm: add_norm(pb, "cross_attn"),
        });
        let ffn = FeedForward::new(pb, &format!("{name}.ffn"), c, cfg.d_ff, cfg.activation);
        let ffn_norm = add_norm(pb, "ffn");
        Self {
            params: start..pb.len(),
            self_attn,
            self_attn_norm,
            cross,
            ffn,
            ffn_norm,
            after_self_attn: B::Buf::default(),
            after_cross_attn: B::Buf::default(),
            d_after_self_attn: B::Buf::default(),
            d_after_cross_attn: B::Buf::default(),
        }
    }

    /// x, y: (N, C) rows: (B, T, C) for sequences, (R, C) for a decoding step.
    fn forward(
        &mut self,
        be: &B,
        p: B::Ref<'_>,
        x: B::Ref<'_>,
        y: B::Mut<'_>,
        keys: &mut impl Keys<B>,
        mode: Mode,
    ) {
        let n = B::len(x);
        let a_in = self.self_attn_norm.sublayer_input(be, p, B::shorten(x));
        let a = keys.self_attention(be, &mut self.self_attn, p, a_in);
        let after_self = be.grow(&mut self.after_self_attn, n);
        self.self_attn_norm.finish(be, p, x, a, after_self, mode);
        let mut h = B::view(&self.after_self_attn, n);
        if let (Some(cross), true) = (&mut self.cross, keys.has_source()) {
            let c_in = cross.norm.sublayer_input(be, p, B::shorten(h));
            let ca = keys.cross_attention(be, &mut cross.attn, p, c_in);
            let after_cross = be.grow(&mut self.after_cross_attn, n);
            cross.norm.finish(be, p, h, ca, after_cross, mode);
            h = B::view(&self.after_cross_attn, n);
        }
        let f_in = self.ffn_norm.sublayer_input(be, p, B::shorten(h));
        let f = self.ffn.forward(be, p, f_in);
        self.ffn_norm.finish(be, p, h, f, y, mode);
    }

    /// dy → dx (overwritten) for the `x` of the last sequence forward. A decoder block adds
    /// `∂L/∂memory` into `memory.1`.
    ///
    /// With `InputGrad::Skip` nobody reads `dx` afterwards: post-LN then skips the product
    /// that carries the gradient into `x` through the QKV projection, as autograd does for an
    /// input that does not require grad. (Pre-LN still needs it: it feeds the norm's
    /// parameter gradients.)
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &mut self,
        be: &B,
        p: B::Ref<'_>,
        mut g: B::Mut<'_>,
        x: B::Ref<'_>,
        dy: B::Ref<'_>,
        mut dx: B::Mut<'_>,
        input_grad: InputGrad,
        memory: Option<(B::Ref<'_>, B::Mut<'_>)>,
    ) {
        let n = B::len(x);
        let after_self = B::view(&self.after_self_attn, n);
        {
            let mut d_after_self = be.grow(&mut self.d_after_self_attn, n);
            {
                let (ffn_in, mut d_ffn_in) = match self.cross {
                    Some(_) => (
                        B::view(&self.after_cross_attn, n),
                        be.grow(&mut self.d_after_cross_attn, n),
                    ),
                    None => (after_self, B::reborrow(&mut d_after_self)),
                };
                let (g1, d1) = (B::reborrow(&mut g), B::reborrow(&mut d_ffn_in));
                let ffn_in1 = B::shorten(ffn_in);
                let SublayerGrad {
                    d_output,
                    input,
                    d_input,
                    acc,
                } = self.ffn_norm.backward_output(be, p, g1, ffn_in1, dy, d1);
                let g1 = B::reborrow(&mut g);
                self.ffn.backward(be, p, g1, input, d_output, d_input, acc);
                let g1 = B::reborrow(&mut g);
                self.ffn_norm.backward_input(be, p, g1, ffn_in, d_ffn_in);
            }
            if let (Some(cross), Some((states, dmemory))) = (&mut self.cross, memory) {
                let d_after_cross = B::view(&self.d_after_cross_attn, n);
                let (g1, d1) = (B::reborrow(&mut g), B::reborrow(&mut d_after_self));
                let SublayerGrad {
                    d_output,
                    input,
                    d_input,
                    acc,
                } = cross.norm.backward_output(
                    be,
                    p,
                    g1,
                    B::shorten(after_self),
                    d_after_cross,
                    d1,
                );
                let g1 = B::reborrow(&mut g);
                cross
                    .attn
                    .backward(be, p, g1, input, states, d_output, d_input, acc, dmemory);
                let g1 = B::reborrow(&mut g);
                cross
                    .norm
                    .backward_input(be, p, g1, after_self, d_after_self);
            }
        }
        let reads_x = self.self_attn_norm.placement == NormPlacement::Post;
        let d_after_self = B::view(&self.d_after_self_attn, n);
        let (g1, dx1) = (B::reborrow(&mut g), B::reborrow(&mut dx));
        let SublayerGrad {
            d_output,
            input,
            d_input,
            acc,
        } = self
            .self_attn_norm
            .backward_output(be, p, g1, B::shorten(x), d_after_self, dx1);
        let d_input = (input_grad == InputGrad::Wanted || !reads_x).then_some(d_input);
        let g1 = B::reborrow(&mut g);
        self.self_attn
            .backward(be, p, g1, input, d_output, d_input, acc);
        self.self_attn_norm.backward_input(be, p, g, x, dx);
    }
}

/// What each block of a stack attends over: the same sequences for every block, or each
/// block's slots of a decoding cache.
trait StackKeys<B: Backend> {
    fn block(&mut self, i: usize) -> impl Keys<B> + '_;
}

impl<B: Backend> StackKeys<B> for Sequence<'_, '_, B> {
    fn block(&mut self, _: usize) -> impl Keys<B> + '_ {
        *self
    }
}

impl<B: Decoding> StackKeys<B> for KvCache<B> {
    fn block(&mut self, i: usize) -> impl Keys<B> + '_ {
        let blocks = self.blocks();
        let KvCache {
            pos,
            self_kv,
            cross_kv,
            src_padding,
            src_len,
            source_of,
            own,
            ..
        } = self;
        Step {
            self_kv: &mut self_kv[i],
            cross_kv: cross_kv.get(i),
            ctx: StepCtx {
                pos,
                own,
                source_of,
                src_padding,
                src_len,
                blocks,
            },
        }
    }
}

/// N blocks, and the final LayerNorm of pre-LN stacks; owns the hidden states between blocks.
#[derive(Clone, Debug)]
pub struct Stack<B: Backend = Cpu> {
    pub layers: Vec<Block<B>>,
    pub final_norm: Option<LayerNorm<B>>,
    hidden: Vec<B::Buf>, // L + 1 buffers of (N, C): the input, then each block's output
    out: B::Buf,         // final_norm output (pre-LN)
    dh: [B::Buf; 2],
}

impl<B: Backend> Stack<B> {
    /// `n_layers` blocks named `{name}.layers.{i}`, with cross-attention when `cross_attention`.
    pub fn new(
        pb: &mut ParamBuilder,
        name: &str,
        n_layers: usize,
        cross_attention: bool,
        cfg: &ModelConfig,
        sites: &mut SiteIds,
    ) -> Self {
        let layers = (0..n_layers)
            .map(|i| {
                Block::new(
                    pb,
                    &format!("{name}.layers.{i}"),
                    cfg,
                    cross_attention,
                    sites,
                )
            })
            .collect();
        let final_norm = (cfg.norm == NormPlacement::Pre).then(|| {
            LayerNorm::new(
                pb,
                &format!("{name}.final_norm"),
                cfg.d_model,
                cfg.layer_norm_eps,
            )
        });
        Self {
            layers,
            final_norm,
            hidden: (0..n_layers + 1).map(|_| B::Buf::default()).collect(),
            out: B::Buf::default(),
            dh: [B::Buf::default(), B::Buf::default()],
        }
    }

    /// x: (B, T, C) → (B, T, C). Decoder stacks read `memory`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        be: &B,
        p: B::Ref<'_>,
        x: B::Ref<'_>,
        batch: usize,
        t: usize,
        masks: &Masks,
        memory: Option<Memory<'_, B>>,
        mode: Mode,
    ) -> B::Ref<'_> {
        let mut keys = Sequence {
            batch,
            t,
            masks,
            memory,
        };
        self.run(be, p, x, &mut keys, mode)
    }

    fn run(
        &mut self,
        be: &B,
        p: B::Ref<'_>,
        x: B::Ref<'_>,
        keys: &mut impl StackKeys<B>,
        mode: Mode,
    ) -> B::Ref<'_> {
        let n = B::len(x);
        be.copy(be.grow(&mut self.hidden[0], n), x);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let (lo, hi) = self.hidden.split_at_mut(i + 1);
            let (input, output) = (B::view(&lo[i], n), be.grow(&mut hi[0], n));
            layer.forward(be, p, input, output, &mut keys.block(i), mode);
        }
        let last = B::view(&self.hidden[self.layers.len()], n);
        final_output(be, &mut self.final_norm, p, last, &mut self.out)
    }

    /// The output of the last forward, (N, C).
    pub fn output(&self, n: usize) -> B::Ref<'_> {
        match self.final_norm {
            Some(_) => B::view(&self.out, n),
            None => B::view(&self.hidden[self.layers.len()], n),
        }
    }

    /// dy: gradient of the stack output → gradient of its input, for the last sequence
    /// forward. A decoder stack adds `∂L/∂memory` into `memory.1`. With `InputGrad::Skip`
    /// only the parameter gradients are wanted (PyTorch's input with `requires_grad=False`):
    /// the first block may skip its input-gradient product, and the returned slice is then
    /// not the input's gradient.
    /// `done(g)` is called after each block's backward (last block first; see
    /// [`Stack::grad_order`]).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        be: &B,
        p: B::Ref<'_>,
        mut g: B::Mut<'_>,
        dy: B::Ref<'_>,
        input_grad: InputGrad,
        mut memory: Option<(B::Ref<'_>, B::Mut<'_>)>,
        done: &mut dyn FnMut(B::Ref<'_>),
    ) -> B::Ref<'_> {
        let n = B::len(dy);
        let l = self.layers.len();
        let [d0, d1] = &mut self.dh;
        let (mut cur, mut next) = (be.grow(d0, n), be.grow(d1, n));
        match &self.final_norm {
            Some(norm) => {
                let (g1, c1) = (B::reborrow(&mut g), B::reborrow(&mut cur));
                let last = B::view(&self.hidden[l], n);
                norm.backward(be, p, g1, last, dy, c1, Acc::Set)
            }
            None => be.copy(B::reborrow(&mut cur), dy),
        }
        for i in (0..l).rev() {
            let memory = memory.as_mut().map(|(m, dm)| (*m, B::reborrow(dm)));
            // Every block but the first feeds the gradient of its input to the one below.
            let input_grad = if i > 0 { InputGrad::Wanted } else { input_grad };
            let input = B::view(&self.hidden[i], n);
            let (g1, dy1, dx1) = (B::reborrow(&mut g), B::shared(&cur), B::reborrow(&mut next));
            self.layers[i].backward(be, p, g1, input, dy1, dx1, input_grad, memory);
            done(B::shared(&g));
            std::mem::swap(&mut cur, &mut next);
        }
        B::into_ref(cur)
    }

    /// The blocks' parameter ranges in the order `backward` finishes their gradients.
    pub fn grad_order(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        self.layers.iter().rev().map(|b| b.params.clone())
    }
}

impl<B: Decoding> Stack<B> {
    /// x: (R, C) embeddings of the newest position of each cache row → (R, C).
    pub(crate) fn step(
        &mut self,
        be: &B,
        p: B::Ref<'_>,
        x: B::Ref<'_>,
        cache: &mut KvCache<B>,
    ) -> B::Ref<'_> {
        self.run(be, p, x, cache, Mode::EVAL)
    }

    /// Cross-attention keys and values of every block for the memory (B, S, C).
    pub(crate) fn memory_kv(
        &self,
        be: &B,
        p: B::Ref<'_>,
        memory: B::Ref<'_>,
        s_len: usize,
    ) -> Vec<LayerKv<B>> {
        self.layers
            .iter()
            .filter_map(|l| l.cross.as_ref())
            .map(|c| c.attn.memory_kv(be, p, memory, s_len))
            .collect()
    }
}
