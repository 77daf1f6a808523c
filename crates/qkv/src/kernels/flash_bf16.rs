//! The fused attention of [`super::flash`] with its tile products in bf16: the same tiles,
//! masks, online softmax and saved log-sum-exp, with the products on the `vdpbf16ps`
//! micro-kernel of [`super::bf16`]. As FlashAttention-2 does in bf16 on a GPU, the products'
//! operands — Q, K, V, dO, and the probabilities P and score gradients dS of each tile — are
//! rounded to bf16; the sums, the softmax statistics, O and the three gradients stay f32.
//! [`super::flash::flash_forward`] / [`super::flash::flash_backward`] come here when products run
//! in bf16 ([`super::matmul::bf16_active`]), so the signature and the callers are shared.
//!
//! Every query tile reads all of a head's keys (and every key tile all of its queries), so each
//! head's operands are packed once, in the layouts [`tile_product`] reads, and reused by every
//! tile. Three layouts, named by the role an operand plays in a product:
//! - *rows* (a left operand, (T, D) row pairs along D): Q for S = Q Kᵀ, dO for dP = dO Vᵀ;
//! - *token panels* (a right operand whose columns are tokens: panels of `NR` tokens, pairs
//!   along D): K for S, V for dP;
//! - *dim panels* (a right operand whose columns are D: panels of `NR` dims, pairs along the
//!   tokens): V for O += P V, K for dQ += dS K, Q for dK += dSᵀ Q, dO for dV += Pᵀ dO.
//!
//! P and dS are written in bf16 per tile: as rows (left operand of P V and dS K) and, in
//! backward, transposed into panels of `MR` keys with pairs along the queries (left operand of
//! Pᵀ dO and dSᵀ Q).

use super::attention::{grad_heads, AttentionShape, HeadsMut, HeadsRef, Masks};
use super::bf16::pack::{convert_rows_block, pack_cols_pairs, pack_rows_panel};
use super::bf16::{tile_product, MR, NR};
use super::flash::{
    at_least, dscore_row, finish_rows, online_softmax_tile, packed_head_groups, probs_tile,
    tile_visible, with_scratch, BC,
};
use super::matmul::MatMut;
use super::Acc;
use crate::simd;
use rayon::prelude::*;

/// Query rows per tile: six micro-kernel row blocks (a multiple of `MR`, so the blocks of a
/// tile are whole blocks of the head's packed rows; even, so are its query pairs).
const BR: usize = 6 * MR;

/// u32 of packed keys and values the forward keeps at once (8 MB), as in [`super::flash`].
const PACK_U32: usize = 2 << 20;

thread_local! {
    /// The forward's packed keys and values, kept between calls (see [`super::flash`]).
    static PACKED: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
    static FWD_SCRATCH: std::cell::Cell<Option<Box<FwdScratch>>> = const { std::cell::Cell::new(None) };
    static BWD_SCRATCH: std::cell::Cell<Option<Box<BwdScratch>>> = const { std::cell::Cell::new(None) };
}

/// The (len, D) rows of head `h` in batch `b`, as a slice from its first element to its last.
fn head_rows<'a>(x: &HeadsRef<'a>, b: usize, len: usize, h: usize, d: usize) -> &'a [f32] {
    let start = b * len * x.rs + x.offset + h * d;
    &x.data[start..start + (len - 1) * x.rs + d]
}

/// u32 of a *rows* operand of `t` rows: whole `MR`-row blocks.
fn rows_len(t: usize, d: usize) -> usize {
    t.div_ceil(MR) * MR * d.div_ceil(2)
}

/// u32 of a *token panels* operand of `t` tokens.
fn token_panels_len(t: usize, d: usize) -> usize {
    t.div_ceil(NR) * d.div_ceil(2) * NR
}

/// u32 of a *dim panels* operand of `t` tokens.
fn dim_panels_len(t: usize, d: usize) -> usize {
    d.div_ceil(NR) * t.div_ceil(2) * NR
}

