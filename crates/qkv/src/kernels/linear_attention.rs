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
//! supported). Forward saves the normaliser `den_i = φ(q_i)·z_i` per query row. The tests
//! check both passes against a twin that materializes the (Tq, Tk) kernel matrix
//! (`tests/attention.rs`).

use super::attention::{grad_heads, AttentionShape, HeadsMut, HeadsRef, Masks};
use super::matmul::{gemm_strided, MatMut, MatRef};
use super::Acc;
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
    padding: Option<&[bool]>,
) {
    let (tq, tk, d) = (qh.nrows(), kh.nrows(), qh.ncols());
    fq.resize(tq * d, 0.0);
    fk.resize(tk * d, 0.0);
    for i in 0..tq {
        feature_map(&mut fq[i * d..(i + 1) * d], qh.row(i));
    }
    for j in 0..tk {
        let dst = &mut fk[j * d..(j + 1) * d];
        if padding.is_some_and(|p| p[j]) {
            dst.fill(0.0);
        } else {
            feature_map(dst, kh.row(j));
        }
    }
}

/// `x` as a row-major (rows, cols) matrix.
fn mat(x: &[f32], rows: usize, cols: usize) -> MatRef<'_> {
    MatRef::new(x, rows, cols)
}

/// `x` as a writable row-major (rows, cols) matrix.
fn mat_mut(x: &mut [f32], rows: usize, cols: usize) -> MatMut<'_> {
    MatMut::new(x, rows, cols)
}

/// `dst [+]= a · b` on this thread: the parallelism is over heads.
fn product(dst: &mut MatMut, a: MatRef, b: MatRef, acc: Acc) {
    gemm_strided(dst, a, b, 1.0, acc, gemm::Parallelism::None);
}

/// The state over the keys `fk` = φ(K) (n, D) and values `v` (n, D): `S (+)= φ(K)ᵀ V` (D, D)
/// and `z (+)= Σ_j φ(k_j)` (D).
fn add_to_state(st: &mut [f32], z: &mut [f32], fk: &[f32], v: MatRef, acc: Acc) {
    let (n, d) = (v.nrows(), v.ncols());
    if acc == Acc::Set {
        z.fill(0.0);
    }
    product(&mut mat_mut(st, d, d), mat(fk, n, d).t(), v, acc);
    for row in fk.chunks(d) {
        z.iter_mut().zip(row).for_each(|(a, b)| *a += b);
    }
}

/// `A = φ(Q_c) φ(K_c)ᵀ`, lower triangle kept: a causal chunk's kernel values
/// `a_ij = φ(q_i)·φ(k_j)`. a: (n, n); fqc, fkc: (n, D)
fn kernel_values(a: &mut [f32], fqc: &[f32], fkc: &[f32], (n, d): (usize, usize)) {
    product(
        &mut mat_mut(a, n, n),
        mat(fqc, n, d),
        mat(fkc, n, d).t(),
        Acc::Set,
    );
    for (i, row) in a[..n * n].chunks_mut(n).enumerate() {
        row[i + 1..].fill(0.0);
    }
}

/// `dA = G_c V_cᵀ + e_i` on row i, lower triangle kept: the gradient of a causal chunk's
/// kernel values. da: (n, n); gc: (n, D); vc: (n, D); ec: (n)
fn kernel_grads(da: &mut [f32], gc: &[f32], vc: MatRef, ec: &[f32]) {
    let (n, d) = (vc.nrows(), vc.ncols());
    product(&mut mat_mut(da, n, n), mat(gc, n, d), vc.t(), Acc::Set);
    for (i, row) in da[..n * n].chunks_mut(n).enumerate() {
        row[..=i].iter_mut().for_each(|x| *x += ec[i]);
        row[i + 1..].fill(0.0);
    }
}

