//! AdamW with global-norm gradient clipping over the flat parameter/gradient buffers.

use crate::backend::{Backend, Cpu};
use crate::error::{Error, Result};
use crate::kernels::optim::sum_squares;
use crate::params::Params;
use serde::{Deserialize, Serialize};

/// AdamW's settings. The learning rate is not one of them: the trainer takes it from the
/// schedule at every update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay (Loshchilov & Hutter), multiplied by the learning rate.
    pub weight_decay: f32,
    /// Clip the global gradient norm to this value (`None`: no clipping).
    pub clip_norm: Option<f32>,
}

impl Default for AdamWConfig {
    /// The paper's Adam settings (§5.3: β1 = 0.9, β2 = 0.98, ε = 1e-9) with decoupled decay.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-9,
            weight_decay: 0.01,
            clip_norm: Some(1.0),
        }
    }
}

impl AdamWConfig {
    /// Reject settings AdamW cannot use, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(format!("optimizer.{name} must be in [0, 1), got {b}"));
            }
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return bad(format!("optimizer.eps must be positive, got {}", self.eps));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad(format!(
                "optimizer.weight_decay must be ≥ 0, got {}",
                self.weight_decay
            ));
        }
        if self.clip_norm.is_some_and(|c| !(c > 0.0 && c.is_finite())) {
            return bad(format!(
                "optimizer.clip_norm must be positive (or null for no clipping), got {:?}",
                self.clip_norm
            ));
        }
        Ok(())
    }
}

/// Optimizer state: first and second moments in the parameters' layout, on the parameters'
/// backend, and the step count.
#[derive(Clone, Debug)]
pub struct AdamW<B: Backend = Cpu> {
    pub config: AdamWConfig,
    pub m: B::Buf,
    pub v: B::Buf,
    pub step: u64,
}

impl AdamW {
    pub fn new(config: AdamWConfig, n_params: usize) -> Self {
        Self::on(&Cpu, config, n_params)
    }

    /// Clip (if configured) and apply one update with learning rate `lr`.
    /// Returns the gradient norm before clipping. A non-finite gradient is an error naming the
    /// first parameter that holds one; the parameters are left untouched.
    pub fn step(&mut self, params: &mut Params, lr: f32) -> Result<f32> {
        self.step_on(&Cpu, params, lr)
    }
}

impl<B: Backend> AdamW<B> {
    /// Zero moments for `n_params` parameters on `be`.
    pub fn on(be: &B, config: AdamWConfig, n_params: usize) -> Self {
        Self {
            config,
            m: be.upload(vec![0.0; n_params]),
            v: be.upload(vec![0.0; n_params]),
            step: 0,
        }
    }

    /// A host optimizer state (a checkpoint's) on `be`.
    pub fn upload(be: &B, host: AdamW) -> Self {
        Self {
            config: host.config,
            m: be.upload(host.m),
            v: be.upload(host.v),
            step: host.step,
        }
    }

    /// [`AdamW::step`] on `be`, where `params` and the moments live. The update is queued on
    /// a device: a failure shows at the next read (the next loss).
    pub fn step_on(&mut self, be: &B, params: &mut Params<B>, lr: f32) -> Result<f32> {
        let n = params.len();
        let norm = be.sum_squares(B::view(&params.grad, n)).sqrt() as f32;
        if !norm.is_finite() {
            be.sync()?;
            let grad = be.to_host(B::view(&params.grad, n))?;
            return Err(non_finite_gradient(&params.specs, &grad, norm));
        }
        let clip = clip_coef(norm, self.config.clip_norm);
        self.step += 1;
        be.adamw_step(
            be.grow(&mut params.data, n),
            be.grow(&mut params.grad, n),
            be.grow(&mut self.m, n),
            be.grow(&mut self.v, n),
            clip,
            &self.config,
            lr,
            self.step,
        );
        Ok(norm)
    }
}

/// The factor that clips gradients of norm `norm` to `max`, when they need it:
/// torch.nn.utils.clip_grad_norm_'s `max / (norm + 1e-6)`, applied when below 1.
pub fn clip_coef(norm: f32, max: Option<f32>) -> Option<f32> {
    let coef = max? / (norm + 1e-6);
    (coef < 1.0).then_some(coef)
}

/// Global L2 norm of all gradients; errors on NaN/Inf, naming the parameter.
pub fn grad_norm(params: &Params) -> Result<f32> {
    let norm = sum_squares(&params.grad).sqrt() as f32;
    if norm.is_finite() {
        return Ok(norm);
    }
    Err(non_finite_gradient(&params.specs, &params.grad, norm))
}

/// The error for a gradient whose norm is `norm` (not finite): names the first parameter that
/// holds a NaN or infinity, and its element. `grad` is in the specs' flat layout.
pub fn non_finite_gradient(specs: &[crate::params::ParamSpec], grad: &[f32], norm: f32) -> Error {
    for s in specs {
        let g = &grad[s.offset..s.offset + s.len];
        if let Some(i) = g.iter().position(|v| !v.is_finite()) {
            return Error::NonFinite {
                what: format!("gradient of {} (element {i})", s.name),
                value: g[i],
            };
        }
    }
    Error::NonFinite {
        what: "gradient norm".into(),
        value: norm,
    }
}
