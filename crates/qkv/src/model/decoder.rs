//! The decoder (Figure 1, right): masked self-attention, cross-attention over the encoder
//! output, and feed-forward, each wrapped in Add & Norm.

use super::attention::{CrossAttention, SelfAttention};
use super::config::{ModelConfig, NormPlacement};
use super::feed_forward::FeedForward;
use super::kv_cache::{KvCache, LayerKv, StepCtx};
use super::norm::{final_output, AddNorm, LayerNorm};
use super::{buf, Mode, SiteIds};
use crate::kernels::attention::Masks;
use crate::params::ParamBuilder;

#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub self_attn: SelfAttention,
    pub self_attn_norm: AddNorm,
    pub cross_attn: CrossAttention,
    pub cross_attn_norm: AddNorm,
    pub ffn: FeedForward,
    pub ffn_norm: AddNorm,
    mid1: Vec<f32>, // (N, C) after self-attention's Add & Norm
    mid2: Vec<f32>, // (N, C) after cross-attention's Add & Norm
    dmid1: Vec<f32>,
    dmid2: Vec<f32>,
}

/// The encoder output seen by every decoder layer. memory: (B, S, C); padding: (B, S)
#[derive(Clone, Copy)]
pub struct Memory<'a> {
    pub states: &'a [f32],
    pub len: usize,
    pub padding: Option<&'a [bool]>,
}

impl DecoderLayer {
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
            cross_attn: CrossAttention::new(pb, &format!("{name}.cross_attn"), cfg),
            cross_attn_norm: AddNorm::new(
                pb,
                &format!("{name}.cross_attn_norm"),
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
            mid1: Vec::new(),
            mid2: Vec::new(),
            dmid1: Vec::new(),
            dmid2: Vec::new(),
        }
    }

    /// x, y: (B, T, C)
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        p: &[f32],
        x: &[f32],
        y: &mut [f32],
        batch: usize,
        t: usize,
        masks: &Masks,
        memory: Memory,
        mode: Mode,
    ) {
        let n = x.len();
        let a_in = self.self_attn_norm.sublayer_input(p, x);
        let a = self.self_attn.forward(p, a_in, batch, t, masks);
        self.self_attn_norm
            .finish(p, x, a, buf(&mut self.mid1, n), mode);
        let mid1 = &self.mid1[..n];
        let c_in = self.cross_attn_norm.sublayer_input(p, mid1);
        let ca =
            self.cross_attn
                .forward(p, c_in, memory.states, batch, t, memory.len, memory.padding);
        self.cross_attn_norm
            .finish(p, mid1, ca, buf(&mut self.mid2, n), mode);
        let mid2 = &self.mid2[..n];
        let f_in = self.ffn_norm.sublayer_input(p, mid2);
        let f = self.ffn.forward(p, f_in);
        self.ffn_norm.finish(p, mid2, f, y, mode);
    }

    /// dy → dx (overwritten); `dmemory += ∂L/∂memory`.
    pub fn backward(
        &mut self,
        p: &[f32],
        g: &mut [f32],
        x: &[f32],
        memory: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        dmemory: &mut [f32],
    ) {
        let n = x.len();
        let (mid1, mid2) = (&self.mid1[..n], &self.mid2[..n]);
        let (dmid1, dmid2) = (buf(&mut self.dmid1, n), buf(&mut self.dmid2, n));
        let s = self.ffn_norm.backward_output(p, g, mid2, dy, dmid2);
        self.ffn
            .backward(p, g, s.input, s.d_output, s.d_input, s.accumulate);
        self.ffn_norm.backward_input(p, g, mid2, dmid2);
        let s = self
            .cross_attn_norm
            .backward_output(p, g, mid1, dmid2, dmid1);
        self.cross_attn.backward(
            p,
            g,
            s.input,
            memory,
            s.d_output,
            s.d_input,
            s.accumulate,
            dmemory,
        );
        self.cross_attn_norm.backward_input(p, g, mid1, dmid1);
        let s = self.self_attn_norm.backward_output(p, g, x, dmid1, dx);
        self.self_attn
            .backward(p, g, s.input, s.d_output, Some(s.d_input), s.accumulate);
        self.self_attn_norm.backward_input(p, g, x, dx);
    }
}