/// `rows[i] += scale_i · x` for each row of width `x.len()`, `scale_i` from `scales` (or 1).
fn add_scaled_rows(rows: &mut [f32], x: &[f32], scales: Option<&[f32]>) {
    for (i, row) in rows.chunks_mut(x.len()).enumerate() {
        match scales {
            Some(e) => row.iter_mut().zip(x).for_each(|(a, b)| *a += e[i] * b),
            None => row.iter_mut().zip(x).for_each(|(a, b)| *a += b),
        }
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
    if tq == 0 {
        return;
    }
    let [o] = HeadsMut::split(out, w, w, [0]);
    den[..s.batch * hh * tq]
        .par_chunks_mut(tq)
        .enumerate()
        .for_each_init(Scratch::default, |sc, (bh, den)| {
            let (b, h) = (bh / hh, bh % hh);
            let vh = v.head(b, tk, h, d);
            let (qh, kh) = (q.head(b, tq, h, d), k.head(b, tk, h, d));
            features(&mut sc.fq, &mut sc.fk, qh, kh, masks.padding(b, tk));
            // SAFETY: this task alone takes head (b, h) of `out`.
            let mut oh = unsafe { o.head(b, tq, h, d) };
            sc.st.resize(d * d, 0.0);
            sc.z.clear();
            sc.z.resize(d, 0.0);
            if masks.causal {
                forward_causal(sc, &mut oh, den, vh);
            } else {
                forward_full(sc, &mut oh, den, vh);
            }
            for (i, &dv) in den.iter().enumerate() {
                let inv = if dv > 0.0 { 1.0 / dv } else { 0.0 };
                oh.rows(i, 1).scale(inv);
            }
        });
}

/// Non-causal forward of one head, unnormalised: `S = φ(K)ᵀ V`, `z = Σ_j φ(k_j)`;
/// `out = φ(Q) S`, `den = φ(Q) z`.
fn forward_full(sc: &mut Scratch, oh: &mut MatMut, den: &mut [f32], vh: MatRef) {
    let (tq, d) = (oh.nrows(), oh.ncols());
    add_to_state(&mut sc.st, &mut sc.z, &sc.fk, vh, Acc::Set);
    product(oh, mat(&sc.fq, tq, d), mat(&sc.st, d, d), Acc::Set);
    for (i, dv) in den.iter_mut().enumerate() {
        *dv = simd::dot(&sc.fq[i * d..(i + 1) * d], &sc.z);
    }
}

/// Causal forward of one head, unnormalised, chunk by chunk: `A = φ(Q_c) φ(K_c)ᵀ` (lower
/// triangle), `out_c = A V_c + φ(Q_c) S_prev`, `den_c = rowsum(A) + φ(Q_c) z_prev`; then the
/// state takes in the chunk.
fn forward_causal(sc: &mut Scratch, oh: &mut MatMut, den: &mut [f32], vh: MatRef) {
    let (tq, d) = (oh.nrows(), oh.ncols());
    sc.st.fill(0.0);
    sc.a.resize(CH * CH, 0.0);
    for c0 in (0..tq).step_by(CH) {
        let n = CH.min(tq - c0);
        let (fqc, fkc) = (&sc.fq[c0 * d..(c0 + n) * d], &sc.fk[c0 * d..(c0 + n) * d]);
        kernel_values(&mut sc.a, fqc, fkc, (n, d));
        for (i, row) in sc.a[..n * n].chunks(n).enumerate() {
            den[c0 + i] = simd::sum(row) + simd::dot(&fqc[i * d..(i + 1) * d], &sc.z);
        }
        let mut oc = oh.rows(c0, n);
        product(&mut oc, mat(&sc.a, n, n), vh.rows(c0, n), Acc::Set);
        product(&mut oc, mat(fqc, n, d), mat(&sc.st, d, d), Acc::Add);
        add_to_state(&mut sc.st, &mut sc.z, fkc, vh.rows(c0, n), Acc::Add);
    }
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
            let padding = masks.padding(b, tk);
            let (qh, kh, vh) = (
                q.head(b, tq, h, d),
                k.head(b, tk, h, d),
                v.head(b, tk, h, d),
            );
            // SAFETY: this task alone takes head (b, h) of dq, dk and dv.
            let [mut dqh, mut dkh, mut dvh] = unsafe { grad_heads([dq, dk, dv], (b, h), &s) };
            features(&mut sc.fq, &mut sc.fk, qh, kh, padding);
            let (doh, oh) = (dov.head(b, tq, h, d), ov.head(b, tq, h, d));
            output_grads(sc, doh, oh, &den[bh * tq..(bh + 1) * tq]);
            sc.dfq.clear();
            sc.dfq.resize(tq * d, 0.0);
            sc.dfk.clear();
            sc.dfk.resize(tk * d, 0.0);
            sc.st.resize(d * d, 0.0);
            sc.dst.resize(d * d, 0.0);
            sc.z.clear();
            sc.z.resize(d, 0.0);
            if masks.causal {
                backward_causal(sc, vh, &mut dvh);
            } else {
                backward_full(sc, vh, &mut dvh);
            }
            // Through φ: dq = dφ(Q) ∘ φ'(Q), dk = dφ(K) ∘ φ'(K) (0 for padded keys).
            for i in 0..tq {
                let row = &mut sc.dfq[i * d..(i + 1) * d];
                feature_map_backward(row, qh.row(i));
                dqh.row_mut(i).copy_from_slice(row);
            }
            for j in 0..tk {
                let row = &mut sc.dfk[j * d..(j + 1) * d];
                if padding.is_some_and(|p| p[j]) {
                    row.fill(0.0);
                } else {
                    feature_map_backward(row, kh.row(j));
                }
                dkh.row_mut(j).copy_from_slice(row);
            }
        });
}

