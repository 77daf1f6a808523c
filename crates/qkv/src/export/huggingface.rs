//! A post-LN Seq2Seq model as a Hugging Face MarianMT model (`MarianMTModel`):
//! `config.json`, `generation_config.json`, `model.safetensors` and the tokenizer.
//!
//! Marian's architecture is the paper's (post-LN, sinusoidal positions, scaled embeddings,
//! no final norms); what differs is the layout of the sinusoids: Marian puts the sines of
//! every frequency in the first half of the model dimension and the cosines in the second,
//! qkv interleaves them (sin, cos of frequency j at 2j, 2j + 1). Permuting the model
//! dimension the same way in every tensor that reads or writes the residual stream (the
//! embeddings, each projection's input columns or output rows, the norms) gives the same
//! network, since LayerNorm and the residual sums do not care about the order of features
//! and the attention heads' own dimensions are left alone. So the export is exact.
//!
//! Marian keeps query, key and value projections apart; qkv's fused [Q; K; V] (and [K; V]
//! of cross-attention) are split by rows.

use super::ctranslate2::Vocabularies;
use crate::checkpoint::{io_err, save_tensors, write_atomic};
use crate::decode::DecodeConfig;
use crate::error::{Error, Result};
use crate::kernels::activation::Activation;
use crate::model::{AttentionKind, Family, ModelConfig, NormPlacement, Positional};
use crate::params::Params;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The special token ids Marian's config names.
#[derive(Clone, Copy, Debug)]
pub struct SpecialIds {
    pub pad: u32,
    pub bos: u32,
    pub eos: u32,
}

/// Why a MarianMT model cannot hold this model, if it cannot.
pub fn check_exportable(cfg: &ModelConfig) -> Result<()> {
    let refuse = |why: &str| {
        Err(Error::Config(format!(
            "Hugging Face (MarianMT) export: {why}"
        )))
    };
    if cfg.family != Family::Seq2seq {
        return refuse("only seq2seq models become MarianMT models");
    }
    if cfg.norm != NormPlacement::Post {
        return refuse(
            "MarianMT is post-LN (a norm after each residual sum, no final norms); this model \
             is pre-LN (export it to CTranslate2 instead)",
        );
    }
    if cfg.positional != Positional::Sinusoidal {
        return refuse("MarianMT computes sinusoidal positions; this model learned its own");
    }
    if cfg.token_types > 0 || cfg.embed_norm {
        return refuse("MarianMT embeddings have no token types and no LayerNorm");
    }
    if cfg.layer_norm_eps != 1e-5 {
        return refuse(&format!(
            "MarianMT's LayerNorm epsilon is fixed at 1e-5; this model uses {}",
            cfg.layer_norm_eps
        ));
    }
    if cfg.attention == AttentionKind::Linear || cfg.attention_window.is_some() {
        return refuse("MarianMT attends with full softmax attention only");
    }
    if cfg.activation == Activation::Identity {
        return refuse("MarianMT's feed-forward has an activation");
    }
    if !cfg.d_model.is_multiple_of(2) {
        return refuse("the model width must be even to lay out sines and cosines in halves");
    }
    Ok(())
}

/// Marian's feature m is qkv's feature `perm[m]`: sines first, then cosines.
fn permutation(c: usize) -> Vec<usize> {
    (0..c)
        .map(|m| {
            if m < c / 2 {
                2 * m
            } else {
                2 * (m - c / 2) + 1
            }
        })
        .collect()
}

/// A named tensor: (Hugging Face name, shape, values).
pub type Tensor = (String, Vec<usize>, Vec<f32>);

