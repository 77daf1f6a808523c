//! The encoder (Figure 1, left): N identical layers of self-attention and feed-forward, each
//! wrapped in Add & Norm. The same block with a causal mask is the decoder-only LM's layer.

use super::attention::SelfAttention;
use super::config::{ModelConfig, NormPlacement};
use super::feed_forward::FeedForward;
use super::kv_cache::{KvCache, LayerKv, StepCtx};
use super::norm::{final_output, AddNorm, LayerNorm};
use super::{buf, Mode, SiteIds};
use crate::kernels::attention::Masks;
use crate::params::ParamBuilder;

#[derive(Clone, Debug)]
pub struct EncoderLayer {
    pub self_attn: SelfAttention,
    pub self_attn_norm: AddNorm,
    pub ffn: FeedForward,
    pub ffn_norm: AddNorm,
    mid: Vec<f32>,  // (N, C) output of the attention sublayer's Add & Norm
    dmid: Vec<f32>, // (N, C)
}

impl EncoderLayer {
    pub fn new(pb: &mut ParamBuilder, name: &str, cfg: &ModelConfig, sites: &mut SiteIds) -> Self {
        let (c, eps, placement) = (cfg.d_model, cfg.layer_norm_eps, cfg.norm);
        Self {
            self_attn: SelfAttention::new(pb, &format!("{name}.self_attn"), cfg),
            self_attn_norm: AddNorm::new(
                pb,
                &format!("{name}.self_attn_norm"),
                c,
                eps,
                placement,
                sites.next(),
            ),
            ffn: FeedForward::new(pb, &format!("{name}.ffn"), c, cfg.d_ff, cfg.activation),
            ffn_norm: AddNorm::new(
                pb,
                &format!("{name}.ffn_norm"),
                c,
                eps,
                placement,
                sites.next(),
            ),
            mid: Vec::new(),
            dmid: Vec::new(),
        }
    }

    /// x, y: (B, T, C)
    pub fn forward(
        &mut self,
        p: &[f32],
        x: &[f32],
        y: &mut [f32],
        batch: usize,
        t: usize,
        masks: &Masks,
        mode: Mode,
    ) {
        let n = x.len();
        let a_in = self.self_attn_norm.sublayer_input(p, x);
        let a = self.self_attn.forward(p, a_in, batch, t, masks);
        let mid = buf(&mut self.mid, n);
        self.self_attn_norm.finish(p, x, a, mid, mode);
        let mid = &self.mid[..n];
        let f_in = self.ffn_norm.sublayer_input(p, mid);
        let f = self.ffn.forward(p, f_in);
        self.ffn_norm.finish(p, mid, f, y, mode);
    }

    /// dy → dx (overwritten), for the `x` of the last forward.
    ///
    /// With `input_grad` false nobody reads `dx` afterwards: post-LN then skips the product
    /// that carries the gradient into `x` through the QKV projection, as autograd does for an
    /// input that does not require grad. (Pre-LN still needs it: it feeds the norm's
    /// parameter gradients.)
    pub fn backward(
        &mut self,
        p: &[f32],
        g: &mut [f32],
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        input_grad: bool,
    ) {
        let n = x.len();
        let mid = &self.mid[..n];
        let dmid = buf(&mut self.dmid, n);
        let s = self.ffn_norm.backward_output(p, g, mid, dy, dmid);
        self.ffn
            .backward(p, g, s.input, s.d_output, s.d_input, s.accumulate);
        self.ffn_norm.backward_input(p, g, mid, dmid);
        let reads_x = self.self_attn_norm.placement == NormPlacement::Post;
        let s = self
            .self_attn_norm
            .backward_output(p, g, x, &self.dmid[..n], dx);
        let d_input = (input_grad || !reads_x).then_some(s.d_input);
        self.self_attn
            .backward(p, g, s.input, s.d_output, d_input, s.accumulate);
        self.self_attn_norm.backward_input(p, g, x, dx);
    }
}

/// A stack of layers with the pre-LN final norm; owns the hidden states between layers.
#[derive(Clone, Debug)]
pub struct EncoderStack {
    pub layers: Vec<EncoderLayer>,
    pub final_norm: Option<LayerNorm>,
    hidden: Vec<Vec<f32>>, // L + 1 buffers of (N, C): input, each layer's output
    out: Vec<f32>,         // final_norm output (pre-LN)
    dh: [Vec<f32>; 2],
}

