//! The layer stacks of Figure 1. One [`Block`] serves both sides: self-attention and a
//! feed-forward network (§3.3), each wrapped in Add & Norm (§3.1); a decoder block adds
//! cross-attention over the encoder output between them (§3.2.3). With a causal mask and no
//! cross-attention the same block is a decoder-only language model's layer.
//!
//! A block runs one of two ways, through one `forward`: over whole sequences (training,
//! scoring, encoding), or one new position per row over a caller-owned [`KvCache`]
//! (incremental decoding). Only the attention sublayers differ between the two.

use super::attention::{CrossAttention, SelfAttention};
use super::config::{ModelConfig, NormPlacement};
use super::feed_forward::FeedForward;
use super::kv_cache::{KvCache, LayerKv, StepCtx};
use super::norm::{final_output, AddNorm, LayerNorm};
use super::{buf, Mode, SiteIds};
use crate::backend::Cpu;
use crate::kernels::attention::Masks;
use crate::kernels::Acc;
use crate::params::ParamBuilder;
use std::ops::Range;

/// The encoder output every decoder block attends over. states: (B, S, C); padding: (B, S)
#[derive(Clone, Copy)]
pub struct Memory<'a> {
    pub states: &'a [f32],
    pub len: usize,
    pub padding: Option<&'a [bool]>,
}

/// Whether a stack's backward must produce the gradient of its input (an embedding below
/// needs it; a benchmark's random input, like PyTorch's input without `requires_grad`, does
/// not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputGrad {
    Wanted,
    Skip,
}

/// What a stack's attention reads besides its input rows.
pub(crate) enum Attend<'a> {
    /// Whole sequences: (B, T) rows, their masks, and the encoder output for decoder blocks.
    Sequence {
        batch: usize,
        t: usize,
        masks: &'a Masks<'a>,
        memory: Option<Memory<'a>>,
    },
    /// One new position per row: earlier positions (and the source's keys and values) are
    /// in the cache, which gains this position's keys and values.
    Step(&'a mut KvCache),
}

/// A decoder block's cross-attention sublayer and the Add & Norm around it.
#[derive(Clone, Debug)]
pub struct CrossSublayer {
    pub attn: CrossAttention,
    pub norm: AddNorm,
}

/// One layer: self-attention → (cross-attention →) feed-forward, each in Add & Norm.
#[derive(Clone, Debug)]
pub struct Block {
    pub self_attn: SelfAttention,
    pub self_attn_norm: AddNorm,
    /// Decoder blocks only.
    pub cross: Option<CrossSublayer>,
    pub ffn: FeedForward,
    pub ffn_norm: AddNorm,
    /// Where this block's parameters lie in the flat buffers (registered one after another):
    /// its gradients are final once its backward is done.
    pub params: Range<usize>,
    after_self_attn: Vec<f32>,    // (N, C)
    after_cross_attn: Vec<f32>,   // (N, C), decoder blocks
    d_after_self_attn: Vec<f32>,  // (N, C)
    d_after_cross_attn: Vec<f32>, // (N, C), decoder blocks
}

/// The attention inputs of one block: its own cache slot when decoding step by step.
enum BlockAttend<'a> {
    Sequence {
        batch: usize,
        t: usize,
        masks: &'a Masks<'a>,
        memory: Option<Memory<'a>>,
    },
    Step {
        self_kv: &'a mut LayerKv,
        cross_kv: Option<&'a LayerKv>,
        ctx: StepCtx<'a>,
    },
}

