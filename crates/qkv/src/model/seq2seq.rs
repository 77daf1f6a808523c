//! The encoder-decoder Transformer (Figure 1): source embedding → encoder; target embedding →
//! decoder over the encoder output → linear projection to target-vocabulary logits.

use super::config::{Family, ModelConfig};
use super::embedding::Embedding;
use super::kv_cache::{decoder_step, host_logits, Decoding, Incremental, KvCache};
use super::linear::{output_weight, project_out, project_out_backward};
use super::stack::{InputGrad, Memory, Stack};
use super::{check_family, loss_of, scale_grad, Forward, LastPass, Mode, Model, SiteIds, Tokens};
use crate::backend::{Backend, Cpu};
use crate::data::Seq2SeqBatch;
use crate::error::{shape_err, Result};
use crate::kernels::attention::Masks;
use crate::params::{Param, ParamBuilder, Params};
use std::ops::Range;

#[derive(Clone)]
pub struct Seq2Seq<B: Backend = Cpu> {
    pub config: ModelConfig,
    pub params: Params<B>,
    pub src_embed: Embedding<B>,
    pub tgt_embed: Embedding<B>,
    pub encoder: Stack<B>,
    pub decoder: Stack<B>,
    /// (Vt, C): `output.weight`, or the target (or shared) embedding table when tied.
    pub output: Param,
    src_pad: Vec<bool>,
    tgt_pad: Vec<bool>,
    logits: B::Buf,
    /// A decoding step's logits copied to the host (a device model's; the CPU's are `logits`).
    step_logits: Vec<f32>,
    dlogits: B::Buf,
    dmemory: B::Buf,
    ddec: B::Buf,
    /// (B, S) of the source the encoder holds, which `decode` must match.
    encoded: Option<(usize, usize)>,
    /// (B, S, T) of the last training forward.
    last: LastPass<(usize, usize, usize)>,
    /// Decoding steps run their products in int8 (`--dtype int8`; see kernels::packed).
    pub int8_steps: bool,
    /// Packed decoder weights shared with the other copies decoding the same call (see
    /// `kernels::packed::SharedPacks`); set by whoever made the copies, for that call only.
    pub(crate) shared_packs: Option<std::sync::Arc<crate::kernels::packed::SharedPacks>>,
    be: B,
}

impl Seq2Seq {
    pub fn new(config: ModelConfig, seed: u64) -> Result<Self> {
        Self::on(Cpu, config, seed)
    }
}

