//! The CPU backend: plain slices and [`crate::kernels`], one call per op (inlined: the CPU
//! path costs what it cost before the seam).

use super::{Backend, HeadGrads, Heads, KvLayout, Operand};
use crate::error::Result;
use crate::kernels::activation::{self, Activation};
use crate::kernels::attention::{
    attention_backward, attention_forward, attention_one_query, AttentionKind, AttentionShape,
    HeadsMut, HeadsRef, KvBlocks, Masks,
};
use crate::kernels::bf16::{self, linear_bf16};
use crate::kernels::dropout::{self, Dropout};
use crate::kernels::embedding;
use crate::kernels::flash::{flash_backward, flash_forward};
use crate::kernels::layernorm;
use crate::kernels::linear_attention::{
    linear_attention_backward, linear_attention_forward, linear_attention_step,
};
use crate::kernels::loss::{self, CrossEntropy};
use crate::kernels::matmul::{bf16_active, matmul_operands, Layout};
use crate::kernels::optim;
use crate::kernels::pool::{self, Pool};
use crate::kernels::Acc;
use crate::optim::AdamWConfig;
use crate::params::{two_mut, Param};
use std::borrow::Cow;
use std::ops::Range;

/// The CPU: buffers are `Vec`s, views are slices, ops are [`crate::kernels`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpu;