/// `x` (t, D), rows `ld` apart → *rows*: (⌈t/MR⌉·MR, ⌈D/2⌉) pairs. dst: [`rows_len`]
///
/// # Safety
/// [`super::bf16::available`].
unsafe fn pack_rows(dst: &mut [u32], x: &[f32], ld: usize, t: usize, d: usize) {
    convert_rows_block(&mut dst[..rows_len(t, d)], x, ld, 0, t, d);
}

/// `x` (t, D) → *token panels*: (⌈t/NR⌉, ⌈D/2⌉, NR). dst: [`token_panels_len`]
///
/// # Safety
/// As [`pack_rows`].
unsafe fn pack_token_panels(dst: &mut [u32], x: &[f32], ld: usize, t: usize, d: usize) {
    let panel = d.div_ceil(2) * NR;
    for (p, chunk) in dst[..token_panels_len(t, d)]
        .chunks_exact_mut(panel)
        .enumerate()
    {
        pack_rows_panel::<NR, f32>(chunk, x, ld, p * NR, t, d);
    }
}

/// `x` (t, D) → *dim panels*: (⌈D/NR⌉, ⌈t/2⌉, NR). dst: [`dim_panels_len`]
///
/// # Safety
/// As [`pack_rows`].
unsafe fn pack_dim_panels(dst: &mut [u32], x: &[f32], ld: usize, t: usize, d: usize) {
    let kp2 = t.div_ceil(2);
    let dst = &mut dst[..dim_panels_len(t, d)];
    pack_cols_pairs::<NR, f32>(dst.as_mut_ptr(), kp2, d.div_ceil(NR), 0, kp2, x, ld, d, t);
}

/// A tile (rows, cols) of f32, `cols` apart → transposed panels of `MR` columns with pairs
/// along the rows: the left operand of a product with the tile's transpose. dst:
/// (⌈cols/MR⌉, ⌈rows/2⌉, MR)
///
/// # Safety
/// As [`pack_rows`].
unsafe fn pack_transposed(dst: &mut [u32], x: &[f32], rows: usize, cols: usize) {
    let kp2 = rows.div_ceil(2);
    let panels = cols.div_ceil(MR);
    let dst = &mut dst[..panels * kp2 * MR];
    pack_cols_pairs::<MR, f32>(dst.as_mut_ptr(), kp2, panels, 0, kp2, x, cols, cols, rows);
}

/// Scratch of one forward task.
#[derive(Default)]
struct FwdScratch {
    qa: Vec<u32>, // (BR, D/2) this tile's queries, rows
    s: Vec<f32>,  // (BR, BC) scores, then probabilities
    pa: Vec<u32>, // (BR, BC/2) probabilities, rows
    m: Vec<f32>,  // (BR,) running max
    l: Vec<f32>,  // (BR,) running sum
}

/// Forward: the contract of [`super::flash::flash_forward`], with Tq, Tk ≥ 1.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: HeadsRef,
    k: HeadsRef,
    v: HeadsRef,
    s: AttentionShape,
    masks: &Masks,
    scale: f32,
) {
    let (tq, tk, d, hh) = (s.q_len, s.k_len, s.head_dim, s.heads);
    let w = hh * d;
    let [o] = HeadsMut::split(out, w, w, [0]);
    let kp2_d = d.div_ceil(2);
    // Per head: K as token panels (for S), V as dim panels (for P V).
    let (k_len, v_len) = (token_panels_len(tk, d), dim_panels_len(tk, d));
    packed_head_groups(
        &PACKED,
        PACK_U32,
        k_len + v_len,
        (lse, s.batch * hh),
        (tq, BR),
        |bh, head| {
            let (b, h) = (bh / hh, bh % hh);
            let (kn, vd) = head.split_at_mut(k_len);
            rayon::join(
                // SAFETY: `bf16_active()`, which sent the forward here, implies `available()`.
                || unsafe { pack_token_panels(kn, head_rows(&k, b, tk, h, d), k.rs, tk, d) },
                // SAFETY: as above.
                || unsafe { pack_dim_panels(vd, head_rows(&v, b, tk, h, d), v.rs, tk, d) },
            );
        },
        |bh, qt, head, lse| {
            with_scratch(&FWD_SCRATCH, |sc: &mut FwdScratch| {
                at_least(&mut sc.qa, BR * kp2_d);
                at_least(&mut sc.s, BR * BC);
                at_least(&mut sc.pa, BR * BC.div_ceil(2));
                at_least(&mut sc.m, BR);
                at_least(&mut sc.l, BR);
                let (b, h) = (bh / hh, bh % hh);
                let (i0, rows) = (qt * BR, lse.len());
                // SAFETY: this task alone takes rows [i0, i0 + rows) of head (b, h).
                let oh = unsafe { o.head_rows(b, tq, h, d, i0..i0 + rows) };
                let kv = head.split_at(k_len);
                // SAFETY: as in the packing above; `kv` is head `bh`'s packed keys and values.
                unsafe { forward_tile(sc, (oh, lse), q, kv, (b, h), i0, s, masks, scale) };
            })
        },
    );
}

