//! Scaled dot-product attention, the materialized reference (§3.2.1, Eq. 1):
//! `Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V`, with key-padding and causal masks.
//!
//! Heads are strided views into the fused projection buffers (e.g. a (B·T, 3C) QKV buffer):
//! head h of operand X is columns `[offset + h·D, offset + (h+1)·D)` with row stride `rs`,
//! so neither the head split nor the transposes need copies.
//! The scores are materialized as `probs` (B, H, Tq, Tk) and kept for backward.

use super::matmul::{gemm_strided, MatMut, MatRef};
use super::softmax::{softmax_row, softmax_row_backward};
use super::Acc;
use crate::simd;
use rayon::prelude::*;
use std::marker::PhantomData;
use std::ops::Range;

/// How attention is computed. The softmax kinds give the same function (Eq. 1) and differ only
/// in memory and speed; `linear` is a different model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKind {
    /// Fused FlashAttention-2 kernel: scores never materialized, memory linear in T.
    #[default]
    Flash,
    /// Scores materialized as a (B, H, Tq, Tk) tensor: the reference, and the only kind that
    /// can return attention weights.
    Materialized,
    /// Linear attention with feature map elu(x)+1 (Katharopoulos et al., 2020); self-attention
    /// only (cross-attention stays softmax).
    Linear,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub q_len: usize,
    pub k_len: usize,
    pub head_dim: usize,
}

/// Which scores are removed before the softmax.
#[derive(Clone, Copy, Debug, Default)]
pub struct Masks<'a> {
    /// (B, Tk): `true` where the key is padding.
    pub key_padding: Option<&'a [bool]>,
    /// Query i may not see keys j > i (decoder self-attention, §3.2.3).
    pub causal: bool,
    /// Sliding window w: query i sees only keys j with |i − j| < w (with `causal`, the w most
    /// recent keys i−w+1..=i).
    pub window: Option<usize>,
}

impl Masks<'_> {
    /// Keys `[lo, hi)` that query `i` may see under the causal and window masks (key padding
    /// is applied per element on top).
    #[inline]
    pub fn visible(&self, i: usize, k_len: usize) -> (usize, usize) {
        let mut hi = if self.causal {
            (i + 1).min(k_len)
        } else {
            k_len
        };
        let mut lo = 0;
        if let Some(w) = self.window {
            lo = (i + 1).saturating_sub(w);
            if !self.causal {
                hi = hi.min(i + w);
            }
        }
        (lo.min(hi), hi)
    }

    /// Batch row `b`'s key-padding mask, (Tk).
    pub fn padding(&self, b: usize, k_len: usize) -> Option<&[bool]> {
        self.key_padding.map(|m| &m[b * k_len..(b + 1) * k_len])
    }
}

/// Read-only per-head view: row `t` of batch `b` starts at `(b·len + t)·rs + offset`.
#[derive(Clone, Copy)]
pub struct HeadsRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub offset: usize,
}

impl<'a> HeadsRef<'a> {
    /// The (len, D) block of head `h` in batch `b`.
    pub(crate) fn head(&self, b: usize, len: usize, h: usize, d: usize) -> MatRef<'a> {
        if len == 0 {
            return MatRef::new(&[], 0, d);
        }
        let start = (b * len) * self.rs + self.offset + h * d;
        MatRef::strided(&self.data[start..], len, d, self.rs)
    }
}

/// Writable per-head view. Several may point into one buffer (dQ, dK, dV inside one (B·T, 3C)
/// gradient buffer): [`HeadsMut::split`] checks their column ranges are disjoint.
pub struct HeadsMut<'a> {
    ptr: *mut f32,
    len: usize,
    rs: usize,
    offset: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: a `HeadsMut<'a>` stands for the `&'a mut [f32]` it was split from (`Send`); writes
// go only through `head_rows`, whose callers promise that blocks in use at the same time are
// disjoint, so the tasks that write them may share it.
unsafe impl Send for HeadsMut<'_> {}
// SAFETY: as above.
unsafe impl Sync for HeadsMut<'_> {}

