//! Fused attention, the FlashAttention-2 algorithm (Dao, 2023) on the CPU: the same math as the
//! materialized reference in [`super::attention`] (Eq. 1 of the paper, same masks, same
//! strided per-head views), but the (Tq, Tk) score matrix never exists. A tile of `br()` queries
//! streams over tiles of `BC` keys, keeping a running row maximum `m` and normaliser `l` (the
//! "online softmax"); forward saves only the log-sum-exp `lse = m + ln l` per query row, and
//! backward recomputes each score tile from it. Extra memory is O(threads · BR · BC), not
//! O(Tq · Tk), so a 16k-token sequence costs no more scratch than a 64-token one.
//!
//! Tile products are the hand-written kernels of [`super::tile`] (single-threaded inside a task);
//! the parallelism is over (batch, head, query tile) in forward and over (batch, head) in
//! backward, where each task owns its head's dQ and so needs no atomics. When products run in
//! bf16 ([`super::matmul::bf16_active`]) both entry points hand over to `kernels/flash_bf16.rs`,
//! the same algorithm with bf16 tile operands.

use super::attention::{AttentionShape, HeadsMut, HeadsRef, Masks};
use super::matmul::{MatMut, MatRef};
use super::tile::{gemm_rows, transpose};
use super::Acc;
use crate::simd::multiversion;
use rayon::prelude::*;

mod backward;
mod exp_rows;

pub use backward::flash_backward;

/// Query rows per tile: 64 with AVX-512 (as measured on Zen 4); 128 with AVX2, whose tile
/// products copy each 16-column strip of a K or V tile before using it, so twice the rows per
/// copy (Zen3, N 8192: forward 986–989 → 962–966 ms, causal 518 → 501, forward + backward
/// 3,486 → 3,364).
pub(super) fn br() -> usize {
    if crate::simd::has_avx512() {
        64
    } else {
        128
    }
}
/// Key columns per tile. A (64, BC) score tile is 64 KB: it and the Q, K and V tiles stay in
/// L2 (128 KB at 128 rows: still in Zen3's 512 KB L2).
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
    /// `dp ← p ∘ (dp − delta) · scale`: the score gradient of one row.
    pub(super) fn dscore_row(dp: &mut [f32], p: &[f32], delta: f32, scale: f32) {
        dp.iter_mut().zip(p).for_each(|(d, &pv)| *d = pv * (*d - delta) * scale);
    }
}

/// Run `f` on this thread's scratch of type `T`, kept between tasks and calls (allocated per
/// rayon split, the tiles were zeroed again every split: BENCHMARKS.md, "bf16 flash
/// attention"). Taken out while in use, so a re-entrant call (work stealing) makes its own
/// instead of aliasing.
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
    // Every query tile reads all of its head's keys and values, so both are packed once per
    // head, in the layouts the tile products read fastest (Kᵀ in BC-column tiles; V as
    // contiguous rows, beyond one key tile only): BENCHMARKS.md, "Fused (flash) attention".
    let pack_v = tk > BC;
    let per_head = d * tk * if pack_v { 2 } else { 1 };
    packed_head_groups(
        &PACKED,
        PACK_FLOATS,
        per_head,
        (lse, s.batch * hh),
        (tq, br()),
        |bh, head| {
            let (b, h) = (bh / hh, bh % hh);
            let (kh, vh) = (k.head(b, tk, h, d), v.head(b, tk, h, d));
            let (kt_h, v_h) = head.split_at_mut(d * tk);
            kt_h.par_chunks_mut(BC * d)
                .enumerate()
                .for_each(|(t, kt_t)| {
                    let j0 = t * BC;
                    pack_transposed(kt_t, kh.rows(j0, BC.min(tk - j0)));
                });
            v_h.par_chunks_mut(BC * d).enumerate().for_each(|(t, v_t)| {
                for (r, dst) in v_t.chunks_exact_mut(d).enumerate() {
                    dst.copy_from_slice(vh.row(t * BC + r));
                }
            });
        },
        |bh, qt, head, lse| {
            with_scratch(&FWD_SCRATCH, |sc: &mut FwdScratch| {
                at_least(&mut sc.s, br() * BC);
                at_least(&mut sc.m, br());
                at_least(&mut sc.l, br());
                let (b, h) = (bh / hh, bh % hh);
                let (kt, vp) = head.split_at(d * tk);
                let vh = if pack_v {
                    MatRef::new(vp, tk, d)
                } else {
                    v.head(b, tk, h, d)
                };
                let (i0, rows) = (qt * br(), lse.len());
                let qh = q.head(b, tq, h, d).rows(i0, rows);
                // SAFETY: this task alone takes rows [i0, i0 + rows) of head (b, h).
                let oh = unsafe { o.head_rows(b, tq, h, d, i0..i0 + rows) };
                let padding = masks.padding(b, tk);
                forward_tile(sc, (oh, lse), qh, (kt, vh), i0, s, (masks, padding), scale);
            })
        },
    );
}

