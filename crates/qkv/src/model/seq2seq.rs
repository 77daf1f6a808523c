//! The encoder-decoder Transformer (Figure 1): source embedding → encoder; target embedding →
//! decoder over the encoder output → linear projection to target-vocabulary logits.

use super::config::{Family, ModelConfig};
use super::decoder::{DecoderStack, Memory};
use super::embedding::Embedding;
use super::encoder::EncoderStack;
use super::kv_cache::{Incremental, KvCache};
use super::linear::{project_out, project_out_backward};
use super::{buf, finite, Mode, Model, SiteIds, Tokens};
use crate::error::{shape_err, Error, Result};
use crate::kernels::attention::Masks;
use crate::kernels::loss::cross_entropy_forward_backward;
use crate::params::{Init, Param, ParamBuilder, Params};

pub struct Seq2Seq {
    pub config: ModelConfig,
    pub params: Params,
    pub src_embed: Embedding,
    pub tgt_embed: Embedding,
    pub encoder: EncoderStack,
    pub decoder: DecoderStack,
    /// (Vt, C): `output.weight`, or the target (or shared) embedding table when tied.
    pub output: Param,
    src_pad: Vec<bool>,
    tgt_pad: Vec<bool>,
    logits: Vec<f32>,
    dlogits: Vec<f32>,
    dmemory: Vec<f32>,
    ddec: Vec<f32>,
    shape: Option<(usize, usize, usize)>, // (B, S, T) of the last forward
}

impl Seq2Seq {
    pub fn new(config: ModelConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        if config.family != Family::Seq2seq {
            return Err(Error::Config(format!(
                "expected family seq2seq, got {:?}",
                config.family
            )));
        }
        let cfg = &config;
        let (c, vt) = (cfg.d_model, cfg.tgt_vocab());
        let mut pb = ParamBuilder::default();
        let mut sites = SiteIds::default();
        let src_embed = Embedding::new(
            &mut pb,
            "src_embed",
            None,
            "src_pos",
            cfg.vocab_size,
            c,
            cfg.max_len,
            cfg.positional,
            cfg.scale_embeddings,
            "source",
            sites.next(),
        );
        let shared = cfg.share_embeddings.then_some(src_embed.table);
        let tgt_embed = Embedding::new(
            &mut pb,
            "tgt_embed",
            shared,
            "tgt_pos",
            vt,
            c,
            cfg.max_len,
            cfg.positional,
            cfg.scale_embeddings,
            "target",
            sites.next(),
        );
        let encoder = EncoderStack::new(&mut pb, "encoder", cfg.n_encoder_layers, cfg, &mut sites);
        let decoder = DecoderStack::new(&mut pb, "decoder", cfg, &mut sites);
        let output = if cfg.share_embeddings || cfg.tie_output {
            tgt_embed.table
        } else {
            pb.add(
                "output.weight",
                &[vt, c],
                Init::Normal((c as f32).powf(-0.5)),
            )
        };
        Ok(Self {
            params: pb.build(seed),
            config,
            src_embed,
            tgt_embed,
            encoder,
            decoder,
            output,
            src_pad: Vec::new(),
            tgt_pad: Vec::new(),
            logits: Vec::new(),
            dlogits: Vec::new(),
            dmemory: Vec::new(),
            ddec: Vec::new(),
            shape: None,
        })
    }

    /// Encode the source: (B, S) → memory (B, S, C). The encoder stack keeps it as its output,
    /// which the decoder reads until the next `encode`.
    pub fn encode(&mut self, src: Tokens, mode: Mode) -> Result<&[f32]> {
        let p = &self.params.data;
        let x = self.src_embed.forward(p, src, mode)?;
        src.padding_mask(self.config.pad_id, &mut self.src_pad);
        let masks = Masks {
            key_padding: Some(&self.src_pad),
            causal: false,
            window: None,
        };
        Ok(self.encoder.forward(p, x, src.batch, src.len, &masks, mode))
    }

