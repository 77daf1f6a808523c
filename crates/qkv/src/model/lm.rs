//! Decoder-only language model: embedding → causal self-attention blocks (the stack's block
//! without cross-attention, under a causal mask, as GPT) → projection to the vocabulary.

use super::config::{Family, ModelConfig};
use super::embedding::Embedding;
use super::kv_cache::{decoder_step, host_logits, Decoding, Incremental, KvCache};
use super::linear::{output_weight, project_out, project_out_backward};
use super::stack::{InputGrad, Stack};
use super::{check_family, loss_of, scale_grad, Forward, LastPass, Mode, Model, SiteIds, Tokens};
use crate::backend::{Backend, Cpu};
use crate::data::LmBatch;
use crate::error::{shape_err, Result};
use crate::kernels::attention::Masks;
use crate::params::{Param, ParamBuilder, Params};
use std::ops::Range;

pub struct LanguageModel<B: Backend = Cpu> {
    pub config: ModelConfig,
    pub params: Params<B>,
    pub embed: Embedding<B>,
    /// Named `decoder` in the checkpoint: blocks without cross-attention.
    pub decoder: Stack<B>,
    pub output: Param,
    pad: Vec<bool>,
    logits: B::Buf,
    /// A decoding step's logits copied to the host (a device model's; the CPU's are `logits`).
    step_logits: Vec<f32>,
    dlogits: B::Buf,
    dh: B::Buf,
    /// (B, T) of the last training forward.
    last: LastPass<(usize, usize)>,
    /// Decoding steps run their products in int8 (`--dtype int8`; see kernels::packed).
    pub int8_steps: bool,
    be: B,
}

impl LanguageModel {
    pub fn new(config: ModelConfig, seed: u64) -> Result<Self> {
        Self::on(Cpu, config, seed)
    }
}

impl<B: Backend> LanguageModel<B> {
    /// A new model whose parameters and activations live on `be`; initialised on the host
    /// from `seed` as on the CPU, so both devices start from the same weights.
    pub fn on(be: B, config: ModelConfig, seed: u64) -> Result<Self> {
        check_family(&config, Family::Lm)?;
        let cfg = &config;
        let c = cfg.d_model;
        let mut pb = ParamBuilder::default();
        let mut sites = SiteIds::default();
        let embed = Embedding::new(
            &mut pb,
            "embed",
            None,
            "pos",
            cfg.vocab_size,
            c,
            cfg.max_len,
            cfg.positional,
            cfg.scale_embeddings,
            "tokens",
            sites.next_id(),
        );
        let n_layers = cfg.n_decoder_layers;
        let decoder = Stack::new(&mut pb, "decoder", n_layers, false, cfg, &mut sites);
        let tied = cfg.tie_output.then_some(embed.table);
        let output = output_weight(&mut pb, tied, cfg.vocab_size, c);
        Ok(Self {
            params: Params::upload(&be, pb.build(seed)?),
            config,
            embed,
            decoder,
            output,
            pad: Vec::new(),
            logits: B::Buf::default(),
            step_logits: Vec::new(),
            dlogits: B::Buf::default(),
            dh: B::Buf::default(),
            last: LastPass::Nothing,
            int8_steps: false,
            be,
        })
    }

    /// Inference: tokens (B, T) → logits (B, T, V).
    pub fn logits(&mut self, tokens: Tokens) -> Result<B::Ref<'_>> {
        self.last = LastPass::Other("an inference forward");
        self.run(tokens, Mode::EVAL)
    }

    fn run(&mut self, tokens: Tokens, mode: Mode) -> Result<B::Ref<'_>> {
        let be = &self.be;
        let p = B::view(&self.params.data, self.params.len());
        let (b, t, c) = (tokens.batch, tokens.len, self.config.d_model);
        let x = self.embed.forward(be, p, tokens, mode)?;
        tokens.padding_mask(self.config.pad_id, &mut self.pad);
        let masks = Masks {
            key_padding: Some(&self.pad),
            causal: true,
            window: None,
        };
        let h = self.decoder.forward(be, p, x, b, t, &masks, None, mode);
        let v = project_out(be, p, self.output, h, &mut self.logits, c);
        Ok(B::view(&self.logits, b * t * v))
    }
}