/// One query tile of head (b, h), from row `i0`: its rows `oh` of O and their log-sum-exps.
///
/// # Safety
/// `available()`; `kn`, `vd` are the head's packed keys and values.
#[allow(clippy::too_many_arguments)]
unsafe fn forward_tile(
    sc: &mut FwdScratch,
    (mut oh, lse): (MatMut, &mut [f32]),
    q: HeadsRef,
    (kn, vd): (&[u32], &[u32]),
    (b, h): (usize, usize),
    i0: usize,
    s: AttentionShape,
    masks: &Masks,
    scale: f32,
) {
    let (tq, tk, d) = (s.q_len, s.k_len, s.head_dim);
    let rows = oh.nrows();
    let (kp2_d, kp2_tk) = (d.div_ceil(2), tk.div_ceil(2));
    let padding = masks.padding(b, tk);
    oh.fill(0.0);
    convert_rows_block(
        &mut sc.qa[..rows_len(rows, d)],
        head_rows(&q, b, tq, h, d),
        q.rs,
        i0,
        tq,
        d,
    );
    let (m, l) = (&mut sc.m[..rows], &mut sc.l[..rows]);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    for j0 in (0..tk).step_by(BC) {
        let cols = BC.min(tk - j0);
        if !tile_visible(masks, i0, i0 + rows, j0, j0 + cols, tk) {
            continue;
        }
        // S = scale · Q_i K_jᵀ
        let tile = &mut sc.s[..rows * cols];
        tile_product::<false>(
            kp2_d,
            (sc.qa.as_ptr(), MR * kp2_d),
            (kn.as_ptr().add(j0 / NR * kp2_d * NR), kp2_d * NR),
            &mut MatMut::new(tile, rows, cols),
            scale,
            Acc::Set,
        );
        let ml = (&mut *m, &mut *l);
        online_softmax_tile(tile, cols, (i0, j0), tk, masks, padding, ml, &mut oh);
        // O += P V_j, P rounded to bf16 (pairs of keys j0 + 2c, j0 + 2c + 1: whole pairs of
        // V's, as j0 is even).
        let kp2_c = cols.div_ceil(2);
        let pa = &mut sc.pa[..rows_len(rows, cols)];
        convert_rows_block(pa, tile, cols, 0, rows, cols);
        tile_product::<false>(
            kp2_c,
            (pa.as_ptr(), MR * kp2_c),
            (vd.as_ptr().add(j0 / 2 * NR), kp2_tk * NR),
            &mut oh,
            1.0,
            Acc::Add,
        );
    }
    finish_rows(&mut oh, m, l, lse);
}

/// Scratch of one backward task: its head's packed operands, then the tiles.
#[derive(Default)]
struct BwdScratch {
    qa: Vec<u32>,    // Q rows
    qd: Vec<u32>,    // Q dim panels
    doa: Vec<u32>,   // dO rows
    dod: Vec<u32>,   // dO dim panels
    kn: Vec<u32>,    // K token panels
    kd: Vec<u32>,    // K dim panels
    vn: Vec<u32>,    // V token panels
    p: Vec<f32>,     // (BR, BC) probabilities
    dp: Vec<f32>,    // (BR, BC) probability, then score, gradients
    t: Vec<u32>,     // Pᵀ, then dSᵀ, transposed panels
    dsa: Vec<u32>,   // dS rows
    delta: Vec<f32>, // (Tq,) rowsum(dO ∘ O)
}

