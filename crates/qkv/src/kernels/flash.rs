//! Fused attention, the FlashAttention-2 algorithm (Dao, 2023) on the CPU: the same math as the
//! materialized reference in [`super::attention`] (Eq. 1 of the paper, same masks, same
//! strided per-head views), but the (Tq, Tk) score matrix never exists. A tile of `BR` queries
//! streams over tiles of `BC` keys, keeping a running row maximum `m` and normaliser `l` (the
//! "online softmax"); forward saves only the log-sum-exp `lse = m + ln l` per query row, and
//! backward recomputes each score tile from it. Extra memory is O(threads · BR · BC), not
//! O(Tq · Tk), so a 16k-token sequence costs no more scratch than a 64-token one.
//!
//! Tile products are the hand-written kernels of [`super::tile`] (single-threaded inside a task);
//! the parallelism is over (batch, head, query tile) in forward and over (batch, head) in
//! backward, where each task owns its head's dQ and so needs no atomics. When products run in
//! bf16 ([`super::matmul::bf16_active`]) both entry points hand over to [`super::flash_bf16`],
//! the same algorithm with bf16 tile operands.

use super::attention::{AttentionShape, HeadsMut, HeadsRef, Masks};
use super::matmul::{MatMut, MatRef};
use super::tile::{gemm_rows, transpose};
use crate::parallel::SendPtr;
use crate::simd::{self, multiversion};
use rayon::prelude::*;

/// Query rows per tile.
const BR: usize = 64;
/// Key columns per tile. A (BR, BC) score tile is 64 KB: it and the Q, K and V tiles stay in L2.
pub(super) const BC: usize = 256;

/// Does query tile `[i0, i1)` see anything of key tile `[j0, j1)`?
#[inline]
pub(super) fn tile_visible(
    masks: &Masks,
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
    k_len: usize,
) -> bool {
    let (lo_first, _) = masks.visible(i0, k_len);
    let (_, hi_last) = masks.visible(i1 - 1, k_len);
    // lo and hi are non-decreasing in i, so the tile's visible band is [lo(i0), hi(i1 − 1)).
    j0 < hi_last && lo_first < j1
}

/// Set masked entries of one score row (keys `j0..j0 + row.len()`) to −∞.
#[inline]
fn mask_row(row: &mut [f32], j0: usize, lo: usize, hi: usize, padding: Option<&[bool]>) {
    let n = row.len();
    let a = lo.saturating_sub(j0).min(n);
    let b = hi.saturating_sub(j0).min(n).max(a);
    row[..a].iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
    row[b..].iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
    if let Some(pad) = padding {
        for (v, &m) in row[a..b].iter_mut().zip(&pad[j0 + a..j0 + b]) {
            if m {
                *v = f32::NEG_INFINITY;
            }
        }
    }
}

multiversion! {
    /// One row of the online softmax: `row` holds masked scores (−∞ = hidden); on exit it holds
    /// `exp(score − m_new)` (0 where hidden). Returns (m_new, the factor `exp(m_old − m_new)` that
    /// rescales the running sum and output, and the row's sum).
    fn online_row_portable(row: &mut [f32], m_old: f32) -> (f32, f32, f32) {
        let m_new = simd::max(row).max(m_old);
        if m_new == f32::NEG_INFINITY {
            row.iter_mut().for_each(|v| *v = 0.0);
            return (m_new, 1.0, 0.0);
        }
        // One pass: exponentiate and sum, 16 independent lanes so it vectorizes.
        let mut acc = [0.0f32; 16];
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            for l in 0..16 {
                let e = simd::exp(c[l] - m_new);
                let e = if c[l] == f32::NEG_INFINITY { 0.0 } else { e };
                c[l] = e;
                acc[l] += e;
            }
        }
        let mut sum: f32 = 0.0;
        for v in chunks.into_remainder() {
            let e = simd::exp(*v - m_new);
            *v = if *v == f32::NEG_INFINITY { 0.0 } else { e };
            sum += *v;
        }
        let alpha = if m_old == f32::NEG_INFINITY { 0.0 } else { simd::exp(m_old - m_new) };
        (m_new, alpha, sum + acc.iter().sum::<f32>())
    }
}