/// `g_i = dO_i / den_i` and `e_i = −dO_i·O_i / den_i` (0 where `den_i` is 0) into `sc`.
fn output_grads(sc: &mut Scratch, doh: MatRef, oh: MatRef, den: &[f32]) {
    let d = doh.ncols();
    sc.g.resize(den.len() * d, 0.0);
    sc.e.resize(den.len(), 0.0);
    for (i, &dn) in den.iter().enumerate() {
        let (doi, oi) = (doh.row(i), oh.row(i));
        let inv = if dn > 0.0 { 1.0 / dn } else { 0.0 };
        sc.e[i] = -simd::dot(doi, oi) * inv;
        sc.g[i * d..(i + 1) * d]
            .iter_mut()
            .zip(doi)
            .for_each(|(g, &x)| *g = x * inv);
    }
}

/// Non-causal backward of one head, to dφ(Q), dφ(K) (in `sc`) and dV: with `S = φ(K)ᵀ V`,
/// `z = Σ φ(k_j)`, `dS = φ(Q)ᵀ G`, `dz = Σ e_i φ(q_i)`:
/// `dφ(Q) = G Sᵀ + e zᵀ`, `dφ(K) = V dSᵀ + 1 dzᵀ`, `dV = φ(K) dS`.
fn backward_full(sc: &mut Scratch, vh: MatRef, dvh: &mut MatMut) {
    let (tk, d, tq) = (vh.nrows(), vh.ncols(), sc.e.len());
    let (fq, fk, g, e) = (&sc.fq, &sc.fk, &sc.g, &sc.e);
    add_to_state(&mut sc.st, &mut sc.z, fk, vh, Acc::Set);
    product(
        &mut mat_mut(&mut sc.dst, d, d),
        mat(fq, tq, d).t(),
        mat(g, tq, d),
        Acc::Set,
    );
    let mut dz = vec![0.0f32; d];
    for (i, row) in fq.chunks(d).enumerate() {
        dz.iter_mut().zip(row).for_each(|(a, b)| *a += e[i] * b);
    }
    let (st, dst) = (mat(&sc.st, d, d), mat(&sc.dst, d, d));
    product(
        &mut mat_mut(&mut sc.dfq, tq, d),
        mat(g, tq, d),
        st.t(),
        Acc::Set,
    );
    product(&mut mat_mut(&mut sc.dfk, tk, d), vh, dst.t(), Acc::Set);
    product(dvh, mat(fk, tk, d), dst, Acc::Set);
    add_scaled_rows(&mut sc.dfq, &sc.z, Some(e));
    add_scaled_rows(&mut sc.dfk, &dz, None);
}