#[derive(Clone, Debug)]
pub struct DecoderStack {
    pub layers: Vec<DecoderLayer>,
    pub final_norm: Option<LayerNorm>,
    hidden: Vec<Vec<f32>>,
    out: Vec<f32>,
    dh: [Vec<f32>; 2],
}

impl DecoderStack {
    pub fn new(pb: &mut ParamBuilder, name: &str, cfg: &ModelConfig, sites: &mut SiteIds) -> Self {
        let n_layers = cfg.n_decoder_layers;
        let layers = (0..n_layers)
            .map(|i| DecoderLayer::new(pb, &format!("{name}.layers.{i}"), cfg, sites))
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

    /// x: (B, T, C) target embeddings → (B, T, C)
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        p: &[f32],
        x: &[f32],
        batch: usize,
        t: usize,
        masks: &Masks,
        memory: Memory,
        mode: Mode,
    ) -> &[f32] {
        let n = x.len();
        buf(&mut self.hidden[0], n).copy_from_slice(x);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let (lo, hi) = self.hidden.split_at_mut(i + 1);
            layer.forward(
                p,
                &lo[i][..n],
                buf(&mut hi[0], n),
                batch,
                t,
                masks,
                memory,
                mode,
            );
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

    /// dy → gradient of the target embeddings; `dmemory += ∂L/∂memory`.
    pub fn backward(
        &mut self,
        p: &[f32],
        g: &mut [f32],
        memory: &[f32],
        dy: &[f32],
        dmemory: &mut [f32],
    ) -> &[f32] {
        let n = dy.len();
        let l = self.layers.len();
        let [d0, d1] = &mut self.dh;
        let (mut cur, mut next) = (buf(d0, n), buf(d1, n));
        match &self.final_norm {
            Some(norm) => norm.backward(p, g, &self.hidden[l][..n], dy, cur, false),
            None => cur.copy_from_slice(dy),
        }
        for i in (0..l).rev() {
            self.layers[i].backward(p, g, &self.hidden[i][..n], memory, cur, next, dmemory);
            std::mem::swap(&mut cur, &mut next);
        }
        cur
    }
}

/// Incremental decoding (see `kv_cache`).
impl DecoderLayer {
    /// x, y: (R, C) at position `ctx.pos`.
    pub(crate) fn step(
        &mut self,
        p: &[f32],
        x: &[f32],
        y: &mut [f32],
        self_kv: &mut LayerKv,
        cross_kv: &LayerKv,
        ctx: StepCtx,
    ) {
        let n = x.len();
        let a_in = self.self_attn_norm.sublayer_input(p, x);
        let a = self.self_attn.step(p, a_in, self_kv, ctx);
        self.self_attn_norm
            .finish(p, x, a, buf(&mut self.mid1, n), Mode::EVAL);
        let mid1 = &self.mid1[..n];
        let c_in = self.cross_attn_norm.sublayer_input(p, mid1);
        let ca = self.cross_attn.step(p, c_in, cross_kv, ctx);
        self.cross_attn_norm
            .finish(p, mid1, ca, buf(&mut self.mid2, n), Mode::EVAL);
        let mid2 = &self.mid2[..n];
        let f_in = self.ffn_norm.sublayer_input(p, mid2);
        let f = self.ffn.forward(p, f_in);
        self.ffn_norm.finish(p, mid2, f, y, Mode::EVAL);
    }
}

impl DecoderStack {
    /// Cross-attention keys/values of every layer for the memory (B, S, C).
    pub(crate) fn memory_kv(&self, p: &[f32], memory: &[f32], s_len: usize) -> Vec<LayerKv> {
        self.layers
            .iter()
            .map(|l| l.cross_attn.memory_kv(p, memory, s_len))
            .collect()
    }

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
                &cache.cross_kv[i],
                ctx,
            );
        }
        let last = &self.hidden[self.layers.len()][..n];
        final_output(&mut self.final_norm, p, last, &mut self.out)
    }
}