/// Backward: the contract of [`super::flash::flash_backward`], with Tq, Tk ≥ 1.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    dq: &HeadsMut,
    dk: &HeadsMut,
    dv: &HeadsMut,
    dout: &[f32],
    out: &[f32],
    lse: &[f32],
    q: HeadsRef,
    k: HeadsRef,
    v: HeadsRef,
    s: AttentionShape,
    masks: &Masks,
    scale: f32,
) {
    let (tq, tk, d, hh) = (s.q_len, s.k_len, s.head_dim, s.heads);
    let w = hh * d;
    let view = |data| HeadsRef {
        data,
        rs: w,
        offset: 0,
    };
    let (dov, ov) = (view(dout), view(out));
    (0..s.batch * hh).into_par_iter().for_each(|bh| {
        with_scratch(&BWD_SCRATCH, |sc: &mut BwdScratch| {
            let (b, h) = (bh / hh, bh % hh);
            let lse = &lse[bh * tq..(bh + 1) * tq];
            let (doh, oh) = (head_rows(&dov, b, tq, h, d), head_rows(&ov, b, tq, h, d));
            sc.delta.clear();
            sc.delta
                .extend((0..tq).map(|i| simd::dot(&doh[i * w..i * w + d], &oh[i * w..i * w + d])));
            // SAFETY: this task alone takes head (b, h) of dq, dk and dv.
            let grads = unsafe { grad_heads([dq, dk, dv], (b, h), &s) };
            let ops =
                [(q, tq), (k, tk), (v, tk)].map(|(x, len)| (head_rows(&x, b, len, h, d), x.rs));
            // SAFETY: `bf16_active()`, which sent the backward here, implies `available()`.
            unsafe {
                pack_head(sc, ops, (doh, w), s);
                backward_head(sc, grads, lse, s, (masks, masks.padding(b, tk)), scale);
            }
        })
    });
}

/// Pack one head's operands into `sc`, each in the layouts its products read: Q, K, V and dO
/// as (rows, row stride).
///
/// # Safety
/// `available()`.
unsafe fn pack_head(
    sc: &mut BwdScratch,
    [(qh, q_rs), (kh, k_rs), (vh, v_rs)]: [(&[f32], usize); 3],
    (doh, do_rs): (&[f32], usize),
    s: AttentionShape,
) {
    let (tq, tk, d) = (s.q_len, s.k_len, s.head_dim);
    at_least(&mut sc.qa, rows_len(tq, d));
    at_least(&mut sc.doa, rows_len(tq, d));
    at_least(&mut sc.qd, dim_panels_len(tq, d));
    at_least(&mut sc.dod, dim_panels_len(tq, d));
    at_least(&mut sc.kn, token_panels_len(tk, d));
    at_least(&mut sc.vn, token_panels_len(tk, d));
    at_least(&mut sc.kd, dim_panels_len(tk, d));
    at_least(&mut sc.p, BR * BC);
    at_least(&mut sc.dp, BR * BC);
    at_least(&mut sc.t, BC.div_ceil(MR) * MR * BR.div_ceil(2));
    at_least(&mut sc.dsa, BR * BC.div_ceil(2));
    pack_rows(&mut sc.qa, qh, q_rs, tq, d);
    pack_rows(&mut sc.doa, doh, do_rs, tq, d);
    pack_dim_panels(&mut sc.qd, qh, q_rs, tq, d);
    pack_dim_panels(&mut sc.dod, doh, do_rs, tq, d);
    pack_token_panels(&mut sc.kn, kh, k_rs, tk, d);
    pack_token_panels(&mut sc.vn, vh, v_rs, tk, d);
    pack_dim_panels(&mut sc.kd, kh, k_rs, tk, d);
}

