//! The efficient attention kernels against their materialized twins: flash (and sliding window)
//! against the reference softmax attention, linear attention against its materialized kernel
//! matrix, on random inputs across shapes, masks and odd lengths (output and all three input
//! gradients).

mod common;
use common::{random_vec, rel_err};
use qkv::kernels::attention::{
    attention_backward, attention_forward, AttentionShape, HeadsMut, HeadsRef, Masks,
};
use qkv::kernels::flash::{flash_backward, flash_forward};
use qkv::kernels::linear_attention::{
    linear_attention_backward, linear_attention_forward, linear_attention_step,
};
use qkv::rng::Rng;

fn view(data: &[f32], rs: usize) -> HeadsRef<'_> {
    HeadsRef {
        data,
        rs,
        offset: 0,
    }
}

struct Case {
    s: AttentionShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    pad: Vec<bool>,
}

impl Case {
    fn new(rng: &mut Rng, s: AttentionShape, padded: bool) -> Self {
        let w = s.heads * s.head_dim;
        // Scores of a few units, as in a trained model, so the softmax is not flat.
        let q = random_vec(rng, s.batch * s.q_len * w, 1.5);
        let k = random_vec(rng, s.batch * s.k_len * w, 1.5);
        let v = random_vec(rng, s.batch * s.k_len * w, 1.0);
        let dout = random_vec(rng, s.batch * s.q_len * w, 1.0);
        // Batch row b has its last 3·b keys padded; with batch ≥ 3 and short keys a row may be
        // entirely padded.
        let pad = (0..s.batch * s.k_len)
            .map(|i| padded && (i % s.k_len) + 3 * (i / s.k_len) >= s.k_len)
            .collect();
        Self {
            s,
            q,
            k,
            v,
            dout,
            pad,
        }
    }

    fn masks(&self, padded: bool, causal: bool, window: Option<usize>) -> Masks<'_> {
        Masks {
            key_padding: padded.then_some(self.pad.as_slice()),
            causal,
            window,
        }
    }
}

/// (out, dq, dk, dv) of the materialized reference.
fn reference(c: &Case, masks: &Masks) -> [Vec<f32>; 4] {
    let s = c.s;
    let w = s.heads * s.head_dim;
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let mut out = vec![0.0; c.q.len()];
    let mut probs = vec![0.0; s.batch * s.heads * s.q_len * s.k_len];
    let (q, k, v) = (view(&c.q, w), view(&c.k, w), view(&c.v, w));
    attention_forward(&mut out, &mut probs, q, k, v, s, masks, scale);
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; c.q.len()],
        vec![0.0; c.k.len()],
        vec![0.0; c.v.len()],
    );
    let mut scratch = vec![0.0; probs.len()];
    {
        let [a] = HeadsMut::split(&mut dq, w, w, [0]);
        let [b] = HeadsMut::split(&mut dk, w, w, [0]);
        let [d] = HeadsMut::split(&mut dv, w, w, [0]);
        attention_backward(&a, &b, &d, &c.dout, &probs, q, k, v, &mut scratch, s, scale);
    }
    [out, dq, dk, dv]
}

fn flash(c: &Case, masks: &Masks) -> [Vec<f32>; 4] {
    let s = c.s;
    let w = s.heads * s.head_dim;
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    // Poison the outputs: every element must be written.
    let mut out = vec![f32::NAN; c.q.len()];
    let mut lse = vec![f32::NAN; s.batch * s.heads * s.q_len];
    let (q, k, v) = (view(&c.q, w), view(&c.k, w), view(&c.v, w));
    flash_forward(&mut out, &mut lse, q, k, v, s, masks, scale);
    let (mut dq, mut dk, mut dv) = (
        vec![f32::NAN; c.q.len()],
        vec![f32::NAN; c.k.len()],
        vec![f32::NAN; c.v.len()],
    );
    {
        let [a] = HeadsMut::split(&mut dq, w, w, [0]);
        let [b] = HeadsMut::split(&mut dk, w, w, [0]);
        let [d] = HeadsMut::split(&mut dv, w, w, [0]);
        flash_backward(&a, &b, &d, &c.dout, &out, &lse, q, k, v, s, masks, scale);
    }
    [out, dq, dk, dv]
}

