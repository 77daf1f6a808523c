//! Save → load reproduces outputs bit for bit; damaged or mismatched checkpoints are errors.

mod common;
use common::{tiny, train_mode, Case};
use qkv::checkpoint::{self, CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE};
use qkv::data::Seq2SeqBatch;
use qkv::model::{Family, Model, NormPlacement, Seq2Seq, Tokens};
use qkv::optim::{AdamW, AdamWConfig};
use std::path::PathBuf;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qkv-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn trained_seq2seq() -> (Seq2Seq, AdamW) {
    let cfg = tiny(Family::Seq2seq, NormPlacement::Pre, true, true);
    let mut m = Seq2Seq::new(cfg, 3).unwrap();
    let mut opt = AdamW::new(AdamWConfig::default(), m.params.len());
    let batch = Seq2SeqBatch::new(&[(&[3, 4, 5, 6], &[3, 4, 5, 6])], 0, 1, 2);
    for _ in 0..3 {
        m.params.zero_grad();
        m.forward(&batch, train_mode(0.1)).unwrap();
        m.backward(1.0).unwrap();
        opt.step(&mut m.params, 1e-2).unwrap();
    }
    (m, opt)
}

#[test]
fn save_then_load_reproduces_outputs_and_optimizer_bit_for_bit() {
    let dir = tmpdir("roundtrip");
    let (mut m, opt) = trained_seq2seq();
    checkpoint::save(&dir, &m.config, &m.params, Some(&opt)).unwrap();
    let src = [3u32, 7, 8, 2];
    let tin = [1u32, 3, 7, 8];
    let before = m
        .logits(
            Tokens::new(&src, 1, 4).unwrap(),
            Tokens::new(&tin, 1, 4).unwrap(),
        )
        .unwrap()
        .to_vec();

    let cfg = checkpoint::load_config(&dir).unwrap();
    let mut loaded = Seq2Seq::new(cfg.clone(), 12345).unwrap();
    checkpoint::load(&dir, &cfg, &mut loaded.params).unwrap();
    let after = loaded
        .logits(
            Tokens::new(&src, 1, 4).unwrap(),
            Tokens::new(&tin, 1, 4).unwrap(),
        )
        .unwrap()
        .to_vec();
    assert_eq!(
        before.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        after.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );

    let o = checkpoint::load_optimizer(&dir, &loaded.params).unwrap();
    assert_eq!(o.step, opt.step);
    assert_eq!(o.m, opt.m);
    assert_eq!(o.v, opt.v);
    assert_eq!(o.config, opt.config);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn truncated_and_corrupt_files_are_errors_naming_the_file() {
    let dir = tmpdir("damaged");
    let (m, opt) = trained_seq2seq();
    checkpoint::save(&dir, &m.config, &m.params, Some(&opt)).unwrap();
    let model_path = dir.join(MODEL_FILE);
    let bytes = std::fs::read(&model_path).unwrap();
    let mut fresh = Seq2Seq::new(m.config.clone(), 0).unwrap();

    std::fs::write(&model_path, &bytes[..bytes.len() / 2]).unwrap();
    let e = checkpoint::load(&dir, &m.config, &mut fresh.params)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );

    let mut garbage = bytes.clone();
    garbage[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&model_path, &garbage).unwrap();
    let e = checkpoint::load(&dir, &m.config, &mut fresh.params)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");

    std::fs::write(dir.join(CONFIG_FILE), "{\"family\": \"seq2seq\", ").unwrap();
    let e = checkpoint::load_config(&dir).unwrap_err().to_string();
    assert!(
        e.contains("config.json") && e.contains("invalid config"),
        "{e}"
    );

    std::fs::write(dir.join(OPTIMIZER_FILE), b"\x01\x00").unwrap();
    let e = checkpoint::load_optimizer(&dir, &fresh.params)
        .unwrap_err()
        .to_string();
    assert!(e.contains("optimizer.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mismatched_config_or_shapes_are_errors() {
    let dir = tmpdir("mismatch");
    let (m, _) = trained_seq2seq();
    checkpoint::save(&dir, &m.config, &m.params, None).unwrap();

    // A model with another width: the config check names both configs.
    let mut other_cfg = m.config.clone();
    other_cfg.d_model = 32;
    let mut other = Seq2Seq::new(other_cfg.clone(), 0).unwrap();
    let e = checkpoint::load(&dir, &other_cfg, &mut other.params)
        .unwrap_err()
        .to_string();
    assert!(e.contains("config does not match"), "{e}");

    // Bypassing the config check, the tensor shapes are still checked by name.
    let e = checkpoint::load_params(&dir.join(MODEL_FILE), &mut other.params)
        .unwrap_err()
        .to_string();
    assert!(e.contains("shape") && e.contains("src_embed.weight"), "{e}");

    // A different family's parameters: unexpected names.
    let mut lm = Case::random(tiny(Family::Lm, NormPlacement::Pre, true, true), 1);
    let e = checkpoint::load_params(&dir.join(MODEL_FILE), lm.params())
        .unwrap_err()
        .to_string();
    assert!(e.contains("unexpected tensor"), "{e}");

    // Missing optimizer state.
    let e = checkpoint::load_optimizer(&dir, &m.params)
        .unwrap_err()
        .to_string();
    assert!(e.contains("optimizer.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