fn heads(h: Heads<'_, Cpu>) -> HeadsRef<'_> {
    HeadsRef {
        data: h.data,
        rs: h.rs,
        offset: h.offset,
    }
}

fn cpu_operand<'a>(x: Operand<'a, Cpu>) -> bf16::Operand<'a> {
    match x {
        Operand::F32(x) => bf16::Operand::F32(x),
        Operand::Bf16(x) => bf16::Operand::Bf16(x),
    }
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Buf16 = Vec<u16>;
    type Ref<'a> = &'a [f32];
    type Mut<'a> = &'a mut [f32];
    type Ref16<'a> = &'a [u16];
    type Mut16<'a> = &'a mut [u16];

    #[inline]
    fn grow<'a>(&self, b: &'a mut Vec<f32>, n: usize) -> &'a mut [f32] {
        if b.len() < n {
            b.resize(n, 0.0);
        }
        &mut b[..n]
    }
    #[inline]
    fn grow16<'a>(&self, b: &'a mut Vec<u16>, n: usize) -> &'a mut [u16] {
        if b.len() < n {
            b.resize(n, 0);
        }
        &mut b[..n]
    }
    #[inline]
    fn view(b: &Vec<f32>, n: usize) -> &[f32] {
        &b[..n]
    }
    #[inline]
    fn view16(b: &Vec<u16>) -> &[u16] {
        b
    }
    #[inline]
    fn sub<'a>(x: Self::Ref<'a>, r: Range<usize>) -> Self::Ref<'a> {
        &x[r]
    }
    #[inline]
    fn len(x: &[f32]) -> usize {
        x.len()
    }
    #[inline]
    fn reborrow<'b>(x: &'b mut &mut [f32]) -> &'b mut [f32] {
        x
    }
    #[inline]
    fn shared<'b>(x: &'b &mut [f32]) -> &'b [f32] {
        x
    }
    #[inline]
    fn shorten<'s, 'l: 's>(x: Self::Ref<'l>) -> Self::Ref<'s> {
        x
    }
    #[inline]
    fn into_ref<'a>(x: Self::Mut<'a>) -> Self::Ref<'a> {
        x
    }
    #[inline]
    fn prefix_mut<'a>(x: Self::Mut<'a>, n: usize) -> Self::Mut<'a> {
        &mut x[..n]
    }
    #[inline]
    fn sub_mut<'a>(x: Self::Mut<'a>, r: Range<usize>) -> Self::Mut<'a> {
        &mut x[r]
    }
    fn buf_len(b: &Vec<f32>) -> usize {
        b.len()
    }
    #[inline]
    fn param_mut<'a>(g: Self::Mut<'a>, w: Param) -> Self::Mut<'a> {
        w.of_mut(g)
    }
    #[inline]
    fn params_mut<'a>(g: Self::Mut<'a>, a: Param, b: Param) -> (Self::Mut<'a>, Self::Mut<'a>) {
        two_mut(g, a, b)
    }

    #[inline]
    fn bf16_products(&self) -> bool {
        bf16_active()
    }
    fn runs_attention(&self, _: AttentionKind) -> Result<()> {
        Ok(())
    }
    fn sync(&self) -> crate::error::Result<()> {
        Ok(())
    }

    #[inline]
    fn matmul(
        &self,
        out: &mut [f32],
        a: Operand<'_, Cpu>,
        b: Operand<'_, Cpu>,
        m: usize,
        k: usize,
        n: usize,
        (la, lb): (Layout, Layout),
        acc: Acc,
    ) {
        let (a, b) = (cpu_operand(a), cpu_operand(b));
        matmul_operands(out, a, b, m, k, n, la, lb, acc);
    }

    #[inline]
    fn linear(
        &self,
        y: &mut [f32],
        x: Operand<'_, Cpu>,
        w: &[f32],
        bias: Option<&[f32]>,
        n: usize,
        i: usize,
        o: usize,
    ) {
        let x = cpu_operand(x);
        if bf16_active() {
            return linear_bf16(&mut y[..n * o], x, w, bias, n, i, o);
        }
        let y = &mut y[..n * o];
        matmul_operands(
            y,
            x,
            bf16::Operand::F32(w),
            n,
            i,
            o,
            Layout::RowMajor,
            Layout::Transposed,
            Acc::Set,
        );
        if let Some(b) = bias {
            activation::bias_act_forward(y, &mut [], b, Activation::Identity);
        }
    }

    #[inline]
    fn column_sum(&self, acc: &mut [f32], x: &[f32], f: usize) {
        activation::column_sum(acc, x, f);
    }
    #[inline]
    fn bias_act_forward(&self, pre: &mut [f32], post: &mut [f32], bias: &[f32], act: Activation) {
        activation::bias_act_forward(pre, post, bias, act);
    }
    #[inline]
    fn bias_act_forward_bf16(
        &self,
        pre: &mut [f32],
        post: &mut [u16],
        bias: &[f32],
        act: Activation,
    ) {
        activation::bias_act_forward_bf16(pre, post, bias, act);
    }
    #[inline]
    fn bias_act_backward(&self, d: &mut [f32], dbias: &mut [f32], pre: &[f32], act: Activation) {
        activation::bias_act_backward(d, dbias, pre, act);
    }
    #[inline]
    fn bias_act_backward_bf16(
        &self,
        d: &[f32],
        dbias: &mut [f32],
        pre: &[f32],
        act: Activation,
        out: &mut [u16],
    ) {
        activation::bias_act_backward_bf16(d, dbias, pre, act, out);
    }

    #[inline]
    fn layernorm_forward(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        x: &[f32],
        w: &[f32],
        b: &[f32],
        c: usize,
        eps: f32,
    ) {
        layernorm::layernorm_forward(out, mean, rstd, x, w, b, c, eps);
    }
    #[inline]
    fn residual_layernorm_forward(
        &self,
        sum: &mut [f32],
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        x: &[f32],
        sub: &[f32],
        (w, b): (&[f32], &[f32]),
        c: usize,
        eps: f32,
        drop: Option<Dropout>,
    ) {
        layernorm::residual_layernorm_forward(sum, out, mean, rstd, x, sub, w, b, c, eps, drop);
    }
    #[inline]
    fn layernorm_backward(
        &self,
        dx: &mut [f32],
        (dw, db): (&mut [f32], &mut [f32]),
        dy: &[f32],
        x: &[f32],
        (mean, rstd): (&[f32], &[f32]),
        w: &[f32],
        c: usize,
        dx_acc: Acc,
    ) {
        layernorm::layernorm_backward(dx, dw, db, dy, x, mean, rstd, w, c, dx_acc);
    }

    #[inline]
    fn residual_add(&self, out: &mut [f32], x: &[f32], sub: &[f32], drop: Option<Dropout>) {
        dropout::residual_add(out, x, sub, drop);
    }
    #[inline]
    fn copy(&self, dst: &mut [f32], src: &[f32]) {
        dst[..src.len()].copy_from_slice(src);
    }
    #[inline]
    fn dropout_backward(&self, out: &mut [f32], dy: &[f32], drop: Option<Dropout>) {
        dropout::backward_into(out, dy, drop);
    }

    #[inline]
    fn add_rows(&self, x: &mut [f32], row: &[f32]) {
        x.chunks_mut(row.len())
            .for_each(|o| o.iter_mut().zip(row).for_each(|(o, t)| *o += t));
    }
    #[inline]
    fn dropout_apply(&self, x: &mut [f32], drop: Option<Dropout>) {
        dropout::apply(x, drop);
    }
    #[inline]
    fn zero(&self, x: &mut [f32]) {
        x.iter_mut().for_each(|v| *v = 0.0);
    }
    #[inline]
    fn scale(&self, x: &mut [f32], s: f32) {
        x.iter_mut().for_each(|v| *v *= s);
    }
    #[inline]
    fn upload(&self, host: Vec<f32>) -> Vec<f32> {
        host
    }
    fn to_host<'a>(&self, x: Self::Ref<'a>) -> Result<Cow<'a, [f32]>> {
        Ok(Cow::Borrowed(x))
    }
    fn host_mut(&self, x: &mut [f32], f: &mut dyn FnMut(&mut [f32]) -> Result<()>) -> Result<()> {
        f(x)
    }
    fn sum_squares(&self, x: &[f32]) -> f64 {
        optim::sum_squares(x)
    }
    fn adamw_step(
        &self,
        data: &mut [f32],
        grad: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        clip: Option<f32>,
        c: &AdamWConfig,
        lr: f32,
        step: u64,
    ) {
        if let Some(coef) = clip {
            optim::scale(grad, coef);
        }
        let (b1, b2, eps, wd) = (c.beta1, c.beta2, c.eps, c.weight_decay);
        optim::adamw_step(data, grad, m, v, lr, b1, b2, eps, wd, step);
    }

    #[inline]
    fn embedding_forward(
        &self,
        out: &mut [f32],
        tokens: &[u32],
        table: &[f32],
        pos: &[f32],
        scale: f32,
        (t_len, c): (usize, usize),
        drop: Option<Dropout>,
    ) {
        embedding::embedding_forward(out, tokens, table, pos, scale, t_len, c, drop);
    }
    #[inline]
    fn embedding_backward(
        &self,
        dtable: &mut [f32],
        dpos: Option<&mut [f32]>,
        dout: &[f32],
        tokens: &[u32],
        scale: f32,
        (t_len, c): (usize, usize),
    ) {
        embedding::embedding_backward(dtable, dpos, dout, tokens, scale, t_len, c);
    }
    #[inline]
    fn pool_forward(
        &self,
        out: &mut [f32],
        h: &[f32],
        pad: &[bool],
        (t, c): (usize, usize),
        pool: Pool,
    ) {
        pool::pool_forward(out, h, pad, t, c, pool);
    }
    #[inline]
    fn pool_backward(
        &self,
        dh: &mut [f32],
        dpooled: &[f32],
        pad: &[bool],
        (t, c): (usize, usize),
        pool: Pool,
    ) {
        pool::pool_backward(dh, dpooled, pad, t, c, pool);
    }
    #[inline]
    fn cross_entropy(
        &self,
        dlogits: Option<&mut [f32]>,
        logits: &[f32],
        targets: &[u32],
        v: usize,
        ignore: Option<u32>,
        smoothing: f32,
    ) -> CrossEntropy {
        loss::cross_entropy(dlogits, logits, targets, v, ignore, smoothing)
    }

    fn attention_forward(
        &self,
        kind: AttentionKind,
        out: &mut [f32],
        saved: &mut [f32],
        qkv: [Heads<'_, Cpu>; 3],
        s: AttentionShape,
        masks: &Masks,
        scale: f32,
    ) {
        let [q, k, v] = qkv.map(heads);
        match kind {
            AttentionKind::Materialized => attention_forward(out, saved, q, k, v, s, masks, scale),
            AttentionKind::Flash => flash_forward(out, saved, q, k, v, s, masks, scale),
            AttentionKind::Linear => linear_attention_forward(out, saved, q, k, v, s, masks),
        }
    }

    fn attention_backward(
        &self,
        kind: AttentionKind,
        grads: HeadGrads<'_, Cpu>,
        (dout, out, saved): (&[f32], &[f32], &[f32]),
        scratch: &mut Vec<f32>,
        qkv: [Heads<'_, Cpu>; 3],
        s: AttentionShape,
        masks: &Masks,
        scale: f32,
    ) {
        let c = s.heads * s.head_dim;
        let [dq, dk, dv] = match grads {
            HeadGrads::Fused(d) => HeadsMut::split(d, 3 * c, c, [0, c, 2 * c]),
            HeadGrads::Split(dq, dkv) => {
                let [dq] = HeadsMut::split(dq, c, c, [0]);
                let [dk, dv] = HeadsMut::split(dkv, 2 * c, c, [0, c]);
                [dq, dk, dv]
            }
        };
        let [q, k, v] = qkv.map(heads);
        let (dq, dk, dv) = (&dq, &dk, &dv);
        match kind {
            AttentionKind::Materialized => {
                let scratch = self.grow(scratch, s.batch * s.heads * s.q_len * s.k_len);
                attention_backward(dq, dk, dv, dout, saved, q, k, v, scratch, s, scale);
            }
            AttentionKind::Flash => {
                flash_backward(dq, dk, dv, dout, out, saved, q, k, v, s, masks, scale)
            }
            AttentionKind::Linear => {
                linear_attention_backward(dq, dk, dv, dout, out, saved, q, k, v, s, masks)
            }
        }
    }

    fn kv_append(
        &self,
        kv: &mut [f32],
        rows: usize,
        src: &[f32],
        src_rs: usize,
        width: usize,
        block: &[usize],
        pos: &[usize],
    ) {
        for (r, (&b, &t)) in block.iter().zip(pos).enumerate() {
            let dst = (b * rows + t) * width;
            kv[dst..dst + width].copy_from_slice(&src[r * src_rs..][..width]);
        }
    }

    fn attention_one_query(
        &self,
        out: &mut [f32],
        q: &[f32],
        q_rs: usize,
        kv: &[f32],
        layout: KvLayout,
        block: &[usize],
        keys: &[Range<usize>],
        padding: Option<&[bool]>,
        heads: usize,
        head_dim: usize,
        scale: f32,
    ) {
        let kv = KvBlocks {
            data: kv,
            rows: layout.rows,
            rs: layout.rs,
            k_offset: layout.k_offset,
            v_offset: layout.v_offset,
        };
        attention_one_query(
            out, q, q_rs, kv, block, keys, padding, heads, head_dim, scale,
        );
    }

    fn copy_within(&self, data: &mut [f32], copies: &[(usize, usize, usize)]) {
        for &(from, to, len) in copies {
            data.copy_within(from..from + len, to);
        }
    }

    fn linear_attention_step(
        &self,
        out: &mut [f32],
        state: &mut [f32],
        qkv: &[f32],
        heads: usize,
        head_dim: usize,
    ) {
        linear_attention_step(out, state, qkv, heads, head_dim);
    }
}
