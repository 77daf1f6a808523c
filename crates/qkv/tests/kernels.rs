//! Every kernel against its reference twin, and every backward against finite differences.

mod common;
use common::{random_vec, rel_err};
use qkv::kernels::activation::{bias_act_backward, bias_act_forward, Activation};
use qkv::kernels::attention::{
    attention_backward, attention_forward, AttentionShape, HeadsMut, HeadsRef, Masks,
};
use qkv::kernels::dropout::{self, Dropout};
use qkv::kernels::embedding::{embedding_backward, embedding_forward, sinusoidal_table};
use qkv::kernels::layernorm::{layernorm_backward, layernorm_forward, residual_layernorm_forward};
use qkv::kernels::loss::cross_entropy;
use qkv::kernels::matmul::{matmul, matmul_naive, Layout};
use qkv::kernels::optim::adamw_step;
use qkv::kernels::softmax::{softmax_backward, softmax_forward};
use qkv::kernels::Acc;
use qkv::rng::Rng;

/// Central differences of `f` at `x`, for the indices in `idx`.
fn numeric_grad(x: &[f32], idx: &[usize], f: &mut dyn FnMut(&[f32]) -> f64) -> Vec<f32> {
    let h = 1e-2f32;
    let mut x = x.to_vec();
    idx.iter()
        .map(|&i| {
            let o = x[i];
            x[i] = o + h;
            let a = f(&x);
            x[i] = o - h;
            let b = f(&x);
            x[i] = o;
            ((a - b) / (2.0 * h as f64)) as f32
        })
        .collect()
}

fn assert_close(analytic: &[f32], numeric: &[f32], what: &str) {
    for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
        let err = (a - n).abs() / (a.abs().max(n.abs()) + 1e-3);
        assert!(err < 2e-2, "{what}[{i}]: analytic {a} vs numeric {n}");
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

fn sample(n: usize, k: usize) -> Vec<usize> {
    (0..k).map(|i| (i * 7919 + 3) % n).collect()
}

#[test]
fn matmul_matches_naive_in_every_transpose_combination() {
    let mut rng = Rng::new(1);
    // The last two are tall enough (m ≥ 4·min(k, n)) that a transposed right operand is made
    // row-major first, in several bands with ragged edges.
    for (m, k, n) in [
        (1, 1, 1),
        (37, 19, 23),
        (130, 70, 90),
        (300, 37, 45),
        (600, 9, 130),
    ] {
        for ta in [Layout::RowMajor, Layout::Transposed] {
            for tb in [Layout::RowMajor, Layout::Transposed] {
                for acc in [Acc::Set, Acc::Add] {
                    let a = random_vec(&mut rng, m * k, 1.0);
                    let b = random_vec(&mut rng, k * n, 1.0);
                    let init = random_vec(&mut rng, m * n, 1.0);
                    let (mut got, mut want) = (init.clone(), init.clone());
                    matmul(&mut got, &a, &b, m, k, n, ta, tb, acc);
                    matmul_naive(&mut want, &a, &b, m, k, n, ta, tb, acc);
                    assert!(
                        rel_err(&got, &want) < 1e-5,
                        "m{m} k{k} n{n} {ta:?} {tb:?} {acc:?}"
                    );
                }
            }
        }
    }
}

/// Naive materialized attention in f64, one (b, h) at a time, with explicit masks.
#[allow(clippy::too_many_arguments)]
pub fn attention_naive(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
    pad: Option<&[bool]>,
    causal: bool,
    window: Option<usize>,
) -> Vec<f32> {
    let (b, h, tq, tk, d) = (s.batch, s.heads, s.q_len, s.k_len, s.head_dim);
    let c = h * d;
    let mut out = vec![0.0f32; b * tq * c];
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..tq {
                let mut sc: Vec<f64> = (0..tk)
                    .map(|j| {
                        let outside = window.is_some_and(|w| i.abs_diff(j) >= w);
                        let masked =
                            (causal && j > i) || outside || pad.is_some_and(|p| p[bi * tk + j]);
                        if masked {
                            f64::NEG_INFINITY
                        } else {
                            (0..d)
                                .map(|x| {
                                    q[(bi * tq + i) * c + hi * d + x] as f64
                                        * k[(bi * tk + j) * c + hi * d + x] as f64
                                })
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        }
                    })
                    .collect();
                let max = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if max == f64::NEG_INFINITY {
                    continue;
                }
                sc.iter_mut().for_each(|x| *x = (*x - max).exp());
                let z: f64 = sc.iter().sum();
                for x in 0..d {
                    out[(bi * tq + i) * c + hi * d + x] = (0..tk)
                        .map(|j| sc[j] / z * v[(bi * tk + j) * c + hi * d + x] as f64)
                        .sum::<f64>()
                        as f32;
                }
            }
        }
    }
    out
}

