//! Linear attention (Katharopoulos et al., 2020, "Transformers are RNNs"): softmax(q·k) is
//! replaced by the kernel φ(q)·φ(k) with φ(x) = elu(x) + 1, so
//!
//! `out_i = φ(q_i) Σ_j φ(k_j)ᵀ v_j / φ(q_i) · Σ_j φ(k_j)`
//!
//! and the sums over keys are computed once: O(T·D²) instead of O(T²·D). Non-causal attention
//! forms `S = φ(K)ᵀ V` (D, D) and `z = Σ φ(k_j)` (D) per head. Causal attention uses prefix
//! sums: chunks of `CH` positions handle their own (CH, CH) lower triangle directly and see
//! earlier chunks through the running state (S, z), which is exactly the recurrent state of
//! O(1)-per-token decoding ([`linear_attention_step`]). No 1/√D scale: φ is not an exponential.
//!
//! Same views and masks as the softmax kernels (padded keys get φ = 0; a sliding window is not
//! supported). Forward saves the normaliser `den_i = φ(q_i)·z_i` per query row.
//! [`linear_attention_reference`] materializes the (Tq, Tk) kernel matrix: the test twin.

use super::attention::{AttentionShape, HeadsMut, HeadsRef, Masks};
use super::matmul::{gemm_strided, MatMut, MatRef};
use crate::parallel::SendPtr;
use crate::simd::{self, multiversion};
use rayon::prelude::*;

/// Positions per causal chunk.
const CH: usize = 64;

multiversion! {
    /// φ(x) = elu(x) + 1 = x + 1 for x > 0, eˣ otherwise.
    fn feature_map(dst: &mut [f32], src: &[f32]) {
        for (o, &x) in dst.iter_mut().zip(src) {
            let e = simd::exp(x.min(0.0));
            *o = if x > 0.0 { x + 1.0 } else { e };
        }
    }
}

multiversion! {
    /// `g ← g ∘ φ'(x)`, φ'(x) = 1 for x > 0, eˣ otherwise.
    fn feature_map_backward(g: &mut [f32], x: &[f32]) {
        for (gv, &xv) in g.iter_mut().zip(x) {
            let e = simd::exp(xv.min(0.0));
            *gv *= if xv > 0.0 { 1.0 } else { e };
        }
    }
}

/// Per-head φ(Q) (Tq, D) and φ(K) (Tk, D) gathered into contiguous scratch, padded keys zeroed.
fn features(
    fq: &mut Vec<f32>,
    fk: &mut Vec<f32>,
    qh: MatRef,
    kh: MatRef,
    tq: usize,
    tk: usize,
    d: usize,
    padding: Option<&[bool]>,
) {
    fq.resize(tq * d, 0.0);
    fk.resize(tk * d, 0.0);
    for i in 0..tq {
        // SAFETY: head rows were bounds-checked by the caller (`check`).
        feature_map(&mut fq[i * d..(i + 1) * d], unsafe {
            qh.offset_rows(i).row(d)
        });
    }
    for j in 0..tk {
        let dst = &mut fk[j * d..(j + 1) * d];
        if padding.is_some_and(|p| p[j]) {
            dst.fill(0.0);
        } else {
            // SAFETY: as above.
            feature_map(dst, unsafe { kh.offset_rows(j).row(d) });
        }
    }
}

fn contiguous(m: &[f32], cols: usize) -> MatRef {
    MatRef::rows(m, cols, false)
}

fn contiguous_mut(m: &mut [f32], cols: usize) -> MatMut {
    MatMut {
        ptr: m.as_mut_ptr(),
        rs: cols as isize,
        cs: 1,
    }
}

/// The state over `n` keys: `S (+)= φ(K)ᵀ V` (D, D) and `z (+)= Σ_j φ(k_j)` (D); fk: (n, D).
fn add_to_state(
    st: &mut [f32],
    z: &mut [f32],
    fk: &[f32],
    v: MatRef,
    n: usize,
    d: usize,
    accumulate: bool,
) {
    if !accumulate {
        z.fill(0.0);
    }
    // SAFETY: `st` is (D, D) scratch; `fk` holds n rows; `v` is a checked head view of n rows.
    unsafe {
        gemm_strided(
            d,
            d,
            n,
            contiguous_mut(st, d),
            accumulate,
            contiguous(fk, d).transposed(),
            v,
            1.0,
            gemm::Parallelism::None,
        )
    };
    for row in fk.chunks(d) {
        z.iter_mut().zip(row).for_each(|(a, b)| *a += b);
    }
}

