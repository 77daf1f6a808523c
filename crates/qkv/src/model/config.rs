//! Model configuration: plain serde data with named presets, saved beside every checkpoint.

use crate::error::{Error, Result};
use crate::kernels::activation::Activation;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Encoder-decoder (Figure 1).
    Seq2seq,
    /// Encoder-only with a pooled class head.
    Classifier,
    /// Decoder-only, causal.
    Lm,
}

impl Family {
    /// The name configs use.
    pub fn name(self) -> &'static str {
        match self {
            Family::Seq2seq => "seq2seq",
            Family::Classifier => "classifier",
            Family::Lm => "lm",
        }
    }
}

/// Where LayerNorm sits around each sublayer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormPlacement {
    /// `LN(x + Sublayer(x))`, the paper's placement (§3.1).
    Post,
    /// `x + Sublayer(LN(x))`, with a final LN after the stack (Xiong et al., 2020).
    Pre,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positional {
    /// Fixed sinusoids (§3.5).
    Sinusoidal,
    /// A learned (max_len, C) table.
    Learned,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean over non-padding positions.
    Mean,
    /// The first position (a [CLS]-style token).
    First,
}

/// Which attention kernel a model's layers use (the backends name their kernels by it).
pub use crate::kernels::attention::AttentionKind;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub family: Family,
    /// Source (or only) vocabulary size.
    pub vocab_size: usize,
    /// Target vocabulary for seq2seq; `None` means the same as `vocab_size`.
    #[serde(default)]
    pub tgt_vocab_size: Option<usize>,
    /// Classes of the classifier head.
    #[serde(default)]
    pub n_classes: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub d_ff: usize,
    #[serde(default)]
    pub n_encoder_layers: usize,
    #[serde(default)]
    pub n_decoder_layers: usize,
    pub max_len: usize,
    pub dropout: f32,
    pub activation: Activation,
    pub norm: NormPlacement,
    pub positional: Positional,
    /// Multiply embeddings by √C (§3.4).
    pub scale_embeddings: bool,
    /// Output projection shares the target embedding (§3.4).
    pub tie_output: bool,
    /// Seq2seq: one table for source, target and output (requires one vocabulary).
    #[serde(default)]
    pub share_embeddings: bool,
    #[serde(default = "default_pooling")]
    pub pooling: Pooling,
    #[serde(default)]
    pub pad_id: u32,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f32,
    #[serde(default)]
    pub attention: AttentionKind,
    /// Sliding-window self-attention: each query sees the `w` nearest keys on each side
    /// (|i − j| < w), or the `w` most recent ones under the causal mask. Softmax kinds only.
    #[serde(default)]
    pub attention_window: Option<usize>,
    /// Token-type (segment) embeddings, BERT's `type_vocab_size`; 0 means none. qkv feeds one
    /// segment per input, so every token has type 0. Classifier, and both embeddings of
    /// seq2seq (BERT-layout stacks).
    #[serde(default)]
    pub token_types: usize,
    /// LayerNorm over the summed embeddings, applied before dropout (BERT). Classifier, and
    /// both embeddings of seq2seq (a BERT-layout encoder under a decoder of the same layout,
    /// Rothe et al., 2020).
    #[serde(default)]
    pub embed_norm: bool,
}

fn default_pooling() -> Pooling {
    Pooling::Mean
}
fn default_eps() -> f32 {
    1e-5
}

impl ModelConfig {
    /// Named presets. `base` is the paper's base model (Table 3); `small` and `tiny` fit this
    /// 2-core machine. The family decides which stacks exist.
    pub fn preset(name: &str, family: Family, vocab_size: usize) -> Result<Self> {
        let (layers, d_model, n_heads, d_ff, dropout) = match name {
            "base" => (6, 512, 8, 2048, 0.1),
            "small" => (3, 256, 4, 1024, 0.1),
            "tiny" => (2, 64, 4, 256, 0.1),
            other => {
                return Err(Error::Config(format!(
                    "unknown preset '{other}' (expected base, small or tiny)"
                )))
            }
        };
        Ok(Self {
            family,
            vocab_size,
            tgt_vocab_size: None,
            n_classes: if family == Family::Classifier { 2 } else { 0 },
            d_model,
            n_heads,
            d_ff,
            n_encoder_layers: if family == Family::Lm { 0 } else { layers },
            n_decoder_layers: if family == Family::Classifier {
                0
            } else {
                layers
            },
            max_len: 512,
            dropout,
            activation: Activation::Relu,
            norm: NormPlacement::Post,
            positional: Positional::Sinusoidal,
            scale_embeddings: true,
            tie_output: family != Family::Classifier,
            share_embeddings: false,
            pooling: Pooling::Mean,
            pad_id: 0,
            layer_norm_eps: 1e-5,
            attention: AttentionKind::Flash,
            attention_window: None,
            token_types: 0,
            embed_norm: false,
        })
    }