impl Block {
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
            after_self_attn: Vec::new(),
            after_cross_attn: Vec::new(),
            d_after_self_attn: Vec::new(),
            d_after_cross_attn: Vec::new(),
        }
    }

    /// x, y: (N, C) rows: (B, T, C) for sequences, (R, C) for a decoding step.
    fn forward(&mut self, p: &[f32], x: &[f32], y: &mut [f32], at: BlockAttend, mode: Mode) {
        let n = x.len();
        let a_in = self.self_attn_norm.sublayer_input(&Cpu, p, x);
        let (a, cross_in) = match at {
            BlockAttend::Sequence {
                batch,
                t,
                masks,
                memory,
            } => (
                self.self_attn.forward(&Cpu, p, a_in, batch, t, masks),
                memory.map(|memory| CrossInput::Memory { memory, batch, t }),
            ),
            BlockAttend::Step {
                self_kv,
                cross_kv,
                ctx,
            } => (
                self.self_attn.step(p, a_in, self_kv, ctx),
                cross_kv.map(|kv| CrossInput::Cache { kv, ctx }),
            ),
        };
        self.self_attn_norm
            .finish(&Cpu, p, x, a, buf(&mut self.after_self_attn, n), mode);
        let mut h = &self.after_self_attn[..n];
        if let (Some(cross), Some(input)) = (&mut self.cross, cross_in) {
            let c_in = cross.norm.sublayer_input(&Cpu, p, h);
            let ca = match input {
                CrossInput::Memory {
                    memory: m,
                    batch,
                    t,
                } => cross
                    .attn
                    .forward(&Cpu, p, c_in, m.states, batch, t, m.len, m.padding),
                CrossInput::Cache { kv, ctx } => cross.attn.step(p, c_in, kv, ctx),
            };
            cross
                .norm
                .finish(&Cpu, p, h, ca, buf(&mut self.after_cross_attn, n), mode);
            h = &self.after_cross_attn[..n];
        }
        let f_in = self.ffn_norm.sublayer_input(&Cpu, p, h);
        let f = self.ffn.forward(&Cpu, p, f_in);
        self.ffn_norm.finish(&Cpu, p, h, f, y, mode);
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
        p: &[f32],
        g: &mut [f32],
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        input_grad: InputGrad,
        memory: Option<(&[f32], &mut [f32])>,
    ) {
        let n = x.len();
        let after_self = &self.after_self_attn[..n];
        let d_after_self = buf(&mut self.d_after_self_attn, n);
        let (ffn_in, d_ffn_in) = match self.cross {
            Some(_) => (
                &self.after_cross_attn[..n],
                buf(&mut self.d_after_cross_attn, n),
            ),
            None => (after_self, &mut *d_after_self),
        };
        let s = self
            .ffn_norm
            .backward_output(&Cpu, p, g, ffn_in, dy, d_ffn_in);
        self.ffn
            .backward(&Cpu, p, g, s.input, s.d_output, s.d_input, s.acc);
        self.ffn_norm.backward_input(&Cpu, p, g, ffn_in, d_ffn_in);
        if let (Some(cross), Some((states, dmemory))) = (&mut self.cross, memory) {
            let d_after_cross = &self.d_after_cross_attn[..n];
            let s = cross
                .norm
                .backward_output(&Cpu, p, g, after_self, d_after_cross, d_after_self);
            cross.attn.backward(
                &Cpu, p, g, s.input, states, s.d_output, s.d_input, s.acc, dmemory,
            );
            cross
                .norm
                .backward_input(&Cpu, p, g, after_self, d_after_self);
        }
        let reads_x = self.self_attn_norm.placement == NormPlacement::Post;
        let d_after_self = &self.d_after_self_attn[..n];
        let s = self
            .self_attn_norm
            .backward_output(&Cpu, p, g, x, d_after_self, dx);
        let d_input = (input_grad == InputGrad::Wanted || !reads_x).then_some(s.d_input);
        self.self_attn
            .backward(&Cpu, p, g, s.input, s.d_output, d_input, s.acc);
        self.self_attn_norm.backward_input(&Cpu, p, g, x, dx);
    }
}

/// Where a decoder block's cross-attention finds the source.
enum CrossInput<'a> {
    Memory {
        memory: Memory<'a>,
        batch: usize,
        t: usize,
    },
    Cache {
        kv: &'a LayerKv,
        ctx: StepCtx<'a>,
    },
}

/// N blocks, and the final LayerNorm of pre-LN stacks; owns the hidden states between blocks.
#[derive(Clone, Debug)]
pub struct Stack {
    pub layers: Vec<Block>,
    pub final_norm: Option<LayerNorm>,
    hidden: Vec<Vec<f32>>, // L + 1 buffers of (N, C): the input, then each block's output
    out: Vec<f32>,         // final_norm output (pre-LN)
    dh: [Vec<f32>; 2],
}

