//! `qkv export` and `qkv bench translate` through the binary: what they write and print, and
//! their errors.

mod common;
use common::{qkv, scratch, tiny_model, TEXTS};
use qkv::model::Family;
use std::path::Path;

/// `qkv export --model MODEL --format FORMAT --out OUT`.
fn export(model: &Path, format: &str, out: &Path) -> (bool, String, String) {
    let (model, out) = (model.to_str().unwrap(), out.to_str().unwrap());
    qkv(
        &["export", "--model", model, "--format", format, "--out", out],
        None,
    )
}

#[test]
fn export_writes_a_ctranslate2_model_once() {
    let model = tiny_model(Family::Seq2seq, "export-s2s");
    let out = scratch("export-out").join("ct2");
    let (ok, _, err) = export(&model, "ctranslate2", &out);
    assert!(ok, "{err}");
    for file in ["model.bin", "config.json", "shared_vocabulary.json"] {
        assert!(out.join(file).is_file(), "{file} missing");
        assert!(
            err.contains(&format!("wrote {}", out.join(file).display())),
            "{err}"
        );
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["eos_token"], "</s>");
    assert_eq!(config["add_source_eos"], true);
    let vocab: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(out.join("shared_vocabulary.json")).unwrap())
            .unwrap();
    assert_eq!(&vocab[..4], ["<pad>", "<s>", "</s>", "<unk>"]);
    // The model.bin starts with CTranslate2's binary version and spec name.
    let bin = std::fs::read(out.join("model.bin")).unwrap();
    assert_eq!(&bin[..4], &6u32.to_le_bytes());
    assert_eq!(&bin[6..21], b"TransformerSpec");

    // A second export into the same directory is refused and leaves the first intact.
    let (ok, _, err) = export(&model, "ctranslate2", &out);
    assert!(!ok && err.contains("model.bin: already exists"), "{err}");
    assert_eq!(std::fs::read(out.join("model.bin")).unwrap(), bin);
}

#[test]
fn export_refuses_what_ctranslate2_cannot_run() {
    let lm = tiny_model(Family::Lm, "export-lm");
    let out = scratch("export-refused").join("ct2");
    let (ok, _, err) = export(&lm, "ctranslate2", &out);
    assert!(!ok && err.contains("only seq2seq models"), "{err}");
    assert!(!out.exists(), "nothing is written");
    let missing = lm.join("no-such-model");
    let (ok, _, err) = export(&missing, "ctranslate2", &out);
    assert!(!ok && err.contains("no-such-model"), "{err}");
}

#[test]
fn bench_translate_prints_one_json_line() {
    let model = tiny_model(Family::Seq2seq, "bench-translate");
    let data = scratch("bench-translate-data").join("test.tsv");
    let pairs: String = TEXTS.iter().map(|t| format!("{t}\t{t}\n")).collect();
    std::fs::write(&data, pairs).unwrap();
    let (ok, stdout, err) = qkv(
        &[
            "bench",
            "translate",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--beam",
            "2",
        ],
        None,
    );
    assert!(ok, "{err}");
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line["sentences"], 6);
    assert_eq!(line["beam"], 2);
    assert_eq!(line["threads"], 2);
    // Every output has at least its EOS.
    assert!(line["target_tokens"].as_u64().unwrap() >= 6, "{line}");
    assert!(line["tokens_per_s"].as_f64().unwrap() > 0.0, "{line}");
    assert!(
        ["avx512", "avx2", "baseline"].contains(&line["isa"].as_str().unwrap()),
        "{line}"
    );
    assert_eq!(line["device"], "cpu");
    // On the GPU: int8 is the CPU's, and without a GPU the error names what is missing.
    let on_gpu = |extra: &[&str]| {
        let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
        let args = [
            "bench",
            "translate",
            "--model",
            m,
            "--data",
            d,
            "--device",
            "cuda",
        ];
        let (ok, _, err) = qkv(&[&args[..], extra].concat(), None);
        assert!(!ok, "{err}");
        err
    };
    let err = on_gpu(&["--dtype", "int8"]);
    assert!(err.contains("--dtype int8 runs decoding steps"), "{err}");
    if !qkv::cuda::driver_available() {
        let err = on_gpu(&[]);
        assert!(
            err.contains("--device cuda") && err.contains("libcuda.so"),
            "{err}"
        );
    }

    let lm = tiny_model(Family::Lm, "bench-translate-lm");
    let (ok, _, err) = qkv(
        &[
            "bench",
            "translate",
            "--model",
            lm.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ],
        None,
    );
    assert!(!ok && err.contains("not a translation model"), "{err}");
}