fn assert_all_close(got: &[Vec<f32>; 4], want: &[Vec<f32>; 4], tol: f32, what: &str) {
    for (name, (g, w)) in ["out", "dq", "dk", "dv"].iter().zip(got.iter().zip(want)) {
        assert!(g.iter().all(|x| x.is_finite()), "{what}: {name} not finite");
        // Relative to the largest reference value, with a floor for gradients that vanish
        // (window 1: each query sees only itself, so dq is rounding noise around 0).
        let diff = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let scale = w.iter().map(|x| x.abs()).fold(0.1f32, f32::max);
        assert!(
            diff < tol * scale,
            "{what}: {name} relative error {}",
            diff / scale
        );
    }
}

fn shape(
    batch: usize,
    heads: usize,
    q_len: usize,
    k_len: usize,
    head_dim: usize,
) -> AttentionShape {
    AttentionShape {
        batch,
        heads,
        q_len,
        k_len,
        head_dim,
    }
}

#[test]
fn flash_matches_the_materialized_reference_across_shapes_and_masks() {
    let mut rng = Rng::new(11);
    // Lengths below, at and across the tile sizes (64 query rows, 256 key columns), odd ones,
    // cross-attention shapes (Tq ≠ Tk), head widths up to 256, and heads whose packed keys and
    // values are too large to share the forward's packing buffer (one head per group).
    let shapes = [
        shape(2, 3, 5, 5, 4),
        shape(3, 2, 67, 67, 16),
        shape(1, 2, 300, 300, 32),
        shape(2, 1, 130, 517, 8),
        shape(2, 2, 257, 64, 64),
        shape(1, 1, 70, 70, 256),
        shape(4, 1, 9, 3, 12),
        shape(3, 1, 40, 2100, 256),
    ];
    for s in shapes {
        for padded in [false, true] {
            let c = Case::new(&mut rng, s, padded);
            let causal_ok = s.q_len == s.k_len;
            for causal in [false, true] {
                if causal && !causal_ok {
                    continue;
                }
                let m = c.masks(padded, causal, None);
                let what = format!("{s:?} padded {padded} causal {causal}");
                assert_all_close(&flash(&c, &m), &reference(&c, &m), 1e-4, &what);
            }
        }
    }
}

#[test]
fn bf16_flash_matches_the_reference_on_bf16_rounded_inputs() {
    use qkv::kernels::bf16::round_bf16;
    use qkv::kernels::matmul::{set_matmul_precision, Precision};
    if !qkv::kernels::bf16::run_bf16_test("bf16 flash attention") {
        return;
    }
    let mut rng = Rng::new(13);
    // The f32 test's shapes (odd lengths and head widths pair up a zero half; D = 4 and 12 are
    // narrower than a 32-lane panel), window masks, and several query and key tiles (72, 256).
    let shapes = [
        (shape(2, 3, 5, 5, 4), None),
        (shape(3, 2, 67, 67, 16), None),
        (shape(1, 2, 300, 300, 32), None),
        (shape(2, 1, 130, 517, 8), None),
        (shape(2, 2, 257, 64, 64), None),
        (shape(1, 1, 70, 70, 256), None),
        (shape(4, 1, 9, 3, 12), None),
        (shape(1, 1, 151, 151, 7), None),
        (shape(3, 1, 40, 2100, 256), None),
        (shape(1, 2, 600, 600, 16), Some(100)),
    ];
    for (s, window) in shapes {
        for padded in [false, true] {
            let mut c = Case::new(&mut rng, s, padded);
            for x in [&mut c.q, &mut c.k, &mut c.v, &mut c.dout] {
                x.iter_mut().for_each(|v| *v = round_bf16(*v));
            }
            for causal in [false, true] {
                if causal && s.q_len != s.k_len {
                    continue;
                }
                let m = c.masks(padded, causal, window);
                let what = format!("{s:?} window {window:?} padded {padded} causal {causal}");
                let got = {
                    let _g = set_matmul_precision(Precision::Bf16);
                    flash(&c, &m)
                };
                // The inputs are exact in bf16, so what is left is P and dS rounded to bf16
                // (2⁻⁹ relative) inside the products.
                assert_all_close(&got, &reference(&c, &m), 1e-2, &what);
                // And the bf16 kernel did run: f32 flash on the same inputs is not the same.
                assert_ne!(got[0], flash(&c, &m)[0], "{what}: bf16 gave the f32 output");
            }
        }
    }
}