/// The packed x·Wᵀ kernel of decoding steps against the naive product: every row count of
/// the micro-kernel (1–6 and several tiles), partial and whole column panels, both `Acc`s,
/// on one thread and across the pool; and through `matmul` while a packing scope is
/// installed (where the weight is packed at its first product).
#[test]
fn packed_matmul_matches_naive() {
    use qkv::kernels::packed::{self, PackedB, PackedScope, PackedWeights};
    if !packed::available() {
        eprintln!("skipped: this CPU has no AVX2+FMA, so the packed kernel is never used");
        return;
    }
    let mut rng = Rng::new(11);
    for (m, k, n) in [
        (1, 1, 1),
        (5, 7, 16),
        (6, 33, 17),
        (13, 64, 40),
        (2, 256, 6000),
        (300, 64, 70),
    ] {
        let x = random_vec(&mut rng, m * k, 1.0);
        let w = random_vec(&mut rng, n * k, 1.0);
        let start = random_vec(&mut rng, m * n, 1.0);
        let b = PackedB::pack(&w, n, k);
        for acc in [Acc::Set, Acc::Add] {
            let mut want = start.clone();
            matmul_naive(
                &mut want,
                &x,
                &w,
                m,
                k,
                n,
                Layout::RowMajor,
                Layout::Transposed,
                acc,
            );
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut got = start.clone();
                pool.install(|| packed::matmul_packed(&mut got, &x, m, &b, acc));
                let e = rel_err(&got, &want);
                assert!(
                    e < 1e-5,
                    "({m}, {k}, {n}) {acc:?} {threads} threads: rel err {e}"
                );
            }
            let scope = PackedScope::install(PackedWeights::default());
            let mut got = start.clone();
            matmul(
                &mut got,
                &x,
                &w,
                m,
                k,
                n,
                Layout::RowMajor,
                Layout::Transposed,
                acc,
            );
            assert_eq!(scope.finish().len(), 1, "the product ran on a packed copy");
            let e = rel_err(&got, &want);
            assert!(
                e < 1e-5,
                "({m}, {k}, {n}) {acc:?} through matmul: rel err {e}"
            );
        }
    }
}

/// The int8 product against its twin: the naive product of the same quantized operands
/// (each weight row scaled so its largest magnitude is 127, each input row likewise,
/// rounded to nearest, ties to even), and within quantization error of the f32 product.
#[test]
fn packed_int8_matmul_matches_its_quantized_twin() {
    use qkv::kernels::packed::{self, PackedI8};
    if !packed::available() {
        eprintln!("skipped: this CPU has no AVX2+FMA, so the packed kernel is never used");
        return;
    }
    let quantized = |x: &[f32], k: usize| -> Vec<f32> {
        x.chunks(k)
            .flat_map(|row| {
                let amax = row.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
                let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
                row.iter()
                    .map(move |&v| (v * (1.0 / s)).round_ties_even().clamp(-127.0, 127.0) * s)
            })
            .collect()
    };
    let mut rng = Rng::new(12);
    for (m, k, n) in [
        (1, 1, 1),
        (5, 7, 16),
        (6, 33, 17),
        (13, 64, 40),
        (2, 256, 600),
        (40, 255, 70),
    ] {
        let x = random_vec(&mut rng, m * k, 1.0);
        let mut w = random_vec(&mut rng, n * k, 1.0);
        w[..k].iter_mut().for_each(|v| *v = 0.0); // an all-zero channel
        let b = PackedI8::pack(&w, n, k);
        for acc in [Acc::Set, Acc::Add] {
            let start = random_vec(&mut rng, m * n, 1.0);
            let mut twin = start.clone();
            let (xq, wq) = (quantized(&x, k), quantized(&w, k));
            matmul_naive(
                &mut twin,
                &xq,
                &wq,
                m,
                k,
                n,
                Layout::RowMajor,
                Layout::Transposed,
                acc,
            );
            let mut exact = start.clone();
            matmul_naive(
                &mut exact,
                &x,
                &w,
                m,
                k,
                n,
                Layout::RowMajor,
                Layout::Transposed,
                acc,
            );
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut got = start.clone();
                let mut scratch = packed::QuantScratch::default();
                pool.install(|| packed::matmul_packed_i8(&mut got, &x, m, &b, acc, &mut scratch));
                let e = rel_err(&got, &twin);
                assert!(
                    e < 1e-5,
                    "({m}, {k}, {n}) {acc:?} {threads} threads: rel err {e} to the twin"
                );
                let e = rel_err(&got, &exact);
                assert!(
                    e < 3e-2,
                    "({m}, {k}, {n}) {acc:?}: rel err {e} to the f32 product"
                );
            }
        }
    }
}