impl<'a> HeadsMut<'a> {
    /// Views of `width` columns starting at each of `offsets`, rows of stride `rs`.
    pub fn split<const N: usize>(
        buf: &'a mut [f32],
        rs: usize,
        width: usize,
        offsets: [usize; N],
    ) -> [HeadsMut<'a>; N] {
        for (i, &a) in offsets.iter().enumerate() {
            assert!(a + width <= rs, "view exceeds row");
            for &b in &offsets[i + 1..] {
                assert!(a + width <= b || b + width <= a, "overlapping views");
            }
        }
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        offsets.map(|offset| HeadsMut {
            ptr,
            len,
            rs,
            offset,
            _borrow: PhantomData,
        })
    }

    pub fn rs(&self) -> usize {
        self.rs
    }

    /// The (len, D) block of head `h` in batch `b`.
    ///
    /// # Safety
    /// As [`HeadsMut::head_rows`], for the whole block.
    pub(crate) unsafe fn head(&self, b: usize, len: usize, h: usize, d: usize) -> MatMut<'_> {
        self.head_rows(b, len, h, d, 0..len)
    }

    /// Rows `rows` of the (len, D) block of head `h` in batch `b`.
    ///
    /// # Safety
    /// No other view of these elements may be in use while this one lives: each task takes
    /// its own (b, h) block, or its own rows of it.
    pub(crate) unsafe fn head_rows(
        &self,
        b: usize,
        len: usize,
        h: usize,
        d: usize,
        rows: std::ops::Range<usize>,
    ) -> MatMut<'_> {
        assert!(
            rows.start <= rows.end && rows.end <= len,
            "rows outside the head"
        );
        let n = rows.end - rows.start;
        let start = (b * len + rows.start) * self.rs + self.offset + h * d;
        assert!(
            n == 0 || start + (n - 1) * self.rs + d <= self.len,
            "head outside the buffer"
        );
        // SAFETY: in bounds of the buffer borrowed for 'a (checked); exclusive by the contract.
        MatMut::from_raw(self.ptr.wrapping_add(start), n, d, self.rs)
    }
}

/// Head (b, h) of the three input gradients: dQ (Tq, D), dK and dV (Tk, D).
///
/// # Safety
/// As [`HeadsMut::head`], for each: the caller's task alone takes head (b, h).
pub(crate) unsafe fn grad_heads<'g>(
    [dq, dk, dv]: [&'g HeadsMut; 3],
    (b, h): (usize, usize),
    s: &AttentionShape,
) -> [MatMut<'g>; 3] {
    let (tq, tk, d) = (s.q_len, s.k_len, s.head_dim);
    [
        dq.head(b, tq, h, d),
        dk.head(b, tk, h, d),
        dv.head(b, tk, h, d),
    ]
}

pub(crate) fn check(s: &AttentionShape, q: &HeadsRef, k: &HeadsRef, v: &HeadsRef) {
    let w = s.heads * s.head_dim;
    for (x, len) in [(q, s.q_len), (k, s.k_len), (v, s.k_len)] {
        assert!(
            x.offset + w <= x.rs && x.data.len() >= s.batch * len * x.rs,
            "attention operand too small"
        );
    }
}