multiversion! {
    /// `row ← exp(row − lse)` with hidden (−∞) entries 0: the probabilities, recomputed.
    fn probs_row_portable(row: &mut [f32], lse: f32) {
        if lse == f32::NEG_INFINITY {
            row.iter_mut().for_each(|v| *v = 0.0);
            return;
        }
        for v in row.iter_mut() {
            let e = simd::exp(*v - lse);
            *v = if *v == f32::NEG_INFINITY { 0.0 } else { e };
        }
    }
}

multiversion! {
    /// `dp ← p ∘ (dp − delta) · scale`: the score gradient of one row.
    pub(super) fn dscore_row(dp: &mut [f32], p: &[f32], delta: f32, scale: f32) {
        dp.iter_mut().zip(p).for_each(|(d, &pv)| *d = pv * (*d - delta) * scale);
    }
}

/// Run `f` on this thread's scratch of type `T`, kept between tasks and calls. Allocated per
/// rayon split (`for_each_init`), the ~150 KB of tiles were zeroed again every split; keeping
/// them made the training steps' one-tile heads 10% faster. Taken out while in use, so a
/// re-entrant call (work stealing) makes its own instead of aliasing.
pub(super) fn with_scratch<T: Default + 'static, R>(
    key: &'static std::thread::LocalKey<std::cell::Cell<Option<Box<T>>>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    let mut sc = key.with(|c| c.take()).unwrap_or_default();
    let r = f(&mut sc);
    key.with(|c| c.set(Some(sc)));
    r
}

/// Grow `v` to at least `n` elements (scratch is grow-only; every user writes what it reads).
pub(super) fn at_least<T: Clone + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// Scratch of one forward task.
#[derive(Default)]
struct FwdScratch {
    s: Vec<f32>, // (BR, BC) scores, then probabilities
    m: Vec<f32>, // (BR,) running max
    l: Vec<f32>, // (BR,) running sum
}

/// Forward. out: (B, Tq, H·D) contiguous; lse: (B, H, Tq) log-sum-exp per query row (−∞ for a
/// row that sees no key; its output is 0, as in the reference).
#[allow(clippy::too_many_arguments)]
pub fn flash_forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: HeadsRef,
    k: HeadsRef,
    v: HeadsRef,
    s: AttentionShape,
    masks: &Masks,
    scale: f32,
) {
    let _p = crate::profile::scope("attention forward");
    super::attention::check(&s, &q, &k, &v);
    let (tq, tk, d, hh) = (s.q_len, s.k_len, s.head_dim, s.heads);
    let w = hh * d;
    assert!(out.len() >= s.batch * tq * w && lse.len() >= s.batch * hh * tq);
    if super::matmul::bf16_active() && tq > 0 && tk > 0 {
        return super::flash_bf16::forward(out, lse, q, k, v, s, masks, scale);
    }
    let [o] = HeadsMut::split(out, w, w, [0]);
    let lse_ptr = SendPtr(lse.as_mut_ptr());
    // Every query tile of a head reads all of its keys and values, so both are packed once per
    // head: Kᵀ tile by tile, (Tk/BC, D, BC), so a score product reads rows of BC contiguous
    // floats (rows of a whole-head transpose would lie Tk floats apart; at Tk = 8192 that is
    // 32 KB, and 64 such rows fall into one L1 set), and V as contiguous (Tk, D) rows (the
    // P·V product streams a (BC, D) tile per query block; at Tk = 8192 a tile of rows H·D
    // floats apart spans 128 pages, and the forward ran 16% slower). A single key tile spans
    // few pages and is not worth the copy, so V is packed only beyond one. Heads go in groups
    // whose packed copies fit in `PACK_FLOATS`, so the extra memory is bounded by one head's K
    // and V however long the sequence.
    let pack_v = tk > BC;
    let per_head = d * tk * if pack_v { 2 } else { 1 };
    packed_head_groups(
        &PACKED,
        PACK_FLOATS,
        per_head,
        s.batch * hh,
        tq.div_ceil(BR),
        |bh, head| {
            let kh = k.head(bh / hh, tk, bh % hh, d);
            let vh = v.head(bh / hh, tk, bh % hh, d);
            let (kt_h, v_h) = head.split_at_mut(d * tk);
            kt_h.par_chunks_mut(BC * d)
                .enumerate()
                .for_each(|(t, kt_t)| {
                    let j0 = t * BC;
                    pack_transposed(kt_t, kh.offset_rows(j0), BC.min(tk - j0), d);
                });
            v_h.par_chunks_mut(BC * d).enumerate().for_each(|(t, v_t)| {
                for (r, dst) in v_t.chunks_exact_mut(d).enumerate() {
                    // SAFETY: rows t·BC + r < Tk of a checked operand.
                    dst.copy_from_slice(unsafe { vh.offset_rows(t * BC + r).row(d) });
                }
            });
        },
        |bh, qt, head| {
            with_scratch(&FWD_SCRATCH, |sc: &mut FwdScratch| {
                at_least(&mut sc.s, BR * BC);
                at_least(&mut sc.m, BR);
                at_least(&mut sc.l, BR);
                let (b, h) = (bh / hh, bh % hh);
                let (kt, vp) = head.split_at(d * tk);
                let vh = if pack_v {
                    MatRef::rows(vp, d, false)
                } else {
                    v.head(b, tk, h, d)
                };
                forward_tile(
                    sc,
                    &o,
                    lse_ptr,
                    q,
                    kt,
                    vh,
                    bh,
                    (b, h),
                    qt * BR,
                    s,
                    masks,
                    scale,
                );
            })
        },
    );
}