#[test]
fn sliding_window_flash_matches_the_windowed_reference() {
    let mut rng = Rng::new(12);
    for (s, w) in [
        (shape(2, 2, 40, 40, 8), 1),
        (shape(2, 2, 40, 40, 8), 7),
        (shape(1, 2, 600, 600, 16), 100),
        (shape(1, 1, 300, 300, 8), 300),
    ] {
        for padded in [false, true] {
            let c = Case::new(&mut rng, s, padded);
            for causal in [false, true] {
                let m = c.masks(padded, causal, Some(w));
                let what = format!("{s:?} window {w} padded {padded} causal {causal}");
                assert_all_close(&flash(&c, &m), &reference(&c, &m), 1e-4, &what);
            }
        }
    }
}

#[test]
fn the_window_mask_means_nearby_keys_only() {
    // One head, width 1, q = 0: uniform attention over exactly the visible keys, so the output
    // is the mean of the visible values.
    let s = shape(1, 1, 6, 6, 1);
    let (q, k) = (vec![0.0; 6], vec![0.0; 6]);
    let v: Vec<f32> = (0..6).map(|j| (1u32 << j) as f32).collect();
    for (causal, window, want) in [
        // causal, w = 2: keys i−1, i
        (true, 2, [1.0, 1.5, 3.0, 6.0, 12.0, 24.0]),
        // non-causal, w = 2: keys i−1, i, i+1
        (
            false,
            2,
            [1.5, 7.0 / 3.0, 14.0 / 3.0, 28.0 / 3.0, 56.0 / 3.0, 24.0],
        ),
    ] {
        let m = Masks {
            key_padding: None,
            causal,
            window: Some(window),
        };
        let c = Case {
            s,
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            dout: vec![0.0; 6],
            pad: vec![],
        };
        for got in [&flash(&c, &m)[0], &reference(&c, &m)[0]] {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-5, "causal {causal}: {got:?} vs {want:?}");
            }
        }
    }
}

fn linear(c: &Case, masks: &Masks) -> [Vec<f32>; 4] {
    let s = c.s;
    let w = s.heads * s.head_dim;
    let mut out = vec![f32::NAN; c.q.len()];
    let mut den = vec![f32::NAN; s.batch * s.heads * s.q_len];
    let (q, k, v) = (view(&c.q, w), view(&c.k, w), view(&c.v, w));
    linear_attention_forward(&mut out, &mut den, q, k, v, s, masks);
    let (mut dq, mut dk, mut dv) = (
        vec![f32::NAN; c.q.len()],
        vec![f32::NAN; c.k.len()],
        vec![f32::NAN; c.v.len()],
    );
    {
        let [a] = HeadsMut::split(&mut dq, w, w, [0]);
        let [b] = HeadsMut::split(&mut dk, w, w, [0]);
        let [d] = HeadsMut::split(&mut dv, w, w, [0]);
        linear_attention_backward(&a, &b, &d, &c.dout, &out, &den, q, k, v, s, masks);
    }
    [out, dq, dk, dv]
}