    pub fn tgt_vocab(&self) -> usize {
        self.tgt_vocab_size.unwrap_or(self.vocab_size)
    }

    /// Floats of recurrent decoding state per row and layer: linear attention keeps (S, z) per
    /// head, (D·D + D) floats; softmax attention keeps keys and values instead (0 here).
    pub fn recurrent_state(&self) -> usize {
        match self.attention {
            AttentionKind::Linear => self.d_model * (self.head_dim() + 1),
            _ => 0,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Reject configurations the model cannot be built from, naming the field. Sizes come
    /// from users' files, so each has a cap far above any trained model's; a size above it
    /// is an error rather than an allocation that aborts the process.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        for (field, value, cap) in [
            ("d_model", self.d_model, 1 << 16),
            ("n_heads", self.n_heads, 1 << 12),
            ("d_ff", self.d_ff, 1 << 20),
            ("vocab_size", self.vocab_size, 1 << 24),
            ("tgt_vocab_size", self.tgt_vocab_size.unwrap_or(0), 1 << 24),
            ("n_classes", self.n_classes, 1 << 20),
            ("n_encoder_layers", self.n_encoder_layers, 1 << 10),
            ("n_decoder_layers", self.n_decoder_layers, 1 << 10),
            ("max_len", self.max_len, 1 << 20),
            ("token_types", self.token_types, 1 << 10),
        ] {
            if value > cap {
                return bad(format!("{field} {value} is above the cap of {cap}"));
            }
        }
        // The sinusoidal table (or learned positions) holds max_len × d_model floats.
        if self.max_len * self.d_model > 1 << 30 {
            return bad(format!(
                "max_len {} × d_model {} positions exceed the cap of 2^30 values",
                self.max_len, self.d_model
            ));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return bad(format!(
                "layer_norm_eps must be positive, got {}",
                self.layer_norm_eps
            ));
        }
        for (field, value) in [
            ("d_model", self.d_model),
            ("n_heads", self.n_heads),
            ("d_ff", self.d_ff),
            ("max_len", self.max_len),
            ("vocab_size", self.vocab_size),
            ("tgt_vocab_size", self.tgt_vocab()),
        ] {
            if value == 0 {
                return bad(format!("{field} must be positive, got 0"));
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return bad(format!(
                "d_model {} is not divisible by n_heads {}",
                self.d_model, self.n_heads
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} is outside [0, 1)", self.dropout));
        }
        if self.pad_id as usize >= self.vocab_size {
            return bad(format!(
                "pad_id {} is outside the vocabulary (size {})",
                self.pad_id, self.vocab_size
            ));
        }
        match (self.attention, self.attention_window) {
            (_, Some(0)) => return bad("attention_window must be positive".into()),
            (AttentionKind::Linear, Some(_)) => {
                return bad("attention_window applies to softmax attention, not linear".into())
            }
            _ => {}
        }
        if self.family == Family::Lm && (self.token_types > 0 || self.embed_norm) {
            return bad(
                "token_types and embed_norm are supported by the classifier and seq2seq only"
                    .into(),
            );
        }
        match self.family {
            Family::Seq2seq => {
                if self.n_encoder_layers == 0 || self.n_decoder_layers == 0 {
                    return bad(
                        "seq2seq needs n_encoder_layers > 0 and n_decoder_layers > 0".into(),
                    );
                }
                if self.share_embeddings && self.tgt_vocab() != self.vocab_size {
                    return bad(format!(
                        "share_embeddings needs one vocabulary, got {} and {}",
                        self.vocab_size,
                        self.tgt_vocab()
                    ));
                }
            }
            Family::Classifier => {
                // n_classes 0 is an encoder without a head: it computes sentence embeddings.
                if self.n_encoder_layers == 0 || self.n_classes == 1 {
                    return bad(format!(
                        "classifier needs n_encoder_layers > 0 and n_classes 0 (embeddings only) or >= 2 (got {} and {})",
                        self.n_encoder_layers, self.n_classes
                    ));
                }
            }
            Family::Lm => {
                if self.n_decoder_layers == 0 {
                    return bad("lm needs n_decoder_layers > 0".into());
                }
            }
        }
        Ok(())
    }
}