impl<B: Backend> Seq2Seq<B> {
    /// A new model whose parameters and activations live on `be`; initialised on the host
    /// from `seed` as on the CPU, so both devices start from the same weights.
    pub fn on(be: B, config: ModelConfig, seed: u64) -> Result<Self> {
        check_family(&config, Family::Seq2seq)?;
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
            sites.next_id(),
        )
        .with_token_types(&mut pb, "src_embed_types", cfg.token_types)
        .with_norm(
            &mut pb,
            "src_embed_norm",
            cfg.embed_norm,
            cfg.layer_norm_eps,
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
            sites.next_id(),
        )
        .with_token_types(&mut pb, "tgt_embed_types", cfg.token_types)
        .with_norm(
            &mut pb,
            "tgt_embed_norm",
            cfg.embed_norm,
            cfg.layer_norm_eps,
        );
        let (n_enc, n_dec) = (cfg.n_encoder_layers, cfg.n_decoder_layers);
        let encoder = Stack::new(&mut pb, "encoder", n_enc, false, cfg, &mut sites);
        let decoder = Stack::new(&mut pb, "decoder", n_dec, true, cfg, &mut sites);
        let tied = (cfg.share_embeddings || cfg.tie_output).then_some(tgt_embed.table);
        let output = output_weight(&mut pb, tied, vt, c);
        Ok(Self {
            params: Params::upload(&be, pb.build(seed)?),
            config,
            src_embed,
            tgt_embed,
            encoder,
            decoder,
            output,
            src_pad: Vec::new(),
            tgt_pad: Vec::new(),
            logits: B::Buf::default(),
            step_logits: Vec::new(),
            dlogits: B::Buf::default(),
            dmemory: B::Buf::default(),
            ddec: B::Buf::default(),
            encoded: None,
            last: LastPass::Nothing,
            int8_steps: false,
            shared_packs: None,
            be,
        })
    }

    /// Encode the source: (B, S) → memory (B, S, C). The encoder keeps it as its output,
    /// which [`Seq2Seq::decode`] reads until the next `encode`.
    pub fn encode(&mut self, src: Tokens) -> Result<B::Ref<'_>> {
        self.last = LastPass::Other("encode");
        self.run_encoder(src, Mode::EVAL)
    }

    /// Decode over the memory of the last [`Seq2Seq::encode`]: tgt_in (B, T) → logits
    /// (B, T, Vt). The batch must be the encoded source's.
    pub fn decode(&mut self, tgt_in: Tokens) -> Result<B::Ref<'_>> {
        self.last = LastPass::Other("decode");
        self.run_decoder(tgt_in, Mode::EVAL)
    }

    /// Inference over whole sequences: (src (B, S), tgt_in (B, T)) → logits (B, T, Vt).
    pub fn logits(&mut self, src: Tokens, tgt_in: Tokens) -> Result<B::Ref<'_>> {
        self.last = LastPass::Other("an inference forward");
        self.run(src, tgt_in, Mode::EVAL)
    }

    fn run(&mut self, src: Tokens, tgt_in: Tokens, mode: Mode) -> Result<B::Ref<'_>> {
        if src.batch != tgt_in.batch {
            return Err(shape_err(
                "target batch",
                format!("{} rows (as the source)", src.batch),
                tgt_in.batch,
            ));
        }
        self.run_encoder(src, mode)?;
        self.run_decoder(tgt_in, mode)
    }

    fn run_encoder(&mut self, src: Tokens, mode: Mode) -> Result<B::Ref<'_>> {
        let (be, p) = (&self.be, B::view(&self.params.data, self.params.len()));
        self.encoded = None;
        let x = self.src_embed.forward(be, p, src, mode)?;
        src.padding_mask(self.config.pad_id, &mut self.src_pad);
        let masks = Masks {
            key_padding: Some(&self.src_pad),
            causal: false,
            window: None,
        };
        let memory = self
            .encoder
            .forward(be, p, x, src.batch, src.len, &masks, None, mode);
        self.encoded = Some((src.batch, src.len));
        Ok(memory)
    }

    fn run_decoder(&mut self, tgt_in: Tokens, mode: Mode) -> Result<B::Ref<'_>> {
        let (b, s) = match self.encoded {
            Some((b, s)) if b == tgt_in.batch => (b, s),
            Some((b, _)) => {
                return Err(shape_err(
                    "decoder batch",
                    format!("{b} rows (the encoded source)"),
                    tgt_in.batch,
                ))
            }
            None => {
                return Err(crate::error::Error::Usage(
                    "decode needs an encoded source (call encode first)".into(),
                ))
            }
        };
        let (be, p) = (&self.be, B::view(&self.params.data, self.params.len()));
        let c = self.config.d_model;
        let y = self.tgt_embed.forward(be, p, tgt_in, mode)?;
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
            .forward(be, p, y, b, tgt_in.len, &masks, Some(memory), mode);
        let v = project_out(be, p, self.output, h, &mut self.logits, c);
        Ok(B::view(&self.logits, b * tgt_in.len * v))
    }
}

impl<B: Decoding> Seq2Seq<B> {
    /// Encode the source and start incremental decoding of its `B` rows for at most
    /// `max_len` target positions (BOS included): the cross-attention keys and values of every
    /// decoder layer are computed here, once.
    pub fn start_decoding(&mut self, src: Tokens, max_len: usize) -> Result<KvCache<B>> {
        self.encode(src)?;
        self.last = LastPass::Other("start_decoding");
        let (b, s, c) = (src.batch, src.len, self.config.d_model);
        let capacity = max_len.min(self.config.max_len);
        let be = &self.be;
        let mut cache = KvCache::new(
            be,
            b,
            capacity,
            c,
            self.decoder.layers.len(),
            self.config.recurrent_state(),
        );
        let p = B::view(&self.params.data, self.params.len());
        let memory = self.encoder.output(b * s * c);
        cache.cross_kv = self.decoder.memory_kv(be, p, memory, s);
        cache.src_padding = self.src_pad.clone();
        cache.src_len = vec![s; b];
        cache.packed.int8 = self.int8_steps;
        cache.packed.shared = self.shared_packs.clone();
        Ok(cache)
    }
}

