//! A Seq2Seq model in CTranslate2's format: `model.bin` (its binary spec, version 6, of a
//! `TransformerSpec` revision 7), `config.json` and the vocabularies, so OpenNMT's inference
//! engine translates with qkv's weights.
//!
//! Written by hand because CTranslate2 ships its writer only in Python
//! (`ctranslate2/specs/model_spec.py`); `scripts/reference/ctranslate2_convert.py` builds the
//! same model with CTranslate2's own spec classes and the tests compare the bytes.
//!
//! The layouts agree already: CTranslate2's self-attention takes one fused (3C, C) projection
//! [Q; K; V] and its encoder-decoder attention a query projection and a fused [K; V] one, as
//! qkv stores them. Positions are written as a table (CTranslate2's built-in sinusoids put
//! sin and cos in halves; qkv interleaves them), with BERT's token-type row (every token
//! uses row 0) folded in, since CTranslate2 has no token types.

use crate::checkpoint::{io_err, write_atomic};
use crate::error::{Error, Result};
use crate::kernels::activation::Activation;
use crate::kernels::embedding::sinusoidal_table;
use crate::model::{AttentionKind, Family, ModelConfig, NormPlacement, Positional};
use crate::params::Params;
use std::path::{Path, PathBuf};

/// `CURRENT_BINARY_VERSION` of CTranslate2's model_spec.py.
const BINARY_VERSION: u32 = 6;
const SPEC_NAME: &str = "TransformerSpec";
const SPEC_REVISION: u32 = 7;

/// The token strings CTranslate2 needs: each vocabulary by id, and the special tokens.
#[derive(Clone, Debug)]
pub struct Vocabularies {
    pub source: Vec<String>,
    pub target: Vec<String>,
    pub unk: String,
    pub bos: String,
    pub eos: String,
}

/// A variable of the spec: f32 data, or one of the small integer scalars CTranslate2 reads
/// its options from.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    F32 { shape: Vec<usize>, data: Vec<f32> },
    I8(i8),
    I16(i16),
}

impl Value {
    /// CTranslate2's `DataType` enum (float32, int8, int16, …).
    fn type_id(&self) -> u8 {
        match self {
            Value::F32 { .. } => 0,
            Value::I8(_) => 1,
            Value::I16(_) => 2,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Value::F32 { shape, .. } => shape,
            _ => &[],
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            Value::F32 { data, .. } => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Value::I8(v) => v.to_le_bytes().to_vec(),
            Value::I16(v) => v.to_le_bytes().to_vec(),
        }
    }
}

/// Variables by their spec names ("encoder/layer_0/ffn/linear_0/weight").
struct Spec<'a> {
    params: &'a Params,
    vars: Vec<(String, Value)>,
}