fn check_masks(masks: &Masks, s: &AttentionShape) {
    assert!(masks.window.is_none(), "linear attention has no window");
    assert!(
        !masks.causal || s.q_len == s.k_len,
        "causal linear attention needs Tq = Tk"
    );
}

#[derive(Default)]
struct Scratch {
    fq: Vec<f32>,
    fk: Vec<f32>,
    a: Vec<f32>,   // (CH, CH) intra-chunk kernel values
    da: Vec<f32>,  // (CH, CH) their gradients
    st: Vec<f32>,  // (D, D) state S (or R in the reverse sweep)
    z: Vec<f32>,   // (D,) state z (or r)
    g: Vec<f32>,   // (Tq, D) dO / den
    e: Vec<f32>,   // (Tq,) −dO·O / den
    dfq: Vec<f32>, // (Tq, D)
    dfk: Vec<f32>, // (Tk, D)
    dst: Vec<f32>, // (D, D) gradient of the state
}

/// Forward. out: (B, Tq, H·D); den: (B, H, Tq) normalisers (0 where a row sees no key, whose
/// output is then 0).
#[allow(clippy::too_many_arguments)]
pub fn linear_attention_forward(
    out: &mut [f32],
    den: &mut [f32],
    q: HeadsRef,
    k: HeadsRef,
    v: HeadsRef,
    s: AttentionShape,
    masks: &Masks,
) {
    let _p = crate::profile::scope("linear attention forward");
    super::attention::check(&s, &q, &k, &v);
    check_masks(masks, &s);
    let (tq, tk, d, hh) = (s.q_len, s.k_len, s.head_dim, s.heads);
    let w = hh * d;
    assert!(out.len() >= s.batch * tq * w && den.len() >= s.batch * hh * tq);
    let [o] = HeadsMut::split(out, w, w, [0]);
    let den_ptr = SendPtr(den.as_mut_ptr());
    (0..s.batch * hh)
        .into_par_iter()
        .for_each_init(Scratch::default, |sc, bh| {
            let (b, h) = (bh / hh, bh % hh);
            let none = gemm::Parallelism::None;
            let padding = masks.padding(b, tk);
            let (kh, vh) = (k.head(b, tk, h, d), v.head(b, tk, h, d));
            let oh = o.head(b, tq, h, d);
            features(
                &mut sc.fq,
                &mut sc.fk,
                q.head(b, tq, h, d),
                kh,
                tq,
                tk,
                d,
                padding,
            );
            // SAFETY: den row block bh belongs to this task.
            let den = unsafe { std::slice::from_raw_parts_mut(den_ptr.get().add(bh * tq), tq) };
            sc.st.resize(d * d, 0.0);
            sc.z.clear();
            sc.z.resize(d, 0.0);
            let (fq, fk) = (&sc.fq, &sc.fk);
            if !masks.causal {
                // S = φ(K)ᵀ V ; z = Σ_j φ(k_j) ; out = φ(Q) S ; den = φ(Q) z
                add_to_state(&mut sc.st, &mut sc.z, fk, vh, tk, d, false);
                // SAFETY: operands are this task's scratch or checked head views.
                unsafe {
                    gemm_strided(
                        tq,
                        d,
                        d,
                        oh,
                        false,
                        contiguous(fq, d),
                        contiguous(&sc.st, d),
                        1.0,
                        none,
                    );
                }
                for (i, dv) in den.iter_mut().enumerate() {
                    *dv = simd::dot(&fq[i * d..(i + 1) * d], &sc.z);
                }
            } else {
                sc.st.fill(0.0);
                sc.a.resize(CH * CH, 0.0);
                for c0 in (0..tq).step_by(CH) {
                    let n = CH.min(tq - c0);
                    let (fqc, fkc) = (&fq[c0 * d..(c0 + n) * d], &fk[c0 * d..(c0 + n) * d]);
                    let am = contiguous_mut(&mut sc.a, n);
                    // SAFETY: as above.
                    unsafe {
                        // A = φ(Q_c) φ(K_c)ᵀ, lower triangle kept
                        gemm_strided(
                            n,
                            n,
                            d,
                            am,
                            false,
                            contiguous(fqc, d),
                            contiguous(fkc, d).transposed(),
                            1.0,
                            none,
                        );
                    }
                    for (i, row) in sc.a[..n * n].chunks_mut(n).enumerate() {
                        row[i + 1..].fill(0.0);
                        den[c0 + i] = simd::sum(row) + simd::dot(&fqc[i * d..(i + 1) * d], &sc.z);
                    }
                    let oc = oh.offset_rows(c0);
                    // SAFETY: as above. out_c = A V_c + φ(Q_c) S_prev
                    unsafe {
                        gemm_strided(
                            n,
                            d,
                            n,
                            oc,
                            false,
                            contiguous(&sc.a, n),
                            vh.offset_rows(c0),
                            1.0,
                            none,
                        );
                        gemm_strided(
                            n,
                            d,
                            d,
                            oc,
                            true,
                            contiguous(fqc, d),
                            contiguous(&sc.st, d),
                            1.0,
                            none,
                        );
                    }
                    add_to_state(&mut sc.st, &mut sc.z, fkc, vh.offset_rows(c0), n, d, true);
                }
            }
            for (i, &dv) in den.iter().enumerate() {
                let inv = if dv > 0.0 { 1.0 / dv } else { 0.0 };
                // SAFETY: rows of this task's head.
                unsafe { oh.offset_rows(i).fill_scale(1, d, inv) };
            }
        });
}