/// Forward. out: (B, Tq, H·D) contiguous; probs: (B, H, Tq, Tk).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    out: &mut [f32],
    probs: &mut [f32],
    q: HeadsRef,
    k: HeadsRef,
    v: HeadsRef,
    s: AttentionShape,
    masks: &Masks,
    scale: f32,
) {
    let _p = crate::profile::scope("attention forward");
    check(&s, &q, &k, &v);
    let (tq, tk, d, hh) = (s.q_len, s.k_len, s.head_dim, s.heads);
    let w = hh * d;
    assert!(out.len() >= s.batch * tq * w && probs.len() >= s.batch * hh * tq * tk);
    let [o] = HeadsMut::split(out, w, w, [0]);
    probs[..s.batch * hh * tq * tk]
        .par_chunks_mut(tq * tk)
        .enumerate()
        .for_each(|(bh, p)| {
            let (b, h) = (bh / hh, bh % hh);
            let none = gemm::Parallelism::None;
            let kh = k.head(b, tk, h, d);
            let pm = &mut MatMut::new(p, tq, tk);
            gemm_strided(pm, q.head(b, tq, h, d), kh.t(), scale, Acc::Set, none);
            for (i, row) in p.chunks_mut(tk).enumerate() {
                let (lo, hi) = masks.visible(i, tk);
                row[..lo].iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
                softmax_row(row, hi, masks.padding(b, tk));
            }
            // SAFETY: this task alone takes head (b, h) of `out`.
            let oh = &mut unsafe { o.head(b, tq, h, d) };
            let (pr, vh) = (MatRef::new(p, tq, tk), v.head(b, tk, h, d));
            gemm_strided(oh, pr, vh, 1.0, Acc::Set, none);
        });
}

/// Backward. dout: (B, Tq, H·D); probs from forward; scratch: (B, H, Tq, Tk).
/// Writes (overwrites) dq, dk, dv.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &HeadsMut,
    dk: &HeadsMut,
    dv: &HeadsMut,
    dout: &[f32],
    probs: &[f32],
    q: HeadsRef,
    k: HeadsRef,
    v: HeadsRef,
    scratch: &mut [f32],
    s: AttentionShape,
    scale: f32,
) {
    let _p = crate::profile::scope("attention backward");
    check(&s, &q, &k, &v);
    let (tq, tk, d, hh) = (s.q_len, s.k_len, s.head_dim, s.heads);
    let dov = HeadsRef {
        data: dout,
        rs: hh * d,
        offset: 0,
    };
    scratch[..s.batch * hh * tq * tk]
        .par_chunks_mut(tq * tk)
        .enumerate()
        .for_each(|(bh, ds)| {
            let (b, h) = (bh / hh, bh % hh);
            let none = gemm::Parallelism::None;
            let p = MatRef::new(&probs[bh * tq * tk..(bh + 1) * tq * tk], tq, tk);
            let doh = dov.head(b, tq, h, d);
            // SAFETY: this task alone takes head (b, h) of dq, dk and dv.
            let [mut dqh, mut dkh, mut dvh] = unsafe { grad_heads([dq, dk, dv], (b, h), &s) };
            // dV = Pᵀ dO ; dP = dO Vᵀ
            gemm_strided(&mut dvh, p.t(), doh, 1.0, Acc::Set, none);
            let vt = v.head(b, tk, h, d).t();
            gemm_strided(&mut MatMut::new(ds, tq, tk), doh, vt, 1.0, Acc::Set, none);
            // dS = P ∘ (dP − rowsum(dP ∘ P)) · scale ; masked entries have P = 0, hence dS = 0.
            for (i, dr) in ds.chunks_mut(tk).enumerate() {
                softmax_row_backward(dr, p.row(i), scale);
            }
            // dQ = dS K ; dK = dSᵀ Q
            let dsm = MatRef::new(ds, tq, tk);
            gemm_strided(&mut dqh, dsm, k.head(b, tk, h, d), 1.0, Acc::Set, none);
            gemm_strided(&mut dkh, dsm.t(), q.head(b, tq, h, d), 1.0, Acc::Set, none);
        });
}

/// Keys and values of incremental decoding: block `b` holds `rows` positions of `rs` floats,
/// key head h at columns `[k_offset + h·D, …)` and value head h at `[v_offset + h·D, …)`.
#[derive(Clone, Copy)]
pub struct KvBlocks<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub rs: usize,
    pub k_offset: usize,
    pub v_offset: usize,
}

