//! Incremental decoding: the KV cache reproduces the full masked forward, and the searches
//! agree with each other where they must.

mod common;
use common::{padded_source, random_ids, rel_err, tiny, BEAM_ORDERS};
use qkv::decode::{beam_search, generate, greedy, sample_outputs, BeamConfig, Choice, Sampling};
use qkv::model::{
    AttentionKind, Family, Incremental, LanguageModel, NormPlacement, Seq2Seq, Tokens,
};
use qkv::rng::Rng;

#[test]
fn seq2seq_cached_steps_equal_full_forward() {
    for (norm, learned) in [(NormPlacement::Post, false), (NormPlacement::Pre, true)] {
        let cfg = tiny(Family::Seq2seq, norm, true, learned);
        let mut model = Seq2Seq::new(cfg, 5).unwrap();
        let mut rng = Rng::new(1);
        let (b, s, t) = (3, 7, 6);
        let src = padded_source(&mut rng, b, s, 13);
        let tgt = random_ids(&mut rng, b * t, 1, model.vocab() as u32);
        let full = model
            .logits(
                Tokens::new(&src, b, s).unwrap(),
                Tokens::new(&tgt, b, t).unwrap(),
            )
            .unwrap()
            .to_vec();
        let v = model.vocab();
        let mut cache = model
            .start_decoding(Tokens::new(&src, b, s).unwrap(), t)
            .unwrap();
        for pos in 0..t {
            let ids: Vec<u32> = (0..b).map(|r| tgt[r * t + pos]).collect();
            let step = model.step(&mut cache, &ids).unwrap().to_vec();
            for r in 0..b {
                let want = &full[(r * t + pos) * v..(r * t + pos + 1) * v];
                let err = rel_err(&step[r * v..(r + 1) * v], want);
                assert!(err < 1e-5, "{norm:?} row {r} pos {pos}: rel err {err}");
            }
        }
        // The cache is full now: one more step is an error, not a panic.
        assert!(model.step(&mut cache, &[1, 1, 1]).is_err());
    }
}

/// Beam search's reorders (rows repeated, dropped, permuted; the cache copies a block only
/// when a row continues more than once) leave every row's cache equal to its own history:
/// each step's logits equal a full forward over the histories as reordered.
#[test]
fn reordered_cache_rows_equal_full_forward_of_their_histories() {
    let cfg = tiny(Family::Seq2seq, NormPlacement::Pre, true, false);
    let mut model = Seq2Seq::new(cfg, 9).unwrap();
    let mut rng = Rng::new(4);
    let (b, s, t) = (3, 7, 6);
    let src = padded_source(&mut rng, b, s, 13);
    let v = model.vocab();
    let mut cache = model
        .start_decoding(Tokens::new(&src, b, s).unwrap(), t)
        .unwrap();
    // Per cache row: (source row, tokens fed so far).
    let mut rows: Vec<(usize, Vec<u32>)> = (0..b).map(|i| (i, Vec::new())).collect();
    for (pos, order) in std::iter::once(&[][..]).chain(BEAM_ORDERS).enumerate() {
        if pos > 0 {
            cache.reorder(order);
            rows = order.iter().map(|&r| rows[r].clone()).collect();
        }
        let ids = random_ids(&mut rng, rows.len(), 1, v as u32);
        for (row, &id) in rows.iter_mut().zip(&ids) {
            row.1.push(id);
        }
        let step = model.step(&mut cache, &ids).unwrap().to_vec();
        for (r, (source, tokens)) in rows.iter().enumerate() {
            let one = &src[source * s..(source + 1) * s];
            let full = model
                .logits(
                    Tokens::new(one, 1, s).unwrap(),
                    Tokens::new(tokens, 1, tokens.len()).unwrap(),
                )
                .unwrap()
                .to_vec();
            let want = &full[pos * v..(pos + 1) * v];
            let err = rel_err(&step[r * v..(r + 1) * v], want);
            assert!(
                err < 1e-5,
                "step {pos} row {r} (source {source}): rel err {err}"
            );
        }
    }
}