impl Stack {
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
            hidden: vec![Vec::new(); n_layers + 1],
            out: Vec::new(),
            dh: [Vec::new(), Vec::new()],
        }
    }

    /// x: (B, T, C) → (B, T, C). Decoder stacks read `memory`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        p: &[f32],
        x: &[f32],
        batch: usize,
        t: usize,
        masks: &Masks,
        memory: Option<Memory>,
        mode: Mode,
    ) -> &[f32] {
        let at = Attend::Sequence {
            batch,
            t,
            masks,
            memory,
        };
        self.run(p, x, at, mode)
    }

    /// x: (R, C) embeddings of the newest position of each cache row → (R, C).
    pub(crate) fn step(&mut self, p: &[f32], x: &[f32], cache: &mut KvCache) -> &[f32] {
        self.run(p, x, Attend::Step(cache), Mode::EVAL)
    }

    fn run(&mut self, p: &[f32], x: &[f32], mut at: Attend, mode: Mode) -> &[f32] {
        let n = x.len();
        buf(&mut self.hidden[0], n).copy_from_slice(x);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let (lo, hi) = self.hidden.split_at_mut(i + 1);
            let block_at = match &mut at {
                Attend::Sequence {
                    batch,
                    t,
                    masks,
                    memory,
                } => BlockAttend::Sequence {
                    batch: *batch,
                    t: *t,
                    masks,
                    memory: *memory,
                },
                Attend::Step(cache) => {
                    let KvCache {
                        pos,
                        self_kv,
                        cross_kv,
                        src_padding,
                        src_len,
                        source_of,
                        own,
                        ..
                    } = &mut **cache;
                    BlockAttend::Step {
                        self_kv: &mut self_kv[i],
                        cross_kv: cross_kv.get(i),
                        ctx: StepCtx {
                            pos,
                            own,
                            source_of,
                            src_padding,
                            src_len,
                        },
                    }
                }
            };
            layer.forward(p, &lo[i][..n], buf(&mut hi[0], n), block_at, mode);
        }
        let last = &self.hidden[self.layers.len()][..n];
        final_output(&Cpu, &mut self.final_norm, p, last, &mut self.out)
    }

    /// The output of the last forward, (N, C).
    pub fn output(&self, n: usize) -> &[f32] {
        match self.final_norm {
            Some(_) => &self.out[..n],
            None => &self.hidden[self.layers.len()][..n],
        }
    }

    /// dy: gradient of the stack output → gradient of its input, for the last sequence
    /// forward. A decoder stack adds `∂L/∂memory` into `memory.1`. With `InputGrad::Skip`
    /// only the parameter gradients are wanted (PyTorch's input with `requires_grad=False`):
    /// the first block may skip its input-gradient product, and the returned slice is then
    /// not the input's gradient.
    /// `done(g)` is called after each block's backward (last block first; see
    /// [`Stack::grad_order`]).
    pub fn backward(
        &mut self,
        p: &[f32],
        g: &mut [f32],
        dy: &[f32],
        input_grad: InputGrad,
        mut memory: Option<(&[f32], &mut [f32])>,
        done: &mut dyn FnMut(&[f32]),
    ) -> &[f32] {
        let n = dy.len();
        let l = self.layers.len();
        let [d0, d1] = &mut self.dh;
        let (mut cur, mut next) = (buf(d0, n), buf(d1, n));
        match &self.final_norm {
            Some(norm) => norm.backward(&Cpu, p, g, &self.hidden[l][..n], dy, cur, Acc::Set),
            None => cur.copy_from_slice(dy),
        }
        for i in (0..l).rev() {
            let memory = memory.as_mut().map(|(m, dm)| (*m, &mut **dm));
            // Every block but the first feeds the gradient of its input to the one below.
            let input_grad = if i > 0 { InputGrad::Wanted } else { input_grad };
            self.layers[i].backward(p, g, &self.hidden[i][..n], cur, next, input_grad, memory);
            done(g);
            std::mem::swap(&mut cur, &mut next);
        }
        cur
    }

    /// The blocks' parameter ranges in the order `backward` finishes their gradients.
    pub fn grad_order(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        self.layers.iter().rev().map(|b| b.params.clone())
    }

    /// Cross-attention keys and values of every block for the memory (B, S, C).
    pub(crate) fn memory_kv(&self, p: &[f32], memory: &[f32], s_len: usize) -> Vec<LayerKv> {
        self.layers
            .iter()
            .filter_map(|l| l.cross.as_ref())
            .map(|c| c.attn.memory_kv(p, memory, s_len))
            .collect()
    }
}