/// The forward's outer loop, shared by both precisions: each head's keys and values are packed
/// once (`pack(bh, buf)` fills head `bh`'s `per_head` elements), heads in groups whose copies
/// fit in `budget` elements, so the extra memory is bounded by one head's however long the
/// sequence; then `tile(bh, qt, buf)` runs every query tile `qt` of the group's heads, in
/// parallel. The buffer is this thread's `buf`, kept between calls.
pub(super) fn packed_head_groups<T: Copy + Default + Send + Sync + 'static>(
    buf: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>,
    budget: usize,
    per_head: usize,
    heads: usize,
    q_tiles: usize,
    pack: impl Fn(usize, &mut [T]) + Sync,
    tile: impl Fn(usize, usize, &[T]) + Sync,
) {
    if heads == 0 || per_head == 0 {
        // Nothing to pack (no key): each tile only writes zero rows and −∞ log-sum-exps.
        (0..heads * q_tiles)
            .into_par_iter()
            .for_each(|t| tile(t / q_tiles, t % q_tiles, &[]));
        return;
    }
    let group = (budget / per_head).clamp(1, heads);
    let mut pack_buf = buf.with(|c| c.take());
    if pack_buf.len() < group * per_head {
        pack_buf = vec![T::default(); group * per_head];
    }
    for g0 in (0..heads).step_by(group) {
        let g = group.min(heads - g0);
        let packed = &mut pack_buf[..g * per_head];
        packed
            .par_chunks_mut(per_head)
            .enumerate()
            .for_each(|(gh, head)| pack(g0 + gh, head));
        let packed = &*packed;
        (0..g * q_tiles).into_par_iter().for_each(|task| {
            let (gh, qt) = (task / q_tiles, task % q_tiles);
            tile(g0 + gh, qt, &packed[gh * per_head..(gh + 1) * per_head]);
        });
    }
    buf.with(|c| c.set(pack_buf));
}

/// Floats of packed keys and values the forward keeps at once (8 MB): all heads of a training
/// batch, two heads at N = 8192, one head beyond 16 384.
const PACK_FLOATS: usize = 2 << 20;