impl<B: Backend> Model<B> for Seq2Seq<B> {
    type Batch = Seq2SeqBatch;

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

    fn loss_count(&self, batch: &Seq2SeqBatch) -> usize {
        batch.n_tokens
    }

    /// Loss of predicting `tgt_out` from (src, tgt_in), padding ignored.
    fn forward(&mut self, batch: &Seq2SeqBatch, mode: Mode) -> Result<Forward<'_, B>> {
        let (b, s, t) = (batch.batch, batch.src_len, batch.tgt_len);
        let vt = self.config.tgt_vocab();
        let tgt_out = Tokens::new(&batch.tgt_out, b, t)
            .map_err(|_| shape_err("target output", format!("{b} x {t}"), batch.tgt_out.len()))?;
        tgt_out.check_vocab("target output", vt)?;
        self.last = LastPass::Other("a failed forward");
        let src = Tokens::new(&batch.src, b, s)?;
        let tgt_in = Tokens::new(&batch.tgt_in, b, t)?;
        self.run(src, tgt_in, mode)?;
        let logits = B::view(&self.logits, b * t * vt);
        let pad = Some(self.config.pad_id);
        let loss = loss_of(
            &self.be,
            logits,
            &mut self.dlogits,
            tgt_out.ids,
            vt,
            pad,
            mode,
        )?;
        self.last = LastPass::after_forward(mode, (b, s, t));
        Ok(Forward { loss, logits })
    }

    /// Decoder blocks (last first), then encoder blocks, then embeddings and final norms.
    fn grad_order(&self) -> Vec<Range<usize>> {
        let blocks = self.decoder.grad_order().chain(self.encoder.grad_order());
        super::grad_order(blocks, self.params.len())
    }

    fn backward_with(
        &mut self,
        scale: f32,
        ready: &mut dyn FnMut(usize, B::Ref<'_>),
    ) -> Result<()> {
        let (b, s, t) = self.last.take_for_backward()?;
        let (c, vt) = (self.config.d_model, self.config.tgt_vocab());
        let (be, len) = (&self.be, self.params.len());
        scale_grad(be, be.grow(&mut self.dlogits, b * t * vt), scale);
        let p = B::view(&self.params.data, len);
        let mut g = be.grow(&mut self.params.grad, len);
        let h = self.decoder.output(b * t * c);
        let dlogits = B::view(&self.dlogits, b * t * vt);
        let ddec = be.grow(&mut self.ddec, b * t * c);
        project_out_backward(be, p, B::reborrow(&mut g), self.output, h, dlogits, ddec, c);
        be.zero(be.grow(&mut self.dmemory, b * s * c));
        let memory = self.encoder.output(b * s * c);
        let mut done = super::count_blocks::<B>(ready);
        let dy = self.decoder.backward(
            be,
            p,
            B::reborrow(&mut g),
            B::view(&self.ddec, b * t * c),
            InputGrad::Wanted,
            Some((memory, be.grow(&mut self.dmemory, b * s * c))),
            &mut done,
        );
        self.tgt_embed.backward(be, p, B::reborrow(&mut g), dy);
        let dx = self.encoder.backward(
            be,
            p,
            B::reborrow(&mut g),
            B::view(&self.dmemory, b * s * c),
            InputGrad::Wanted,
            None,
            &mut done,
        );
        self.src_embed.backward(be, p, g, dx);
        be.sync()
    }
}

impl<B: Decoding> Incremental<B> for Seq2Seq<B> {
    fn vocab(&self) -> usize {
        self.config.tgt_vocab()
    }

    fn step(&mut self, cache: &mut KvCache<B>, tokens: &[u32]) -> Result<&[f32]> {
        self.last = LastPass::Other("a decoding step");
        let (be, p) = (&self.be, B::view(&self.params.data, self.params.len()));
        let (embed, stack) = (&mut self.tgt_embed, &mut self.decoder);
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
