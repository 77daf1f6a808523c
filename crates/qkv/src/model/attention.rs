//! Multi-head attention (§3.2.2, Figure 2 right): `MultiHead(Q,K,V) = Concat(head_1..h) Wᴼ`.
//!
//! Self-attention projects Q, K and V with one fused (3C, C) matrix; cross-attention projects
//! Q from the decoder and K, V with one fused (2C, C) matrix from the encoder output
//! ("memory"). Heads are strided views into those buffers (see `kernels::attention`).

use super::config::{AttentionKind, ModelConfig};
use super::kv_cache::{LayerKv, StepCtx};
use super::linear::BiasGrad;
use super::linear::Linear;
use crate::backend::{Backend, Cpu, HeadGrads, Heads, KvLayout};
use crate::kernels::attention::{AttentionShape, Masks};
use crate::kernels::Acc;
use crate::params::ParamBuilder;
use std::ops::Range;

/// The masks of the last forward, owned, because the fused kernels apply them again in backward.
#[derive(Clone, Debug, Default)]
struct SavedMasks {
    padding: Option<Vec<bool>>,
    causal: bool,
    window: Option<usize>,
}

impl SavedMasks {
    fn save(&mut self, m: &Masks) {
        match (m.key_padding, &mut self.padding) {
            (Some(src), Some(dst)) => {
                dst.clear();
                dst.extend_from_slice(src);
            }
            (Some(src), None) => self.padding = Some(src.to_vec()),
            (None, p) => *p = None,
        }
        self.causal = m.causal;
        self.window = m.window;
    }

    fn masks(&self) -> Masks<'_> {
        Masks {
            key_padding: self.padding.as_deref(),
            causal: self.causal,
            window: self.window,
        }
    }
}

/// Buffers shared by both kinds: the attention core and the output projection.
#[derive(Clone, Debug)]
struct Core<B: Backend = Cpu> {
    kind: AttentionKind,
    /// Run the materialized kernel and keep its weights, whatever `kind` says.
    record_weights: bool,
    /// What backward needs from forward: the probabilities (B, H, Tq, Tk) when materialized,
    /// the log-sum-exp (B, H, Tq) for flash, the normalisers (B, H, Tq) for linear.
    saved: B::Buf,
    ctx: B::Buf,     // (B, Tq, C) concatenated heads
    out: B::Buf,     // (B, Tq, C) after Wᴼ
    dctx: B::Buf,    // (B, Tq, C)
    scratch: B::Buf, // the backend's, for its backward kernel
    masks: SavedMasks,
    /// Shape and kernel of the last forward.
    last: Option<(AttentionShape, AttentionKind)>,
    /// A decoding step's keys: one range for every row, or one per row.
    spans: Vec<Range<usize>>,
}

#[derive(Clone, Debug)]
pub struct SelfAttention<B: Backend = Cpu> {
    pub qkv: Linear,
    pub out: Linear,
    pub heads: usize,
    c: usize,
    window: Option<usize>,
    qkv_buf: B::Buf, // (B, T, 3C)
    dqkv: B::Buf,    // (B, T, 3C)
    core: Core<B>,
}

impl<B: Backend> SelfAttention<B> {
    pub fn new(pb: &mut ParamBuilder, name: &str, cfg: &ModelConfig) -> Self {
        let c = cfg.d_model;
        Self {
            qkv: Linear::new(pb, &format!("{name}.qkv"), c, 3 * c, true),
            out: Linear::new(pb, &format!("{name}.out"), c, c, true),
            heads: cfg.n_heads,
            c,
            window: cfg.attention_window,
            qkv_buf: B::Buf::default(),
            dqkv: B::Buf::default(),
            core: Core::new(cfg.attention),
        }
    }

