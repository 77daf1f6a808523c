//! The f32 backward of [`super::flash_forward`]: per (batch, head) task, each key tile against
//! each query tile it is visible to, with the probabilities recomputed from the saved
//! log-sum-exp (FlashAttention-2, Algorithm 2). Each task owns its head's dQ, dK and dV.

use super::{at_least, dscore_row, pack_transposed, probs_tile, tile_visible, with_scratch};
use super::{br, BC};
use crate::kernels::attention::{grad_heads, AttentionShape, HeadsMut, HeadsRef, Masks};
use crate::kernels::matmul::{MatMut, MatRef};
use crate::kernels::tile::gemm_rows;
use crate::kernels::Acc;
use crate::simd;
use rayon::prelude::*;

/// Scratch of one backward task.
#[derive(Default)]
struct BwdScratch {
    kt: Vec<f32>,    // (D, BC) the key tile transposed
    vt: Vec<f32>,    // (D, BC) the value tile transposed
    p: Vec<f32>,     // (BR, BC) probabilities
    dp: Vec<f32>,    // (BR, BC) probability, then score, gradients
    delta: Vec<f32>, // (Tq,) rowsum(dO ∘ O)
}

thread_local! {
    static BWD_SCRATCH: std::cell::Cell<Option<Box<BwdScratch>>> = const { std::cell::Cell::new(None) };
}

/// One head's operands: Q, dO (Tq, D) and K, V (Tk, D).
struct Head<'a> {
    q: MatRef<'a>,
    k: MatRef<'a>,
    v: MatRef<'a>,
    dout: MatRef<'a>,
}

/// Backward. dout, out: (B, Tq, H·D); lse from [`super::flash_forward`]. Writes (overwrites)
/// dq, dk, dv.
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
    crate::kernels::attention::check(&s, &q, &k, &v);
    let (tq, tk, d, hh) = (s.q_len, s.k_len, s.head_dim, s.heads);
    let w = hh * d;
    assert!(
        dout.len() >= s.batch * tq * w
            && out.len() >= s.batch * tq * w
            && lse.len() >= s.batch * hh * tq
    );
    if crate::kernels::matmul::bf16_active() && tq > 0 && tk > 0 {
        return crate::kernels::flash_bf16::backward(
            dq, dk, dv, dout, out, lse, q, k, v, s, masks, scale,
        );
    }
    let view = |data| HeadsRef {
        data,
        rs: w,
        offset: 0,
    };
    let (dov, ov) = (view(dout), view(out));
    (0..s.batch * hh).into_par_iter().for_each(|bh| {
        with_scratch(&BWD_SCRATCH, |sc: &mut BwdScratch| {
            let (b, h) = (bh / hh, bh % hh);
            let x = Head {
                q: q.head(b, tq, h, d),
                k: k.head(b, tk, h, d),
                v: v.head(b, tk, h, d),
                dout: dov.head(b, tq, h, d),
            };
            let oh = ov.head(b, tq, h, d);
            sc.delta.clear();
            sc.delta
                .extend((0..tq).map(|i| simd::dot(x.dout.row(i), oh.row(i))));
            // SAFETY: this task alone takes head (b, h) of dq, dk and dv.
            let grads = unsafe { grad_heads([dq, dk, dv], (b, h), &s) };
            let lse = &lse[bh * tq..(bh + 1) * tq];
            backward_head(sc, &x, grads, lse, s, (masks, masks.padding(b, tk)), scale);
        })
    });
}

/// All tiles of one head: `grads` (dQ, dK, dV) are overwritten.
fn backward_head(
    sc: &mut BwdScratch,
    x: &Head,
    [mut dqh, mut dkh, mut dvh]: [MatMut; 3],
    lse: &[f32],
    s: AttentionShape,
    (masks, padding): (&Masks, Option<&[bool]>),
    scale: f32,
) {
    let (tq, tk, d) = (s.q_len, s.k_len, s.head_dim);
    at_least(&mut sc.kt, d * BC);
    at_least(&mut sc.vt, d * BC);
    let br = br();
    at_least(&mut sc.p, br * BC);
    at_least(&mut sc.dp, br * BC);
    dqh.fill(0.0);
    dkh.fill(0.0);
    dvh.fill(0.0);
    for j0 in (0..tk).step_by(BC) {
        let cols = BC.min(tk - j0);
        let (kj, vj) = (x.k.rows(j0, cols), x.v.rows(j0, cols));
        pack_transposed(&mut sc.kt, kj);
        pack_transposed(&mut sc.vt, vj);
        let (ktj, vtj) = (MatRef::new(&sc.kt, d, cols), MatRef::new(&sc.vt, d, cols));
        for i0 in (0..tq).step_by(br) {
            let rows = br.min(tq - i0);
            if !tile_visible(masks, i0, i0 + rows, j0, j0 + cols, tk) {
                continue;
            }
            let (qi, doi) = (x.q.rows(i0, rows), x.dout.rows(i0, rows));
            let (p, dp) = (&mut sc.p[..rows * cols], &mut sc.dp[..rows * cols]);
            // S = scale · Q_i K_jᵀ, then P = exp(S − lse)
            gemm_rows(&mut MatMut::new(p, rows, cols), qi, ktj, scale, Acc::Set);
            probs_tile(p, cols, (i0, j0), tk, masks, padding, lse);
            let pm = MatRef::new(p, rows, cols);
            // dV_j += P_ijᵀ dO_i ; dP = dO_i V_jᵀ
            gemm_rows(&mut dvh.rows(j0, cols), pm.t(), doi, 1.0, Acc::Add);
            gemm_rows(&mut MatMut::new(dp, rows, cols), doi, vtj, 1.0, Acc::Set);
            for (r, (dpr, prow)) in dp.chunks_mut(cols).zip(p.chunks(cols)).enumerate() {
                dscore_row(dpr, prow, sc.delta[i0 + r], scale);
            }
            // dQ_i += dS K_j ; dK_j += dSᵀ Q_i
            let ds = MatRef::new(dp, rows, cols);
            gemm_rows(&mut dqh.rows(i0, rows), ds, kj, 1.0, Acc::Add);
            gemm_rows(&mut dkh.rows(j0, cols), ds.t(), qi, 1.0, Acc::Add);
        }
    }
}
