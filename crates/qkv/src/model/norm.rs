//! "Add & Norm" around a sublayer (§3.1, §5.4 residual dropout), in either placement:
//! post-LN `y = LN(x + dropout(f(x)))` (the paper) or pre-LN `y = x + dropout(f(LN(x)))`.

use super::{config::NormPlacement, Mode};
use crate::backend::{Backend, Cpu};
use crate::kernels::dropout::Dropout;
use crate::kernels::Acc;
use crate::params::{Init, Param, ParamBuilder};

#[derive(Clone, Debug)]
pub struct LayerNorm<B: Backend = Cpu> {
    pub weight: Param,
    pub bias: Param,
    pub eps: f32,
    pub c: usize,
    mean: B::Buf, // (N)
    rstd: B::Buf, // (N)
}

impl<B: Backend> LayerNorm<B> {
    pub fn new(pb: &mut ParamBuilder, name: &str, c: usize, eps: f32) -> Self {
        let weight = pb.add(format!("{name}.weight"), &[c], Init::Ones);
        let bias = pb.add(format!("{name}.bias"), &[c], Init::Zeros);
        Self {
            weight,
            bias,
            eps,
            c,
            mean: B::Buf::default(),
            rstd: B::Buf::default(),
        }
    }

    /// x, out: (N, C)
    pub fn forward(&mut self, be: &B, p: B::Ref<'_>, x: B::Ref<'_>, out: B::Mut<'_>) {
        let n = B::len(x) / self.c;
        be.layernorm_forward(
            out,
            be.grow(&mut self.mean, n),
            be.grow(&mut self.rstd, n),
            x,
            B::param(p, self.weight),
            B::param(p, self.bias),
            self.c,
            self.eps,
        );
    }

    /// `dx (+)= LN'(dy)` for the `x` given to the last forward.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        be: &B,
        p: B::Ref<'_>,
        g: B::Mut<'_>,
        x: B::Ref<'_>,
        dy: B::Ref<'_>,
        dx: B::Mut<'_>,
        acc: Acc,
    ) {
        let n = B::len(x) / self.c;
        let stats = (B::view(&self.mean, n), B::view(&self.rstd, n));
        let dparams = B::params_mut(g, self.weight, self.bias);
        let w = B::param(p, self.weight);
        be.layernorm_backward(dx, dparams, dy, x, stats, w, self.c, acc);
    }
}

#[derive(Clone, Debug)]
pub struct AddNorm<B: Backend = Cpu> {
    pub norm: LayerNorm<B>,
    pub placement: NormPlacement,
    site: u64,
    drop: Option<Dropout>,
    /// post: x + dropout(f); pre: LN(x)
    saved: B::Buf,
    /// dropout'(upstream gradient) for the sublayer output
    dsub_out: B::Buf,
    /// pre: gradient w.r.t. LN(x), produced by the sublayer's backward
    dsub_in: B::Buf,
}