/// The forward's outer loop, shared by both precisions: each head's keys and values are packed
/// once (`pack(bh, buf)` fills head `bh`'s `per_head` elements), heads in groups whose copies
/// fit in `budget` elements, so the extra memory is bounded by one head's however long the
/// sequence; then `tile(bh, qt, buf, lse)` runs every query tile `qt` (`br` of the `tq` rows)
/// of the group's heads, in parallel, each with its rows of `lse` (heads, tq). The buffer is
/// this thread's `buf`, kept between calls.
pub(super) fn packed_head_groups<T: Copy + Default + Send + Sync + 'static>(
    buf: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>,
    budget: usize,
    per_head: usize,
    (lse, heads): (&mut [f32], usize),
    (tq, br): (usize, usize),
    pack: impl Fn(usize, &mut [T]) + Sync,
    tile: impl Fn(usize, usize, &[T], &mut [f32]) + Sync,
) {
    if heads == 0 || tq == 0 {
        return;
    }
    let q_tiles = tq.div_ceil(br);
    let mut tiles: Vec<&mut [f32]> = lse[..heads * tq]
        .chunks_mut(tq)
        .flat_map(|head| head.chunks_mut(br))
        .collect();
    if per_head == 0 {
        // Nothing to pack (no key): each tile only writes zero rows and −∞ log-sum-exps.
        tiles
            .par_iter_mut()
            .enumerate()
            .for_each(|(t, lse)| tile(t / q_tiles, t % q_tiles, &[], lse));
        return;
    }
    let group = (budget / per_head).clamp(1, heads);
    let mut pack_buf = buf.with(|c| c.take());
    if pack_buf.len() < group * per_head {
        pack_buf = vec![T::default(); group * per_head];
    }
    for (g0, group_tiles) in (0..heads)
        .step_by(group)
        .zip(tiles.chunks_mut(group * q_tiles))
    {
        let g = group.min(heads - g0);
        let packed = &mut pack_buf[..g * per_head];
        packed
            .par_chunks_mut(per_head)
            .enumerate()
            .for_each(|(gh, head)| pack(g0 + gh, head));
        let packed = &*packed;
        group_tiles
            .par_iter_mut()
            .enumerate()
            .for_each(|(task, lse)| {
                let (gh, qt) = (task / q_tiles, task % q_tiles);
                tile(
                    g0 + gh,
                    qt,
                    &packed[gh * per_head..(gh + 1) * per_head],
                    lse,
                );
            });
    }
    buf.with(|c| c.set(pack_buf));
}

/// Floats of packed keys and values the forward keeps at once (8 MB): all heads of a training
/// batch, two heads at N = 8192, one head beyond 16 384.
const PACK_FLOATS: usize = 2 << 20;