impl Spec<'_> {
    fn scalar(&mut self, name: &str, v: Value) {
        self.vars.push((name.to_string(), v));
    }

    fn flag(&mut self, name: &str, on: bool) {
        self.scalar(name, Value::I8(on as i8));
    }

    fn tensor(&mut self, name: &str, shape: Vec<usize>, data: Vec<f32>) {
        self.vars
            .push((name.to_string(), Value::F32 { shape, data }));
    }

    fn get(&self, name: &str) -> Result<(Vec<usize>, &[f32])> {
        match (self.params.spec(name), self.params.get(name)) {
            (Some(spec), Some(data)) => Ok((spec.shape.clone(), data)),
            _ => Err(Error::Usage(format!(
                "CTranslate2 export: the model has no parameter {name}"
            ))),
        }
    }

    /// The qkv parameter `from` under the spec name `to`.
    fn param(&mut self, to: &str, from: &str) -> Result<()> {
        let (shape, data) = self.get(from)?;
        let data = data.to_vec();
        self.tensor(to, shape, data);
        Ok(())
    }

    fn norm(&mut self, to: &str, from: &str) -> Result<()> {
        self.param(&format!("{to}/gamma"), &format!("{from}.weight"))?;
        self.param(&format!("{to}/beta"), &format!("{from}.bias"))
    }

    fn linear(&mut self, to: &str, from: &str) -> Result<()> {
        self.param(&format!("{to}/weight"), &format!("{from}.weight"))?;
        self.param(&format!("{to}/bias"), &format!("{from}.bias"))
    }

    /// One encoder or decoder layer (`TransformerEncoderLayerSpec` / `…DecoderLayerSpec`).
    fn layer(&mut self, to: &str, from: &str, decoder: bool) -> Result<()> {
        self.norm(
            &format!("{to}/self_attention/layer_norm"),
            &format!("{from}.self_attn_norm"),
        )?;
        self.linear(
            &format!("{to}/self_attention/linear_0"),
            &format!("{from}.self_attn.qkv"),
        )?;
        self.linear(
            &format!("{to}/self_attention/linear_1"),
            &format!("{from}.self_attn.out"),
        )?;
        if decoder {
            self.norm(
                &format!("{to}/attention/layer_norm"),
                &format!("{from}.cross_attn_norm"),
            )?;
            self.linear(
                &format!("{to}/attention/linear_0"),
                &format!("{from}.cross_attn.q"),
            )?;
            self.linear(
                &format!("{to}/attention/linear_1"),
                &format!("{from}.cross_attn.kv"),
            )?;
            self.linear(
                &format!("{to}/attention/linear_2"),
                &format!("{from}.cross_attn.out"),
            )?;
        }
        self.norm(&format!("{to}/ffn/layer_norm"), &format!("{from}.ffn_norm"))?;
        self.linear(&format!("{to}/ffn/linear_0"), &format!("{from}.ffn.up"))?;
        self.linear(&format!("{to}/ffn/linear_1"), &format!("{from}.ffn.down"))
    }

    /// The table CTranslate2 adds at position t: qkv's positions plus the token-type row.
    fn positions(&mut self, to: &str, cfg: &ModelConfig, side: &str) -> Result<()> {
        let c = cfg.d_model;
        let mut table = match cfg.positional {
            Positional::Sinusoidal => sinusoidal_table(cfg.max_len, c),
            Positional::Learned => self.get(&format!("{side}_pos.weight"))?.1.to_vec(),
        };
        if cfg.token_types > 0 {
            let (_, types) = self.get(&format!("{side}_embed_types.weight"))?;
            let row = &types[..c];
            table
                .chunks_mut(c)
                .for_each(|t| t.iter_mut().zip(row).for_each(|(t, r)| *t += r));
        }
        let rows = table.len() / c;
        self.tensor(to, vec![rows, c], table);
        Ok(())
    }
}

/// Why CTranslate2's Transformer cannot run this model, if it cannot.
pub fn check_exportable(cfg: &ModelConfig) -> Result<()> {
    let refuse = |why: String| Err(Error::Config(format!("CTranslate2 export: {why}")));
    if cfg.family != Family::Seq2seq {
        return refuse(format!(
            "only seq2seq models become CTranslate2 Transformers; this model is a {:?}",
            cfg.family
        ));
    }
    if cfg.attention == AttentionKind::Linear {
        return refuse("linear attention has no CTranslate2 equivalent".into());
    }
    if let Some(w) = cfg.attention_window {
        return refuse(format!(
            "a sliding attention window ({w}) has no CTranslate2 equivalent for encoder-decoder \
             models"
        ));
    }
    Ok(())
}

