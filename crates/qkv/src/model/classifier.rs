//! Encoder-only classifier: embedding → encoder → pooling (mean over real tokens, or the first
//! token) → linear class head. With `n_classes: 0` there is no head and the model computes
//! sentence embeddings (`features`), as sentence-transformers does with a BERT-family encoder.

use super::config::{Family, ModelConfig, Pooling};
use super::embedding::Embedding;
use super::linear::BiasGrad;
use super::linear::Linear;
use super::stack::{InputGrad, Stack};
use super::{check_family, loss_of, scale_grad, Forward, LastPass, Mode, Model, SiteIds, Tokens};
use crate::backend::{Backend, Cpu};
use crate::data::ClassifyBatch;
use crate::error::{shape_err, Error, Result};
use crate::kernels::attention::Masks;
use crate::kernels::pool::Pool;
use crate::kernels::Acc;
use crate::params::{ParamBuilder, Params};
use std::borrow::Cow;
use std::ops::Range;

pub struct Classifier<B: Backend = Cpu> {
    pub config: ModelConfig,
    pub params: Params<B>,
    pub embed: Embedding<B>,
    pub encoder: Stack<B>,
    /// None when `n_classes` is 0 (an embedding model).
    pub head: Option<Linear>,
    pad: Vec<bool>,
    pooled: B::Buf, // (B, C)
    logits: B::Buf, // (B, K)
    dlogits: B::Buf,
    dpooled: B::Buf,
    dh: B::Buf, // (B, T, C)
    /// (B, T) of the last training forward.
    last: LastPass<(usize, usize)>,
    be: B,
}

impl Classifier {
    pub fn new(config: ModelConfig, seed: u64) -> Result<Self> {
        Self::on(Cpu, config, seed)
    }
}

impl<B: Backend> Classifier<B> {
    /// A new model whose parameters and activations live on `be`; initialised on the host
    /// from `seed` as on the CPU, so both devices start from the same weights.
    pub fn on(be: B, config: ModelConfig, seed: u64) -> Result<Self> {
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
            params: Params::upload(&be, pb.build(seed)?),
            config,
            embed,
            encoder,
            head,
            pad: Vec::new(),
            pooled: B::Buf::default(),
            logits: B::Buf::default(),
            dlogits: B::Buf::default(),
            dpooled: B::Buf::default(),
            dh: B::Buf::default(),
            last: LastPass::Nothing,
            be,
        })
    }

    /// Inference: tokens (B, T) → logits (B, K).
    pub fn logits(&mut self, tokens: Tokens) -> Result<B::Ref<'_>> {
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

    fn run(&mut self, tokens: Tokens, mode: Mode) -> Result<B::Ref<'_>> {
        self.head()?;
        let b = tokens.batch;
        self.pool(tokens, mode)?;
        let (k, c, be) = (self.config.n_classes, self.config.d_model, &self.be);
        if let Some(head) = &self.head {
            let p = B::view(&self.params.data, self.params.len());
            let logits = be.grow(&mut self.logits, b * k);
            head.forward(be, p, B::view(&self.pooled, b * c), logits);
        }
        Ok(B::view(&self.logits, b * k))
    }

    /// Embedding → encoder → pooling into `self.pooled` (B, C).
    fn pool(&mut self, tokens: Tokens, mode: Mode) -> Result<()> {
        let (be, p) = (&self.be, B::view(&self.params.data, self.params.len()));
        let (b, t, c) = (tokens.batch, tokens.len, self.config.d_model);
        let x = self.embed.forward(be, p, tokens, mode)?;
        tokens.padding_mask(self.config.pad_id, &mut self.pad);
        let masks = Masks {
            key_padding: Some(&self.pad),
            causal: false,
            window: None,
        };
        let pool = pooling(&self.config);
        let h = self.encoder.forward(be, p, x, b, t, &masks, None, mode);
        be.pool_forward(be.grow(&mut self.pooled, b * c), h, &self.pad, (t, c), pool);
        Ok(())
    }
}