/// One query tile of one head: its rows `oh` of O, from row `i0`, and their log-sum-exps.
/// `qh` holds the tile's queries; `kt` the head's packed keys (Tk/BC, D, BC); `vh` its values
/// (Tk, D), packed or not.
#[allow(clippy::too_many_arguments)]
fn forward_tile(
    sc: &mut FwdScratch,
    (mut oh, lse): (MatMut, &mut [f32]),
    qh: MatRef,
    (kt, vh): (&[f32], MatRef),
    i0: usize,
    s: AttentionShape,
    (masks, padding): (&Masks, Option<&[bool]>),
    scale: f32,
) {
    let (tk, d) = (s.k_len, s.head_dim);
    let rows = qh.nrows();
    oh.fill(0.0);
    let (m, l) = (&mut sc.m[..rows], &mut sc.l[..rows]);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    for j0 in (0..tk).step_by(BC) {
        let cols = BC.min(tk - j0);
        if !tile_visible(masks, i0, i0 + rows, j0, j0 + cols, tk) {
            continue;
        }
        let tile = &mut sc.s[..rows * cols];
        // S = scale · Q_i K_jᵀ
        let ktj = MatRef::new(&kt[j0 * d..(j0 + cols) * d], d, cols);
        gemm_rows(&mut MatMut::new(tile, rows, cols), qh, ktj, scale, Acc::Set);
        let ml = (&mut *m, &mut *l);
        online_softmax_tile(tile, cols, (i0, j0), tk, masks, padding, ml, &mut oh);
        // O += P V_j
        let p = MatRef::new(tile, rows, cols);
        gemm_rows(&mut oh, p, vh.rows(j0, cols), 1.0, Acc::Add);
    }
    finish_rows(&mut oh, m, l, lse);
}

/// One score tile's step of the online softmax: masked entries to −∞, each row exponentiated
/// against its running maximum `m` (in place: the tile then holds the unnormalised P), the
/// running sums `l` updated, and the output rows so far, `oh`, rescaled where the maximum
/// moved. tile: (rows, cols) scores of queries `i0 + r` against keys `j0..j0 + cols`.
#[allow(clippy::too_many_arguments)]
pub(super) fn online_softmax_tile(
    tile: &mut [f32],
    cols: usize,
    (i0, j0): (usize, usize),
    tk: usize,
    masks: &Masks,
    padding: Option<&[bool]>,
    (m, l): (&mut [f32], &mut [f32]),
    oh: &mut MatMut,
) {
    for (r, row) in tile.chunks_mut(cols).enumerate() {
        let (lo, hi) = masks.visible(i0 + r, tk);
        mask_row(row, j0, lo, hi, padding);
        let (m_new, alpha, sum) = exp_rows::online_row(row, m[r]);
        m[r] = m_new;
        l[r] = l[r] * alpha + sum;
        if alpha != 1.0 {
            oh.rows(r, 1).scale(alpha);
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

/// A query tile's last step: its output rows `oh` divided by their softmax sums `l`, and their
/// log-sum-exp `m + ln l` written to `lse` (−∞, and a zero row, where no key was visible).
pub(super) fn finish_rows(oh: &mut MatMut, m: &[f32], l: &[f32], lse: &mut [f32]) {
    for (r, ((&m, &l), lse)) in m.iter().zip(l).zip(lse).enumerate() {
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        oh.rows(r, 1).scale(inv);
        *lse = if l > 0.0 {
            m + l.ln()
        } else {
            f32::NEG_INFINITY
        };
    }
}

thread_local! {
    static FWD_SCRATCH: std::cell::Cell<Option<Box<FwdScratch>>> = const { std::cell::Cell::new(None) };
    /// The forward's packed keys and values, kept between calls: allocating 2 MB a step
    /// (B = 32, T = 64) cost its page faults every time. Grows to the largest group seen.
    static PACKED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `dst (D, cols) ← src (cols, D)ᵀ`: a key or value tile with contiguous columns, so the tile
/// products can read it row by row.
fn pack_transposed(dst: &mut [f32], src: MatRef) {
    transpose(&mut MatMut::new(dst, src.ncols(), src.nrows()), src);
}