    /// Keep the attention weights of every following forward (see [`SelfAttention::weights`]);
    /// this runs the materialized kernel, which computes the same function as flash. Linear
    /// attention has no weights: for it this changes nothing and `weights` stays `None`.
    pub fn record_weights(&mut self, on: bool) {
        self.core.record_weights = on;
    }

    /// x: (B, T, C) → (B, T, C)
    pub fn forward(
        &mut self,
        be: &B,
        p: B::Ref<'_>,
        x: B::Ref<'_>,
        batch: usize,
        t: usize,
        masks: &Masks,
    ) -> B::Ref<'_> {
        let c = self.c;
        let n = batch * t;
        self.qkv
            .forward(be, p, x, be.grow(&mut self.qkv_buf, n * 3 * c));
        let shape = AttentionShape {
            batch,
            heads: self.heads,
            q_len: t,
            k_len: t,
            head_dim: c / self.heads,
        };
        let qkv = B::view(&self.qkv_buf, n * 3 * c);
        let view = |offset| Heads::<B> {
            data: qkv,
            rs: 3 * c,
            offset,
        };
        let masks = Masks {
            window: self.window,
            ..*masks
        };
        let heads = [view(0), view(c), view(2 * c)];
        self.core.forward(be, p, &self.out, heads, shape, &masks)
    }

    /// dy: (B, T, C) → `dx (+)= ∂L/∂x`; with `dx: None` only the parameter gradients (the
    /// input-gradient product of the QKV projection is skipped).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        be: &B,
        p: B::Ref<'_>,
        mut g: B::Mut<'_>,
        x: B::Ref<'_>,
        dy: B::Ref<'_>,
        dx: Option<B::Mut<'_>>,
        acc: Acc,
    ) {
        let c = self.c;
        let (s, _) = self.core.last.expect("backward before forward");
        let n = s.batch * s.q_len;
        let qkv = B::view(&self.qkv_buf, n * 3 * c);
        let view = |offset| Heads::<B> {
            data: qkv,
            rs: 3 * c,
            offset,
        };
        let heads = [view(0), view(c), view(2 * c)];
        let dqkv = HeadGrads::Fused(be.grow(&mut self.dqkv, n * 3 * c));
        let core_g = B::reborrow(&mut g);
        self.core
            .backward(be, p, core_g, &self.out, dy, dqkv, heads);
        let dqkv = B::view(&self.dqkv, n * 3 * c);
        self.qkv
            .backward(be, p, g, x, dqkv, dx, acc, BiasGrad::Compute);
    }
}

impl SelfAttention<Cpu> {
    /// Attention weights of the last forward, (B, H, T, T), if it recorded them.
    pub fn weights(&self) -> Option<&[f32]> {
        self.core.weights()
    }
}

#[derive(Clone, Debug)]
pub struct CrossAttention<B: Backend = Cpu> {
    pub q: Linear,
    pub kv: Linear,
    pub out: Linear,
    pub heads: usize,
    c: usize,
    q_buf: B::Buf,  // (B, Tq, C)
    kv_buf: B::Buf, // (B, Tk, 2C)
    dq: B::Buf,
    dkv: B::Buf,
    core: Core<B>,
}

impl<B: Backend> CrossAttention<B> {
    pub fn new(pb: &mut ParamBuilder, name: &str, cfg: &ModelConfig) -> Self {
        let c = cfg.d_model;
        // Linear attention is a self-attention model; the source is attended with softmax.
        let kind = match cfg.attention {
            AttentionKind::Linear => AttentionKind::Flash,
            k => k,
        };
        Self {
            q: Linear::new(pb, &format!("{name}.q"), c, c, true),
            kv: Linear::new(pb, &format!("{name}.kv"), c, 2 * c, true),
            out: Linear::new(pb, &format!("{name}.out"), c, c, true),
            heads: cfg.n_heads,
            c,
            q_buf: B::Buf::default(),
            kv_buf: B::Buf::default(),
            dq: B::Buf::default(),
            dkv: B::Buf::default(),
            core: Core::new(kind),
        }
    }

