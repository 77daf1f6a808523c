//! Encoder-only classifier: embedding → encoder → pooling (mean over real tokens, or the first
//! token) → linear class head. With `n_classes: 0` there is no head and the model computes
//! sentence embeddings (`features`), as sentence-transformers does with a BERT-family encoder.

use super::config::{Family, ModelConfig, Pooling};
use super::embedding::Embedding;
use super::linear::BiasGrad;
use super::linear::Linear;
use super::stack::{InputGrad, Stack};
use super::{
    buf, check_family, loss_of, scale_grad, Forward, LastPass, Mode, Model, SiteIds, Tokens,
};
use crate::backend::Cpu;
use crate::data::ClassifyBatch;
use crate::error::{shape_err, Error, Result};
use crate::kernels::attention::Masks;
use crate::kernels::Acc;
use crate::params::{ParamBuilder, Params};
use std::ops::Range;

pub struct Classifier {
    pub config: ModelConfig,
    pub params: Params,
    pub embed: Embedding,
    pub encoder: Stack,
    /// None when `n_classes` is 0 (an embedding model).
    pub head: Option<Linear>,
    pad: Vec<bool>,
    pooled: Vec<f32>, // (B, C)
    logits: Vec<f32>, // (B, K)
    dlogits: Vec<f32>,
    dpooled: Vec<f32>,
    dh: Vec<f32>, // (B, T, C)
    /// (B, T) of the last training forward.
    last: LastPass<(usize, usize)>,
}

impl Classifier {
    pub fn new(config: ModelConfig, seed: u64) -> Result<Self> {
        check_family(&config, Family::Classifier)?;
        let cfg = &config;
        let mut pb = ParamBuilder::default();
        let mut sites = SiteIds::default();
        let embed = Embedding::new(
            &mut pb,
            "embed",
            None,
            "pos",
            cfg.vocab_size,
            cfg.d_model,
            cfg.max_len,
            cfg.positional,
            cfg.scale_embeddings,
            "tokens",
            sites.next_id(),
        )
        .with_token_types(&mut pb, "embed_types", cfg.token_types)
        .with_norm(&mut pb, "embed_norm", cfg.embed_norm, cfg.layer_norm_eps);
        let n_layers = cfg.n_encoder_layers;
        let encoder = Stack::new(&mut pb, "encoder", n_layers, false, cfg, &mut sites);
        let head = (cfg.n_classes > 0)
            .then(|| Linear::new(&mut pb, "head", cfg.d_model, cfg.n_classes, true));
        Ok(Self {
            params: pb.build(seed)?,
            config,
            embed,
            encoder,
            head,
            pad: Vec::new(),
            pooled: Vec::new(),
            logits: Vec::new(),
            dlogits: Vec::new(),
            dpooled: Vec::new(),
            dh: Vec::new(),
            last: LastPass::Nothing,
        })
    }

    /// Number of real (non-padding) tokens in row `b`, at least 1 to keep the mean defined.
    fn real_tokens(pad: &[bool], b: usize, t: usize) -> usize {
        pad[b * t..(b + 1) * t]
            .iter()
            .filter(|&&m| !m)
            .count()
            .max(1)
    }

    /// Inference: tokens (B, T) → logits (B, K).
    pub fn logits(&mut self, tokens: Tokens) -> Result<&[f32]> {
        self.last = LastPass::Other("an inference forward");
        self.run(tokens, Mode::EVAL)
    }

    fn head(&self) -> Result<&Linear> {
        self.head.as_ref().ok_or_else(|| {
            Error::Config(
                "this model has no class head (n_classes 0): use it for embeddings".into(),
            )
        })
    }

    fn run(&mut self, tokens: Tokens, mode: Mode) -> Result<&[f32]> {
        self.head()?;
        let b = tokens.batch;
        self.pool(tokens, mode)?;
        let (k, c) = (self.config.n_classes, self.config.d_model);
        let logits = buf(&mut self.logits, b * k);
        if let Some(head) = &self.head {
            head.forward(&Cpu, &self.params.data, &self.pooled[..b * c], logits);
        }
        Ok(&self.logits[..b * k])
    }

