//! qkv: the Transformer of "Attention Is All You Need" (Vaswani et al., 2017) on a
//! hand-written CPU engine with explicit forward and backward passes.
//!
//! Layering (see ARCHITECTURE.md):
//! - [`kernels`]: numeric kernels over flat `f32` slices; they know nothing of models.
//! - [`params`]: one flat parameter buffer and one gradient buffer with the same layout.
//! - [`model`]: layers, blocks and the three model families; no IO.
//! - [`optim`]: AdamW and gradient clipping over the flat buffers.
//! - [`checkpoint`]: safetensors weights, config JSON and optimizer state (the only IO in the library,
//!   with [`hf`], which reads pretrained Hugging Face encoders).

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod decode;
pub mod error;
pub mod hf;
pub mod inspect;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod parallel;
pub mod params;
pub mod profile;
pub mod rng;
pub mod schedule;
pub mod simd;
pub mod tasks;
pub mod train;

pub use error::{Error, Result};