/// Linear attention's materialized twin: `A = φ(Q) φ(K)ᵀ` masked, `out = A V / rowsum(A)`,
/// summed in f64.
/// Returns out (B, Tq, H·D) and, given dout, (dq, dk, dv) in the same layout as q, k, v
/// (each (B, T, H·D) contiguous).
fn linear_attention_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    s: AttentionShape,
    masks: &Masks,
) -> [Vec<f32>; 4] {
    let (tq, tk, d, hh) = (s.q_len, s.k_len, s.head_dim, s.heads);
    let w = hh * d;
    let phi = |x: f32| if x > 0.0 { x + 1.0 } else { x.exp() };
    let dphi = |x: f32| if x > 0.0 { 1.0 } else { x.exp() };
    let mut out = vec![0.0; s.batch * tq * w];
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; s.batch * tq * w],
        vec![0.0; s.batch * tk * w],
        vec![0.0; s.batch * tk * w],
    );
    for b in 0..s.batch {
        for h in 0..hh {
            let at = |x: &[f32], t: usize, len: usize, c: usize| x[(b * len + t) * w + h * d + c];
            let mut a = vec![0.0f64; tq * tk];
            for i in 0..tq {
                for j in 0..tk {
                    let hidden =
                        (masks.causal && j > i) || masks.key_padding.is_some_and(|p| p[b * tk + j]);
                    if !hidden {
                        a[i * tk + j] = (0..d)
                            .map(|c| phi(at(q, i, tq, c)) as f64 * phi(at(k, j, tk, c)) as f64)
                            .sum();
                    }
                }
            }
            for i in 0..tq {
                let den: f64 = a[i * tk..(i + 1) * tk].iter().sum();
                if den == 0.0 {
                    continue;
                }
                let mut o = vec![0.0f64; d];
                for j in 0..tk {
                    for (c, oc) in o.iter_mut().enumerate() {
                        *oc += a[i * tk + j] * at(v, j, tk, c) as f64 / den;
                    }
                }
                // da_ij = (dO_i · v_j − dO_i · o_i) / den
                let doi: Vec<f64> = (0..d).map(|c| at(dout, i, tq, c) as f64).collect();
                let dot_o: f64 = doi.iter().zip(&o).map(|(x, y)| x * y).sum();
                for j in 0..tk {
                    if a[i * tk + j] == 0.0 {
                        continue;
                    }
                    let dv_dot: f64 = (0..d).map(|c| doi[c] * at(v, j, tk, c) as f64).sum();
                    let da = (dv_dot - dot_o) / den;
                    for c in 0..d {
                        let (qc, kc) = (at(q, i, tq, c), at(k, j, tk, c));
                        dq[(b * tq + i) * w + h * d + c] +=
                            (da * phi(kc) as f64 * dphi(qc) as f64) as f32;
                        dk[(b * tk + j) * w + h * d + c] +=
                            (da * phi(qc) as f64 * dphi(kc) as f64) as f32;
                        dv[(b * tk + j) * w + h * d + c] += (a[i * tk + j] / den * doi[c]) as f32;
                    }
                }
                for (c, oc) in o.iter().enumerate() {
                    out[(b * tq + i) * w + h * d + c] = *oc as f32;
                }
            }
        }
    }
    [out, dq, dk, dv]
}

#[test]
fn linear_attention_matches_its_materialized_twin() {
    let mut rng = Rng::new(13);
    // Causal lengths below, at and across the 64-position chunks.
    for s in [
        shape(2, 3, 5, 5, 4),
        shape(3, 2, 64, 64, 8),
        shape(1, 2, 150, 150, 16),
        shape(2, 1, 7, 19, 8),
    ] {
        for padded in [false, true] {
            let c = Case::new(&mut rng, s, padded);
            for causal in [false, true] {
                if causal && s.q_len != s.k_len {
                    continue;
                }
                let m = c.masks(padded, causal, None);
                let want = linear_attention_reference(&c.q, &c.k, &c.v, &c.dout, s, &m);
                let what = format!("{s:?} padded {padded} causal {causal}");
                assert_all_close(&linear(&c, &m), &want, 1e-4, &what);
            }
        }
    }
}

#[test]
fn linear_attention_recurrent_steps_equal_the_causal_forward() {
    let mut rng = Rng::new(14);
    let s = shape(2, 2, 90, 90, 8);
    let c = Case::new(&mut rng, s, false);
    let w = s.heads * s.head_dim;
    let m = c.masks(false, true, None);
    let full = linear(&c, &m);
    let mut state = vec![0.0; s.batch * s.heads * (s.head_dim * s.head_dim + s.head_dim)];
    let mut out = vec![0.0; s.batch * w];
    for t in 0..s.q_len {
        // Rows [q | k | v] of position t for each batch row.
        let mut qkv = Vec::new();
        for b in 0..s.batch {
            for x in [&c.q, &c.k, &c.v] {
                qkv.extend_from_slice(&x[(b * s.q_len + t) * w..][..w]);
            }
        }
        linear_attention_step(&mut out, &mut state, &qkv, s.heads, s.head_dim);
        for b in 0..s.batch {
            let want = &full[0][(b * s.q_len + t) * w..][..w];
            let e = rel_err(&out[b * w..(b + 1) * w], want);
            assert!(e < 1e-5, "position {t} row {b}: {e}");
        }
    }
}