impl EncoderStack {
    pub fn new(
        pb: &mut ParamBuilder,
        name: &str,
        n_layers: usize,
        cfg: &ModelConfig,
        sites: &mut SiteIds,
    ) -> Self {
        let layers = (0..n_layers)
            .map(|i| EncoderLayer::new(pb, &format!("{name}.layers.{i}"), cfg, sites))
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

    /// x: (B, T, C) → (B, T, C)
    pub fn forward(
        &mut self,
        p: &[f32],
        x: &[f32],
        batch: usize,
        t: usize,
        masks: &Masks,
        mode: Mode,
    ) -> &[f32] {
        let n = x.len();
        buf(&mut self.hidden[0], n).copy_from_slice(x);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let (lo, hi) = self.hidden.split_at_mut(i + 1);
            layer.forward(p, &lo[i][..n], buf(&mut hi[0], n), batch, t, masks, mode);
        }
        let last = &self.hidden[self.layers.len()][..n];
        final_output(&mut self.final_norm, p, last, &mut self.out)
    }

    /// The output of the last forward, (N, C).
    pub fn output(&self, n: usize) -> &[f32] {
        match self.final_norm {
            Some(_) => &self.out[..n],
            None => &self.hidden[self.layers.len()][..n],
        }
    }

    /// dy: gradient of the stack output → gradient of its input.
    pub fn backward(&mut self, p: &[f32], g: &mut [f32], dy: &[f32]) -> &[f32] {
        self.backward_impl(p, g, dy, true)
    }

    /// dy: gradient of the stack output → the parameter gradients only, for an input that
    /// needs no gradient (PyTorch's `requires_grad=False`): the first layer skips its
    /// input-gradient product.
    pub fn backward_params(&mut self, p: &[f32], g: &mut [f32], dy: &[f32]) {
        self.backward_impl(p, g, dy, false);
    }

    fn backward_impl(&mut self, p: &[f32], g: &mut [f32], dy: &[f32], input_grad: bool) -> &[f32] {
        let n = dy.len();
        let l = self.layers.len();
        let [d0, d1] = &mut self.dh;
        let (mut cur, mut next) = (buf(d0, n), buf(d1, n));
        match &self.final_norm {
            Some(norm) => norm.backward(p, g, &self.hidden[l][..n], dy, cur, false),
            None => cur.copy_from_slice(dy),
        }
        for i in (0..l).rev() {
            let input_grad = input_grad || i > 0;
            self.layers[i].backward(p, g, &self.hidden[i][..n], cur, next, input_grad);
            std::mem::swap(&mut cur, &mut next);
        }
        cur
    }
}

/// Incremental decoding for the decoder-only LM, whose layers are this block with a causal mask.
impl EncoderLayer {
    /// x, y: (R, C) at position `ctx.pos`.
    pub(crate) fn step(
        &mut self,
        p: &[f32],
        x: &[f32],
        y: &mut [f32],
        kv: &mut LayerKv,
        ctx: StepCtx,
    ) {
        let n = x.len();
        let a_in = self.self_attn_norm.sublayer_input(p, x);
        let a = self.self_attn.step(p, a_in, kv, ctx);
        self.self_attn_norm
            .finish(p, x, a, buf(&mut self.mid, n), Mode::EVAL);
        let mid = &self.mid[..n];
        let f_in = self.ffn_norm.sublayer_input(p, mid);
        let f = self.ffn.forward(p, f_in);
        self.ffn_norm.finish(p, mid, f, y, Mode::EVAL);
    }
}

impl EncoderStack {
    /// x: (R, C) embeddings of the newest position → (R, C).
    pub(crate) fn step(&mut self, p: &[f32], x: &[f32], cache: &mut KvCache) -> &[f32] {
        let n = x.len();
        buf(&mut self.hidden[0], n).copy_from_slice(x);
        let ctx = StepCtx {
            pos: cache.len,
            own: &cache.own,
            source_of: &cache.source_of,
            src_padding: &cache.src_padding,
        };
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let (lo, hi) = self.hidden.split_at_mut(i + 1);
            layer.step(
                p,
                &lo[i][..n],
                buf(&mut hi[0], n),
                &mut cache.self_kv[i],
                ctx,
            );
        }
        let last = &self.hidden[self.layers.len()][..n];
        final_output(&mut self.final_norm, p, last, &mut self.out)
    }
}
