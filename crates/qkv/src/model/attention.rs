//! Multi-head attention (§3.2.2, Figure 2 right): `MultiHead(Q,K,V) = Concat(head_1..h) Wᴼ`.
//!
//! Self-attention projects Q, K and V with one fused (3C, C) matrix; cross-attention projects
//! Q from the decoder and K, V with one fused (2C, C) matrix from the encoder output
//! ("memory"). Heads are strided views into those buffers (see `kernels::attention`).

use super::buf;
use super::config::{AttentionKind, ModelConfig};
use super::kv_cache::{LayerKv, StepCtx};
use super::linear::BiasGrad;
use super::linear::Linear;
use crate::backend::Cpu;
use crate::kernels::attention::{
    attention_backward, attention_forward, attention_one_query, AttentionShape, HeadsMut, HeadsRef,
    KvBlocks, Masks,
};
use crate::kernels::flash::{flash_backward, flash_forward};
use crate::kernels::linear_attention::{
    linear_attention_backward, linear_attention_forward, linear_attention_step,
};
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
#[derive(Clone, Debug, Default)]
struct Core {
    kind: AttentionKind,
    /// Run the materialized kernel and keep its weights, whatever `kind` says.
    record_weights: bool,
    /// What backward needs from forward: the probabilities (B, H, Tq, Tk) when materialized,
    /// the log-sum-exp (B, H, Tq) for flash, the normalisers (B, H, Tq) for linear.
    saved: Vec<f32>,
    ctx: Vec<f32>,     // (B, Tq, C) concatenated heads
    out: Vec<f32>,     // (B, Tq, C) after Wᴼ
    dctx: Vec<f32>,    // (B, Tq, C)
    scratch: Vec<f32>, // (B, H, Tq, Tk), materialized backward only
    masks: SavedMasks,
    /// Shape and kernel of the last forward.
    last: Option<(AttentionShape, AttentionKind)>,
    /// A decoding step's keys: one range for every row, or one per row.
    spans: Vec<Range<usize>>,
}

#[derive(Clone, Debug)]
pub struct SelfAttention {
    pub qkv: Linear,
    pub out: Linear,
    pub heads: usize,
    c: usize,
    window: Option<usize>,
    qkv_buf: Vec<f32>, // (B, T, 3C)
    dqkv: Vec<f32>,    // (B, T, 3C)
    core: Core,
}

impl SelfAttention {
    pub fn new(pb: &mut ParamBuilder, name: &str, cfg: &ModelConfig) -> Self {
        let c = cfg.d_model;
        Self {
            qkv: Linear::new(pb, &format!("{name}.qkv"), c, 3 * c, true),
            out: Linear::new(pb, &format!("{name}.out"), c, c, true),
            heads: cfg.n_heads,
            c,
            window: cfg.attention_window,
            qkv_buf: Vec::new(),
            dqkv: Vec::new(),
            core: Core {
                kind: cfg.attention,
                ..Core::default()
            },
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
        p: &[f32],
        x: &[f32],
        batch: usize,
        t: usize,
        masks: &Masks,
    ) -> &[f32] {
        let c = self.c;
        let n = batch * t;
        let qkv = buf(&mut self.qkv_buf, n * 3 * c);
        self.qkv.forward(&Cpu, p, x, qkv);
        let shape = AttentionShape {
            batch,
            heads: self.heads,
            q_len: t,
            k_len: t,
            head_dim: c / self.heads,
        };
        let view = |offset| HeadsRef {
            data: &self.qkv_buf[..n * 3 * c],
            rs: 3 * c,
            offset,
        };
        let masks = Masks {
            window: self.window,
            ..*masks
        };
        self.core
            .forward(p, &self.out, view(0), view(c), view(2 * c), shape, &masks)
    }

    /// Attention weights of the last forward, (B, H, T, T), if it recorded them.
    pub fn weights(&self) -> Option<&[f32]> {
        self.core.weights()
    }

    /// dy: (B, T, C) → `dx (+)= ∂L/∂x`; with `dx: None` only the parameter gradients (the
    /// input-gradient product of the QKV projection is skipped).
    pub fn backward(
        &mut self,
        p: &[f32],
        g: &mut [f32],
        x: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        acc: Acc,
    ) {
        let c = self.c;
        let (s, _) = self.core.last.expect("backward before forward");
        let n = s.batch * s.q_len;
        let qkv = &self.qkv_buf[..n * 3 * c];
        let view = |offset| HeadsRef {
            data: qkv,
            rs: 3 * c,
            offset,
        };
        let dqkv = buf(&mut self.dqkv, n * 3 * c);
        {
            let [dq, dk, dv] = HeadsMut::split(dqkv, 3 * c, c, [0, c, 2 * c]);
            self.core.backward(
                p,
                g,
                &self.out,
                dy,
                &dq,
                &dk,
                &dv,
                view(0),
                view(c),
                view(2 * c),
            );
        }
        self.qkv.backward(
            &Cpu,
            p,
            g,
            x,
            &self.dqkv[..n * 3 * c],
            dx,
            acc,
            BiasGrad::Compute,
        );
    }
}

#[derive(Clone, Debug)]
pub struct CrossAttention {
    pub q: Linear,
    pub kv: Linear,
    pub out: Linear,
    pub heads: usize,
    c: usize,
    q_buf: Vec<f32>,  // (B, Tq, C)
    kv_buf: Vec<f32>, // (B, Tk, 2C)
    dq: Vec<f32>,
    dkv: Vec<f32>,
    core: Core,
}

impl CrossAttention {
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
            q_buf: Vec::new(),
            kv_buf: Vec::new(),
            dq: Vec::new(),
            dkv: Vec::new(),
            core: Core {
                kind,
                ..Core::default()
            },
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
        p: &[f32],
        x: &[f32],
        memory: &[f32],
        batch: usize,
        tq: usize,
        tk: usize,
        memory_padding: Option<&[bool]>,
    ) -> &[f32] {
        let c = self.c;
        self.q
            .forward(&Cpu, p, x, buf(&mut self.q_buf, batch * tq * c));
        self.kv
            .forward(&Cpu, p, memory, buf(&mut self.kv_buf, batch * tk * 2 * c));
        let shape = AttentionShape {
            batch,
            heads: self.heads,
            q_len: tq,
            k_len: tk,
            head_dim: c / self.heads,
        };
        let q = HeadsRef {
            data: &self.q_buf[..batch * tq * c],
            rs: c,
            offset: 0,
        };
        let kv = |offset| HeadsRef {
            data: &self.kv_buf[..batch * tk * 2 * c],
            rs: 2 * c,
            offset,
        };
        let masks = Masks {
            key_padding: memory_padding,
            causal: false,
            window: None,
        };
        self.core
            .forward(p, &self.out, q, kv(0), kv(c), shape, &masks)
    }