/// `int8_steps`: each decoding step's logits stay within int8's quantization error of the
/// f32 step's (and the f32 steps equal the full forward, tested above).
#[test]
fn int8_steps_stay_close_to_f32_steps() {
    if !qkv::kernels::packed::available() {
        eprintln!("skipped: int8 decoding needs AVX2+FMA");
        return;
    }
    let cfg = tiny(Family::Seq2seq, NormPlacement::Pre, true, false);
    let mut rng = Rng::new(6);
    let (b, s, t) = (3, 7, 6);
    let src = padded_source(&mut rng, b, s, 13);
    let mut logits = Vec::new();
    for int8 in [false, true] {
        let mut model = Seq2Seq::new(cfg.clone(), 9).unwrap();
        model.int8_steps = int8;
        let v = model.vocab() as u32;
        let mut cache = model
            .start_decoding(Tokens::new(&src, b, s).unwrap(), t)
            .unwrap();
        let mut rng = Rng::new(2);
        let mut all = Vec::new();
        for _ in 0..t {
            let ids = random_ids(&mut rng, b, 1, v);
            all.extend_from_slice(model.step(&mut cache, &ids).unwrap());
        }
        logits.push(all);
    }
    let e = rel_err(&logits[1], &logits[0]);
    assert!(e > 0.0 && e < 5e-2, "int8 logits against f32: rel err {e}");
}

#[test]
fn lm_cached_steps_equal_full_forward() {
    let base = tiny(Family::Lm, NormPlacement::Pre, false, true);
    // Softmax attention over the cache, a sliding window over it, and linear attention's
    // recurrent state, each against its own full forward.
    for (kind, window) in [
        (AttentionKind::Flash, None),
        (AttentionKind::Materialized, Some(3)),
        (AttentionKind::Flash, Some(3)),
        (AttentionKind::Linear, None),
    ] {
        let mut cfg = base.clone();
        cfg.attention = kind;
        cfg.attention_window = window;
        lm_cached_steps_equal_full_forward_for(cfg);
    }
}

fn lm_cached_steps_equal_full_forward_for(cfg: qkv::model::ModelConfig) {
    let what = format!("{:?} window {:?}", cfg.attention, cfg.attention_window);
    let mut model = LanguageModel::new(cfg, 9).unwrap();
    let mut rng = Rng::new(2);
    let (b, t) = (2, 9);
    let ids = random_ids(&mut rng, b * t, 1, 13);
    let full = model
        .logits(Tokens::new(&ids, b, t).unwrap())
        .unwrap()
        .to_vec();
    let v = model.vocab();
    let mut cache = model.start_decoding(b, t);
    for pos in 0..t {
        let step_ids: Vec<u32> = (0..b).map(|r| ids[r * t + pos]).collect();
        let step = model.step(&mut cache, &step_ids).unwrap().to_vec();
        for r in 0..b {
            let err = rel_err(
                &step[r * v..(r + 1) * v],
                &full[(r * t + pos) * v..(r * t + pos + 1) * v],
            );
            assert!(err < 1e-5, "{what}: row {r} pos {pos}: rel err {err}");
        }
    }
}

#[test]
fn beam_of_one_equals_greedy_and_wider_beams_score_no_worse() {
    let cfg = tiny(Family::Seq2seq, NormPlacement::Post, false, false);
    let mut model = Seq2Seq::new(cfg, 3).unwrap();
    let mut rng = Rng::new(4);
    let (b, s) = (4, 6);
    let src = padded_source(&mut rng, b, s, 13);
    let tokens = Tokens::new(&src, b, s).unwrap();
    let mut cache = model.start_decoding(tokens, 12).unwrap();
    let g = greedy(&mut model, &mut cache, 1, 2).unwrap();
    let beam1 = BeamConfig {
        beam: 1,
        length_penalty: 0.0,
        nbest: 1,
        ..BeamConfig::default()
    };
    let mut cache = model.start_decoding(tokens, 12).unwrap();
    let b1 = beam_search(&mut model, &mut cache, 1, 2, &beam1).unwrap();
    for (gr, hyps) in g.iter().zip(&b1) {
        assert_eq!(gr, &hyps[0].tokens);
    }
    let beam4 = BeamConfig {
        beam: 4,
        length_penalty: 0.0,
        nbest: 3,
        ..BeamConfig::default()
    };
    let mut cache = model.start_decoding(tokens, 12).unwrap();
    let b4 = beam_search(&mut model, &mut cache, 1, 2, &beam4).unwrap();
    for (h1, h4) in b1.iter().zip(&b4) {
        assert!(h4.len() == 3 && h4[0].score >= h4[1].score && h4[1].score >= h4[2].score);
        // Every hypothesis is complete, ended by EOS (chosen, or forced at the length limit
        // of 12 positions), so with length penalty 0 the wider beam's best is at least as
        // likely as the greedy output.
        assert!(h4[0].log_prob >= h1[0].log_prob - 1e-5, "{h4:?} vs {h1:?}");
    }
}