/// Backward. dout, out: (B, Tq, H·D); den from forward. Writes (overwrites) dq, dk, dv.
///
/// With `g_i = dO_i / den_i` and `e_i = −dO_i·out_i / den_i`, the kernel value
/// `a_ij = φ(q_i)·φ(k_j)` has gradient `g_i·v_j + e_i`; then `dφ(q_i) = Σ_j da_ij φ(k_j)`,
/// `dφ(k_j) = Σ_i da_ij φ(q_i)`, `dv_j = Σ_i a_ij g_i`. Non-causal sums factor through
/// `S` and `z`; causal ones are a forward sweep (for dφ(Q), with the prefix state) and a
/// reverse sweep (for dφ(K), dV, with the suffix state `R = Σ φ(q_i) g_iᵀ`, `r = Σ e_i φ(q_i)`).
#[allow(clippy::too_many_arguments)]
pub fn linear_attention_backward(
    dq: &HeadsMut,
    dk: &HeadsMut,
    dv: &HeadsMut,
    dout: &[f32],
    out: &[f32],
    den: &[f32],
    q: HeadsRef,
    k: HeadsRef,
    v: HeadsRef,
    s: AttentionShape,
    masks: &Masks,
) {
    let _p = crate::profile::scope("linear attention backward");
    super::attention::check(&s, &q, &k, &v);
    check_masks(masks, &s);
    let (tq, tk, d, hh) = (s.q_len, s.k_len, s.head_dim, s.heads);
    let w = hh * d;
    assert!(dout.len() >= s.batch * tq * w && out.len() >= s.batch * tq * w);
    assert!(den.len() >= s.batch * hh * tq);
    let view = |data| HeadsRef {
        data,
        rs: w,
        offset: 0,
    };
    let (dov, ov) = (view(dout), view(out));
    (0..s.batch * hh)
        .into_par_iter()
        .for_each_init(Scratch::default, |sc, bh| {
            let (b, h) = (bh / hh, bh % hh);
            let none = gemm::Parallelism::None;
            let padding = masks.padding(b, tk);
            let (qh, kh, vh) = (
                q.head(b, tq, h, d),
                k.head(b, tk, h, d),
                v.head(b, tk, h, d),
            );
            let (doh, oh) = (dov.head(b, tq, h, d), ov.head(b, tq, h, d));
            let (dqh, dkh, dvh) = (
                dq.head(b, tq, h, d),
                dk.head(b, tk, h, d),
                dv.head(b, tk, h, d),
            );
            let den = &den[bh * tq..(bh + 1) * tq];
            features(&mut sc.fq, &mut sc.fk, qh, kh, tq, tk, d, padding);
            sc.g.resize(tq * d, 0.0);
            sc.e.resize(tq, 0.0);
            for i in 0..tq {
                // SAFETY: checked head rows.
                let (doi, oi) = unsafe { (doh.offset_rows(i).row(d), oh.offset_rows(i).row(d)) };
                let inv = if den[i] > 0.0 { 1.0 / den[i] } else { 0.0 };
                sc.e[i] = -simd::dot(doi, oi) * inv;
                sc.g[i * d..(i + 1) * d]
                    .iter_mut()
                    .zip(doi)
                    .for_each(|(g, &x)| *g = x * inv);
            }
            sc.dfq.clear();
            sc.dfq.resize(tq * d, 0.0);
            sc.dfk.clear();
            sc.dfk.resize(tk * d, 0.0);
            sc.st.resize(d * d, 0.0);
            sc.dst.resize(d * d, 0.0);
            sc.z.clear();
            sc.z.resize(d, 0.0);
            let (fq, fk, g, e) = (&sc.fq, &sc.fk, &sc.g, &sc.e);
            // SAFETY (all gemm calls below): operands are this task's scratch or checked head
            // views, and this task alone writes head (b, h) of dq, dk, dv.
            if !masks.causal {
                // S = φ(K)ᵀ V, z = Σ φ(k_j); dS = φ(Q)ᵀ G, dz = Σ e_i φ(q_i)
                add_to_state(&mut sc.st, &mut sc.z, fk, vh, tk, d, false);
                unsafe {
                    gemm_strided(
                        d,
                        d,
                        tq,
                        contiguous_mut(&mut sc.dst, d),
                        false,
                        contiguous(fq, d).transposed(),
                        contiguous(g, d),
                        1.0,
                        none,
                    );
                }
                let mut dz = vec![0.0f32; d];
                for (i, row) in fq.chunks(d).enumerate() {
                    dz.iter_mut().zip(row).for_each(|(a, b)| *a += e[i] * b);
                }
                unsafe {
                    // dφ(Q) = G Sᵀ + e zᵀ ; dφ(K) = V dSᵀ + 1 dzᵀ ; dV = φ(K) dS
                    gemm_strided(
                        tq,
                        d,
                        d,
                        contiguous_mut(&mut sc.dfq, d),
                        false,
                        contiguous(g, d),
                        contiguous(&sc.st, d).transposed(),
                        1.0,
                        none,
                    );
                    gemm_strided(
                        tk,
                        d,
                        d,
                        contiguous_mut(&mut sc.dfk, d),
                        false,
                        vh,
                        contiguous(&sc.dst, d).transposed(),
                        1.0,
                        none,
                    );
                    gemm_strided(
                        tk,
                        d,
                        d,
                        dvh,
                        false,
                        contiguous(fk, d),
                        contiguous(&sc.dst, d),
                        1.0,
                        none,
                    );
                }
                for (i, row) in sc.dfq.chunks_mut(d).enumerate() {
                    row.iter_mut().zip(&sc.z).for_each(|(a, b)| *a += e[i] * b);
                }
                for row in sc.dfk.chunks_mut(d) {
                    row.iter_mut().zip(&dz).for_each(|(a, b)| *a += b);
                }
            } else {
                sc.a.resize(CH * CH, 0.0);
                sc.da.resize(CH * CH, 0.0);
                sc.st.fill(0.0);
                // Forward sweep: dφ(Q_c) = dA φ(K_c) + G_c S_prevᵀ + e_c z_prevᵀ.
                for c0 in (0..tq).step_by(CH) {
                    let n = CH.min(tq - c0);
                    let (fkc, gc) = (&fk[c0 * d..(c0 + n) * d], &g[c0 * d..(c0 + n) * d]);
                    unsafe {
                        // dA = G_c V_cᵀ (+ e_i per row), lower triangle kept
                        gemm_strided(
                            n,
                            n,
                            d,
                            contiguous_mut(&mut sc.da, n),
                            false,
                            contiguous(gc, d),
                            vh.offset_rows(c0).transposed(),
                            1.0,
                            none,
                        );
                    }
                    for (i, row) in sc.da[..n * n].chunks_mut(n).enumerate() {
                        row[..=i].iter_mut().for_each(|x| *x += e[c0 + i]);
                        row[i + 1..].fill(0.0);
                    }
                    let dfqc = contiguous_mut(&mut sc.dfq[c0 * d..(c0 + n) * d], d);
                    unsafe {
                        gemm_strided(
                            n,
                            d,
                            n,
                            dfqc,
                            false,
                            contiguous(&sc.da, n),
                            contiguous(fkc, d),
                            1.0,
                            none,
                        );
                        gemm_strided(
                            n,
                            d,
                            d,
                            dfqc,
                            true,
                            contiguous(gc, d),
                            contiguous(&sc.st, d).transposed(),
                            1.0,
                            none,
                        );
                    }
                    for (i, row) in sc.dfq[c0 * d..(c0 + n) * d].chunks_mut(d).enumerate() {
                        row.iter_mut()
                            .zip(&sc.z)
                            .for_each(|(a, b)| *a += e[c0 + i] * b);
                    }
                    add_to_state(&mut sc.st, &mut sc.z, fkc, vh.offset_rows(c0), n, d, true);
                }
                // Reverse sweep: dφ(K_c) = dAᵀ φ(Q_c) + V_c Rᵀ + r ; dV_c = Aᵀ G_c + φ(K_c) R,
                // with R, r summed over later chunks (here `st` holds R and `z` holds r).
                sc.st.fill(0.0);
                sc.z.fill(0.0);
                let last = (tq - 1) / CH * CH;
                for c0 in (0..=last).rev().step_by(CH) {
                    let n = CH.min(tq - c0);
                    let (fqc, fkc) = (&fq[c0 * d..(c0 + n) * d], &fk[c0 * d..(c0 + n) * d]);
                    let gc = &g[c0 * d..(c0 + n) * d];
                    unsafe {
                        gemm_strided(
                            n,
                            n,
                            d,
                            contiguous_mut(&mut sc.a, n),
                            false,
                            contiguous(fqc, d),
                            contiguous(fkc, d).transposed(),
                            1.0,
                            none,
                        );
                        gemm_strided(
                            n,
                            n,
                            d,
                            contiguous_mut(&mut sc.da, n),
                            false,
                            contiguous(gc, d),
                            vh.offset_rows(c0).transposed(),
                            1.0,
                            none,
                        );
                    }
                    for (i, (ar, dr)) in sc.a[..n * n]
                        .chunks_mut(n)
                        .zip(sc.da[..n * n].chunks_mut(n))
                        .enumerate()
                    {
                        dr[..=i].iter_mut().for_each(|x| *x += e[c0 + i]);
                        dr[i + 1..].fill(0.0);
                        ar[i + 1..].fill(0.0);
                    }
                    let dfkc = contiguous_mut(&mut sc.dfk[c0 * d..(c0 + n) * d], d);
                    let dvc = dvh.offset_rows(c0);
                    unsafe {
                        gemm_strided(
                            n,
                            d,
                            n,
                            dfkc,
                            false,
                            contiguous(&sc.da, n).transposed(),
                            contiguous(fqc, d),
                            1.0,
                            none,
                        );
                        gemm_strided(
                            n,
                            d,
                            d,
                            dfkc,
                            true,
                            vh.offset_rows(c0),
                            contiguous(&sc.st, d).transposed(),
                            1.0,
                            none,
                        );
                        gemm_strided(
                            n,
                            d,
                            n,
                            dvc,
                            false,
                            contiguous(&sc.a, n).transposed(),
                            contiguous(gc, d),
                            1.0,
                            none,
                        );
                        gemm_strided(
                            n,
                            d,
                            d,
                            dvc,
                            true,
                            contiguous(fkc, d),
                            contiguous(&sc.st, d),
                            1.0,
                            none,
                        );
                    }
                    for row in sc.dfk[c0 * d..(c0 + n) * d].chunks_mut(d) {
                        row.iter_mut().zip(&sc.z).for_each(|(a, b)| *a += b);
                    }
                    unsafe {
                        // R += φ(Q_c)ᵀ G_c ; r += Σ e_i φ(q_i)
                        gemm_strided(
                            d,
                            d,
                            n,
                            contiguous_mut(&mut sc.st, d),
                            true,
                            contiguous(fqc, d).transposed(),
                            contiguous(gc, d),
                            1.0,
                            none,
                        );
                    }
                    for (i, row) in fqc.chunks(d).enumerate() {
                        sc.z.iter_mut()
                            .zip(row)
                            .for_each(|(a, b)| *a += e[c0 + i] * b);
                    }
                }
            }
            // Through φ: dq = dφ(Q) ∘ φ'(Q), dk = dφ(K) ∘ φ'(K) (0 for padded keys).
            for i in 0..tq {
                let row = &mut sc.dfq[i * d..(i + 1) * d];
                // SAFETY: checked rows; this task alone writes head (b, h).
                unsafe {
                    feature_map_backward(row, qh.offset_rows(i).row(d));
                    std::ptr::copy_nonoverlapping(row.as_ptr(), dqh.offset_rows(i).ptr, d);
                }
            }
            for j in 0..tk {
                let row = &mut sc.dfk[j * d..(j + 1) * d];
                if padding.is_some_and(|p| p[j]) {
                    row.fill(0.0);
                } else {
                    // SAFETY: as above.
                    feature_map_backward(row, unsafe { kh.offset_rows(j).row(d) });
                }
                // SAFETY: as above.
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dkh.offset_rows(j).ptr, d) };
            }
        });
}