/// The tensors of the MarianMT model.
pub fn tensors(cfg: &ModelConfig, params: &Params) -> Result<Vec<Tensor>> {
    check_exportable(cfg)?;
    let c = cfg.d_model;
    let perm = permutation(c);
    let get = |name: &str| {
        params.get(name).ok_or_else(|| {
            Error::Usage(format!(
                "Hugging Face export: the model has no parameter {name}"
            ))
        })
    };
    // (R, C) with the model dimension in columns → permuted columns.
    let cols = |w: &[f32]| -> Vec<f32> {
        w.chunks_exact(c)
            .flat_map(|row| perm.iter().map(move |&p| row[p]))
            .collect()
    };
    // (C, K) with the model dimension in rows → permuted rows.
    let rows = |w: &[f32]| -> Vec<f32> {
        let k = w.len() / c;
        perm.iter()
            .flat_map(|&p| w[p * k..(p + 1) * k].iter().copied())
            .collect()
    };
    let mut out: Vec<Tensor> = Vec::new();
    let mut put = |name: String, shape: Vec<usize>, data: Vec<f32>| out.push((name, shape, data));

    let (vs, vt) = (cfg.vocab_size, cfg.tgt_vocab());
    let src_table = cols(get("src_embed.weight")?);
    if cfg.share_embeddings {
        put("model.shared.weight".into(), vec![vs, c], src_table);
    } else {
        put(
            "model.encoder.embed_tokens.weight".into(),
            vec![vs, c],
            src_table,
        );
        put(
            "model.decoder.embed_tokens.weight".into(),
            vec![vt, c],
            cols(get("tgt_embed.weight")?),
        );
    }
    if !(cfg.share_embeddings || cfg.tie_output) {
        put(
            "lm_head.weight".into(),
            vec![vt, c],
            cols(get("output.weight")?),
        );
    }
    put("final_logits_bias".into(), vec![1, vt], vec![0.0; vt]);

    let norm = |put: &mut dyn FnMut(String, Vec<usize>, Vec<f32>), to: &str, from: &str| {
        for (suffix, v) in [
            ("weight", get(&format!("{from}.weight"))?),
            ("bias", get(&format!("{from}.bias"))?),
        ] {
            put(format!("{to}.{suffix}"), vec![c], rows(v));
        }
        Ok::<(), Error>(())
    };
    // A projection reading the residual stream: its (O, C) weight's columns permuted; the
    // output (head or hidden features) keeps its order.
    let reads =
        |put: &mut dyn FnMut(String, Vec<usize>, Vec<f32>), to: &str, w: &[f32], b: &[f32]| {
            put(format!("{to}.weight"), vec![b.len(), c], cols(w));
            put(format!("{to}.bias"), vec![b.len()], b.to_vec());
        };
    // A projection writing the residual stream: its (C, I) weight's rows and bias permuted.
    let writes = |put: &mut dyn FnMut(String, Vec<usize>, Vec<f32>), to: &str, from: &str| {
        let (w, b) = (
            get(&format!("{from}.weight"))?,
            get(&format!("{from}.bias"))?,
        );
        put(format!("{to}.weight"), vec![c, w.len() / c], rows(w));
        put(format!("{to}.bias"), vec![c], rows(b));
        Ok::<(), Error>(())
    };
    let cc = c * c;
    for (stack, n) in [
        ("encoder", cfg.n_encoder_layers),
        ("decoder", cfg.n_decoder_layers),
    ] {
        for i in 0..n {
            let (to, from) = (
                format!("model.{stack}.layers.{i}"),
                format!("{stack}.layers.{i}"),
            );
            let (w, b) = (
                get(&format!("{from}.self_attn.qkv.weight"))?,
                get(&format!("{from}.self_attn.qkv.bias"))?,
            );
            for (j, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                reads(
                    &mut put,
                    &format!("{to}.self_attn.{proj}"),
                    &w[j * cc..(j + 1) * cc],
                    &b[j * c..(j + 1) * c],
                );
            }
            writes(
                &mut put,
                &format!("{to}.self_attn.out_proj"),
                &format!("{from}.self_attn.out"),
            )?;
            norm(
                &mut put,
                &format!("{to}.self_attn_layer_norm"),
                &format!("{from}.self_attn_norm"),
            )?;
            if stack == "decoder" {
                let (w, b) = (
                    get(&format!("{from}.cross_attn.q.weight"))?,
                    get(&format!("{from}.cross_attn.q.bias"))?,
                );
                reads(&mut put, &format!("{to}.encoder_attn.q_proj"), w, b);
                let (w, b) = (
                    get(&format!("{from}.cross_attn.kv.weight"))?,
                    get(&format!("{from}.cross_attn.kv.bias"))?,
                );
                for (j, proj) in ["k_proj", "v_proj"].iter().enumerate() {
                    reads(
                        &mut put,
                        &format!("{to}.encoder_attn.{proj}"),
                        &w[j * cc..(j + 1) * cc],
                        &b[j * c..(j + 1) * c],
                    );
                }
                writes(
                    &mut put,
                    &format!("{to}.encoder_attn.out_proj"),
                    &format!("{from}.cross_attn.out"),
                )?;
                norm(
                    &mut put,
                    &format!("{to}.encoder_attn_layer_norm"),
                    &format!("{from}.cross_attn_norm"),
                )?;
            }
            let (w, b) = (
                get(&format!("{from}.ffn.up.weight"))?,
                get(&format!("{from}.ffn.up.bias"))?,
            );
            reads(&mut put, &format!("{to}.fc1"), w, b);
            writes(&mut put, &format!("{to}.fc2"), &format!("{from}.ffn.down"))?;
            norm(
                &mut put,
                &format!("{to}.final_layer_norm"),
                &format!("{from}.ffn_norm"),
            )?;
        }
    }
    Ok(out)
}