#[test]
fn a_rows_sample_depends_on_its_seed_not_on_its_batch() {
    let cfg = tiny(Family::Lm, NormPlacement::Post, false, false);
    let mut model = LanguageModel::new(cfg, 11).unwrap();
    let sampling = |seed: u64| {
        Choice::Sample(Sampling {
            temperature: 1.3,
            top_k: Some(8),
            top_p: Some(0.9),
            seed,
        })
    };
    let run = |model: &mut LanguageModel, prefixes: &[Vec<u32>], choices: &[Choice]| {
        let mut cache = model.start_decoding(prefixes.len(), 16);
        generate(model, &mut cache, prefixes, 2, choices).unwrap()
    };
    let prefixes = vec![vec![1, 4, 5], vec![1], vec![1, 7]];
    let seeds = [5, 6, 7].map(sampling);
    let batched = run(&mut model, &prefixes, &seeds);
    assert_eq!(
        batched,
        run(&mut model, &prefixes, &seeds),
        "not reproducible"
    );
    // Every row alone samples what it sampled in the batch, row 2 included.
    for r in 0..3 {
        let alone = run(&mut model, &prefixes[r..r + 1], &seeds[r..r + 1]);
        assert_eq!(alone[0], batched[r], "row {r}");
    }
    // Other compositions and positions: the last row moved first, beside another request
    // with its own seed, and a batch of one seed for every row.
    let mixed = run(
        &mut model,
        &[prefixes[2].clone(), vec![1, 9, 9, 9], prefixes[0].clone()],
        &[seeds[2].clone(), sampling(99), seeds[0].clone()],
    );
    assert_eq!((&mixed[0], &mixed[2]), (&batched[2], &batched[0]));
    let shared = run(&mut model, &prefixes, &[sampling(6)]);
    assert_eq!(shared[1], batched[1]);
    // A different seed gives a different sample somewhere.
    let other = run(&mut model, &prefixes, &[5, 6, 7].map(|s| sampling(s + 100)));
    assert_ne!(other, batched);
    // Prompts are continued, not echoed; the 16 positions hold the prefix and the new tokens.
    assert!(batched
        .iter()
        .zip(&prefixes)
        .all(|(o, p)| o.len() + p.len() <= 16));
    let bad = Choice::Sample(Sampling {
        temperature: 0.0,
        top_k: None,
        top_p: None,
        seed: 1,
    });
    let mut cache = model.start_decoding(3, 16);
    assert!(generate(&mut model, &mut cache, &prefixes, 2, &[bad]).is_err());
    let mut cache = model.start_decoding(3, 16);
    let two = [sampling(1), sampling(2)];
    let e = generate(&mut model, &mut cache, &prefixes, 2, &two).unwrap_err();
    assert!(e.to_string().contains("one per row"), "{e}");
}

#[test]
fn decoding_another_batch_than_the_encoded_one_is_an_error() {
    let cfg = tiny(Family::Seq2seq, NormPlacement::Post, false, false);
    let mut model = Seq2Seq::new(cfg, 3).unwrap();
    // B = 2, S = 3 encoded; B = 3 decoding would divide the 6 source positions evenly.
    model
        .encode(Tokens::new(&[3, 4, 5, 6, 7, 8], 2, 3).unwrap())
        .unwrap();
    let e = model
        .decode(Tokens::new(&[1, 1, 1, 3, 4, 5], 3, 2).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("decoder batch") && e.contains("2 rows") && e.contains("got 3"),
        "{e}"
    );
    assert!(model.decode(Tokens::new(&[1, 3], 2, 1).unwrap()).is_ok());
}

/// fairseq's `--min-len` and `--no-repeat-ngram-size`: a random model repeats itself and
/// ends early; constrained, no output repeats a bigram (BOS included) and none ends before
/// `min_len` tokens, while the unconstrained search does both (so the test can fail).
#[test]
fn min_len_and_no_repeat_ngram_constrain_beam_search() {
    let cfg = tiny(Family::Seq2seq, NormPlacement::Pre, false, false);
    let mut model = Seq2Seq::new(cfg, 11).unwrap();
    let mut rng = Rng::new(9);
    let (b, s, cap) = (6, 6, 15);
    let src = padded_source(&mut rng, b, s, 13);
    let tokens = Tokens::new(&src, b, s).unwrap();
    let (bos, eos) = (1, 2);
    let bigrams_repeat = |t: &[u32]| {
        let seq: Vec<u32> = std::iter::once(bos).chain(t.iter().copied()).collect();
        let mut seen = std::collections::HashSet::new();
        seq.windows(2).any(|w| !seen.insert((w[0], w[1])))
    };
    let run = |model: &mut Seq2Seq, cfg: &BeamConfig| {
        let mut cache = model.start_decoding(tokens, cap).unwrap();
        beam_search(model, &mut cache, bos, eos, cfg).unwrap()
    };
    let free = BeamConfig {
        beam: 3,
        nbest: 3,
        ..BeamConfig::default()
    };
    let hyps = run(&mut model, &free);
    let all = || hyps.iter().flatten();
    assert!(all().any(|h| bigrams_repeat(&h.tokens)), "{hyps:?}");
    let min_len = 6;
    assert!(all().any(|h| h.tokens.len() < min_len), "{hyps:?}");
    for beam in [1, 3] {
        let cfg = BeamConfig {
            beam,
            nbest: beam,
            min_len,
            no_repeat_ngram_size: 2,
            ..BeamConfig::default()
        };
        let hyps = run(&mut model, &cfg);
        for h in hyps.iter().flatten() {
            assert!(!bigrams_repeat(&h.tokens), "beam {beam}: {:?}", h.tokens);
            assert!(h.tokens.len() >= min_len, "beam {beam}: {:?}", h.tokens);
        }
        assert!(hyps.iter().all(|h| !h.is_empty()));
    }
}

