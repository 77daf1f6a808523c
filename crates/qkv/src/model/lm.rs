//! Decoder-only language model: embedding → causal self-attention layers (the encoder block
//! with a causal mask, as GPT) → projection to the vocabulary.

use super::config::{Family, ModelConfig};
use super::embedding::Embedding;
use super::encoder::EncoderStack;
use super::kv_cache::{Incremental, KvCache};
use super::linear::{project_out, project_out_backward};
use super::{buf, finite, Mode, Model, SiteIds, Tokens};
use crate::error::{shape_err, Error, Result};
use crate::kernels::attention::Masks;
use crate::kernels::loss::cross_entropy_forward_backward;
use crate::params::{Init, Param, ParamBuilder, Params};

pub struct LanguageModel {
    pub config: ModelConfig,
    pub params: Params,
    pub embed: Embedding,
    /// Named `decoder` in the checkpoint: decoder-only layers (no cross-attention).
    pub decoder: EncoderStack,
    pub output: Param,
    pad: Vec<bool>,
    logits: Vec<f32>,
    dlogits: Vec<f32>,
    dh: Vec<f32>,
    shape: Option<(usize, usize)>,
}

impl LanguageModel {
    pub fn new(config: ModelConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        if config.family != Family::Lm {
            return Err(Error::Config(format!(
                "expected family lm, got {:?}",
                config.family
            )));
        }
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
            sites.next(),
        );
        let decoder = EncoderStack::new(&mut pb, "decoder", cfg.n_decoder_layers, cfg, &mut sites);
        let output = if cfg.tie_output {
            embed.table
        } else {
            pb.add(
                "output.weight",
                &[cfg.vocab_size, c],
                Init::Normal((c as f32).powf(-0.5)),
            )
        };
        Ok(Self {
            params: pb.build(seed),
            config,
            embed,
            decoder,
            output,
            pad: Vec::new(),
            logits: Vec::new(),
            dlogits: Vec::new(),
            dh: Vec::new(),
            shape: None,
        })
    }

    /// tokens: (B, T) → logits (B, T, V)
    pub fn forward(&mut self, tokens: Tokens, mode: Mode) -> Result<&[f32]> {
        let p = &self.params.data;
        let (b, t, c) = (tokens.batch, tokens.len, self.config.d_model);
        let x = self.embed.forward(p, tokens, mode)?;
        tokens.padding_mask(self.config.pad_id, &mut self.pad);
        let masks = Masks {
            key_padding: Some(&self.pad),
            causal: true,
            window: None,
        };
        let h = self.decoder.forward(p, x, b, t, &masks, mode);
        let v = project_out(p, self.output, h, &mut self.logits, c);
        self.shape = Some((b, t));
        Ok(&self.logits[..b * t * v])
    }

    /// Loss of the last forward against next-token `targets` (B, T), and every gradient.
    pub fn backward(&mut self, targets: &[u32], label_smoothing: f32) -> Result<f32> {
        let (b, t) = self
            .shape
            .ok_or_else(|| Error::Config("backward called before forward".into()))?;
        let (c, v) = (self.config.d_model, self.config.vocab_size);
        if targets.len() != b * t {
            return Err(shape_err("targets", format!("{b} x {t}"), targets.len()));
        }
        Tokens {
            ids: targets,
            batch: b,
            len: t,
        }
        .check_vocab("targets", v)?;
        let dlogits = buf(&mut self.dlogits, b * t * v);
        let (loss, _) = cross_entropy_forward_backward(
            dlogits,
            &self.logits[..b * t * v],
            targets,
            v,
            Some(self.config.pad_id),
            label_smoothing,
        );
        finite("loss", loss)?;
        self.params.zero_grad();
        let (p, g) = (&self.params.data, &mut self.params.grad);
        let dh = buf(&mut self.dh, b * t * c);
        project_out_backward(
            p,
            g,
            self.output,
            self.decoder.output(b * t * c),
            &self.dlogits[..b * t * v],
            dh,
            c,
        );
        let dx = self.decoder.backward(p, g, &self.dh[..b * t * c]);
        self.embed.backward(p, g, dx);
        Ok(loss)
    }
}

impl LanguageModel {
    /// Start incremental decoding of `rows` sequences of at most `max_len` positions.
    pub fn start_decoding(&self, rows: usize, max_len: usize) -> KvCache {
        let capacity = max_len.min(self.config.max_len);
        KvCache::new(
            rows,
            capacity,
            self.config.d_model,
            self.decoder.layers.len(),
            self.config.recurrent_state(),
        )
    }
}

impl Incremental for LanguageModel {
    fn vocab(&self) -> usize {
        self.config.vocab_size
    }

    fn step(&mut self, cache: &mut KvCache, tokens: &[u32]) -> Result<&[f32]> {
        cache.check_step(tokens, self.decoder.layers.len(), false)?;
        let (p, c) = (&self.params.data, self.config.d_model);
        let x = self.embed.step(p, tokens, cache.len)?;
        let h = self.decoder.step(p, x, cache);
        let v = project_out(p, self.output, h, &mut self.logits, c);
        cache.len += 1;
        Ok(&self.logits[..tokens.len() * v])
    }
}

impl Model for LanguageModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn params(&self) -> &Params {
        &self.params
    }
    fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }
}