/// Causal backward of one head, to dφ(Q), dφ(K) (in `sc`) and dV, chunk by chunk: a forward
/// sweep with the prefix state (S, z) for `dφ(Q_c) = dA φ(K_c) + G_c S_prevᵀ + e_c z_prevᵀ`,
/// then a reverse sweep with the suffix state (R, r), summed over later chunks, for
/// `dφ(K_c) = dAᵀ φ(Q_c) + V_c Rᵀ + r` and `dV_c = Aᵀ G_c + φ(K_c) R`.
fn backward_causal(sc: &mut Scratch, vh: MatRef, dvh: &mut MatMut) {
    let (tq, d) = (vh.nrows(), vh.ncols());
    if tq == 0 {
        return;
    }
    sc.a.resize(CH * CH, 0.0);
    sc.da.resize(CH * CH, 0.0);
    sc.st.fill(0.0);
    for c0 in (0..tq).step_by(CH) {
        let n = CH.min(tq - c0);
        let rows = c0 * d..(c0 + n) * d;
        let (fkc, gc, ec) = (&sc.fk[rows.clone()], &sc.g[rows.clone()], &sc.e[c0..c0 + n]);
        kernel_grads(&mut sc.da, gc, vh.rows(c0, n), ec);
        let mut dfqc = mat_mut(&mut sc.dfq[rows.clone()], n, d);
        product(&mut dfqc, mat(&sc.da, n, n), mat(fkc, n, d), Acc::Set);
        product(&mut dfqc, mat(gc, n, d), mat(&sc.st, d, d).t(), Acc::Add);
        add_scaled_rows(&mut sc.dfq[rows], &sc.z, Some(ec));
        add_to_state(&mut sc.st, &mut sc.z, fkc, vh.rows(c0, n), Acc::Add);
    }
    // The reverse sweep: `st` now holds R and `z` holds r.
    sc.st.fill(0.0);
    sc.z.fill(0.0);
    let last = (tq - 1) / CH * CH;
    for c0 in (0..=last).rev().step_by(CH) {
        let n = CH.min(tq - c0);
        let rows = c0 * d..(c0 + n) * d;
        let (fqc, fkc, gc) = (
            &sc.fq[rows.clone()],
            &sc.fk[rows.clone()],
            &sc.g[rows.clone()],
        );
        let (ec, vc) = (&sc.e[c0..c0 + n], vh.rows(c0, n));
        kernel_values(&mut sc.a, fqc, fkc, (n, d));
        kernel_grads(&mut sc.da, gc, vc, ec);
        let (fq_c, fk_c, g_c) = (mat(fqc, n, d), mat(fkc, n, d), mat(gc, n, d));
        let (a, da, st) = (mat(&sc.a, n, n), mat(&sc.da, n, n), mat(&sc.st, d, d));
        let mut dfkc = mat_mut(&mut sc.dfk[rows.clone()], n, d);
        product(&mut dfkc, da.t(), fq_c, Acc::Set);
        product(&mut dfkc, vc, st.t(), Acc::Add);
        let mut dvc = dvh.rows(c0, n);
        product(&mut dvc, a.t(), g_c, Acc::Set);
        product(&mut dvc, fk_c, st, Acc::Add);
        add_scaled_rows(&mut sc.dfk[rows], &sc.z, None);
        // R += φ(Q_c)ᵀ G_c ; r += Σ e_i φ(q_i)
        product(&mut mat_mut(&mut sc.st, d, d), fq_c.t(), g_c, Acc::Add);
        for (i, row) in fqc.chunks(d).enumerate() {
            sc.z.iter_mut().zip(row).for_each(|(a, b)| *a += ec[i] * b);
        }
    }
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
