//! Pretrained Hugging Face BERT-family encoders (BERT, MiniLM, …) from their hub layout
//! (`config.json`, `model.safetensors`, `tokenizer.json`, and sentence-transformers'
//! `sentence_bert_config.json` when present), mapped onto qkv's classifier: a post-LN encoder
//! with GELU, learned positions, token types and a LayerNorm over the embeddings; or onto a
//! seq2seq model of the same layout whose encoder and decoder start from it, all but the
//! decoder's cross-attention (Rothe et al., 2020, "Leveraging Pre-trained Checkpoints for
//! Sequence Generation Tasks": BERT2BERT).
//!
//! BERT keeps separate query/key/value projections; qkv fuses them into one (3C, C) matrix in
//! PyTorch's `in_proj` order [Q; K; V], so loading concatenates them. Everything else is a
//! rename. Tensors of heads qkv does not have (`pooler.*`, `cls.*`) are ignored; any other
//! unknown tensor is an error, so a different architecture is never loaded silently.

use crate::checkpoint::{ck_err, io_err, TensorData, TensorFile};
use crate::data::Tokenizer;
use crate::error::{Error, Result};
use crate::kernels::activation::Activation;
use crate::model::{
    AttentionKind, Classifier, Family, ModelConfig, NormPlacement, Pooling, Positional,
};
use crate::params::Params;
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// sentence-transformers' settings (`max_seq_length`), beside the model files.
pub const SENTENCE_CONFIG_FILE: &str = "sentence_bert_config.json";

/// The fields of a BERT `config.json` that decide the computation.
#[derive(Debug, Deserialize)]
struct BertConfig {
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    hidden_act: String,
    max_position_embeddings: usize,
    #[serde(default)]
    type_vocab_size: usize,
    #[serde(default = "bert_eps")]
    layer_norm_eps: f32,
    #[serde(default)]
    pad_token_id: u32,
    #[serde(default = "bert_dropout")]
    hidden_dropout_prob: f32,
    #[serde(default)]
    position_embedding_type: Option<String>,
}

fn bert_eps() -> f32 {
    1e-12
}
fn bert_dropout() -> f32 {
    0.1
}

#[derive(Debug, Deserialize)]
struct SentenceConfig {
    max_seq_length: usize,
}

/// True when `dir` holds a Hugging Face model (its `config.json` has no qkv `family`).
pub fn is_hf_dir(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(CONFIG_FILE)) else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(&text)
        .map(|v| v.get("family").is_none() && v.get("hidden_size").is_some())
        .unwrap_or(false)
}

/// A BERT-family encoder directory: its qkv model config and tokenizer.
pub struct HfEncoder {
    pub dir: PathBuf,
    /// The equivalent qkv config: a classifier with `n_classes` 0 (embeddings only).
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    /// Rows of the pretrained position table (`max_position_embeddings`).
    pub max_positions: usize,
}

