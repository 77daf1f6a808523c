//! "Add & Norm" around a sublayer (§3.1, §5.4 residual dropout), in either placement:
//! post-LN `y = LN(x + dropout(f(x)))` (the paper) or pre-LN `y = x + dropout(f(LN(x)))`.

use super::{buf, config::NormPlacement, Mode};
use crate::kernels::dropout::{self, Dropout};
use crate::kernels::layernorm::{
    layernorm_backward, layernorm_forward, residual_layernorm_forward,
};
use crate::kernels::Acc;
use crate::params::{two_mut, Init, Param, ParamBuilder};

#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Param,
    pub bias: Param,
    pub eps: f32,
    pub c: usize,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

impl LayerNorm {
    pub fn new(pb: &mut ParamBuilder, name: &str, c: usize, eps: f32) -> Self {
        let weight = pb.add(format!("{name}.weight"), &[c], Init::Ones);
        let bias = pb.add(format!("{name}.bias"), &[c], Init::Zeros);
        Self {
            weight,
            bias,
            eps,
            c,
            mean: Vec::new(),
            rstd: Vec::new(),
        }
    }

    /// x, out: (N, C)
    pub fn forward(&mut self, p: &[f32], x: &[f32], out: &mut [f32]) {
        let n = x.len() / self.c;
        layernorm_forward(
            out,
            buf(&mut self.mean, n),
            buf(&mut self.rstd, n),
            x,
            self.weight.of(p),
            self.bias.of(p),
            self.c,
            self.eps,
        );
    }

    /// `dx (+)= LN'(dy)` for the `x` given to the last forward.
    pub fn backward(
        &self,
        p: &[f32],
        g: &mut [f32],
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        acc: Acc,
    ) {
        let n = x.len() / self.c;
        let (dw, db) = two_mut(g, self.weight, self.bias);
        layernorm_backward(
            dx,
            dw,
            db,
            dy,
            x,
            &self.mean[..n],
            &self.rstd[..n],
            self.weight.of(p),
            self.c,
            acc,
        );
    }
}

#[derive(Clone, Debug)]
pub struct AddNorm {
    pub norm: LayerNorm,
    pub placement: NormPlacement,
    site: u64,
    drop: Option<Dropout>,
    /// post: x + dropout(f); pre: LN(x)
    saved: Vec<f32>,
    /// dropout'(upstream gradient) for the sublayer output
    dsub_out: Vec<f32>,
    /// pre: gradient w.r.t. LN(x), produced by the sublayer's backward
    dsub_in: Vec<f32>,
}

impl AddNorm {
    pub fn new(
        pb: &mut ParamBuilder,
        name: &str,
        c: usize,
        eps: f32,
        placement: NormPlacement,
        site: u64,
    ) -> Self {
        Self {
            norm: LayerNorm::new(pb, name, c, eps),
            placement,
            site,
            drop: None,
            saved: Vec::new(),
            dsub_out: Vec::new(),
            dsub_in: Vec::new(),
        }
    }

    /// What the sublayer reads: `x` itself (post) or `LN(x)` (pre).
    pub fn sublayer_input<'a>(&'a mut self, p: &[f32], x: &'a [f32]) -> &'a [f32] {
        match self.placement {
            NormPlacement::Post => x,
            NormPlacement::Pre => {
                let out = buf(&mut self.saved, x.len());
                self.norm.forward(p, x, out);
                &self.saved[..x.len()]
            }
        }
    }

    /// Combine the block input `x` with the sublayer output `f` into `y`.
    pub fn finish(&mut self, p: &[f32], x: &[f32], f: &[f32], y: &mut [f32], mode: Mode) {
        self.drop = mode.site(self.site, x.len());
        match self.placement {
            NormPlacement::Post => {
                let n = x.len() / self.norm.c;
                let sum = buf(&mut self.saved, x.len());
                let (w, b) = (self.norm.weight.of(p), self.norm.bias.of(p));
                let (mean, rstd) = (buf(&mut self.norm.mean, n), buf(&mut self.norm.rstd, n));
                residual_layernorm_forward(
                    sum,
                    y,
                    mean,
                    rstd,
                    x,
                    f,
                    w,
                    b,
                    self.norm.c,
                    self.norm.eps,
                    self.drop,
                );
            }
            NormPlacement::Pre => dropout::residual_add(y, x, f, self.drop),
        }
    }

    /// First half of backward, from `dy` (gradient of `y`): sets `dx` to the residual path's
    /// gradient and returns what the sublayer's backward needs (then call
    /// [`AddNorm::backward_input`]). `x` is the block input of the last forward.
    pub fn backward_output<'a>(
        &'a mut self,
        p: &[f32],
        g: &mut [f32],
        x: &'a [f32],
        dy: &[f32],
        dx: &'a mut [f32],
    ) -> SublayerGrad<'a> {
        let n = dy.len();
        match self.placement {
            NormPlacement::Post => {
                self.norm.backward(p, g, &self.saved[..n], dy, dx, Acc::Set);
                dropout::backward_into(buf(&mut self.dsub_out, n), dx, self.drop);
                // The sublayer read x itself: its input gradient adds onto the residual's.
                SublayerGrad {
                    d_output: &self.dsub_out[..n],
                    input: x,
                    d_input: dx,
                    acc: Acc::Add,
                }
            }
            NormPlacement::Pre => {
                dx[..n].copy_from_slice(dy);
                dropout::backward_into(buf(&mut self.dsub_out, n), dy, self.drop);
                buf(&mut self.dsub_in, n);
                SublayerGrad {
                    d_output: &self.dsub_out[..n],
                    input: &self.saved[..n],
                    d_input: &mut self.dsub_in[..n],
                    acc: Acc::Set,
                }
            }
        }
    }

    /// Second half: pre-LN adds `LN'(dsub_in)` onto `dx`; post-LN has nothing left to do.
    pub fn backward_input(&self, p: &[f32], g: &mut [f32], x: &[f32], dx: &mut [f32]) {
        if self.placement == NormPlacement::Pre {
            self.norm
                .backward(p, g, x, &self.dsub_in[..x.len()], dx, Acc::Add);
        }
    }
}

/// What a sublayer's backward needs from the Add & Norm around it.
pub struct SublayerGrad<'a> {
    /// Gradient of the sublayer's output.
    pub d_output: &'a [f32],
    /// The sublayer's input in forward: x (post-LN) or LN(x) (pre-LN).
    pub input: &'a [f32],
    /// Where the sublayer writes the gradient of its input: overwritten or added onto.
    pub d_input: &'a mut [f32],
    pub acc: Acc,
}

/// A stack's output: the last layer's `x` itself (post-LN), or `final_norm(x)` written to `out`
/// (pre-LN, whose residual stream is never normalized inside the layers). x: (N, C)
pub fn final_output<'a>(
    final_norm: &mut Option<LayerNorm>,
    p: &[f32],
    x: &'a [f32],
    out: &'a mut Vec<f32>,
) -> &'a [f32] {
    match final_norm {
        Some(norm) => {
            norm.forward(p, x, buf(out, x.len()));
            &out[..x.len()]
        }
        None => x,
    }
}
