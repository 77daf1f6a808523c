//! Position-wise feed-forward network (§3.3): `FFN(x) = act(x W₁ + b₁) W₂ + b₂`.

use super::linear::BiasGrad;
use super::linear::Linear;
use crate::backend::Operand::{Bf16, F32};
use crate::backend::{Backend, Cpu};
use crate::kernels::activation::Activation;
use crate::kernels::bf16::padded_len;
use crate::kernels::Acc;
use crate::params::ParamBuilder;

#[derive(Clone, Debug)]
pub struct FeedForward<B: Backend = Cpu> {
    pub up: Linear,
    pub down: Linear,
    pub activation: Activation,
    pre: B::Buf,   // (N, F) x W₁ + b₁
    post: B::Buf,  // (N, F) act(pre)
    out: B::Buf,   // (N, C)
    dpost: B::Buf, // (N, F) ∂L/∂post, then in place ∂L/∂pre
    // With bf16 products, `post` and `∂L/∂pre` are only ever read by products, so they are
    // written in bf16 alone (rows padded for the product's blocks): see `Operand`.
    post_bf16: B::Buf16, // (N, F)
    dpre_bf16: B::Buf16, // (N, F)
    bf16: bool,          // whether the last forward wrote `post_bf16` instead of `post`
    #[cfg(test)]
    f32_storage: bool, // tests: keep f32 activations even with bf16 products (the reference)
}

impl<B: Backend> FeedForward<B> {
    pub fn new(
        pb: &mut ParamBuilder,
        name: &str,
        c: usize,
        f: usize,
        activation: Activation,
    ) -> Self {
        Self {
            up: Linear::new(pb, &format!("{name}.up"), c, f, true),
            down: Linear::new(pb, &format!("{name}.down"), f, c, true),
            activation,
            pre: B::Buf::default(),
            post: B::Buf::default(),
            out: B::Buf::default(),
            dpost: B::Buf::default(),
            post_bf16: B::Buf16::default(),
            dpre_bf16: B::Buf16::default(),
            bf16: false,
            #[cfg(test)]
            f32_storage: false,
        }
    }

    /// x: (N, C) → (N, C)
    pub fn forward(&mut self, be: &B, p: B::Ref<'_>, x: B::Ref<'_>) -> B::Ref<'_> {
        let (c, f) = (self.up.in_features, self.up.out_features);
        let n = B::len(x) / c;
        let mut pre = be.grow(&mut self.pre, n * f);
        self.up.matmul(be, p, x, B::reborrow(&mut pre));
        let b1 = B::param(p, self.up.bias.expect("ffn has biases"));
        self.bf16 = be.bf16_products() && self.activation != Activation::Identity;
        #[cfg(test)]
        {
            self.bf16 &= !self.f32_storage;
        }
        let out = be.grow(&mut self.out, n * c);
        if self.bf16 {
            let post = be.grow16(&mut self.post_bf16, padded_len(n, f));
            be.bias_act_forward_bf16(pre, post, b1, self.activation);
            let post = Bf16(B::view16(&self.post_bf16));
            self.down.forward_operand(be, p, post, n, out);
        } else {
            let post = be.grow(&mut self.post, n * f);
            be.bias_act_forward(pre, post, b1, self.activation);
            self.down.forward(be, p, B::view(&self.post, n * f), out);
        }
        B::view(&self.out, n * c)
    }

    /// `dx (+)= ∂L/∂x` from dy: (N, C)
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        be: &B,
        p: B::Ref<'_>,
        mut g: B::Mut<'_>,
        x: B::Ref<'_>,
        dy: B::Ref<'_>,
        dx: B::Mut<'_>,
        acc: Acc,
    ) {
        let (c, f) = (self.up.in_features, self.up.out_features);
        let n = B::len(x) / c;
        let mut dpost = be.grow(&mut self.dpost, n * f);
        let b1 = self.up.bias.expect("ffn has biases");
        let pre = B::view(&self.pre, n * f);
        let (down, up) = (&self.down, &self.up);
        if self.bf16 {
            let post = Bf16(B::view16(&self.post_bf16));
            let d_post = Some(B::reborrow(&mut dpost));
            let g_down = B::reborrow(&mut g);
            down.backward_operands(
                be,
                p,
                g_down,
                n,
                post,
                F32(dy),
                d_post,
                Acc::Set,
                BiasGrad::Compute,
            );
            let (_, db1) = B::params_mut(B::reborrow(&mut g), up.weight, b1);
            let dpre = be.grow16(&mut self.dpre_bf16, padded_len(n, f));
            be.bias_act_backward_bf16(B::shared(&dpost), db1, pre, self.activation, dpre);
            let dpre = Bf16(B::view16(&self.dpre_bf16));
            up.backward_operands(be, p, g, n, F32(x), dpre, Some(dx), acc, BiasGrad::Done);
            return;
        }
        let post = B::view(&self.post, n * f);
        let g_down = B::reborrow(&mut g);
        let d_post = Some(B::reborrow(&mut dpost));
        down.backward(be, p, g_down, post, dy, d_post, Acc::Set, BiasGrad::Compute);
        let (_, db1) = B::params_mut(B::reborrow(&mut g), up.weight, b1);
        be.bias_act_backward(B::reborrow(&mut dpost), db1, pre, self.activation);
        let dpre = B::shared(&dpost);
        up.backward(be, p, g, x, dpre, Some(dx), acc, BiasGrad::Done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::{set_matmul_precision, Precision};
    use crate::rng::Rng;

    /// Storing `post` and `∂L/∂pre` in bf16 changes no bit: the products round them to bf16
    /// anyway, and the bias gradient sums the unrounded values in both paths.
    #[test]
    fn bf16_storage_matches_f32_storage_with_bf16_products_bit_for_bit() {
        if !crate::kernels::bf16::run_bf16_test("bf16 FFN storage") {
            return;
        }
        let _g = set_matmul_precision(Precision::Bf16);
        let (n, c, f) = (37, 24, 64); // 37 rows: a partial block of the product's 12
        for act in [Activation::Relu, Activation::Gelu] {
            let mut pb = ParamBuilder::default();
            let ffn: FeedForward = FeedForward::new(&mut pb, "ffn", c, f, act);
            let mut params = pb.build(5).unwrap();
            // Non-zero biases, so the bias gradients and activations are not trivial.
            params.data.iter_mut().for_each(|v| *v += 0.01);
            let mut rng = Rng::new(6);
            let x: Vec<f32> = (0..n * c).map(|_| rng.normal()).collect();
            let dy: Vec<f32> = (0..n * c).map(|_| rng.normal()).collect();
            let run = |f32_storage: bool| {
                let mut ffn = ffn.clone();
                ffn.f32_storage = f32_storage;
                let y = ffn.forward(&Cpu, &params.data, &x).to_vec();
                let mut grad = vec![0.0; params.data.len()];
                let mut dx = vec![0.0; n * c];
                ffn.backward(&Cpu, &params.data, &mut grad, &x, &dy, &mut dx, Acc::Set);
                assert_eq!(ffn.bf16, !f32_storage);
                (y, grad, dx)
            };
            let (reference, stored) = (run(true), run(false));
            assert!(reference.0 == stored.0, "{act:?}: outputs differ");
            assert!(
                reference.1 == stored.1,
                "{act:?}: parameter gradients differ"
            );
            assert!(reference.2 == stored.2, "{act:?}: input gradients differ");
        }
    }
}