impl HfEncoder {
    /// Read `config.json` (and `sentence_bert_config.json`, which caps the input length as
    /// sentence-transformers does) and `tokenizer.json` from `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let bert: BertConfig = serde_json::from_str(&text)
            .map_err(|e| ck_err(&path, format!("not a BERT config.json ({e})")))?;
        let unsupported = |what: String| Err(ck_err(&path, what));
        match bert.model_type.as_deref() {
            None | Some("bert") => {}
            Some(other) => {
                return unsupported(format!(
                    "model_type '{other}' is not supported (qkv loads BERT-family encoders: model_type bert)"
                ))
            }
        }
        let activation = match bert.hidden_act.as_str() {
            "gelu" => Activation::Gelu,
            "relu" => Activation::Relu,
            other => {
                return unsupported(format!(
                    "hidden_act '{other}' is not supported (expected gelu or relu)"
                ))
            }
        };
        if let Some(kind) = bert.position_embedding_type.as_deref() {
            if kind != "absolute" {
                return unsupported(format!(
                    "position_embedding_type '{kind}' is not supported (expected absolute)"
                ));
            }
        }
        let mut max_len = bert.max_position_embeddings;
        let st_path = dir.join(SENTENCE_CONFIG_FILE);
        if st_path.exists() {
            let text = std::fs::read_to_string(&st_path).map_err(io_err(&st_path))?;
            let st: SentenceConfig = serde_json::from_str(&text)
                .map_err(|e| ck_err(&st_path, format!("invalid ({e})")))?;
            max_len = max_len.min(st.max_seq_length);
        }
        let config = ModelConfig {
            family: Family::Classifier,
            vocab_size: bert.vocab_size,
            tgt_vocab_size: None,
            n_classes: 0,
            d_model: bert.hidden_size,
            n_heads: bert.num_attention_heads,
            d_ff: bert.intermediate_size,
            n_encoder_layers: bert.num_hidden_layers,
            n_decoder_layers: 0,
            max_len,
            dropout: bert.hidden_dropout_prob,
            activation,
            norm: NormPlacement::Post,
            positional: Positional::Learned,
            scale_embeddings: false,
            tie_output: false,
            share_embeddings: false,
            pooling: Pooling::Mean,
            pad_id: bert.pad_token_id,
            layer_norm_eps: bert.layer_norm_eps,
            attention: AttentionKind::Flash,
            attention_window: None,
            token_types: bert.type_vocab_size,
            embed_norm: true,
        };
        config
            .validate()
            .map_err(|e| ck_err(&path, e.to_string()))?;
        let tokenizer = Tokenizer::load(&dir.join(TOKENIZER_FILE))?;
        if tokenizer.pad != config.pad_id {
            return Err(Error::Tokenizer(format!(
                "{}: padding token has id {}, but {} says pad_token_id {}",
                dir.join(TOKENIZER_FILE).display(),
                tokenizer.pad,
                path.display(),
                config.pad_id
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            tokenizer,
            max_positions: bert.max_position_embeddings,
        })
    }

    /// The encoder as an embedding model (no head), weights loaded.
    pub fn embedding_model(&self) -> Result<Classifier> {
        let mut model = Classifier::new(self.config.clone(), 0)?;
        self.load_weights(&mut model)?;
        Ok(model)
    }

    /// Copy the pretrained weights into `model`, an encoder built from this config (possibly
    /// with a class head, which keeps its initialization, and a shorter `max_len`: the first
    /// `max_len` position rows are used).
    pub fn load_weights(&self, model: &mut Classifier) -> Result<()> {
        self.load_into(&mut model.params, |name| {
            (!name.starts_with("head.")).then(|| name.to_string())
        })?;
        Ok(())
    }

    /// This encoder under a decoder of the same layout (Rothe et al., 2020): a
    /// seq2seq config whose encoder is the pretrained one (post-LN, GELU, learned positions,
    /// token types, embedding LayerNorm) and whose decoder has as many layers, one shared
    /// WordPiece vocabulary and an output tied to it. The input may be as long as the
    /// pretrained position table (sentence-transformers' shorter cap is for embeddings).
    pub fn seq2seq_config(&self) -> ModelConfig {
        ModelConfig {
            family: Family::Seq2seq,
            n_decoder_layers: self.config.n_encoder_layers,
            max_len: self.max_positions,
            share_embeddings: true,
            tie_output: true,
            ..self.config.clone()
        }
    }

    /// Warm-start a seq2seq model built from [`HfEncoder::seq2seq_config`] (`params` in
    /// [`Seq2Seq`](crate::model::Seq2Seq)'s naming) as Rothe et al.'s BERT2BERT: the encoder,
    /// the shared embeddings, the target's positions and embedding norm, and each decoder
    /// layer's self-attention and feed-forward sublayers (layer `i` from encoder layer `i`;
    /// layers beyond the encoder's depth keep their initialization) come from the pretrained
    /// weights; cross-attention starts from scratch. Returns (tensors copied, tensors of the
    /// model).
    pub fn init_seq2seq(&self, params: &mut Params) -> Result<(usize, usize)> {
        let depth = self.config.n_encoder_layers;
        let copied = self.load_into(params, |name| seq2seq_to_encoder_name(name, depth))?;
        Ok((copied, params.specs.len()))
    }

    /// Copy every parameter of `params` that `rename` maps to an encoder parameter name
    /// (qkv's classifier naming) from its BERT tensor(s). Every tensor of the file must be
    /// used, except heads qkv has no counterpart for. Returns the parameters copied.
    fn load_into(
        &self,
        params: &mut Params,
        rename: impl Fn(&str) -> Option<String>,
    ) -> Result<usize> {
        let path = self.dir.join(WEIGHTS_FILE);
        let file = TensorFile::open(&path)?;
        let names = file.names();
        let prefix = if names.iter().any(|n| n.starts_with("bert.embeddings.")) {
            "bert."
        } else {
            ""
        };
        let mut used: Vec<String> = Vec::new();
        let mut copied = 0;
        let specs = params.specs.clone();
        for spec in &specs {
            let Some(enc_name) = rename(&spec.name) else {
                continue;
            };
            let is_pos = enc_name == "pos.weight";
            let sources = hf_sources(&enc_name).ok_or_else(|| {
                ck_err(
                    &path,
                    format!("qkv parameter '{}' has no BERT counterpart", spec.name),
                )
            })?;
            let mut data = Vec::with_capacity(spec.len);
            for src in &sources {
                let name = find_tensor(&names, prefix, src).ok_or_else(|| {
                    ck_err(
                        &path,
                        format!("missing tensor '{prefix}{src}' (for qkv's '{}')", spec.name),
                    )
                })?;
                // Each source holds its share of the rows (Q, K, V of a fused projection);
                // a position table may hold more rows than the model reads.
                let mut want = spec.shape.clone();
                want[0] /= sources.len();
                match file.get(&name)? {
                    (shape, TensorData::F32(v))
                        if shape == want
                            || (is_pos
                                && shape.len() == 2
                                && shape[1] == want[1]
                                && shape[0] >= want[0]) =>
                    {
                        data.extend_from_slice(&v)
                    }
                    (shape, TensorData::F32(_)) => {
                        return Err(ck_err(
                            &path,
                            format!(
                                "tensor '{name}' has shape {shape:?}, qkv's '{}' needs {want:?}",
                                spec.name
                            ),
                        ))
                    }
                    _ => return Err(ck_err(&path, format!("tensor '{name}' is not F32"))),
                }
                used.push(name);
            }
            // Position tables may be longer than the model's max_len: keep the first rows.
            if is_pos && data.len() > spec.len {
                data.truncate(spec.len);
            }
            if data.len() != spec.len {
                let src = sources.join(" + ");
                return Err(ck_err(
                    &path,
                    format!(
                        "'{prefix}{src}' has {} values, qkv's '{}' {:?} needs {}",
                        data.len(),
                        spec.name,
                        spec.shape,
                        spec.len
                    ),
                ));
            }
            params.data[spec.offset..spec.offset + spec.len].copy_from_slice(&data);
            copied += 1;
        }
        let ignored = |n: &str| {
            let n = n.strip_prefix(prefix).unwrap_or(n);
            n.starts_with("pooler.") || n.starts_with("cls.") || n.ends_with("position_ids")
        };
        if let Some(extra) = names
            .iter()
            .find(|n| !used.contains(n) && !ignored(n.as_str()))
        {
            return Err(ck_err(
                &path,
                format!("unexpected tensor '{extra}': not part of a BERT encoder qkv can load"),
            ));
        }
        Ok(copied)
    }
}

/// A seq2seq parameter's name in the classifier's naming, when the pretrained encoder has
/// one (Rothe et al.'s BERT2BERT): the source embeddings (which the decoder shares) and the
/// encoder layers; the target's positions, token types and embedding norm; and the
/// self-attention and feed-forward sublayers (with their norms) of decoder layer `i` from
/// encoder layer `i` (of `depth`). Cross-attention has no counterpart and starts from
/// scratch.
fn seq2seq_to_encoder_name(name: &str, depth: usize) -> Option<String> {
    if let Some(rest) = name.strip_prefix("src_").or(name.strip_prefix("tgt_")) {
        return Some(rest.to_string());
    }
    if name.starts_with("encoder.layers.") {
        return Some(name.to_string());
    }
    let rest = name.strip_prefix("decoder.layers.")?;
    let (layer, field) = rest.split_once('.')?;
    let shared = ["self_attn.", "self_attn_norm.", "ffn.", "ffn_norm."];
    (layer.parse::<usize>().ok()? < depth && shared.iter().any(|p| field.starts_with(p)))
        .then(|| format!("encoder.layers.{rest}"))
}

/// A tensor by its BERT name; old checkpoints call LayerNorm's parameters gamma/beta.
fn find_tensor(names: &[String], prefix: &str, src: &str) -> Option<String> {
    let full = format!("{prefix}{src}");
    if names.contains(&full) {
        return Some(full);
    }
    let old = full
        .replace("LayerNorm.weight", "LayerNorm.gamma")
        .replace("LayerNorm.bias", "LayerNorm.beta");
    names.contains(&old).then_some(old)
}

/// The BERT tensors (concatenated in order) that make up qkv parameter `name`.
fn hf_sources(name: &str) -> Option<Vec<String>> {
    let one = |s: &str| Some(vec![s.to_string()]);
    match name {
        "embed.weight" => return one("embeddings.word_embeddings.weight"),
        "pos.weight" => return one("embeddings.position_embeddings.weight"),
        "embed_types.weight" => return one("embeddings.token_type_embeddings.weight"),
        "embed_norm.weight" => return one("embeddings.LayerNorm.weight"),
        "embed_norm.bias" => return one("embeddings.LayerNorm.bias"),
        _ => {}
    }
    let rest = name.strip_prefix("encoder.layers.")?;
    let (layer, field) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = field.rsplit_once('.')?; // kind: weight | bias
    let base = format!("encoder.layer.{layer}");
    let bert_module = match module {
        "self_attn.qkv" => {
            return Some(
                ["query", "key", "value"]
                    .iter()
                    .map(|p| format!("{base}.attention.self.{p}.{kind}"))
                    .collect(),
            )
        }
        "self_attn.out" => "attention.output.dense",
        "self_attn_norm" => "attention.output.LayerNorm",
        "ffn.up" => "intermediate.dense",
        "ffn.down" => "output.dense",
        "ffn_norm" => "output.LayerNorm",
        _ => return None,
    };
    Some(vec![format!("{base}.{bert_module}.{kind}")])
}

#[cfg(test)]
mod tests {
    use super::hf_sources;