/// The variables of `cfg`'s model, sorted by name as CTranslate2 writes them.
fn variables(cfg: &ModelConfig, params: &Params) -> Result<Vec<(String, Value)>> {
    check_exportable(cfg)?;
    let mut s = Spec {
        params,
        vars: Vec::new(),
    };
    let pre = cfg.norm == NormPlacement::Pre;
    // common_spec.Activation: RELU = 0, GELU (erf) = 3.
    let activation = match cfg.activation {
        Activation::Relu => 0,
        Activation::Gelu => 3,
        Activation::Identity => {
            return Err(Error::Config(
                "CTranslate2 export: a feed-forward without activation has no CTranslate2 \
                 equivalent"
                    .into(),
            ))
        }
    };
    for stack in ["encoder", "decoder"] {
        s.scalar(
            &format!("{stack}/num_heads"),
            Value::I16(cfg.n_heads as i16),
        );
        s.flag(&format!("{stack}/pre_norm"), pre);
        s.scalar(&format!("{stack}/activation"), Value::I8(activation));
        s.flag(&format!("{stack}/scale_embeddings"), cfg.scale_embeddings);
        if pre {
            s.norm(
                &format!("{stack}/layer_norm"),
                &format!("{stack}.final_norm"),
            )?;
        }
    }
    // TransformerEncoderSpec's remaining options at their defaults.
    s.flag("encoder/multi_query_attention", false);
    s.scalar("encoder/embeddings_merge", Value::I8(0));
    // TransformerDecoderSpec's: no alignment heads trained, no ALiBi.
    s.scalar("decoder/alignment_layer", Value::I16(-1));
    s.scalar("decoder/alignment_heads", Value::I16(1));
    s.flag("decoder/alibi", false);
    s.flag("decoder/alibi_use_positive_positions", false);
    s.flag("decoder/scale_alibi", false);
    s.flag("decoder/start_from_zero_embedding", false);

    s.param("encoder/embeddings_0/weight", "src_embed.weight")?;
    let tgt_table = if cfg.share_embeddings {
        "src_embed.weight"
    } else {
        "tgt_embed.weight"
    };
    s.param("decoder/embeddings/weight", tgt_table)?;
    let tied = cfg.share_embeddings || cfg.tie_output;
    s.param(
        "decoder/projection/weight",
        if tied { tgt_table } else { "output.weight" },
    )?;
    for (stack, side) in [("encoder", "src"), ("decoder", "tgt")] {
        s.positions(&format!("{stack}/position_encodings/encodings"), cfg, side)?;
        if cfg.embed_norm {
            s.norm(
                &format!("{stack}/layernorm_embedding"),
                &format!("{side}_embed_norm"),
            )?;
        }
    }
    for i in 0..cfg.n_encoder_layers {
        s.layer(
            &format!("encoder/layer_{i}"),
            &format!("encoder.layers.{i}"),
            false,
        )?;
    }
    for i in 0..cfg.n_decoder_layers {
        s.layer(
            &format!("decoder/layer_{i}"),
            &format!("decoder.layers.{i}"),
            true,
        )?;
    }
    let mut vars = s.vars;
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}

/// `model.bin`: CTranslate2's `ModelSpec._serialize`, with its aliasing: a tensor equal in
/// shape and values to one earlier in name order is written as an alias of it (a shared
/// embedding table is stored once).
pub fn model_bin(cfg: &ModelConfig, params: &Params) -> Result<Vec<u8>> {
    let vars = variables(cfg, params)?;
    let mut stored: Vec<&(String, Value)> = Vec::new();
    let mut aliases: Vec<(&str, &str)> = Vec::new();
    for (i, var) in vars.iter().enumerate() {
        let same = |(_, other): &&(String, Value)| {
            matches!(var.1, Value::F32 { .. }) && other.shape() == var.1.shape() && other == &var.1
        };
        match vars[..i].iter().find(same) {
            Some((first, _)) => aliases.push((&var.0, first)),
            None => stored.push(var),
        }
    }
    let mut out = Vec::new();
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u16 + 1).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    };
    out.extend_from_slice(&BINARY_VERSION.to_le_bytes());
    string(&mut out, SPEC_NAME);
    out.extend_from_slice(&SPEC_REVISION.to_le_bytes());
    out.extend_from_slice(&(stored.len() as u32).to_le_bytes());
    for (name, value) in stored {
        string(&mut out, name);
        out.push(value.shape().len() as u8);
        for &d in value.shape() {
            out.extend_from_slice(&(d as u32).to_le_bytes());
        }
        out.push(value.type_id());
        let bytes = value.bytes();
        let n = u32::try_from(bytes.len()).map_err(|_| {
            Error::Config(format!(
                "CTranslate2 export: {name} has {} bytes, more than the format's 4 GiB per variable",
                bytes.len()
            ))
        })?;
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(&(aliases.len() as u32).to_le_bytes());
    for (alias, name) in aliases {
        string(&mut out, alias);
        string(&mut out, name);
    }
    Ok(out)
}

