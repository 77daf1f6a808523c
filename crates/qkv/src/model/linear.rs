//! A fully connected layer in PyTorch's layout: weight (O, I), `y = x Wᵀ + b`.

use crate::backend::Backend;
use crate::backend::Operand::{self, Bf16, F32};
use crate::kernels::matmul::Layout::{RowMajor, Transposed};
use crate::kernels::Acc;
use crate::params::{Init, Param, ParamBuilder};

#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Param,
    pub bias: Option<Param>,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    /// Xavier-uniform weight (as PyTorch's attention projections), zero bias.
    pub fn new(
        pb: &mut ParamBuilder,
        name: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Self {
        let a = (6.0 / (in_features + out_features) as f32).sqrt();
        let weight = pb.add(
            format!("{name}.weight"),
            &[out_features, in_features],
            Init::Uniform(a),
        );
        let bias = bias.then(|| pb.add(format!("{name}.bias"), &[out_features], Init::Zeros));
        Self {
            weight,
            bias,
            in_features,
            out_features,
        }
    }

    /// `y = x Wᵀ` without the bias (callers fuse the bias into their next pass). x: (N, I), y: (N, O)
    pub fn matmul<B: Backend>(&self, be: &B, p: B::Ref<'_>, x: B::Ref<'_>, y: B::Mut<'_>) {
        let n = B::len(x) / self.in_features;
        let (i, o, w) = (
            self.in_features,
            self.out_features,
            B::param(p, self.weight),
        );
        let layouts = (RowMajor, Transposed);
        be.matmul(y, F32(x), F32(w), n, i, o, layouts, Acc::Set);
    }

    /// `y = x Wᵀ + b`. x: (N, I), y: (N, O)
    pub fn forward<B: Backend>(&self, be: &B, p: B::Ref<'_>, x: B::Ref<'_>, y: B::Mut<'_>) {
        self.forward_operand(be, p, F32(x), B::len(x) / self.in_features, y);
    }

    /// [`Self::forward`] for an input that may already be bf16. x: (N, I), y: (N, O)
    pub fn forward_operand<B: Backend>(
        &self,
        be: &B,
        p: B::Ref<'_>,
        x: Operand<'_, B>,
        n: usize,
        y: B::Mut<'_>,
    ) {
        let (i, o) = (self.in_features, self.out_features);
        let bias = self.bias.map(|b| B::param(p, b));
        be.linear(y, x, B::param(p, self.weight), bias, n, i, o);
    }

    /// `dW += dyᵀ x`, `db += Σ_rows dy` (unless `bias` says it is done), and `dx (+)= dy W`
    /// when `dx` is given (`dx_acc`: overwrite or add).
    /// x: (N, I), dy: (N, O), dx: (N, I)
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        p: B::Ref<'_>,
        g: B::Mut<'_>,
        x: B::Ref<'_>,
        dy: B::Ref<'_>,
        dx: Option<B::Mut<'_>>,
        dx_acc: Acc,
        bias: BiasGrad,
    ) {
        let n = B::len(x) / self.in_features;
        self.backward_operands(be, p, g, n, F32(x), F32(dy), dx, dx_acc, bias);
    }

    /// [`Self::backward`] for an input and output gradient that may already be bf16; a bf16
    /// `dy` needs `BiasGrad::Done` (its column sums were formed by whoever rounded it).
    /// x: (N, I), dy: (N, O), dx: (N, I)
    #[allow(clippy::too_many_arguments)]
    pub fn backward_operands<B: Backend>(
        &self,
        be: &B,
        p: B::Ref<'_>,
        g: B::Mut<'_>,
        n: usize,
        x: Operand<'_, B>,
        dy: Operand<'_, B>,
        dx: Option<B::Mut<'_>>,
        dx_acc: Acc,
        bias: BiasGrad,
    ) {
        let bias_done = bias == BiasGrad::Done;
        let (i, o) = (self.in_features, self.out_features);
        // dW (O, I) += dyᵀ x
        let weight_grad = |dw| be.matmul(dw, dy, x, o, n, i, (Transposed, RowMajor), Acc::Add);
        match (self.bias, dy) {
            (Some(b), F32(dy_f32)) if !bias_done => {
                let (dw, db) = B::params_mut(g, self.weight, b);
                weight_grad(dw);
                be.column_sum(db, B::sub(dy_f32, 0..n * o), o);
            }
            (Some(_), Bf16(_)) if !bias_done => {
                unreachable!("a bf16 output gradient comes with its bias gradient formed")
            }
            _ => weight_grad(B::param_mut(g, self.weight)),
        }
        if let Some(dx) = dx {
            let (dx, w) = (B::prefix_mut(dx, n * i), F32(B::param(p, self.weight)));
            be.matmul(dx, dy, w, n, o, i, (RowMajor, RowMajor), dx_acc);
        }
    }
}

/// Whether a linear layer's backward forms its bias gradient, or a fused pass before it
/// already did (the FFN's activation backward sums the columns it writes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasGrad {
    Compute,
    Done,
}

/// The output projection's (V, C) table: the embedding table it is `tied` to (§3.4), or a
/// new `output.weight`.
pub fn output_weight(pb: &mut ParamBuilder, tied: Option<Param>, v: usize, c: usize) -> Param {
    tied.unwrap_or_else(|| {
        pb.add(
            "output.weight",
            &[v, c],
            Init::Normal((c as f32).powf(-0.5)),
        )
    })
}

/// Output projection to the vocabulary, possibly sharing an embedding table (§3.4):
/// `logits = h Eᵀ`, no bias. Returns V. h: (N, C), logits: (N, V)
pub fn project_out<B: Backend>(
    be: &B,
    p: B::Ref<'_>,
    table: Param,
    h: B::Ref<'_>,
    logits: &mut B::Buf,
    c: usize,
) -> usize {
    let v = table.len / c;
    let n = B::len(h) / c;
    let out = be.grow(logits, n * v);
    let e = B::param(p, table);
    be.matmul(
        out,
        F32(h),
        F32(e),
        n,
        c,
        v,
        (RowMajor, Transposed),
        Acc::Set,
    );
    v
}

/// Backward of [`project_out`]: `dE += dlogitsᵀ h`, `dh = dlogits E`.
#[allow(clippy::too_many_arguments)]
pub fn project_out_backward<B: Backend>(
    be: &B,
    p: B::Ref<'_>,
    g: B::Mut<'_>,
    table: Param,
    h: B::Ref<'_>,
    dlogits: B::Ref<'_>,
    dh: B::Mut<'_>,
    c: usize,
) {
    let v = table.len / c;
    let n = B::len(h) / c;
    let (de, e) = (B::param_mut(g, table), B::param(p, table));
    let (dl, h) = (F32(dlogits), F32(h));
    be.matmul(de, dl, h, v, n, c, (Transposed, RowMajor), Acc::Add);
    be.matmul(dh, dl, F32(e), n, v, c, (RowMajor, RowMajor), Acc::Set);
}