impl<B: Backend> Classifier<B> {
    /// Sentence embeddings: tokens (B, T) → pooled encoder states (B, C), each row scaled to
    /// unit L2 norm (sentence-transformers' `Normalize`), on the host. Evaluation mode.
    pub fn features(&mut self, tokens: Tokens) -> Result<Cow<'_, [f32]>> {
        self.last = LastPass::Other("features");
        let (n, c) = (tokens.batch * self.config.d_model, self.config.d_model);
        self.pool(tokens, Mode::EVAL)?;
        // On the host: a few floats per row, where the CPU has them already.
        let be = &self.be;
        be.host_mut(be.grow(&mut self.pooled, n), &mut |pooled| {
            for row in pooled.chunks_mut(c) {
                // F.normalize's eps keeps an all-zero row finite.
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                row.iter_mut().for_each(|v| *v /= norm);
            }
            Ok(())
        })?;
        be.to_host(B::view(&self.pooled, n))
    }
}

impl<B: Backend> Model<B> for Classifier<B> {
    type Batch = ClassifyBatch;

    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn params(&self) -> &Params<B> {
        &self.params
    }
    fn params_mut(&mut self) -> &mut Params<B> {
        &mut self.params
    }
    fn backend(&self) -> &B {
        &self.be
    }

    fn loss_count(&self, batch: &ClassifyBatch) -> usize {
        batch.batch
    }

    /// Loss of predicting each row's label.
    fn forward(&mut self, batch: &ClassifyBatch, mode: Mode) -> Result<Forward<'_, B>> {
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
        let logits = B::view(&self.logits, b * k);
        let loss = loss_of(&self.be, logits, &mut self.dlogits, labels, k, None, mode)?;
        self.last = LastPass::after_forward(mode, (b, t));
        Ok(Forward { loss, logits })
    }

    /// Blocks (last first), then the embeddings, final norm and head.
    fn grad_order(&self) -> Vec<Range<usize>> {
        super::grad_order(self.encoder.grad_order(), self.params.len())
    }

    fn backward_with(
        &mut self,
        scale: f32,
        ready: &mut dyn FnMut(usize, B::Ref<'_>),
    ) -> Result<()> {
        let (b, t) = self.last.take_for_backward()?;
        let (c, k) = (self.config.d_model, self.config.n_classes);
        let head = self
            .head
            .as_ref()
            .ok_or_else(|| Error::Usage("no class head".into()))?;
        let (be, len) = (&self.be, self.params.len());
        scale_grad(be, be.grow(&mut self.dlogits, b * k), scale);
        let p = B::view(&self.params.data, len);
        let mut g = be.grow(&mut self.params.grad, len);
        let dpooled = be.grow(&mut self.dpooled, b * c);
        let (pooled, dlogits) = (B::view(&self.pooled, b * c), B::view(&self.dlogits, b * k));
        let g1 = B::reborrow(&mut g);
        head.backward(
            be,
            p,
            g1,
            pooled,
            dlogits,
            Some(dpooled),
            Acc::Set,
            BiasGrad::Compute,
        );
        let dh = be.grow(&mut self.dh, b * t * c);
        let pool = pooling(&self.config);
        be.pool_backward(dh, B::view(&self.dpooled, b * c), &self.pad, (t, c), pool);
        let dx = self.encoder.backward(
            be,
            p,
            B::reborrow(&mut g),
            B::view(&self.dh, b * t * c),
            InputGrad::Wanted,
            None,
            &mut super::count_blocks::<B>(ready),
        );
        self.embed.backward(be, p, g, dx);
        be.sync()
    }
}

/// The pooling kernel for the configured pooling.
fn pooling(cfg: &ModelConfig) -> Pool {
    match cfg.pooling {
        Pooling::First => Pool::First,
        Pooling::Mean => Pool::Mean,
    }
}