/// One query per row against keys `keys[r]` of its block (incremental decoding, where the
/// query is the newest position): `out[r] = softmax(q[r]·K[block[r]]ᵀ · scale) V[block[r]]`.
/// out: (R, H·D); q: (R, ·) with row stride `q_rs`; `block[r]` picks row r's key/value block
/// (beam hypotheses of one source share its cross-attention block); `keys`: one range for
/// every row, or one per row (rows of one cache may be at different positions, and sources
/// of different lengths); padding: (blocks, rows).
#[allow(clippy::too_many_arguments)]
pub fn attention_one_query(
    out: &mut [f32],
    q: &[f32],
    q_rs: usize,
    kv: KvBlocks,
    block: &[usize],
    keys: &[Range<usize>],
    padding: Option<&[bool]>,
    heads: usize,
    head_dim: usize,
    scale: f32,
) {
    let (w, d) = (heads * head_dim, head_dim);
    assert!(keys.len() == 1 || keys.len() == block.len());
    assert!(keys.iter().all(|k| k.start < k.end && k.end <= kv.rows));
    assert!(out.len() >= block.len() * w);
    #[cfg(target_arch = "x86_64")]
    let avx2 = d % 8 == 0 && simd::has_avx2();
    out[..block.len() * w]
        .par_chunks_mut(w)
        .zip(block.par_iter())
        .enumerate()
        .for_each_init(Vec::new, |scores, (r, (o, &blk))| {
            let Range {
                start: k_start,
                end: k_len,
            } = keys[if keys.len() == 1 { 0 } else { r }];
            let n = k_len - k_start;
            scores.resize(n, 0.0);
            let base = (blk * kv.rows + k_start) * kv.rs;
            let pad = padding.map(|m| &m[blk * kv.rows + k_start..blk * kv.rows + k_len]);
            let q = &q[r * q_rs..][..w];
            let keys = RowKeys {
                kv: &kv.data[base..],
                rs: kv.rs,
                k_offset: kv.k_offset,
                v_offset: kv.v_offset,
                d,
                scale,
            };
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU has AVX2 and FMA (checked); the slices' lengths bound every
                // read (see the function).
                return unsafe { one_query_avx2::row(o, q, keys, pad, scores) };
            }
            one_query_row(o, q, keys, pad, scores);
        });
}

/// Keys ahead that [`one_query_row`] asks the cache for: a head's slice of each key row is a
/// whole key row apart (2 KiB at d_model 256), a stride the hardware prefetchers follow only
/// after several misses, and each head's pass over a row's few dozen keys is a new stream.
const PREFETCH: usize = 6;

/// Ask for the cache lines of `kv[at..at + d]` (nothing past the end of `kv`).
#[inline(always)]
fn prefetch_head(kv: &[f32], at: usize, d: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let mut i = at;
        while i < (at + d).min(kv.len()) {
            // SAFETY: a prefetch reads nothing and cannot fault; `i` lies inside `kv` anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(kv.as_ptr().add(i).cast()) };
            i += 16;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (kv, at, d);
}

/// One query's keys and values: rows of `rs` floats from its first key, key head h at
/// `[k_offset + h·d, +d)` and value head h at `[v_offset + h·d, +d)`; scores scale by `scale`.
#[derive(Clone, Copy)]
struct RowKeys<'a> {
    kv: &'a [f32],
    rs: usize,
    k_offset: usize,
    v_offset: usize,
    d: usize,
    scale: f32,
}

crate::simd::multiversion! {
    /// One row of [`attention_one_query`]: every head of query `q` (H·D) against the `n =
    /// scores.len()` keys and values of `keys`, into `o` (H·D).
    fn one_query_row(
        o: &mut [f32],
        q: &[f32],
        keys: RowKeys<'_>,
        pad: Option<&[bool]>,
        scores: &mut [f32],
    ) {
        let RowKeys { kv, rs, k_offset, v_offset, d, scale } = keys;
        let n = scores.len();
        for (h, (qh, oh)) in q.chunks_exact(d).zip(o.chunks_exact_mut(d)).enumerate() {
            for (j, s) in scores.iter_mut().enumerate() {
                prefetch_head(kv, (j + PREFETCH) * rs + k_offset + h * d, d);
                let kj = &kv[j * rs + k_offset + h * d..][..d];
                *s = simd::dot(qh, kj) * scale;
            }
            softmax_row(scores, n, pad);
            oh.iter_mut().for_each(|x| *x = 0.0);
            for (j, &pj) in scores.iter().enumerate() {
                prefetch_head(kv, (j + PREFETCH) * rs + v_offset + h * d, d);
                let vj = &kv[j * rs + v_offset + h * d..][..d];
                oh.iter_mut().zip(vj).for_each(|(x, v)| *x += pj * v);
            }
        }
    }
}