/// One query tile of one head: rows `[i0, i0 + BR)` of O and their log-sum-exp. `kt`
/// holds this head's packed keys (Tk/BC, D, BC); `vh` its values (Tk, D), packed or not.
#[allow(clippy::too_many_arguments)]
fn forward_tile(
    sc: &mut FwdScratch,
    o: &HeadsMut,
    lse_ptr: SendPtr<f32>,
    q: HeadsRef,
    kt: &[f32],
    vh: MatRef,
    bh: usize,
    (b, h): (usize, usize),
    i0: usize,
    s: AttentionShape,
    masks: &Masks,
    scale: f32,
) {
    let (tq, tk, d) = (s.q_len, s.k_len, s.head_dim);
    let w = s.heads * d;
    let rows = BR.min(tq - i0);
    let padding = masks.padding(b, tk);
    let q_rs = q.rs;
    let qh = q.head(b, tq, h, d).offset_rows(i0);
    let oh = o.head(b, tq, h, d).offset_rows(i0);
    // SAFETY: this task alone writes rows [i0, i0 + rows) of head (b, h).
    unsafe { oh.fill(rows, d, 0.0) };
    let (m, l) = (&mut sc.m[..rows], &mut sc.l[..rows]);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    for j0 in (0..tk).step_by(BC) {
        let cols = BC.min(tk - j0);
        if !tile_visible(masks, i0, i0 + rows, j0, j0 + cols, tk) {
            continue;
        }
        let ktj = kt[j0 * d..(j0 + cols) * d].as_ptr();
        // SAFETY: operand bounds were checked; the score tile is this task's scratch.
        // S = scale · Q_i K_jᵀ
        unsafe {
            gemm_rows(
                rows,
                cols,
                d,
                qh.ptr,
                q_rs,
                1,
                ktj,
                cols,
                sc.s.as_mut_ptr(),
                cols,
                scale,
                false,
            )
        };
        let tile = &mut sc.s[..rows * cols];
        let ml = (&mut *m, &mut *l);
        // SAFETY: as above.
        unsafe { online_softmax_tile(tile, cols, (i0, j0), tk, masks, padding, ml, oh, d) };
        // SAFETY: as above; O += P V_j.
        unsafe {
            gemm_rows(
                rows,
                d,
                cols,
                sc.s.as_ptr(),
                cols,
                1,
                vh.offset_rows(j0).ptr,
                vh.rs as usize,
                oh.ptr,
                w,
                1.0,
                true,
            )
        };
    }
    // SAFETY: these rows of O and lse rows (b, h, i0..) belong to this task; lengths checked.
    unsafe { finish_rows(oh, d, m, l, lse_ptr.get().add(bh * tq + i0)) };
}

/// One score tile's step of the online softmax: masked entries to −∞, each row exponentiated
/// against its running maximum `m` (in place: the tile then holds the unnormalised P), the
/// running sums `l` updated, and the output rows so far rescaled where the maximum moved.
/// tile: (rows, cols) scores of queries `i0 + r` against keys `j0..j0 + cols`.
///
/// # Safety
/// `oh` addresses the tile's `rows` output rows of `d` floats, the caller's alone.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn online_softmax_tile(
    tile: &mut [f32],
    cols: usize,
    (i0, j0): (usize, usize),
    tk: usize,
    masks: &Masks,
    padding: Option<&[bool]>,
    (m, l): (&mut [f32], &mut [f32]),
    oh: MatMut,
    d: usize,
) {
    for (r, row) in tile.chunks_mut(cols).enumerate() {
        let (lo, hi) = masks.visible(i0 + r, tk);
        mask_row(row, j0, lo, hi, padding);
        let (m_new, alpha, sum) = exp_rows::online_row(row, m[r]);
        m[r] = m_new;
        l[r] = l[r] * alpha + sum;
        if alpha != 1.0 {
            oh.offset_rows(r).fill_scale(1, d, alpha);
        }
    }
}

/// Backward's recomputed probabilities of one tile: masked entries 0, the rest
/// `exp(score − lse)` of their query row. tile: (rows, cols) as [`online_softmax_tile`];
/// `lse` of the whole head.
pub(super) fn probs_tile(
    tile: &mut [f32],
    cols: usize,
    (i0, j0): (usize, usize),
    tk: usize,
    masks: &Masks,
    padding: Option<&[bool]>,
    lse: &[f32],
) {
    for (r, row) in tile.chunks_mut(cols).enumerate() {
        let (lo, hi) = masks.visible(i0 + r, tk);
        mask_row(row, j0, lo, hi, padding);
        exp_rows::probs_row(row, lse[i0 + r]);
    }
}