#[test]
fn export_hf_writes_a_marian_model_with_its_tokenizer() {
    // The tiny preset is post-LN with sinusoidal positions, as MarianMT is.
    let model = tiny_model(Family::Seq2seq, "export-hf");
    let out = scratch("export-hf-out").join("marian");
    let (ok, _, err) = export(&model, "hf", &out);
    assert!(ok, "{err}");
    for file in [
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "model.safetensors",
        "tokenizer.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing: {err}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "marian");
    assert_eq!(config["decoder_start_token_id"], 1);
    assert_eq!(config["eos_token_id"], 2);
    let weights = qkv::checkpoint::TensorFile::open(&out.join("model.safetensors")).unwrap();
    assert!(weights
        .names()
        .contains(&"model.decoder.layers.0.encoder_attn.k_proj.weight".to_string()));
    let (ok, _, err) = export(&model, "hf", &out);
    assert!(
        !ok && err.contains("model.safetensors: already exists"),
        "{err}"
    );
}

#[test]
fn dtype_int8_quantizes_decoding_and_is_refused_where_nothing_decodes() {
    let model = tiny_model(Family::Seq2seq, "int8-s2s");
    let data = scratch("int8-data").join("test.tsv");
    let pairs: String = TEXTS.iter().map(|t| format!("{t}\t{t}\n")).collect();
    std::fs::write(&data, pairs).unwrap();
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let (ok, stdout, err) = qkv(
        &[
            "bench",
            "translate",
            "--model",
            m,
            "--data",
            d,
            "--dtype",
            "int8",
        ],
        None,
    );
    if !qkv::kernels::packed::available() {
        assert!(!ok && err.contains("needs a CPU with AVX2"), "{err}");
        return;
    }
    assert!(ok, "{err}");
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line["dtype"], "int8");
    let (ok, stdout, err) = qkv(
        &["translate", "--model", m, "--dtype", "int8"],
        Some("the king went to the house\n"),
    );
    assert!(ok && stdout.lines().count() == 1, "{err}");

    let classifier = tiny_model(Family::Classifier, "int8-cls");
    let (ok, _, err) = qkv(
        &[
            "classify",
            "--model",
            classifier.to_str().unwrap(),
            "--dtype",
            "int8",
        ],
        Some("the king\n"),
    );
    assert!(!ok && err.contains("a classifier does not decode"), "{err}");
    let (ok, _, err) = qkv(
        &[
            "bench", "matmul", "--m", "2", "--k", "2", "--n", "2", "--dtype", "int8",
        ],
        None,
    );
    assert!(
        !ok && err.contains("--dtype int8 applies to decoding steps"),
        "{err}"
    );
}

#[test]
fn export_ctranslate2_refuses_a_tokenizer_without_an_unknown_token() {
    // A word-level vocabulary with padding, BOS and EOS but no unknown token.
    let dir = scratch("export-no-unk");
    let special = |id: u32, s: &str| {
        format!(
            r#"{{"id":{id},"content":"{s}","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}}"#
        )
    };
    let tokenizer = format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{},{},{}],
        "normalizer":null,"pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,
        "model":{{"type":"WordLevel","unk_token":"<pad>","vocab":{{"<pad>":0,"<s>":1,"</s>":2,"the":3,"king":4}}}}}}"#,
        special(0, "<pad>"),
        special(1, "<s>"),
        special(2, "</s>")
    );
    std::fs::write(dir.join("tokenizer.json"), tokenizer).unwrap();
    let mut cfg = qkv::model::ModelConfig::preset("tiny", Family::Seq2seq, 5).unwrap();
    cfg.max_len = 16;
    let params = qkv::model::Seq2Seq::new(cfg.clone(), 1).unwrap().params;
    qkv::checkpoint::save(&dir, &cfg, &params, None).unwrap();
    let out = scratch("export-no-unk-out").join("ct2");
    let (ok, _, err) = export(&dir, "ctranslate2", &out);
    assert!(
        !ok && err.contains("the target tokenizer has no unknown token"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written");
}