impl<B: Backend> AddNorm<B> {
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
            saved: B::Buf::default(),
            dsub_out: B::Buf::default(),
            dsub_in: B::Buf::default(),
        }
    }

    /// What the sublayer reads: `x` itself (post) or `LN(x)` (pre).
    pub fn sublayer_input<'a>(&'a mut self, be: &B, p: B::Ref<'_>, x: B::Ref<'a>) -> B::Ref<'a> {
        match self.placement {
            NormPlacement::Post => x,
            NormPlacement::Pre => {
                let n = B::len(x);
                self.norm.forward(be, p, x, be.grow(&mut self.saved, n));
                B::view(&self.saved, n)
            }
        }
    }

    /// Combine the block input `x` with the sublayer output `f` into `y`.
    pub fn finish(
        &mut self,
        be: &B,
        p: B::Ref<'_>,
        x: B::Ref<'_>,
        f: B::Ref<'_>,
        y: B::Mut<'_>,
        mode: Mode,
    ) {
        let len = B::len(x);
        self.drop = mode.site(self.site, len);
        match self.placement {
            NormPlacement::Post => {
                let norm = &mut self.norm;
                let n = len / norm.c;
                let params = (B::param(p, norm.weight), B::param(p, norm.bias));
                be.residual_layernorm_forward(
                    be.grow(&mut self.saved, len),
                    y,
                    be.grow(&mut norm.mean, n),
                    be.grow(&mut norm.rstd, n),
                    x,
                    f,
                    params,
                    norm.c,
                    norm.eps,
                    self.drop,
                );
            }
            NormPlacement::Pre => be.residual_add(y, x, f, self.drop),
        }
    }

    /// First half of backward, from `dy` (gradient of `y`): sets `dx` to the residual path's
    /// gradient and returns what the sublayer's backward needs (then call
    /// [`AddNorm::backward_input`]). `x` is the block input of the last forward.
    pub fn backward_output<'a>(
        &'a mut self,
        be: &B,
        p: B::Ref<'_>,
        g: B::Mut<'_>,
        x: B::Ref<'a>,
        dy: B::Ref<'_>,
        mut dx: B::Mut<'a>,
    ) -> SublayerGrad<'a, B> {
        let n = B::len(dy);
        match self.placement {
            NormPlacement::Post => {
                let saved = B::view(&self.saved, n);
                let dx_now = B::reborrow(&mut dx);
                self.norm.backward(be, p, g, saved, dy, dx_now, Acc::Set);
                let dsub_out = be.grow(&mut self.dsub_out, n);
                be.dropout_backward(dsub_out, B::shared(&dx), self.drop);
                // The sublayer read x itself: its input gradient adds onto the residual's.
                SublayerGrad {
                    d_output: B::view(&self.dsub_out, n),
                    input: x,
                    d_input: dx,
                    acc: Acc::Add,
                }
            }
            NormPlacement::Pre => {
                be.copy(dx, dy);
                be.dropout_backward(be.grow(&mut self.dsub_out, n), dy, self.drop);
                SublayerGrad {
                    d_output: B::view(&self.dsub_out, n),
                    input: B::view(&self.saved, n),
                    d_input: be.grow(&mut self.dsub_in, n),
                    acc: Acc::Set,
                }
            }
        }
    }

    /// Second half: pre-LN adds `LN'(dsub_in)` onto `dx`; post-LN has nothing left to do.
    pub fn backward_input(
        &self,
        be: &B,
        p: B::Ref<'_>,
        g: B::Mut<'_>,
        x: B::Ref<'_>,
        dx: B::Mut<'_>,
    ) {
        if self.placement == NormPlacement::Pre {
            let dsub_in = B::view(&self.dsub_in, B::len(x));
            self.norm.backward(be, p, g, x, dsub_in, dx, Acc::Add);
        }
    }
}

/// What a sublayer's backward needs from the Add & Norm around it.
pub struct SublayerGrad<'a, B: Backend = Cpu> {
    /// Gradient of the sublayer's output.
    pub d_output: B::Ref<'a>,
    /// The sublayer's input in forward: x (post-LN) or LN(x) (pre-LN).
    pub input: B::Ref<'a>,
    /// Where the sublayer writes the gradient of its input: overwritten or added onto.
    pub d_input: B::Mut<'a>,
    pub acc: Acc,
}

/// A stack's output: the last layer's `x` itself (post-LN), or `final_norm(x)` written to `out`
/// (pre-LN, whose residual stream is never normalized inside the layers). x: (N, C)
pub fn final_output<'a, B: Backend>(
    be: &B,
    final_norm: &mut Option<LayerNorm<B>>,
    p: B::Ref<'_>,
    x: B::Ref<'a>,
    out: &'a mut B::Buf,
) -> B::Ref<'a> {
    match final_norm {
        Some(norm) => {
            let n = B::len(x);
            norm.forward(be, p, x, be.grow(out, n));
            B::view(out, n)
        }
        None => x,
    }
}