/// Sampled outputs of a Seq2Seq (fairseq's `--sampling`): `n` per input, each drawn from its
/// input's seed and its index alone (the same alone as in a batch, other seeds differ), under
/// `min_len` and `no_repeat_ngram_size` like beam search.
#[test]
fn seq2seq_samples_follow_their_seed_and_the_rules() {
    let cfg = tiny(Family::Seq2seq, NormPlacement::Pre, false, false);
    let mut model = Seq2Seq::new(cfg, 11).unwrap();
    let mut rng = Rng::new(9);
    let (b, s, cap, n) = (4, 6, 15, 5);
    let src = padded_source(&mut rng, b, s, 13);
    let (bos, eos) = (1, 2);
    let sampling = Sampling {
        temperature: 1.5,
        top_k: None,
        top_p: None,
        seed: 0,
    };
    let bigrams_repeat = |t: &[u32]| {
        let seq: Vec<u32> = std::iter::once(bos).chain(t.iter().copied()).collect();
        let mut seen = std::collections::HashSet::new();
        seq.windows(2).any(|w| !seen.insert((w[0], w[1])))
    };
    let run =
        |model: &mut Seq2Seq, rows: std::ops::Range<usize>, cfg: &BeamConfig, seeds: &[u64]| {
            let tokens = Tokens::new(&src[rows.start * s..rows.end * s], rows.len(), s).unwrap();
            let mut cache = model.start_decoding(tokens, cap).unwrap();
            sample_outputs(model, &mut cache, bos, eos, n, cfg, &sampling, seeds).unwrap()
        };
    let free = BeamConfig::default();
    let seeds = [10, 11, 12, 13];
    let all = run(&mut model, 0..b, &free, &seeds);
    assert_eq!(all.len(), b);
    assert!(all.iter().all(|o| o.len() == n), "{all:?}");
    assert_eq!(
        all,
        run(&mut model, 0..b, &free, &seeds),
        "not reproducible"
    );
    for i in 0..b {
        assert_eq!(
            run(&mut model, i..i + 1, &free, &seeds[i..i + 1])[0],
            all[i],
            "input {i}"
        );
    }
    // An input's samples differ from each other, and from another seed's.
    assert!(all.iter().any(|o| o.iter().any(|t| t != &o[0])), "{all:?}");
    assert_ne!(all, run(&mut model, 0..b, &free, &[20, 21, 22, 23]));
    // The random model repeats bigrams and ends early when free, never when constrained.
    let min_len = 6;
    let flat = |o: &Vec<Vec<Vec<u32>>>| o.iter().flatten().cloned().collect::<Vec<_>>();
    assert!(flat(&all).iter().any(|t| bigrams_repeat(t)), "{all:?}");
    assert!(flat(&all).iter().any(|t| t.len() < min_len), "{all:?}");
    let rules = BeamConfig {
        min_len,
        no_repeat_ngram_size: 2,
        ..BeamConfig::default()
    };
    for t in flat(&run(&mut model, 0..b, &rules, &seeds)) {
        assert!(!bigrams_repeat(&t) && t.len() >= min_len, "{t:?}");
    }
    let mut cache = model
        .start_decoding(Tokens::new(&src, b, s).unwrap(), cap)
        .unwrap();
    let e = sample_outputs(
        &mut model,
        &mut cache,
        bos,
        eos,
        n,
        &free,
        &sampling,
        &seeds[..2],
    );
    assert!(e.unwrap_err().to_string().contains("one seed per input"));
}