/// [`one_query_row`] with AVX2 and FMA, for head widths that are multiples of 8. The
/// portable loop waits on its own sums: a dot product of 64 floats is two dependent FMA chains
/// and a horizontal sum per key, and the weighted sum of values loads and stores its output
/// per key. Here eight keys' dot products run as independent chains and are summed
/// horizontally together, and the output stays in registers while the values stream past:
/// 1.6× the portable loop on a cache held in L3, 1.3× on one read from memory, greedy
/// translation 6% faster (Zen3, BENCHMARKS.md). Software prefetching, as the portable loop
/// does, measured slower here. Same result up to the order of the sums.
#[cfg(target_arch = "x86_64")]
mod one_query_avx2 {
    use super::{softmax_row, RowKeys};
    use crate::simd::avx2::hsum;
    use std::arch::x86_64::*;

    /// Sums of eight vectors, lane k of the result = Σ lanes of `v[k]`.
    #[inline(always)]
    unsafe fn hsum8(v: [__m256; 8]) -> __m256 {
        let a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
        let b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
        // a holds keys 0–3 in its low and high halves (partial sums), b keys 4–7.
        let lo = _mm256_permute2f128_ps::<0x20>(a, b);
        let hi = _mm256_permute2f128_ps::<0x31>(a, b);
        _mm256_add_ps(lo, hi)
    }