#[test]
fn attention_matches_naive_reference_and_finite_differences() {
    let mut rng = Rng::new(2);
    // (tq, tk, causal, padded): self-attention with both masks, cross-attention with odd lengths.
    for (tq, tk, causal, padded) in [
        (5, 5, true, true),
        (4, 7, false, true),
        (3, 3, false, false),
        (6, 6, true, false),
    ] {
        let s = AttentionShape {
            batch: 2,
            heads: 3,
            q_len: tq,
            k_len: tk,
            head_dim: 4,
        };
        let c = s.heads * s.head_dim;
        let q = random_vec(&mut rng, 2 * tq * c, 1.0);
        let k = random_vec(&mut rng, 2 * tk * c, 1.0);
        let v = random_vec(&mut rng, 2 * tk * c, 1.0);
        let pad: Vec<bool> = (0..2 * tk).map(|i| padded && i >= 2 * tk - 2).collect();
        let masks = Masks {
            key_padding: padded.then_some(pad.as_slice()),
            causal,
            window: None,
        };
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let run = |q: &[f32], k: &[f32], v: &[f32]| {
            let mut out = vec![0.0; 2 * tq * c];
            let mut probs = vec![0.0; 2 * 3 * tq * tk];
            let view = |d| HeadsRef {
                data: d,
                rs: c,
                offset: 0,
            };
            attention_forward(
                &mut out,
                &mut probs,
                view(q),
                view(k),
                view(v),
                s,
                &masks,
                scale,
            );
            (out, probs)
        };
        let (out, probs) = run(&q, &k, &v);
        let want = attention_naive(&q, &k, &v, s, masks.key_padding, causal, None);
        assert!(
            rel_err(&out, &want) < 1e-5,
            "forward tq{tq} tk{tk} causal{causal} padded{padded}"
        );

        // Backward of L = Σ out ∘ r.
        let r = random_vec(&mut rng, out.len(), 1.0);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let mut scratch = vec![0.0; probs.len()];
        {
            let [dqv] = HeadsMut::split(&mut dq, c, c, [0]);
            let [dkv] = HeadsMut::split(&mut dk, c, c, [0]);
            let [dvv] = HeadsMut::split(&mut dv, c, c, [0]);
            let view = |d| HeadsRef {
                data: d,
                rs: c,
                offset: 0,
            };
            attention_backward(
                &dqv,
                &dkv,
                &dvv,
                &r,
                &probs,
                view(&q),
                view(&k),
                view(&v),
                &mut scratch,
                s,
                scale,
            );
        }
        let idx = sample(q.len(), 12);
        let num = numeric_grad(&q, &idx, &mut |x| dot(&run(x, &k, &v).0, &r));
        assert_close(&idx.iter().map(|&i| dq[i]).collect::<Vec<_>>(), &num, "dq");
        let idx = sample(k.len(), 12);
        let num = numeric_grad(&k, &idx, &mut |x| dot(&run(&q, x, &v).0, &r));
        assert_close(&idx.iter().map(|&i| dk[i]).collect::<Vec<_>>(), &num, "dk");
        let num = numeric_grad(&v, &idx, &mut |x| dot(&run(&q, &k, x).0, &r));
        assert_close(&idx.iter().map(|&i| dv[i]).collect::<Vec<_>>(), &num, "dv");
    }
}

