//! Numeric kernels over flat `f32` slices: each has a forward and a backward, shapes are given
//! as comments in one alphabet — B batch, T/Tq/Tk sequence, C model width, H heads, D head
//! width, F feed-forward width, V vocabulary, N = B·T rows. Kernels know nothing of models.

pub mod activation;
pub mod attention;
pub mod bf16;
pub mod dropout;
pub mod embedding;
pub mod flash;
mod flash_bf16;
pub mod layernorm;
pub mod linear_attention;
pub mod loss;
pub mod matmul;
pub mod optim;
pub mod softmax;
pub mod tile;