    /// `o[h] = softmax(q[h]·K[h]ᵀ · scale) V[h]` for every head h of one query, over the
    /// `n = scores.len()` key rows of `keys`.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA. The rest is asserted: `d % 8 == 0`, `q.len() ==
    /// o.len()` a multiple of `d`, and `keys.kv` holds `n` rows whose key and value heads lie
    /// inside it.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row(
        o: &mut [f32],
        q: &[f32],
        keys: RowKeys<'_>,
        pad: Option<&[bool]>,
        scores: &mut [f32],
    ) {
        let RowKeys {
            kv,
            rs,
            k_offset,
            v_offset,
            d,
            scale,
        } = keys;
        let n = scores.len();
        let w = o.len();
        assert!(d % 8 == 0 && q.len() == w && w.is_multiple_of(d));
        assert!(n == 0 || (n - 1) * rs + k_offset.max(v_offset) + w <= kv.len());
        let kv_at = |j: usize, off: usize| kv.as_ptr().add(j * rs + off);
        for h in 0..w / d {
            let qh = q.as_ptr().add(h * d);
            let (ko, vo) = (k_offset + h * d, v_offset + h * d);
            // Scores, eight keys at a time.
            let mut j = 0;
            while j + 8 <= n {
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut i = 0;
                while i < d {
                    let qv = _mm256_loadu_ps(qh.add(i));
                    for (k, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kv_at(j + k, ko + i)), *a);
                    }
                    i += 8;
                }
                let s = _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale));
                _mm256_storeu_ps(scores.as_mut_ptr().add(j), s);
                j += 8;
            }
            for (j, s) in scores.iter_mut().enumerate().skip(j) {
                let mut acc = _mm256_setzero_ps();
                let mut i = 0;
                while i < d {
                    let kj = _mm256_loadu_ps(kv_at(j, ko + i));
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh.add(i)), kj, acc);
                    i += 8;
                }
                *s = hsum(acc) * scale;
            }
            softmax_row(scores, n, pad);
            // o[h] = Σ_j p_j V_j[h], in blocks of up to 64 columns held in registers.
            let mut c = 0;
            while c < d {
                let cols = (d - c).min(64);
                weighted_sum(&mut o[h * d + c..h * d + c + cols], kv, rs, vo + c, scores);
                c += cols;
            }
        }
    }

    /// `out = Σ_j p[j] · kv[j·rs + off..][..out.len()]`, out.len() a multiple of 8, ≤ 64.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn weighted_sum(out: &mut [f32], kv: &[f32], rs: usize, off: usize, p: &[f32]) {
        match out.len() / 8 {
            8 => weighted_sum_n::<8>(out, kv, rs, off, p),
            7 => weighted_sum_n::<7>(out, kv, rs, off, p),
            6 => weighted_sum_n::<6>(out, kv, rs, off, p),
            5 => weighted_sum_n::<5>(out, kv, rs, off, p),
            4 => weighted_sum_n::<4>(out, kv, rs, off, p),
            3 => weighted_sum_n::<3>(out, kv, rs, off, p),
            2 => weighted_sum_n::<2>(out, kv, rs, off, p),
            _ => weighted_sum_n::<1>(out, kv, rs, off, p),
        }
    }

    #[inline(always)]
    unsafe fn weighted_sum_n<const B: usize>(
        out: &mut [f32],
        kv: &[f32],
        rs: usize,
        off: usize,
        p: &[f32],
    ) {
        let mut acc = [_mm256_setzero_ps(); B];
        for (j, &pj) in p.iter().enumerate() {
            let (pv, v) = (_mm256_set1_ps(pj), kv.as_ptr().add(j * rs + off));
            for (b, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v.add(8 * b)), *a);
            }
        }
        for (b, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * b), *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dispatched one-query attention (AVX2 where the CPU has it) against the portable
    /// loop, over head widths below, at and above one 64-column register block, key counts
    /// around the 8-key groups, and padded keys (a row of only padding gives zeros).
    #[test]
    fn one_query_matches_the_portable_loop() {
        let mut seed = 0;
        let mut next = |n: usize| -> Vec<f32> {
            seed += 1;
            (0..n).map(|i| crate::rng::normal(seed, i as u64)).collect()
        };
        for (heads, d) in [(4, 64), (2, 32), (2, 128), (3, 72), (1, 8), (2, 12)] {
            let w = heads * d;
            for n in [1, 7, 8, 9, 17, 40] {
                let (rows, blocks, cap) = (3, 2, n + 3);
                let rs = 2 * w + 5;
                let kv = next(blocks * cap * rs);
                let q = next(rows * (w + 1));
                let block = [1, 0, 1];
                let keys = [0..n, 2..n.max(3), 1..n + 1];
                let pad: Vec<bool> = (0..blocks * cap).map(|i| i % 5 == 3).collect();
                for padding in [None, Some(&pad[..])] {
                    let blocks = KvBlocks {
                        data: &kv,
                        rows: cap,
                        rs,
                        k_offset: 3,
                        v_offset: w + 4,
                    };
                    let mut got = vec![f32::NAN; rows * w];
                    attention_one_query(
                        &mut got,
                        &q,
                        w + 1,
                        blocks,
                        &block,
                        &keys,
                        padding,
                        heads,
                        d,
                        0.3,
                    );
                    for r in 0..rows {
                        let k = keys[r].clone();
                        let base = (block[r] * cap + k.start) * rs;
                        let pad =
                            padding.map(|m| &m[block[r] * cap + k.start..block[r] * cap + k.end]);
                        let mut want = vec![0.0; w];
                        let mut scores = vec![0.0; k.len()];
                        let qr = &q[r * (w + 1)..][..w];
                        let keys = RowKeys {
                            kv: &kv[base..],
                            rs,
                            k_offset: 3,
                            v_offset: w + 4,
                            d,
                            scale: 0.3,
                        };
                        one_query_row(&mut want, qr, keys, pad, &mut scores);
                        for (i, (g, e)) in got[r * w..(r + 1) * w].iter().zip(&want).enumerate() {
                            assert!(
                                (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                                "heads {heads} d {d} n {n} row {r} column {i}: {g} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }
}