    #[test]
    fn qkv_names_map_onto_bert_names() {
        assert_eq!(
            hf_sources("encoder.layers.3.self_attn.qkv.bias").unwrap(),
            vec![
                "encoder.layer.3.attention.self.query.bias",
                "encoder.layer.3.attention.self.key.bias",
                "encoder.layer.3.attention.self.value.bias"
            ]
        );
        assert_eq!(
            hf_sources("encoder.layers.0.ffn.down.weight").unwrap(),
            vec!["encoder.layer.0.output.dense.weight"]
        );
        assert_eq!(
            hf_sources("embed_norm.bias").unwrap(),
            vec!["embeddings.LayerNorm.bias"]
        );
        assert!(hf_sources("encoder.final_norm.weight").is_none());
        let rename = |n: &str| super::seq2seq_to_encoder_name(n, 6);
        assert_eq!(rename("src_embed_norm.bias").unwrap(), "embed_norm.bias");
        assert_eq!(rename("tgt_pos.weight").unwrap(), "pos.weight");
        assert_eq!(
            rename("decoder.layers.5.self_attn.qkv.weight").unwrap(),
            "encoder.layers.5.self_attn.qkv.weight"
        );
        assert_eq!(
            rename("decoder.layers.0.ffn_norm.bias").unwrap(),
            "encoder.layers.0.ffn_norm.bias"
        );
        // Cross-attention, and decoder layers deeper than the encoder, start from scratch.
        assert!(rename("decoder.layers.0.cross_attn.kv.weight").is_none());
        assert!(rename("decoder.layers.0.cross_attn_norm.weight").is_none());
        assert!(rename("decoder.layers.6.ffn.up.weight").is_none());
        assert!(hf_sources("head.weight").is_none());
    }
}
