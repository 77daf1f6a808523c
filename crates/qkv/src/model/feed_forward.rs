//! Position-wise feed-forward network (§3.3): `FFN(x) = act(x W₁ + b₁) W₂ + b₂`.

use super::buf;
use super::linear::BiasGrad;
use super::linear::Linear;
use crate::kernels::activation::{
    bias_act_backward, bias_act_backward_bf16, bias_act_forward, bias_act_forward_bf16, Activation,
};
use crate::kernels::bf16::{padded_len, Operand};
use crate::kernels::matmul::bf16_active;
use crate::kernels::Acc;
use crate::params::{two_mut, ParamBuilder};

#[derive(Clone, Debug)]
pub struct FeedForward {
    pub up: Linear,
    pub down: Linear,
    pub activation: Activation,
    pre: Vec<f32>,   // (N, F) x W₁ + b₁
    post: Vec<f32>,  // (N, F) act(pre)
    out: Vec<f32>,   // (N, C)
    dpost: Vec<f32>, // (N, F) ∂L/∂post, then in place ∂L/∂pre
    // With bf16 products, `post` and `∂L/∂pre` are only ever read by products, so they are
    // written in bf16 alone (rows padded for the product's blocks): see `Operand`.
    post_bf16: Vec<u16>, // (N, F)
    dpre_bf16: Vec<u16>, // (N, F)
    bf16: bool,          // whether the last forward wrote `post_bf16` instead of `post`
    #[cfg(test)]
    f32_storage: bool, // tests: keep f32 activations even with bf16 products (the reference)
}

impl FeedForward {
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
            pre: Vec::new(),
            post: Vec::new(),
            out: Vec::new(),
            dpost: Vec::new(),
            post_bf16: Vec::new(),
            dpre_bf16: Vec::new(),
            bf16: false,
            #[cfg(test)]
            f32_storage: false,
        }
    }

    /// x: (N, C) → (N, C)
    pub fn forward(&mut self, p: &[f32], x: &[f32]) -> &[f32] {
        let (c, f) = (self.up.in_features, self.up.out_features);
        let n = x.len() / c;
        let pre = buf(&mut self.pre, n * f);
        self.up.matmul(p, x, pre);
        let b1 = self.up.bias.expect("ffn has biases");
        self.bf16 = bf16_active() && self.activation != Activation::Identity;
        #[cfg(test)]
        {
            self.bf16 &= !self.f32_storage;
        }
        let out = buf(&mut self.out, n * c);
        if self.bf16 {
            let post = buf16(&mut self.post_bf16, padded_len(n, f));
            bias_act_forward_bf16(pre, post, b1.of(p), self.activation);
            self.down
                .forward_operand(p, Operand::Bf16(&self.post_bf16), n, out);
        } else {
            bias_act_forward(pre, buf(&mut self.post, n * f), b1.of(p), self.activation);
            self.down.forward(p, &self.post[..n * f], out);
        }
        &self.out[..n * c]
    }

    /// `dx (+)= ∂L/∂x` from dy: (N, C)
    pub fn backward(
        &mut self,
        p: &[f32],
        g: &mut [f32],
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        acc: Acc,
    ) {
        let (c, f) = (self.up.in_features, self.up.out_features);
        let n = x.len() / c;
        let dpost = buf(&mut self.dpost, n * f);
        let b1 = self.up.bias.expect("ffn has biases");
        if self.bf16 {
            let post = Operand::Bf16(&self.post_bf16);
            let dy = Operand::F32(dy);
            self.down.backward_operands(
                p,
                g,
                n,
                post,
                dy,
                Some(dpost),
                Acc::Set,
                BiasGrad::Compute,
            );
            let (_, db1) = two_mut(g, self.up.weight, b1);
            let dpre = buf16(&mut self.dpre_bf16, padded_len(n, f));
            bias_act_backward_bf16(dpost, db1, &self.pre[..n * f], self.activation, dpre);
            let (x, dpre) = (Operand::F32(x), Operand::Bf16(&self.dpre_bf16));
            self.up
                .backward_operands(p, g, n, x, dpre, Some(dx), acc, BiasGrad::Done);
            return;
        }
        self.down.backward(
            p,
            g,
            &self.post[..n * f],
            dy,
            Some(dpost),
            Acc::Set,
            BiasGrad::Compute,
        );
        let (_, db1) = two_mut(g, self.up.weight, b1);
        bias_act_backward(dpost, db1, &self.pre[..n * f], self.activation);
        self.up
            .backward(p, g, x, &self.dpost[..n * f], Some(dx), acc, BiasGrad::Done);
    }
}

/// Grow-only bf16 buffer, as [`buf`].
fn buf16(v: &mut Vec<u16>, n: usize) -> &mut [u16] {
    if v.len() < n {
        v.resize(n, 0);
    }
    &mut v[..n]
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
            let ffn = FeedForward::new(&mut pb, "ffn", c, f, act);
            let mut params = pb.build(5).unwrap();
            // Non-zero biases, so the bias gradients and activations are not trivial.
            params.data.iter_mut().for_each(|v| *v += 0.01);
            let mut rng = Rng::new(6);
            let x: Vec<f32> = (0..n * c).map(|_| rng.normal()).collect();
            let dy: Vec<f32> = (0..n * c).map(|_| rng.normal()).collect();
            let run = |f32_storage: bool| {
                let mut ffn = ffn.clone();
                ffn.f32_storage = f32_storage;
                let y = ffn.forward(&params.data, &x).to_vec();
                let mut grad = vec![0.0; params.data.len()];
                let mut dx = vec![0.0; n * c];
                ffn.backward(&params.data, &mut grad, &x, &dy, &mut dx, Acc::Set);
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