/// The materialized twin (tests only): `A = φ(Q) φ(K)ᵀ` masked, `out = A V / rowsum(A)`.
/// Returns out (B, Tq, H·D) and, given dout, (dq, dk, dv) in the same layout as q, k, v
/// (each (B, T, H·D) contiguous).
#[allow(clippy::too_many_arguments)]
pub fn linear_attention_reference(
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

/// One decoding step of causal linear attention per row, O(D²) per head whatever the position:
/// `S += φ(k)ᵀ v`, `z += φ(k)`, `out = φ(q) S / φ(q)·z`. state: per row, H blocks of
/// (D·D + D) floats; qkv: (R, 3·H·D) rows of [q | k | v].
pub fn linear_attention_step(
    out: &mut [f32],
    state: &mut [f32],
    qkv: &[f32],
    heads: usize,
    head_dim: usize,
) {
    let (w, d) = (heads * head_dim, head_dim);
    let per_row = heads * (d * d + d);
    let rows = qkv.len() / (3 * w);
    assert!(out.len() >= rows * w && state.len() >= rows * per_row);
    out[..rows * w]
        .par_chunks_mut(w)
        .zip(state[..rows * per_row].par_chunks_mut(per_row))
        .zip(qkv.par_chunks(3 * w))
        .for_each(|((o, st), x)| {
            let (mut fq, mut fk) = (vec![0.0f32; d], vec![0.0f32; d]);
            for h in 0..heads {
                feature_map(&mut fq, &x[h * d..(h + 1) * d]);
                feature_map(&mut fk, &x[w + h * d..w + (h + 1) * d]);
                let vh = &x[2 * w + h * d..2 * w + (h + 1) * d];
                let (s, z) = st[h * (d * d + d)..(h + 1) * (d * d + d)].split_at_mut(d * d);
                for (a, srow) in s.chunks_mut(d).enumerate() {
                    srow.iter_mut()
                        .zip(vh)
                        .for_each(|(sv, &vv)| *sv += fk[a] * vv);
                }
                z.iter_mut().zip(&fk).for_each(|(zv, &f)| *zv += f);
                let den = simd::dot(&fq, z);
                let oh = &mut o[h * d..(h + 1) * d];
                oh.fill(0.0);
                for (a, srow) in s.chunks(d).enumerate() {
                    oh.iter_mut()
                        .zip(srow)
                        .for_each(|(ov, &sv)| *ov += fq[a] * sv);
                }
                let inv = if den > 0.0 { 1.0 / den } else { 0.0 };
                oh.iter_mut().for_each(|v| *v *= inv);
            }
        });
}
