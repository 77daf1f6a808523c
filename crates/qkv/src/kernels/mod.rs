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
pub mod packed;
pub mod pool;
pub mod softmax;
pub mod tile;

/// Whether a kernel overwrites its output or adds onto what is there (`dx += …`: how a
/// residual branch's gradient, or a second product into one buffer, is fused in without a
/// separate pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acc {
    /// `out = …`
    Set,
    /// `out += …`
    Add,
}

impl Acc {
    /// `Add` when `accumulate`: for callers that carry the choice as a flag.
    pub fn add_if(accumulate: bool) -> Self {
        if accumulate {
            Acc::Add
        } else {
            Acc::Set
        }
    }

    /// Whether this is [`Acc::Add`].
    pub fn adds(self) -> bool {
        self == Acc::Add
    }
}
