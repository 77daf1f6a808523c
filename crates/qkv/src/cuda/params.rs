//! Parameters, gradients and AdamW's state on the GPU: the device side of [`crate::params`] and
//! [`crate::optim`], in the same flat layout (a `Param`'s offset means the same element on
//! either side), so a model's weights move with one copy each way and a checkpoint is written
//! from the host copy as today.

use cudarc::driver::CudaSlice;

use super::view::DevMut;
use super::{CudaError, Gpu};
use crate::error::Result;
use crate::optim::{clip_coef, non_finite_gradient, AdamWConfig};
use crate::params::{ParamSpec, Params};

/// A model's parameters and gradients on the GPU.
pub struct DeviceParams {
    pub specs: Vec<ParamSpec>,
    pub data: CudaSlice<f32>,
    pub grad: CudaSlice<f32>,
}

impl DeviceParams {
    /// A copy of `params` (values and gradients) on `gpu`.
    pub fn upload(gpu: &Gpu, params: &Params) -> Result<Self, CudaError> {
        Ok(Self {
            specs: params.specs.clone(),
            data: gpu.stream().clone_htod(&params.data)?,
            grad: gpu.stream().clone_htod(&params.grad)?,
        })
    }

    /// Copies the values back into `params` (same model: the layouts must agree).
    pub fn download(&self, gpu: &Gpu, params: &mut Params) -> Result<(), CudaError> {
        if params.data.len() != self.data.len() {
            return Err(CudaError::Shape {
                kernel: "DeviceParams::download",
                msg: format!(
                    "{} parameters on the GPU, {} on the host",
                    self.data.len(),
                    params.data.len()
                ),
            });
        }
        gpu.stream().memcpy_dtoh(&self.data, &mut params.data)?;
        Ok(())
    }

    /// Zeroes the gradients (the trainer's job, as on the CPU).
    pub fn zero_grad(&mut self, gpu: &Gpu) -> Result<(), CudaError> {
        gpu.stream().memset_zeros(&mut self.grad)?;
        Ok(())
    }
}

/// [`crate::optim::AdamW`] with its moments on the GPU.
pub struct DeviceAdamW {
    pub config: AdamWConfig,
    pub m: CudaSlice<f32>,
    pub v: CudaSlice<f32>,
    pub step: u64,
}

impl DeviceAdamW {
    pub fn new(gpu: &Gpu, config: AdamWConfig, n_params: usize) -> Result<Self, CudaError> {
        Ok(Self {
            config,
            m: gpu.stream().alloc_zeros(n_params)?,
            v: gpu.stream().alloc_zeros(n_params)?,
            step: 0,
        })
    }

    /// [`crate::optim::AdamW::step`] on the GPU: clip to the configured global norm, then one
    /// AdamW update. Returns the norm before clipping; a non-finite gradient is an error naming
    /// the first parameter that holds one, with the parameters untouched.
    pub fn step(&mut self, gpu: &Gpu, params: &mut DeviceParams, lr: f32) -> Result<f32> {
        let (data, grad) = ((&mut params.data).into(), (&mut params.grad).into());
        self.step_views(gpu, &params.specs, data, grad, lr)
    }

    /// [`DeviceAdamW::step`] on a model's flat buffers wherever they are held (a model on the
    /// CUDA backend keeps them in its `Params<Cuda>`).
    pub fn step_views(
        &mut self,
        gpu: &Gpu,
        specs: &[ParamSpec],
        data: DevMut<'_>,
        mut grad: DevMut<'_>,
        lr: f32,
    ) -> Result<f32> {
        let norm = gpu.sum_squares(grad.shared())?.sqrt() as f32;
        if !norm.is_finite() {
            let host = gpu.to_host(grad.shared())?;
            return Err(non_finite_gradient(specs, &host, norm));
        }
        if let Some(coef) = clip_coef(norm, self.config.clip_norm) {
            gpu.scale(grad.reborrow(), coef)?;
        }
        self.step += 1;
        let c = &self.config;
        gpu.adamw_step(
            data,
            grad,
            &mut self.m,
            &mut self.v,
            lr,
            c.beta1,
            c.beta2,
            c.eps,
            c.weight_decay,
            self.step,
        )?;
        Ok(norm)
    }
}