/// `config.json`: `TransformerConfig` with qkv's special tokens. qkv feeds the encoder the
/// source tokens and EOS (no BOS) and starts the decoder from BOS.
pub fn config_json(cfg: &ModelConfig, vocab: &Vocabularies) -> serde_json::Value {
    serde_json::json!({
        "add_source_bos": false,
        "add_source_eos": true,
        "bos_token": vocab.bos,
        "decoder_start_token": vocab.bos,
        "eos_token": vocab.eos,
        // Through its shortest decimal form, so 1e-5 is written 1e-05 and not 9.99999974e-06.
        "layer_norm_epsilon": cfg.layer_norm_eps.to_string().parse::<f64>().unwrap_or(1e-5),
        "multi_query_attention": false,
        "unk_token": vocab.unk,
    })
}

/// Write the model into `out` (created if missing; an existing `model.bin` there is an
/// error, so nothing is overwritten): `model.bin`, `config.json`, and
/// `shared_vocabulary.json` when both sides use one vocabulary (else
/// `source_vocabulary.json` and `target_vocabulary.json`). Returns the paths written.
pub fn write(
    cfg: &ModelConfig,
    params: &Params,
    vocab: &Vocabularies,
    out: &Path,
) -> Result<Vec<PathBuf>> {
    check_exportable(cfg)?;
    for (side, tokens, expected) in [
        ("source", &vocab.source, cfg.vocab_size),
        ("target", &vocab.target, cfg.tgt_vocab()),
    ] {
        if tokens.len() != expected {
            return Err(Error::Config(format!(
                "CTranslate2 export: the {side} tokenizer has {} tokens but the model's {side} \
                 embedding has {expected} rows",
                tokens.len()
            )));
        }
    }
    for (what, token) in [
        ("unknown", &vocab.unk),
        ("begin-of-sequence", &vocab.bos),
        ("end-of-sequence", &vocab.eos),
    ] {
        if !vocab.target.contains(token) {
            return Err(Error::Config(format!(
                "CTranslate2 export: the {what} token {token:?} is not in the target \
                 vocabulary"
            )));
        }
    }
    let bin = out.join("model.bin");
    if bin.exists() {
        return Err(Error::File {
            path: bin,
            msg: "already exists; export into a new directory".into(),
        });
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let bytes = model_bin(cfg, params)?;
    let mut files = Vec::new();
    let json = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let vocabularies: Vec<(&str, &Vec<String>)> = if vocab.source == vocab.target {
        vec![("shared_vocabulary.json", &vocab.source)]
    } else {
        vec![
            ("source_vocabulary.json", &vocab.source),
            ("target_vocabulary.json", &vocab.target),
        ]
    };
    for (name, tokens) in vocabularies {
        let path = out.join(name);
        write_atomic(&path, json(&serde_json::json!(tokens)).as_bytes())?;
        files.push(path);
    }
    let path = out.join("config.json");
    write_atomic(&path, (json(&config_json(cfg, vocab)) + "\n").as_bytes())?;
    files.push(path);
    write_atomic(&bin, &bytes)?;
    files.push(bin);
    Ok(files)
}