    /// As [`SelfAttention::record_weights`].
    pub fn record_weights(&mut self, on: bool) {
        self.core.record_weights = on;
    }

    /// x: (B, Tq, C) queries; memory: (B, Tk, C) encoder output → (B, Tq, C)
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        be: &B,
        p: B::Ref<'_>,
        x: B::Ref<'_>,
        memory: B::Ref<'_>,
        batch: usize,
        tq: usize,
        tk: usize,
        memory_padding: Option<&[bool]>,
    ) -> B::Ref<'_> {
        let c = self.c;
        let (nq, nk) = (batch * tq, batch * tk);
        self.q.forward(be, p, x, be.grow(&mut self.q_buf, nq * c));
        let kv = be.grow(&mut self.kv_buf, nk * 2 * c);
        self.kv.forward(be, p, memory, kv);
        let shape = AttentionShape {
            batch,
            heads: self.heads,
            q_len: tq,
            k_len: tk,
            head_dim: c / self.heads,
        };
        let heads = cross_heads::<B>(&self.q_buf, &self.kv_buf, c, shape);
        let masks = Masks {
            key_padding: memory_padding,
            causal: false,
            window: None,
        };
        self.core.forward(be, p, &self.out, heads, shape, &masks)
    }

    /// `dx (+)= ∂L/∂x`; `dmemory += ∂L/∂memory` (several decoder layers read one memory).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        be: &B,
        p: B::Ref<'_>,
        mut g: B::Mut<'_>,
        x: B::Ref<'_>,
        memory: B::Ref<'_>,
        dy: B::Ref<'_>,
        dx: B::Mut<'_>,
        acc: Acc,
        dmemory: B::Mut<'_>,
    ) {
        let c = self.c;
        let (s, _) = self.core.last.expect("backward before forward");
        let (nq, nk) = (s.batch * s.q_len, s.batch * s.k_len);
        {
            let grads = HeadGrads::Split(
                be.grow(&mut self.dq, nq * c),
                be.grow(&mut self.dkv, nk * 2 * c),
            );
            let heads = cross_heads::<B>(&self.q_buf, &self.kv_buf, c, s);
            let core_g = B::reborrow(&mut g);
            self.core
                .backward(be, p, core_g, &self.out, dy, grads, heads);
        }
        let (dq, dkv) = (B::view(&self.dq, nq * c), B::view(&self.dkv, nk * 2 * c));
        let q_g = B::reborrow(&mut g);
        self.q
            .backward(be, p, q_g, x, dq, Some(dx), acc, BiasGrad::Compute);
        self.kv.backward(
            be,
            p,
            g,
            memory,
            dkv,
            Some(dmemory),
            Acc::Add,
            BiasGrad::Compute,
        );
    }
}

/// Cross-attention's Q, K and V for shape `s`: views of the Q projection's (B·Tq, C) and the
/// fused K, V projection's (B·Tk, 2C) buffers.
fn cross_heads<'a, B: Backend>(
    q_buf: &'a B::Buf,
    kv_buf: &'a B::Buf,
    c: usize,
    s: AttentionShape,
) -> [Heads<'a, B>; 3] {
    let (nq, nk) = (s.batch * s.q_len, s.batch * s.k_len);
    let kv = B::view(kv_buf, nk * 2 * c);
    let q = Heads {
        data: B::view(q_buf, nq * c),
        rs: c,
        offset: 0,
    };
    let kv = |offset| Heads::<B> {
        data: kv,
        rs: 2 * c,
        offset,
    };
    [q, kv(0), kv(c)]
}

impl CrossAttention<Cpu> {
    pub fn weights(&self) -> Option<&[f32]> {
        self.core.weights()
    }
}

