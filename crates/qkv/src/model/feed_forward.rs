//! Position-wise feed-forward network (§3.3): `FFN(x) = act(x W₁ + b₁) W₂ + b₂`.

use super::buf;
use super::linear::Linear;
use crate::kernels::activation::{bias_act_backward, bias_act_forward, Activation};
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
        }
    }

    /// x: (N, C) → (N, C)
    pub fn forward(&mut self, p: &[f32], x: &[f32]) -> &[f32] {
        let (c, f) = (self.up.in_features, self.up.out_features);
        let n = x.len() / c;
        let pre = buf(&mut self.pre, n * f);
        self.up.matmul(p, x, pre);
        let b1 = self.up.bias.expect("ffn has biases");
        bias_act_forward(pre, buf(&mut self.post, n * f), b1.of(p), self.activation);
        self.down
            .forward(p, &self.post[..n * f], buf(&mut self.out, n * c));
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
        accumulate: bool,
    ) {
        let (c, f) = (self.up.in_features, self.up.out_features);
        let n = x.len() / c;
        let dpost = buf(&mut self.dpost, n * f);
        self.down
            .backward(p, g, &self.post[..n * f], dy, Some(dpost), false, false);
        let b1 = self.up.bias.expect("ffn has biases");
        let (_, db1) = two_mut(g, self.up.weight, b1);
        bias_act_backward(dpost, db1, &self.pre[..n * f], self.activation);
        self.up
            .backward(p, g, x, &self.dpost[..n * f], Some(dx), accumulate, true);
    }
}