    pub fn weights(&self) -> Option<&[f32]> {
        self.core.weights()
    }

    /// `dx (+)= ∂L/∂x`; `dmemory += ∂L/∂memory` (several decoder layers read one memory).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        p: &[f32],
        g: &mut [f32],
        x: &[f32],
        memory: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        acc: Acc,
        dmemory: &mut [f32],
    ) {
        let c = self.c;
        let (s, _) = self.core.last.expect("backward before forward");
        let (nq, nk) = (s.batch * s.q_len, s.batch * s.k_len);
        let q = HeadsRef {
            data: &self.q_buf[..nq * c],
            rs: c,
            offset: 0,
        };
        let kv = |offset| HeadsRef {
            data: &self.kv_buf[..nk * 2 * c],
            rs: 2 * c,
            offset,
        };
        {
            let [dq] = HeadsMut::split(buf(&mut self.dq, nq * c), c, c, [0]);
            let [dk, dv] = HeadsMut::split(buf(&mut self.dkv, nk * 2 * c), 2 * c, c, [0, c]);
            self.core
                .backward(p, g, &self.out, dy, &dq, &dk, &dv, q, kv(0), kv(c));
        }
        self.q.backward(
            &Cpu,
            p,
            g,
            x,
            &self.dq[..nq * c],
            Some(dx),
            acc,
            BiasGrad::Compute,
        );
        self.kv.backward(
            &Cpu,
            p,
            g,
            memory,
            &self.dkv[..nk * 2 * c],
            Some(dmemory),
            Acc::Add,
            BiasGrad::Compute,
        );
    }
}