impl<B: Backend> Core<B> {
    fn new(kind: AttentionKind) -> Self {
        Self {
            kind,
            record_weights: false,
            saved: B::Buf::default(),
            ctx: B::Buf::default(),
            out: B::Buf::default(),
            dctx: B::Buf::default(),
            scratch: B::Buf::default(),
            masks: SavedMasks::default(),
            last: None,
            spans: Vec::new(),
        }
    }

    /// The length of `saved` for a forward of shape `s` with `kind`'s kernel.
    fn saved_len(s: AttentionShape, kind: AttentionKind) -> usize {
        let rows = s.batch * s.heads * s.q_len;
        match kind {
            AttentionKind::Materialized => rows * s.k_len,
            AttentionKind::Flash | AttentionKind::Linear => rows,
        }
    }

    fn forward(
        &mut self,
        be: &B,
        p: B::Ref<'_>,
        out_proj: &Linear,
        qkv: [Heads<'_, B>; 3],
        s: AttentionShape,
        masks: &Masks,
    ) -> B::Ref<'_> {
        let c = s.heads * s.head_dim;
        let n = s.batch * s.q_len;
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        // Linear attention is a different function: recording must not swap softmax in.
        let kind = if self.record_weights && self.kind != AttentionKind::Linear {
            AttentionKind::Materialized
        } else {
            self.kind
        };
        let ctx = be.grow(&mut self.ctx, n * c);
        let saved = be.grow(&mut self.saved, Self::saved_len(s, kind));
        be.attention_forward(kind, ctx, saved, qkv, s, masks, scale);
        self.masks.save(masks);
        let out = be.grow(&mut self.out, n * c);
        out_proj.forward(be, p, B::view(&self.ctx, n * c), out);
        self.last = Some((s, kind));
        B::view(&self.out, n * c)
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &mut self,
        be: &B,
        p: B::Ref<'_>,
        g: B::Mut<'_>,
        out_proj: &Linear,
        dy: B::Ref<'_>,
        grads: HeadGrads<'_, B>,
        qkv: [Heads<'_, B>; 3],
    ) {
        let (s, kind) = self.last.expect("backward before forward");
        let c = s.heads * s.head_dim;
        let n = s.batch * s.q_len;
        let dctx = be.grow(&mut self.dctx, n * c);
        let ctx = B::view(&self.ctx, n * c);
        out_proj.backward(be, p, g, ctx, dy, Some(dctx), Acc::Set, BiasGrad::Compute);
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let dctx = B::view(&self.dctx, n * c);
        let saved = B::view(&self.saved, Self::saved_len(s, kind));
        let masks = self.masks.masks();
        let tensors = (dctx, ctx, saved);
        be.attention_backward(
            kind,
            grads,
            tensors,
            &mut self.scratch,
            qkv,
            s,
            &masks,
            scale,
        );
    }
}

impl Core<Cpu> {
    fn weights(&self) -> Option<&[f32]> {
        match self.last {
            Some((s, AttentionKind::Materialized)) => {
                Some(&self.saved[..s.batch * s.heads * s.q_len * s.k_len])
            }
            _ => None,
        }
    }
}

/// Incremental decoding (see `kv_cache`): one new position per row.
impl<B: Backend> SelfAttention<B> {
    /// x: (R, C) for position `ctx.pos` → (R, C); appends this position's K, V to `kv`.
    pub(crate) fn step(
        &mut self,
        be: &B,
        p: B::Ref<'_>,
        x: B::Ref<'_>,
        kv: &mut LayerKv<B>,
        ctx: StepCtx,
    ) -> B::Ref<'_> {
        let c = self.c;
        let r = B::len(x) / c;
        self.qkv
            .forward(be, p, x, be.grow(&mut self.qkv_buf, r * 3 * c));
        let qkv = B::view(&self.qkv_buf, r * 3 * c);
        let (d, ctx_buf) = (c / self.heads, be.grow(&mut self.core.ctx, r * c));
        if self.core.kind == AttentionKind::Linear {
            let state = be.grow(&mut kv.data, r * kv.state);
            be.linear_attention_step(ctx_buf, state, qkv, self.heads, d);
        } else {
            let cache = ctx.blocks * kv.rows * 2 * c;
            let data = be.grow(&mut kv.data, cache);
            be.kv_append(
                data,
                kv.rows,
                B::sub(qkv, c..r * 3 * c),
                3 * c,
                2 * c,
                ctx.own,
                ctx.pos,
            );
            let window = self.window;
            let keys = |pos: usize| window.map_or(0, |w| (pos + 1).saturating_sub(w))..pos + 1;
            self.core.spans.clear();
            match ctx.pos {
                [first, rest @ ..] if rest.iter().any(|p| p != first) => {
                    self.core.spans.extend(ctx.pos.iter().map(|&p| keys(p)))
                }
                _ => self
                    .core
                    .spans
                    .push(keys(ctx.pos.first().copied().unwrap_or(0))),
            }
            let layout = KvLayout {
                rows: kv.rows,
                rs: 2 * c,
                k_offset: 0,
                v_offset: c,
            };
            let scale = 1.0 / (d as f32).sqrt();
            be.attention_one_query(
                ctx_buf,
                qkv,
                3 * c,
                B::view(&kv.data, cache),
                layout,
                ctx.own,
                &self.core.spans,
                None,
                self.heads,
                d,
                scale,
            );
        }
        let out = be.grow(&mut self.core.out, r * c);
        self.out.forward(be, p, B::view(&self.core.ctx, r * c), out);
        B::view(&self.core.out, r * c)
    }
}