/// A query tile's last step: its output rows divided by their softmax sums `l`, and their
/// log-sum-exp `m + ln l` written to `lse` (−∞, and a zero row, where no key was visible).
///
/// # Safety
/// `oh` addresses `l.len()` rows of `d` floats and `lse` as many floats, all the caller's.
pub(super) unsafe fn finish_rows(oh: MatMut, d: usize, m: &[f32], l: &[f32], lse: *mut f32) {
    for (r, (&m, &l)) in m.iter().zip(l).enumerate() {
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        oh.offset_rows(r).fill_scale(1, d, inv);
        *lse.add(r) = if l > 0.0 {
            m + l.ln()
        } else {
            f32::NEG_INFINITY
        };
    }
}

thread_local! {
    static FWD_SCRATCH: std::cell::Cell<Option<Box<FwdScratch>>> = const { std::cell::Cell::new(None) };
    static BWD_SCRATCH: std::cell::Cell<Option<Box<BwdScratch>>> = const { std::cell::Cell::new(None) };
    /// The forward's packed keys and values, kept between calls: allocating 2 MB a step
    /// (B = 32, T = 64) cost its page faults every time. Grows to the largest group seen.
    static PACKED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Scratch of one backward task.
#[derive(Default)]
struct BwdScratch {
    kt: Vec<f32>,    // (D, BC) the key tile transposed
    vt: Vec<f32>,    // (D, BC) the value tile transposed
    p: Vec<f32>,     // (BR, BC) probabilities
    dp: Vec<f32>,    // (BR, BC) probability, then score, gradients
    delta: Vec<f32>, // (Tq,) rowsum(dO ∘ O)
}

/// Backward. dout, out: (B, Tq, H·D); lse from [`flash_forward`]. Writes (overwrites) dq, dk, dv.
#[allow(clippy::too_many_arguments)]
pub fn flash_backward(
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
    let _p = crate::profile::scope("attention backward");
    super::attention::check(&s, &q, &k, &v);
    let (tq, tk, d, hh) = (s.q_len, s.k_len, s.head_dim, s.heads);
    let w = hh * d;
    assert!(
        dout.len() >= s.batch * tq * w
            && out.len() >= s.batch * tq * w
            && lse.len() >= s.batch * hh * tq
    );
    if super::matmul::bf16_active() && tq > 0 && tk > 0 {
        return super::flash_bf16::backward(dq, dk, dv, dout, out, lse, q, k, v, s, masks, scale);
    }
    let (dov, ov) = (
        HeadsRef {
            data: dout,
            rs: w,
            offset: 0,
        },
        HeadsRef {
            data: out,
            rs: w,
            offset: 0,
        },
    );
    (0..s.batch * hh).into_par_iter().for_each(|bh| {
        with_scratch(&BWD_SCRATCH, |sc: &mut BwdScratch| {
            at_least(&mut sc.kt, d * BC);
            at_least(&mut sc.vt, d * BC);
            at_least(&mut sc.p, BR * BC);
            at_least(&mut sc.dp, BR * BC);
            let (b, h) = (bh / hh, bh % hh);
            let padding = masks.padding(b, tk);
            let lse = &lse[bh * tq..(bh + 1) * tq];
            let (q_rs, k_rs, do_rs) = (q.rs, k.rs, w);
            let (dq_rs, dk_rs, dv_rs) = (dq.rs(), dk.rs(), dv.rs());
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
            sc.delta.clear();
            sc.delta.extend((0..tq).map(|i| {
                // SAFETY: rows of heads checked by `check` / the assert above.
                let (a, c) = unsafe { (doh.offset_rows(i).row(d), oh.offset_rows(i).row(d)) };
                simd::dot(a, c)
            }));
            // SAFETY: this task alone writes head (b, h) of dq, dk and dv.
            unsafe {
                dqh.fill(tq, d, 0.0);
                dkh.fill(tk, d, 0.0);
                dvh.fill(tk, d, 0.0);
            }
            for j0 in (0..tk).step_by(BC) {
                let cols = BC.min(tk - j0);
                let (kj, vj) = (kh.offset_rows(j0), vh.offset_rows(j0));
                let (dkj, dvj) = (dkh.offset_rows(j0), dvh.offset_rows(j0));
                pack_transposed(&mut sc.kt, kj, cols, d);
                pack_transposed(&mut sc.vt, vj, cols, d);
                for i0 in (0..tq).step_by(BR) {
                    let rows = BR.min(tq - i0);
                    if !tile_visible(masks, i0, i0 + rows, j0, j0 + cols, tk) {
                        continue;
                    }
                    let (qi, doi, dqi) =
                        (qh.offset_rows(i0), doh.offset_rows(i0), dqh.offset_rows(i0));
                    let (p, dp) = (sc.p.as_mut_ptr(), sc.dp.as_mut_ptr());
                    // SAFETY (all products below): operand bounds checked; the scratch and this
                    // head's gradients belong to this task.
                    unsafe {
                        // S = scale · Q_i K_jᵀ, then P = exp(S − lse)
                        gemm_rows(
                            rows,
                            cols,
                            d,
                            qi.ptr,
                            q_rs,
                            1,
                            sc.kt.as_ptr(),
                            cols,
                            p,
                            cols,
                            scale,
                            false,
                        );
                    }
                    let tile = &mut sc.p[..rows * cols];
                    probs_tile(tile, cols, (i0, j0), tk, masks, padding, lse);
                    unsafe {
                        // dV_j += P_ijᵀ dO_i ; dP = dO_i V_jᵀ
                        gemm_rows(
                            cols, d, rows, p, 1, cols, doi.ptr, do_rs, dvj.ptr, dv_rs, 1.0, true,
                        );
                        gemm_rows(
                            rows,
                            cols,
                            d,
                            doi.ptr,
                            do_rs,
                            1,
                            sc.vt.as_ptr(),
                            cols,
                            dp,
                            cols,
                            1.0,
                            false,
                        );
                    }
                    for (r, (dpr, prow)) in sc.dp[..rows * cols]
                        .chunks_mut(cols)
                        .zip(sc.p[..rows * cols].chunks(cols))
                        .enumerate()
                    {
                        dscore_row(dpr, prow, sc.delta[i0 + r], scale);
                    }
                    unsafe {
                        // dQ_i += dS K_j ; dK_j += dSᵀ Q_i
                        gemm_rows(
                            rows, d, cols, dp, cols, 1, kj.ptr, k_rs, dqi.ptr, dq_rs, 1.0, true,
                        );
                        gemm_rows(
                            cols, d, rows, dp, 1, cols, qi.ptr, q_rs, dkj.ptr, dk_rs, 1.0, true,
                        );
                    }
                }
            }
        })
    });
}

/// `dst (D, cols) ← src (cols, D)ᵀ`: a key or value tile with contiguous columns, so the tile
/// products can read it row by row.
fn pack_transposed(dst: &mut [f32], src: MatRef, cols: usize, d: usize) {
    assert!(dst.len() >= d * cols && src.cs == 1);
    // SAFETY: `dst` holds (D, cols); the caller's tile rows are inside the checked operand.
    unsafe { transpose(cols, d, src.ptr, src.rs as usize, dst.as_mut_ptr(), cols) }
}

/// The two exponentiating row passes, which are a sixth of the forward's time. With AVX-512
/// they are written with intrinsics: `vscalefps` applies 2ⁿ and `vrndscaleps` rounds, which
/// halves the instructions of the portable, auto-vectorized [`simd::exp`] path.
mod exp_rows {
    pub fn online_row(row: &mut [f32], m_old: f32) -> (f32, f32, f32) {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx512() {
            // SAFETY: the CPU has AVX-512F (checked at run time).
            return unsafe { avx512::online_row(row, m_old) };
        }
        super::online_row_portable(row, m_old)
    }

    pub fn probs_row(row: &mut [f32], lse: f32) {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx512() {
            // SAFETY: as above.
            return unsafe { avx512::probs_row(row, lse) };
        }
        super::probs_row_portable(row, lse)
    }

    #[cfg(target_arch = "x86_64")]
    mod avx512 {
        use std::arch::x86_64::*;

        /// e^x for x ≤ 0 (scores minus their maximum), to ~1e−7 relative: n = round(x·log₂e),
        /// r = x − n·ln2 (two-constant Cody–Waite), e^r by its degree-6 Taylor polynomial
        /// (|r| ≤ ln2/2, remainder < 2e−7), then 2ⁿ by `vscalefps`. NaN propagates; inputs below
        /// −87.3 (−∞ included) give ~1e−38, which callers replace by exact zeros.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn exp_nonpositive(x: __m512) -> __m512 {
            let x = _mm512_max_ps(_mm512_set1_ps(-87.3), x);
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
            );
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
            let mut p = _mm512_set1_ps(1.0 / 720.0);
            for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
            }
            _mm512_scalef_ps(p, n)
        }

        #[inline]
        fn tail_mask(n: usize) -> __mmask16 {
            if n >= 16 {
                0xffff
            } else {
                (1u16 << n) - 1
            }
        }

        /// `row ← exp(row − shift)` (0 where row is −∞); returns the sum.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
            let (sv, ninf) = (_mm512_set1_ps(shift), _mm512_set1_ps(f32::NEG_INFINITY));
            let mut acc = _mm512_setzero_ps();
            let p = row.as_mut_ptr();
            let mut j = 0;
            while j < row.len() {
                let m = tail_mask(row.len() - j);
                let x = _mm512_maskz_loadu_ps(m, p.add(j));
                let live = _mm512_mask_cmp_ps_mask::<_CMP_NEQ_UQ>(m, x, ninf);
                let e = _mm512_maskz_mov_ps(live, exp_nonpositive(_mm512_sub_ps(x, sv)));
                _mm512_mask_storeu_ps(p.add(j), m, e);
                acc = _mm512_add_ps(acc, e);
                j += 16;
            }
            _mm512_reduce_add_ps(acc)
        }

        #[target_feature(enable = "avx512f")]
        pub unsafe fn online_row(row: &mut [f32], m_old: f32) -> (f32, f32, f32) {
            let p = row.as_ptr();
            let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut j = 0;
            while j < row.len() {
                let m = tail_mask(row.len() - j);
                mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, p.add(j)));
                j += 16;
            }
            let m_new = _mm512_reduce_max_ps(mx).max(m_old);
            if m_new == f32::NEG_INFINITY {
                row.fill(0.0);
                return (m_new, 1.0, 0.0);
            }
            let sum = exp_shifted(row, m_new);
            let alpha = if m_old == f32::NEG_INFINITY {
                0.0
            } else {
                (m_old - m_new).exp()
            };
            (m_new, alpha, sum)
        }

        #[target_feature(enable = "avx512f")]
        pub unsafe fn probs_row(row: &mut [f32], lse: f32) {
            if lse == f32::NEG_INFINITY {
                row.fill(0.0);
                return;
            }
            exp_shifted(row, lse);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{exp_rows, online_row_portable, probs_row_portable};

    /// The AVX-512 row passes (used on this machine) against the portable ones (used elsewhere).
    #[test]
    fn dispatched_row_passes_match_the_portable_ones() {
        let mut seed = 7u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 40.0 - 30.0
        };
        for len in [1, 5, 16, 17, 64, 250] {
            let mut row: Vec<f32> = (0..len).map(|_| rnd()).collect();
            for j in (0..len).step_by(3) {
                row[j] = f32::NEG_INFINITY;
            }
            for m_old in [f32::NEG_INFINITY, 3.0, 50.0] {
                let (mut a, mut b) = (row.clone(), row.clone());
                let ra = exp_rows::online_row(&mut a, m_old);
                let rb = online_row_portable(&mut b, m_old);
                assert_eq!(ra.0, rb.0);
                assert!((ra.1 - rb.1).abs() <= 1e-6 * rb.1.abs(), "{ra:?} {rb:?}");
                assert!((ra.2 - rb.2).abs() <= 1e-5 * rb.2.abs(), "{ra:?} {rb:?}");
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() <= 1e-6 * y.abs() + 1e-30, "{x} vs {y}");
                }
                for (x, r) in a.iter().zip(&row) {
                    assert_eq!(
                        *r == f32::NEG_INFINITY,
                        *x == 0.0,
                        "masked entries are exact zeros"
                    );
                }
            }
            let lse = 12.0;
            let (mut a, mut b) = (row.clone(), row.clone());
            exp_rows::probs_row(&mut a, lse);
            probs_row_portable(&mut b, lse);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-6 * y.abs() + 1e-30, "{x} vs {y}");
            }
        }
    }
}
