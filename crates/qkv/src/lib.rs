//! qkv: the Transformer of "Attention Is All You Need" (Vaswani et al., 2017) on a
//! hand-written CPU engine with explicit forward and backward passes.
//!
//! Layering (see ARCHITECTURE.md), bottom to top:
//! - [`kernels`]: numeric kernels over flat `f32` slices; they know nothing of models.
//! - [`params`]: one flat parameter buffer and one gradient buffer with the same layout.
//! - [`model`]: layers, blocks and the three model families; no IO.
//! - [`optim`], [`schedule`], [`train`]: AdamW, learning rates, the training loop and its
//!   run directory.
//! - [`data`], [`decode`], [`metrics`], [`mbr`]: tokenizers and batches, decoding,
//!   sacreBLEU-exact scores, minimum Bayes risk selection among a beam's outputs.
//! - [`checkpoint`], [`model_dir`], [`hf`]: model directories on disk (qkv's and Hugging
//!   Face's).
//! - [`tasks`], [`job`], [`pipeline`]: translation, classification and language modelling
//!   from text files to scored models; what the `qkv` binary adapts to a terminal and HTTP.

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod cuda;
pub mod data;
pub mod decode;
pub mod dist;
pub mod error;
pub mod export;
pub mod hf;
pub mod inspect;
pub mod job;
pub mod kernels;
pub mod mbr;
pub mod metrics;
pub mod model;
pub mod model_dir;
pub mod optim;
pub mod parallel;
pub mod params;
pub mod pipeline;
pub mod profile;
pub mod rng;
pub mod schedule;
pub mod simd;
pub mod tasks;
pub mod train;

pub use error::{Error, Result};