impl<B: Backend> CrossAttention<B> {
    /// Keys and values of the encoder output, computed once per source: memory (B, S, C) →
    /// (B, S, 2C).
    pub(crate) fn memory_kv(
        &self,
        be: &B,
        p: B::Ref<'_>,
        memory: B::Ref<'_>,
        s_len: usize,
    ) -> LayerKv<B> {
        let mut data = B::Buf::default();
        self.kv
            .forward(be, p, memory, be.grow(&mut data, B::len(memory) * 2));
        LayerKv {
            data,
            rows: s_len,
            state: 0,
        }
    }

    /// x: (R, C) → (R, C), attending over the row's source in `kv` (B, S, 2C).
    pub(crate) fn step(
        &mut self,
        be: &B,
        p: B::Ref<'_>,
        x: B::Ref<'_>,
        kv: &LayerKv<B>,
        ctx: StepCtx,
    ) -> B::Ref<'_> {
        let c = self.c;
        let r = B::len(x) / c;
        self.q.forward(be, p, x, be.grow(&mut self.q_buf, r * c));
        let layout = KvLayout {
            rows: kv.rows,
            rs: 2 * c,
            k_offset: 0,
            v_offset: c,
        };
        let d = c / self.heads;
        let scale = 1.0 / (d as f32).sqrt();
        // Sources absorbed from a batch of shorter ones hold fewer keys than their blocks.
        self.core.spans.clear();
        if ctx.src_len.iter().any(|&s| s != kv.rows) {
            let keys = ctx.source_of.iter().map(|&b| 0..ctx.src_len[b]);
            self.core.spans.extend(keys);
        } else {
            self.core.spans.push(0..kv.rows);
        }
        let sources = ctx.src_len.len() * kv.rows * 2 * c;
        be.attention_one_query(
            be.grow(&mut self.core.ctx, r * c),
            B::view(&self.q_buf, r * c),
            c,
            B::view(&kv.data, sources),
            layout,
            ctx.source_of,
            &self.core.spans,
            Some(ctx.src_padding),
            self.heads,
            d,
            scale,
        );
        let out = be.grow(&mut self.core.out, r * c);
        self.out.forward(be, p, B::view(&self.core.ctx, r * c), out);
        B::view(&self.core.out, r * c)
    }
}