impl<B: Decoding> LanguageModel<B> {
    /// Start incremental decoding of `rows` sequences of at most `max_len` positions.
    pub fn start_decoding(&mut self, rows: usize, max_len: usize) -> KvCache<B> {
        self.last = LastPass::Other("start_decoding");
        let capacity = max_len.min(self.config.max_len);
        let mut cache = KvCache::new(
            &self.be,
            rows,
            capacity,
            self.config.d_model,
            self.decoder.layers.len(),
            self.config.recurrent_state(),
        );
        cache.packed.int8 = self.int8_steps;
        cache
    }
}

impl<B: Backend> Model<B> for LanguageModel<B> {
    type Batch = LmBatch;

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

    fn loss_count(&self, batch: &LmBatch) -> usize {
        let pad = self.config.pad_id;
        batch.target.iter().filter(|&&t| t != pad).count()
    }

    /// Loss of predicting each next token (`target`, the input shifted by one), padding
    /// ignored.
    fn forward(&mut self, batch: &LmBatch, mode: Mode) -> Result<Forward<'_, B>> {
        let (b, t, v) = (batch.batch, batch.len, self.config.vocab_size);
        let targets = Tokens::new(&batch.target, b, t)
            .map_err(|_| shape_err("targets", format!("{b} x {t}"), batch.target.len()))?;
        targets.check_vocab("targets", v)?;
        self.last = LastPass::Other("a failed forward");
        self.run(Tokens::new(&batch.input, b, t)?, mode)?;
        let logits = B::view(&self.logits, b * t * v);
        let pad = Some(self.config.pad_id);
        let loss = loss_of(
            &self.be,
            logits,
            &mut self.dlogits,
            targets.ids,
            v,
            pad,
            mode,
        )?;
        self.last = LastPass::after_forward(mode, (b, t));
        Ok(Forward { loss, logits })
    }

    /// Blocks (last first), then the embeddings and the final norm.
    fn grad_order(&self) -> Vec<Range<usize>> {
        super::grad_order(self.decoder.grad_order(), self.params.len())
    }

    fn backward_with(
        &mut self,
        scale: f32,
        ready: &mut dyn FnMut(usize, B::Ref<'_>),
    ) -> Result<()> {
        let (b, t) = self.last.take_for_backward()?;
        let (c, v) = (self.config.d_model, self.config.vocab_size);
        let (be, len) = (&self.be, self.params.len());
        scale_grad(be, be.grow(&mut self.dlogits, b * t * v), scale);
        let p = B::view(&self.params.data, len);
        let mut g = be.grow(&mut self.params.grad, len);
        let dh = be.grow(&mut self.dh, b * t * c);
        let h = self.decoder.output(b * t * c);
        let dlogits = B::view(&self.dlogits, b * t * v);
        project_out_backward(be, p, B::reborrow(&mut g), self.output, h, dlogits, dh, c);
        let dx = self.decoder.backward(
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

impl<B: Decoding> Incremental<B> for LanguageModel<B> {
    fn vocab(&self) -> usize {
        self.config.vocab_size
    }

    fn step(&mut self, cache: &mut KvCache<B>, tokens: &[u32]) -> Result<&[f32]> {
        self.last = LastPass::Other("a decoding step");
        let (be, p) = (&self.be, B::view(&self.params.data, self.params.len()));
        let (embed, stack) = (&mut self.embed, &mut self.decoder);
        let logits = decoder_step(
            be,
            p,
            embed,
            stack,
            self.output,
            &mut self.logits,
            cache,
            tokens,
        )?;
        host_logits(be, logits, &mut self.step_logits)
    }
}