/// `config.json` of the MarianMT model.
pub fn config_json(cfg: &ModelConfig, ids: SpecialIds) -> serde_json::Value {
    let activation = match cfg.activation {
        Activation::Gelu => "gelu",
        _ => "relu",
    };
    serde_json::json!({
        "architectures": ["MarianMTModel"],
        "model_type": "marian",
        "is_encoder_decoder": true,
        "vocab_size": cfg.vocab_size,
        "decoder_vocab_size": cfg.tgt_vocab(),
        "share_encoder_decoder_embeddings": cfg.share_embeddings,
        "tie_word_embeddings": cfg.share_embeddings || cfg.tie_output,
        "d_model": cfg.d_model,
        "encoder_layers": cfg.n_encoder_layers,
        "decoder_layers": cfg.n_decoder_layers,
        "encoder_attention_heads": cfg.n_heads,
        "decoder_attention_heads": cfg.n_heads,
        "encoder_ffn_dim": cfg.d_ff,
        "decoder_ffn_dim": cfg.d_ff,
        "activation_function": activation,
        "max_position_embeddings": cfg.max_len,
        "scale_embedding": cfg.scale_embeddings,
        "dropout": cfg.dropout,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "pad_token_id": ids.pad,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "forced_eos_token_id": ids.eos,
        "decoder_start_token_id": ids.bos,
        "use_cache": true,
        "dtype": "float32",
    })
}

/// `generation_config.json`: the model's decoding defaults (`decode.json`) in
/// `generate`'s terms; EOS is forced at the length limit, as qkv's beam search does.
/// Minimum Bayes risk (`decode.mbr`) has no `generate` counterpart and is left out: an
/// exported model returns the most probable beam output, or one sample.
pub fn generation_config_json(
    cfg: &ModelConfig,
    ids: SpecialIds,
    decode: &DecodeConfig,
) -> serde_json::Value {
    let mut g = serde_json::json!({
        "decoder_start_token_id": ids.bos,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "forced_eos_token_id": ids.eos,
        "pad_token_id": ids.pad,
        "max_length": cfg.max_len,
        "num_beams": decode.beam,
        "length_penalty": decode.length_penalty,
    });
    if decode.min_len > 0 {
        g["min_length"] = (decode.min_len + 1).into();
    }
    if decode.no_repeat_ngram_size > 0 {
        g["no_repeat_ngram_size"] = decode.no_repeat_ngram_size.into();
    }
    if decode.sampling {
        // qkv's first sample of an input is drawn as `generate` draws its one.
        g["do_sample"] = true.into();
        g["num_beams"] = 1.into();
        g["temperature"] = decode.temperature.into();
        // `generate` keeps only the 50 most likely tokens unless told otherwise; qkv all.
        g["top_k"] = decode.top_k.unwrap_or(0).into();
        if let Some(p) = decode.top_p {
            g["top_p"] = p.into();
        }
    }
    g
}

/// Write the MarianMT model into `out` (created if missing; an existing
/// `model.safetensors` there is an error). The tokenizer files are the caller's to copy.
pub fn write(
    cfg: &ModelConfig,
    params: &Params,
    vocab: &Vocabularies,
    ids: SpecialIds,
    decode: &DecodeConfig,
    out: &Path,
) -> Result<Vec<PathBuf>> {
    check_exportable(cfg)?;
    let weights = out.join("model.safetensors");
    if weights.exists() {
        return Err(Error::File {
            path: weights,
            msg: "already exists; export into a new directory".into(),
        });
    }
    let tensors = tensors(cfg, params)?;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let json = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    let special = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_len - 1,
        "pad_token": vocab.target.get(ids.pad as usize),
        "bos_token": vocab.bos,
        "eos_token": vocab.eos,
        "unk_token": vocab.unk,
    });
    let mut files = Vec::new();
    for (name, value) in [
        ("config.json", config_json(cfg, ids)),
        (
            "generation_config.json",
            generation_config_json(cfg, ids, decode),
        ),
        ("tokenizer_config.json", special),
    ] {
        let path = out.join(name);
        write_atomic(&path, json(&value).as_bytes())?;
        files.push(path);
    }
    let views: Vec<(String, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), d.as_slice()))
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    save_tensors(&weights, &views, metadata)?;
    files.push(weights);
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Family;

    #[test]
    fn generation_config_carries_sampling_and_turns_off_generates_top_k() {
        let cfg = ModelConfig::preset("tiny", Family::Seq2seq, 40).unwrap();
        let ids = SpecialIds {
            pad: 0,
            bos: 1,
            eos: 2,
        };
        let beam = DecodeConfig {
            beam: 5,
            min_len: 3,
            ..DecodeConfig::default()
        };
        let g = generation_config_json(&cfg, ids, &beam);
        assert_eq!(g["num_beams"], 5);
        assert_eq!(
            g["min_length"], 4,
            "generate counts the decoder's start token"
        );
        assert!(g.get("do_sample").is_none(), "{g}");
        let sampled = DecodeConfig {
            sampling: true,
            temperature: 0.5,
            top_p: Some(0.9),
            ..beam
        };
        let g = generation_config_json(&cfg, ids, &sampled);
        assert_eq!(g["do_sample"], true);
        assert_eq!(g["num_beams"], 1);
        assert_eq!(g["temperature"], 0.5);
        assert_eq!(g["top_k"], 0);
        assert!((g["top_p"].as_f64().unwrap() - 0.9).abs() < 1e-6, "{g}");
    }
}