impl Core {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        p: &[f32],
        out_proj: &Linear,
        q: HeadsRef,
        k: HeadsRef,
        v: HeadsRef,
        s: AttentionShape,
        masks: &Masks,
    ) -> &[f32] {
        let c = s.heads * s.head_dim;
        let n = s.batch * s.q_len;
        let rows = s.batch * s.heads * s.q_len;
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        // Linear attention is a different function: recording must not swap softmax in.
        let kind = if self.record_weights && self.kind != AttentionKind::Linear {
            AttentionKind::Materialized
        } else {
            self.kind
        };
        let ctx = buf(&mut self.ctx, n * c);
        match kind {
            AttentionKind::Materialized => {
                let probs = buf(&mut self.saved, rows * s.k_len);
                attention_forward(ctx, probs, q, k, v, s, masks, scale);
            }
            AttentionKind::Flash => {
                flash_forward(ctx, buf(&mut self.saved, rows), q, k, v, s, masks, scale)
            }
            AttentionKind::Linear => {
                linear_attention_forward(ctx, buf(&mut self.saved, rows), q, k, v, s, masks)
            }
        }
        self.masks.save(masks);
        out_proj.forward(&Cpu, p, &self.ctx[..n * c], buf(&mut self.out, n * c));
        self.last = Some((s, kind));
        &self.out[..n * c]
    }

    fn weights(&self) -> Option<&[f32]> {
        match self.last {
            Some((s, AttentionKind::Materialized)) => {
                Some(&self.saved[..s.batch * s.heads * s.q_len * s.k_len])
            }
            _ => None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &mut self,
        p: &[f32],
        g: &mut [f32],
        out_proj: &Linear,
        dy: &[f32],
        dq: &HeadsMut,
        dk: &HeadsMut,
        dv: &HeadsMut,
        q: HeadsRef,
        k: HeadsRef,
        v: HeadsRef,
    ) {
        let (s, kind) = self.last.expect("backward before forward");
        let c = s.heads * s.head_dim;
        let n = s.batch * s.q_len;
        let dctx = buf(&mut self.dctx, n * c);
        let ctx = &self.ctx[..n * c];
        out_proj.backward(&Cpu, p, g, ctx, dy, Some(dctx), Acc::Set, BiasGrad::Compute);
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let (dctx, ctx) = (&self.dctx[..n * c], &self.ctx[..n * c]);
        let masks = self.masks.masks();
        match kind {
            AttentionKind::Materialized => {
                let scratch = buf(&mut self.scratch, s.batch * s.heads * s.q_len * s.k_len);
                attention_backward(dq, dk, dv, dctx, &self.saved, q, k, v, scratch, s, scale);
            }
            AttentionKind::Flash => flash_backward(
                dq,
                dk,
                dv,
                dctx,
                ctx,
                &self.saved,
                q,
                k,
                v,
                s,
                &masks,
                scale,
            ),
            AttentionKind::Linear => {
                linear_attention_backward(dq, dk, dv, dctx, ctx, &self.saved, q, k, v, s, &masks)
            }
        }
    }
}

/// Incremental decoding (see `kv_cache`): one new position per row.
impl SelfAttention {
    /// x: (R, C) for position `ctx.pos` → (R, C); appends this position's K, V to `kv`.
    pub(crate) fn step(&mut self, p: &[f32], x: &[f32], kv: &mut LayerKv, ctx: StepCtx) -> &[f32] {
        let c = self.c;
        let r = x.len() / c;
        let qkv = buf(&mut self.qkv_buf, r * 3 * c);
        self.qkv.forward(&Cpu, p, x, qkv);
        let d = c / self.heads;
        if self.core.kind == AttentionKind::Linear {
            let ctx_buf = buf(&mut self.core.ctx, r * c);
            linear_attention_step(
                ctx_buf,
                &mut kv.data,
                &self.qkv_buf[..r * 3 * c],
                self.heads,
                d,
            );
            self.out.forward(
                &Cpu,
                p,
                &self.core.ctx[..r * c],
                buf(&mut self.core.out, r * c),
            );
            return &self.core.out[..r * c];
        }
        for row in 0..r {
            let dst = (ctx.own[row] * kv.rows + ctx.pos[row]) * 2 * c;
            kv.data[dst..dst + 2 * c].copy_from_slice(&qkv[row * 3 * c + c..(row + 1) * 3 * c]);
        }
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
        let blocks = KvBlocks {
            data: &kv.data,
            rows: kv.rows,
            rs: 2 * c,
            k_offset: 0,
            v_offset: c,
        };
        let ctx_buf = buf(&mut self.core.ctx, r * c);
        let scale = 1.0 / (d as f32).sqrt();
        attention_one_query(
            ctx_buf,
            &self.qkv_buf,
            3 * c,
            blocks,
            ctx.own,
            &self.core.spans,
            None,
            self.heads,
            d,
            scale,
        );
        self.out.forward(
            &Cpu,
            p,
            &self.core.ctx[..r * c],
            buf(&mut self.core.out, r * c),
        );
        &self.core.out[..r * c]
    }
}

impl CrossAttention {
    /// Keys and values of the encoder output, computed once per source: memory (B, S, C) →
    /// (B, S, 2C).
    pub(crate) fn memory_kv(&self, p: &[f32], memory: &[f32], s_len: usize) -> LayerKv {
        let mut data = vec![0.0; memory.len() * 2];
        self.kv.forward(&Cpu, p, memory, &mut data);
        LayerKv {
            data,
            rows: s_len,
            state: 0,
        }
    }

    /// x: (R, C) → (R, C), attending over the row's source in `kv` (B, S, 2C).
    pub(crate) fn step(&mut self, p: &[f32], x: &[f32], kv: &LayerKv, ctx: StepCtx) -> &[f32] {
        let c = self.c;
        let r = x.len() / c;
        self.q.forward(&Cpu, p, x, buf(&mut self.q_buf, r * c));
        let blocks = KvBlocks {
            data: &kv.data,
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
        let ctx_buf = buf(&mut self.core.ctx, r * c);
        attention_one_query(
            ctx_buf,
            &self.q_buf,
            c,
            blocks,
            ctx.source_of,
            &self.core.spans,
            Some(ctx.src_padding),
            self.heads,
            d,
            scale,
        );
        self.out.forward(
            &Cpu,
            p,
            &self.core.ctx[..r * c],
            buf(&mut self.core.out, r * c),
        );
        &self.core.out[..r * c]
    }
}