#[test]
fn layernorm_matches_reference_and_finite_differences() {
    let mut rng = Rng::new(3);
    let (n, c) = (5, 37);
    let x = random_vec(&mut rng, n * c, 2.0);
    let w = random_vec(&mut rng, c, 1.0);
    let b = random_vec(&mut rng, c, 1.0);
    let run = |x: &[f32], w: &[f32], b: &[f32]| {
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, x, w, b, c, 1e-5);
        (out, mean, rstd)
    };
    let (out, mean, rstd) = run(&x, &w, &b);
    for r in 0..n {
        let row = &x[r * c..(r + 1) * c];
        let m = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = row.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / c as f64;
        for i in 0..c {
            let want = (row[i] as f64 - m) / (var + 1e-5).sqrt() * w[i] as f64 + b[i] as f64;
            assert!((out[r * c + i] as f64 - want).abs() < 1e-4);
        }
    }
    // The fused residual variant equals add-then-normalise.
    let sub = random_vec(&mut rng, n * c, 1.0);
    let (mut sum, mut fused, mut m2, mut s2) = (
        vec![0.0; n * c],
        vec![0.0; n * c],
        vec![0.0; n],
        vec![0.0; n],
    );
    residual_layernorm_forward(
        &mut sum, &mut fused, &mut m2, &mut s2, &x, &sub, &w, &b, c, 1e-5, None,
    );
    let added: Vec<f32> = x.iter().zip(&sub).map(|(a, b)| a + b).collect();
    assert_eq!(fused, run(&added, &w, &b).0);

    let r = random_vec(&mut rng, n * c, 1.0);
    let prior = random_vec(&mut rng, n * c, 1.0);
    let mut dx = prior.clone();
    let (mut dw, mut db) = (vec![0.0; c], vec![0.0; c]);
    layernorm_backward(
        &mut dx,
        &mut dw,
        &mut db,
        &r,
        &x,
        &mean,
        &rstd,
        &w,
        c,
        Acc::Add,
    );
    let idx = sample(n * c, 15);
    let num = numeric_grad(&x, &idx, &mut |x| dot(&run(x, &w, &b).0, &r));
    // Acc::Add keeps what was there and adds the gradient.
    assert_close(
        &idx.iter().map(|&i| dx[i] - prior[i]).collect::<Vec<_>>(),
        &num,
        "dx",
    );
    let idx = sample(c, 8);
    assert_close(
        &idx.iter().map(|&i| dw[i]).collect::<Vec<_>>(),
        &numeric_grad(&w, &idx, &mut |w| dot(&run(&x, w, &b).0, &r)),
        "dw",
    );
    assert_close(
        &idx.iter().map(|&i| db[i]).collect::<Vec<_>>(),
        &numeric_grad(&b, &idx, &mut |b| dot(&run(&x, &w, b).0, &r)),
        "db",
    );
}

#[test]
fn bias_activation_fused_matches_unfused_and_finite_differences() {
    let mut rng = Rng::new(4);
    let (n, f) = (6, 35);
    for act in [Activation::Relu, Activation::Gelu] {
        let x = random_vec(&mut rng, n * f, 1.5);
        let bias = random_vec(&mut rng, f, 0.5);
        let run = |x: &[f32], bias: &[f32]| {
            let (mut pre, mut post) = (x.to_vec(), vec![0.0; n * f]);
            bias_act_forward(&mut pre, &mut post, bias, act);
            (pre, post)
        };
        let (pre, post) = run(&x, &bias);
        for i in 0..n * f {
            let v = x[i] + bias[i % f];
            assert_eq!(pre[i], v);
            assert!((post[i] - act.apply(v)).abs() < 1e-6);
        }
        let r = random_vec(&mut rng, n * f, 1.0);
        let (mut dpre, mut db) = (r.clone(), vec![0.0; f]);
        bias_act_backward(&mut dpre, &mut db, &pre, act);
        let idx = sample(n * f, 15);
        assert_close(
            &idx.iter().map(|&i| dpre[i]).collect::<Vec<_>>(),
            &numeric_grad(&x, &idx, &mut |x| dot(&run(x, &bias).1, &r)),
            "dpre",
        );
        let idx = sample(f, 8);
        assert_close(
            &idx.iter().map(|&i| db[i]).collect::<Vec<_>>(),
            &numeric_grad(&bias, &idx, &mut |b| dot(&run(&x, b).1, &r)),
            "dbias",
        );
    }
    // ReLU propagates NaN like PyTorch (a diverged model must not be hidden).
    let (mut pre, mut post) = (vec![f32::NAN, -1.0, 2.0], vec![0.0; 3]);
    bias_act_forward(&mut pre, &mut post, &[0.0, 0.0, 0.0], Activation::Relu);
    assert!(post[0].is_nan() && post[1] == 0.0 && post[2] == 2.0);
}