/// All tiles of one head, its operands packed in `sc` ([`pack_head`]); `grads` (dQ, dK, dV)
/// are overwritten.
///
/// # Safety
/// `available()`.
unsafe fn backward_head(
    sc: &mut BwdScratch,
    [mut dqh, mut dkh, mut dvh]: [MatMut; 3],
    lse: &[f32],
    s: AttentionShape,
    (masks, padding): (&Masks, Option<&[bool]>),
    scale: f32,
) {
    let (tq, tk, d) = (s.q_len, s.k_len, s.head_dim);
    let (kp2_d, kp2_tq, kp2_tk) = (d.div_ceil(2), tq.div_ceil(2), tk.div_ceil(2));
    dqh.fill(0.0);
    dkh.fill(0.0);
    dvh.fill(0.0);
    for j0 in (0..tk).step_by(BC) {
        let cols = BC.min(tk - j0);
        let kp2_c = cols.div_ceil(2);
        let (kn_j, vn_j) = (
            sc.kn.as_ptr().add(j0 / NR * kp2_d * NR),
            sc.vn.as_ptr().add(j0 / NR * kp2_d * NR),
        );
        let kd_j = sc.kd.as_ptr().add(j0 / 2 * NR);
        for i0 in (0..tq).step_by(BR) {
            let rows = BR.min(tq - i0);
            if !tile_visible(masks, i0, i0 + rows, j0, j0 + cols, tk) {
                continue;
            }
            let kp2_r = rows.div_ceil(2);
            let (qa_i, doa_i) = (
                sc.qa.as_ptr().add(i0 * kp2_d),
                sc.doa.as_ptr().add(i0 * kp2_d),
            );
            let (qd_i, dod_i) = (
                sc.qd.as_ptr().add(i0 / 2 * NR),
                sc.dod.as_ptr().add(i0 / 2 * NR),
            );
            let (p, dp) = (&mut sc.p[..rows * cols], &mut sc.dp[..rows * cols]);
            // S = scale · Q_i K_jᵀ, then P = exp(S − lse)
            let mut pm = MatMut::new(p, rows, cols);
            tile_product::<false>(
                kp2_d,
                (qa_i, MR * kp2_d),
                (kn_j, kp2_d * NR),
                &mut pm,
                scale,
                Acc::Set,
            );
            probs_tile(p, cols, (i0, j0), tk, masks, padding, lse);
            // dV_j += P_ijᵀ dO_i (query pairs i0 + 2c, i0 + 2c + 1: whole pairs of dO's, as
            // i0 is even)
            pack_transposed(&mut sc.t, p, rows, cols);
            let dvj = &mut dvh.rows(j0, cols);
            tile_product::<true>(
                kp2_r,
                (sc.t.as_ptr(), kp2_r * MR),
                (dod_i, kp2_tq * NR),
                dvj,
                1.0,
                Acc::Add,
            );
            // dP = dO_i V_jᵀ, then dS = P ∘ (dP − delta) · scale
            let mut dpm = MatMut::new(dp, rows, cols);
            tile_product::<false>(
                kp2_d,
                (doa_i, MR * kp2_d),
                (vn_j, kp2_d * NR),
                &mut dpm,
                1.0,
                Acc::Set,
            );
            for (r, (dpr, prow)) in dp.chunks_mut(cols).zip(p.chunks(cols)).enumerate() {
                dscore_row(dpr, prow, sc.delta[i0 + r], scale);
            }
            // dQ_i += dS K_j ; dK_j += dSᵀ Q_i
            convert_rows_block(&mut sc.dsa[..rows_len(rows, cols)], dp, cols, 0, rows, cols);
            let dqi = &mut dqh.rows(i0, rows);
            tile_product::<false>(
                kp2_c,
                (sc.dsa.as_ptr(), MR * kp2_c),
                (kd_j, kp2_tk * NR),
                dqi,
                1.0,
                Acc::Add,
            );
            pack_transposed(&mut sc.t, dp, rows, cols);
            let dkj = &mut dkh.rows(j0, cols);
            tile_product::<true>(
                kp2_r,
                (sc.t.as_ptr(), kp2_r * MR),
                (qd_i, kp2_tq * NR),
                dkj,
                1.0,
                Acc::Add,
            );
        }
    }
}