    /// Sentence embeddings: tokens (B, T) → pooled encoder states (B, C), each row scaled to
    /// unit L2 norm (sentence-transformers' `Normalize`). Evaluation mode.
    pub fn features(&mut self, tokens: Tokens) -> Result<&[f32]> {
        self.last = LastPass::Other("features");
        let (b, c) = (tokens.batch, self.config.d_model);
        self.pool(tokens, Mode::EVAL)?;
        for row in self.pooled[..b * c].chunks_mut(c) {
            // F.normalize's eps keeps an all-zero row finite.
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|v| *v /= norm);
        }
        Ok(&self.pooled[..b * c])
    }

    /// Embedding → encoder → pooling into `self.pooled` (B, C).
    fn pool(&mut self, tokens: Tokens, mode: Mode) -> Result<()> {
        let p = &self.params.data;
        let (b, t, c) = (tokens.batch, tokens.len, self.config.d_model);
        let x = self.embed.forward(&Cpu, p, tokens, mode)?;
        tokens.padding_mask(self.config.pad_id, &mut self.pad);
        let masks = Masks {
            key_padding: Some(&self.pad),
            causal: false,
            window: None,
        };
        let h = self.encoder.forward(&Cpu, p, x, b, t, &masks, None, mode);
        let pooled = buf(&mut self.pooled, b * c);
        for (row, out) in pooled.chunks_mut(c).enumerate() {
            out.iter_mut().for_each(|v| *v = 0.0);
            match self.config.pooling {
                Pooling::First => out.copy_from_slice(&h[row * t * c..row * t * c + c]),
                Pooling::Mean => {
                    let inv = 1.0 / Self::real_tokens(&self.pad, row, t) as f32;
                    for pos in (0..t).filter(|&pos| !self.pad[row * t + pos]) {
                        let hr = &h[(row * t + pos) * c..(row * t + pos + 1) * c];
                        out.iter_mut().zip(hr).for_each(|(o, v)| *o += v * inv);
                    }
                }
            }
        }
        Ok(())
    }
}

impl Model for Classifier {
    type Batch = ClassifyBatch;

    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn params(&self) -> &Params {
        &self.params
    }
    fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }

    fn loss_count(&self, batch: &ClassifyBatch) -> usize {
        batch.batch
    }

    /// Loss of predicting each row's label.
    fn forward(&mut self, batch: &ClassifyBatch, mode: Mode) -> Result<Forward<'_>> {
        self.head()?;
        let (b, t, k) = (batch.batch, batch.len, self.config.n_classes);
        let labels = &batch.labels;
        if labels.len() != b {
            return Err(shape_err("labels", b, labels.len()));
        }
        if let Some(row) = labels.iter().position(|&l| l as usize >= k) {
            return Err(Error::LabelOutOfRange {
                input: "labels",
                value: labels[row],
                row,
                n_classes: k,
            });
        }
        self.last = LastPass::Other("a failed forward");
        self.run(Tokens::new(&batch.tokens, b, t)?, mode)?;
        let logits = &self.logits[..b * k];
        let loss = loss_of(&Cpu, logits, &mut self.dlogits, labels, k, None, mode)?;
        self.last = LastPass::after_forward(mode, (b, t));
        Ok(Forward { loss, logits })
    }

    /// Blocks (last first), then the embeddings, final norm and head.
    fn grad_order(&self) -> Vec<Range<usize>> {
        super::grad_order(self.encoder.grad_order(), self.params.len())
    }

    fn backward_with(&mut self, scale: f32, ready: &mut dyn FnMut(usize, &[f32])) -> Result<()> {
        let (b, t) = self.last.take_for_backward()?;
        let (c, k) = (self.config.d_model, self.config.n_classes);
        let head = self
            .head
            .as_ref()
            .ok_or_else(|| Error::Usage("no class head".into()))?;
        let dlogits = &mut self.dlogits[..b * k];
        scale_grad(&Cpu, dlogits, scale);
        let (p, g) = (&self.params.data, &mut self.params.grad);
        let dpooled = buf(&mut self.dpooled, b * c);
        head.backward(
            &Cpu,
            p,
            g,
            &self.pooled[..b * c],
            dlogits,
            Some(dpooled),
            Acc::Set,
            BiasGrad::Compute,
        );
        let dh = buf(&mut self.dh, b * t * c);
        dh.iter_mut().for_each(|v| *v = 0.0);
        for (row, dp) in self.dpooled[..b * c].chunks(c).enumerate() {
            match self.config.pooling {
                Pooling::First => dh[row * t * c..row * t * c + c].copy_from_slice(dp),
                Pooling::Mean => {
                    let inv = 1.0 / Self::real_tokens(&self.pad, row, t) as f32;
                    for pos in (0..t).filter(|&pos| !self.pad[row * t + pos]) {
                        let d = &mut dh[(row * t + pos) * c..(row * t + pos + 1) * c];
                        d.iter_mut().zip(dp).for_each(|(o, v)| *o = v * inv);
                    }
                }
            }
        }
        let dx = self.encoder.backward(
            &Cpu,
            p,
            g,
            &self.dh[..b * t * c],
            InputGrad::Wanted,
            None,
            &mut super::count_blocks::<Cpu>(ready),
        );
        self.embed.backward(&Cpu, p, g, dx);
        Ok(())
    }
}