#[test]
fn softmax_backward_matches_finite_differences() {
    let mut rng = Rng::new(5);
    let (rows, n) = (3, 9);
    let x = random_vec(&mut rng, rows * n, 2.0);
    let run = |x: &[f32]| {
        let mut y = x.to_vec();
        softmax_forward(&mut y, n);
        y
    };
    let y = run(&x);
    for r in 0..rows {
        assert!((y[r * n..(r + 1) * n].iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
    let r = random_vec(&mut rng, rows * n, 1.0);
    let mut d = r.clone();
    softmax_backward(&mut d, &y, n);
    let idx: Vec<usize> = (0..rows * n).collect();
    assert_close(
        &d,
        &numeric_grad(&x, &idx, &mut |x| dot(&run(x), &r)),
        "softmax",
    );
}

#[test]
fn cross_entropy_matches_formula_and_finite_differences() {
    let mut rng = Rng::new(6);
    let n = 5;
    let targets = [3u32, 0, 6, 0, 1]; // 0 is the ignored padding index
                                      // 37: two whole 16-lane chunks of the vectorized row passes and a remainder.
    for (v, smoothing) in [(7, 0.0f32), (7, 0.1), (37, 0.0), (37, 0.1)] {
        let logits = random_vec(&mut rng, n * v, 2.0);
        let run = |l: &[f32]| {
            let mut d = vec![0.0; n * v];
            cross_entropy(Some(&mut d), l, &targets, v, Some(0), smoothing)
        };
        let ce = run(&logits);
        let (loss, count) = (ce.mean, ce.count);
        assert_eq!(count, 3);
        // Forward only (evaluation) measures the same loss.
        assert_eq!(
            cross_entropy(None, &logits, &targets, v, Some(0), smoothing),
            ce
        );
        let (mut want, mut want_nll) = (0.0f64, 0.0f64);
        for (r, &t) in targets.iter().enumerate().filter(|(_, &t)| t != 0) {
            let row = &logits[r * v..(r + 1) * v];
            let lz = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
            let nll = lz - row[t as usize] as f64;
            let smooth = lz - row.iter().map(|&x| x as f64).sum::<f64>() / v as f64;
            want += (1.0 - smoothing as f64) * nll + smoothing as f64 * smooth;
            want_nll += nll;
        }
        assert!(
            (ce.nll_sum - want_nll).abs() < 1e-5,
            "nll {} vs {want_nll}",
            ce.nll_sum
        );
        assert!(
            (loss as f64 - want / 3.0).abs() < 1e-5,
            "loss {loss} vs {}",
            want / 3.0
        );
        let mut d = vec![0.0; n * v];
        cross_entropy(Some(&mut d), &logits, &targets, v, Some(0), smoothing);
        let idx: Vec<usize> = (0..n * v).collect();
        assert_close(
            &d,
            &numeric_grad(&logits, &idx, &mut |l| run(l).mean as f64),
            "dlogits",
        );
    }
}

#[test]
fn embedding_backward_matches_finite_differences() {
    let mut rng = Rng::new(7);
    let (vocab, c, b, t) = (6, 8, 2, 5);
    let table = random_vec(&mut rng, vocab * c, 1.0);
    let pos = random_vec(&mut rng, 8 * c, 1.0);
    let tokens = [1u32, 2, 2, 5, 0, 3, 1, 1, 4, 2];
    let scale = (c as f32).sqrt();
    let run = |table: &[f32], pos: &[f32]| {
        let mut out = vec![0.0; b * t * c];
        embedding_forward(&mut out, &tokens, table, pos, scale, t, c, None);
        out
    };
    let out = run(&table, &pos);
    assert_eq!(out[c + 3], table[2 * c + 3] * scale + pos[c + 3]);
    let r = random_vec(&mut rng, out.len(), 1.0);
    let (mut dt, mut dp) = (vec![0.0; table.len()], vec![0.0; pos.len()]);
    embedding_backward(&mut dt, Some(&mut dp), &r, &tokens, scale, t, c);
    let idx: Vec<usize> = (0..table.len()).collect();
    assert_close(
        &dt,
        &numeric_grad(&table, &idx, &mut |x| dot(&run(x, &pos), &r)),
        "dtable",
    );
    let idx: Vec<usize> = (0..t * c).collect();
    assert_close(
        &dp[..t * c],
        &numeric_grad(&pos, &idx, &mut |x| dot(&run(&table, x), &r)),
        "dpos",
    );
    // The sinusoidal table of §3.5.
    let pe = sinusoidal_table(4, 6);
    assert!((pe[3 * 6 + 2] - (3.0f64 / 10000f64.powf(2.0 / 6.0)).sin() as f32).abs() < 1e-6);
    assert!((pe[3 * 6 + 3] - (3.0f64 / 10000f64.powf(2.0 / 6.0)).cos() as f32).abs() < 1e-6);
}

#[test]
fn adamw_matches_the_pytorch_formula() {
    let mut rng = Rng::new(8);
    let n = 40_000; // spans several parallel chunks
    let mut p = random_vec(&mut rng, n, 1.0);
    let g = random_vec(&mut rng, n, 1.0);
    let (mut m, mut v) = (
        random_vec(&mut rng, n, 0.1),
        random_vec(&mut rng, n, 0.1)
            .iter()
            .map(|x| x.abs())
            .collect::<Vec<_>>(),
    );
    let (p0, m0, v0) = (p.clone(), m.clone(), v.clone());
    let (lr, b1, b2, eps, wd, step) = (1e-2f32, 0.9f32, 0.98f32, 1e-9f32, 0.01f32, 3u64);
    adamw_step(&mut p, &g, &mut m, &mut v, lr, b1, b2, eps, wd, step);
    for i in (0..n).step_by(997) {
        let (g, m0, v0, p0) = (g[i] as f64, m0[i] as f64, v0[i] as f64, p0[i] as f64);
        let m1 = 0.9 * m0 + 0.1 * g;
        let v1 = 0.98 * v0 + 0.02 * g * g;
        let (bc1, bc2) = (1.0 - 0.9f64.powi(3), 1.0 - 0.98f64.powi(3));
        let want = p0 * (1.0 - 1e-2 * 0.01) - 1e-2 / bc1 * m1 / (v1.sqrt() / bc2.sqrt() + 1e-9);
        assert!(
            (p[i] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
            "p[{i}] {} vs {want}",
            p[i]
        );
        assert!((m[i] as f64 - m1).abs() < 1e-6 && (v[i] as f64 - v1).abs() < 1e-6);
    }
}

#[test]
fn dropout_keeps_the_expected_fraction_and_is_inverted() {
    let n = 100_000;
    let x = vec![1.0f32; n];
    let sub = vec![1.0f32; n];
    let mut out = vec![0.0; n];
    let d = Dropout::new(0.25, 99);
    dropout::residual_add(&mut out, &x, &sub, d);
    let kept = out.iter().filter(|&&v| v > 1.0).count() as f64 / n as f64;
    assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
    assert!(out
        .iter()
        .all(|&v| v == 1.0 || (v - (1.0 + 1.0 / 0.75)).abs() < 1e-6));
    // Backward regenerates the same mask.
    let mut g = vec![0.0; n];
    dropout::backward_into(&mut g, &sub, d);
    assert!(g.iter().zip(&out).all(|(g, o)| (*g == 0.0) == (*o == 1.0)));
    assert!(Dropout::new(0.0, 1).is_none());
}