    /// Decode over the memory of the last [`Seq2Seq::encode`]: tgt_in (B, T) → logits (B, T, Vt).
    pub fn decode(&mut self, tgt_in: Tokens, mode: Mode) -> Result<&[f32]> {
        let (b, s) = (tgt_in.batch, self.src_pad.len() / tgt_in.batch.max(1));
        if self.src_pad.len() != b * s || s == 0 {
            return Err(shape_err(
                "decoder batch",
                format!(
                    "{} rows (the encoded source)",
                    self.src_pad.len() / s.max(1)
                ),
                b,
            ));
        }
        let p = &self.params.data;
        let c = self.config.d_model;
        let y = self.tgt_embed.forward(p, tgt_in, mode)?;
        tgt_in.padding_mask(self.config.pad_id, &mut self.tgt_pad);
        let masks = Masks {
            key_padding: Some(&self.tgt_pad),
            causal: true,
            window: None,
        };
        let memory = Memory {
            states: self.encoder.output(b * s * c),
            len: s,
            padding: Some(&self.src_pad),
        };
        let h = self
            .decoder
            .forward(p, y, b, tgt_in.len, &masks, memory, mode);
        let v = project_out(p, self.output, h, &mut self.logits, c);
        self.shape = Some((b, s, tgt_in.len));
        Ok(&self.logits[..b * tgt_in.len * v])
    }

    /// Full forward: (src (B, S), tgt_in (B, T)) → logits (B, T, Vt).
    pub fn forward(&mut self, src: Tokens, tgt_in: Tokens, mode: Mode) -> Result<&[f32]> {
        if src.batch != tgt_in.batch {
            return Err(shape_err(
                "target batch",
                format!("{} rows (as the source)", src.batch),
                tgt_in.batch,
            ));
        }
        self.encode(src, mode)?;
        self.decode(tgt_in, mode)
    }

    /// Loss of the last forward against `tgt_out` (B, T), and every parameter's gradient
    /// (overwriting `params.grad`).
    pub fn backward(&mut self, tgt_out: &[u32], label_smoothing: f32) -> Result<f32> {
        let (b, s, t) = self
            .shape
            .ok_or_else(|| Error::Config("backward called before forward".into()))?;
        let (c, vt) = (self.config.d_model, self.config.tgt_vocab());
        if tgt_out.len() != b * t {
            return Err(shape_err(
                "target output",
                format!("{b} x {t}"),
                tgt_out.len(),
            ));
        }
        Tokens {
            ids: tgt_out,
            batch: b,
            len: t,
        }
        .check_vocab("target output", vt)?;
        let dlogits = buf(&mut self.dlogits, b * t * vt);
        let (loss, _) = cross_entropy_forward_backward(
            dlogits,
            &self.logits[..b * t * vt],
            tgt_out,
            vt,
            Some(self.config.pad_id),
            label_smoothing,
        );
        finite("loss", loss)?;
        self.params.zero_grad();
        let (p, g) = (&self.params.data, &mut self.params.grad);
        let h = self.decoder.output(b * t * c);
        let ddec = buf(&mut self.ddec, b * t * c);
        project_out_backward(p, g, self.output, h, &self.dlogits[..b * t * vt], ddec, c);
        let dmemory = buf(&mut self.dmemory, b * s * c);
        dmemory.iter_mut().for_each(|v| *v = 0.0);
        let dy = self.decoder.backward(
            p,
            g,
            self.encoder.output(b * s * c),
            &self.ddec[..b * t * c],
            dmemory,
        );
        self.tgt_embed.backward(p, g, dy);
        let dx = self.encoder.backward(p, g, &self.dmemory[..b * s * c]);
        self.src_embed.backward(p, g, dx);
        Ok(loss)
    }

    /// Encode the source and start incremental decoding of its `B` rows for at most
    /// `max_len` target positions (BOS included): the cross-attention keys and values of every
    /// decoder layer are computed here, once.
    pub fn start_decoding(&mut self, src: Tokens, max_len: usize) -> Result<KvCache> {
        self.encode(src, Mode::EVAL)?;
        let (b, s, c) = (src.batch, src.len, self.config.d_model);
        let capacity = max_len.min(self.config.max_len);
        let mut cache = KvCache::new(
            b,
            capacity,
            c,
            self.decoder.layers.len(),
            self.config.recurrent_state(),
        );
        cache.cross_kv =
            self.decoder
                .memory_kv(&self.params.data, self.encoder.output(b * s * c), s);
        cache.src_padding = self.src_pad.clone();
        Ok(cache)
    }
}

impl Incremental for Seq2Seq {
    fn vocab(&self) -> usize {
        self.config.tgt_vocab()
    }

    fn step(&mut self, cache: &mut KvCache, tokens: &[u32]) -> Result<&[f32]> {
        cache.check_step(tokens, self.decoder.layers.len(), true)?;
        let (p, c) = (&self.params.data, self.config.d_model);
        let x = self.tgt_embed.step(p, tokens, cache.len)?;
        let h = self.decoder.step(p, x, cache);
        let v = project_out(p, self.output, h, &mut self.logits, c);
        cache.len += 1;
        Ok(&self.logits[..tokens.len() * v])
    }
}

impl Model for Seq2Seq {
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
