//! The seam between the layers and the hardware they run on (issue 18: one model code for the
//! CPU and the GPU). A layer's forward and backward are written once against [`Backend`]; an
//! implementation owns the buffers and runs the kernels: [`Cpu`] calls [`crate::kernels`],
//! [`Cuda`] launches their twins through [`crate::cuda::Gpu`].
//!
//! Buffers are the backend's: an owned, grow-only activation buffer ([`Backend::Buf`],
//! reused while shapes do not grow, as `model::buf` did for `Vec<f32>`) and borrowed views
//! of one ([`Backend::Ref`], [`Backend::Mut`]). On the CPU the views are plain slices, so a
//! layer written against the seam compiles to the kernel calls it made before. Parameters
//! and their gradients are views of the flat buffers of [`crate::params`], addressed by
//! [`Param`] on either side.
//!
//! The ops are the kernels' twins with the same arguments; each says which kernel it is.
//! They return nothing: shapes are the layers' invariants (a mismatch is a bug, and the CPU
//! kernels assert), and a device that fails asynchronously reports it where the caller
//! next reads a result back, as CUDA does.
//!
//! On the seam: every layer, block and stack, the embeddings, the loss, the three model
//! families over whole sequences, AdamW, the trainer and the tasks' validation (a job's
//! `train.device` picks the backend; files and other processes see host copies,
//! [`Backend::to_host`]), classification and embeddings, and decoding steps over a
//! `KvCache<B>` ([`Backend::kv_append`], [`Backend::attention_one_query`]; the search that
//! picks tokens runs on the host). The CPU's alone: continuous batching (a cache absorbing
//! rows), int8 decoding steps, ensembles, linear attention's decoding state.

mod cpu;
mod cuda;

pub use cpu::Cpu;
pub use cuda::{Cuda, DevBuf};

use crate::kernels::activation::Activation;
use crate::kernels::attention::{AttentionKind, AttentionShape, Masks};
use crate::kernels::dropout::Dropout;
use crate::kernels::loss::CrossEntropy;
use crate::kernels::matmul::Layout;
use crate::kernels::pool::Pool;
use crate::kernels::Acc;
use crate::optim::AdamWConfig;
use crate::params::Param;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt::Debug;
use std::ops::Range;

/// The hardware a job trains (or decodes) on: `"cpu"` (the default) or `"cuda"` (the first
/// NVIDIA GPU). Serde data, as a job file writes it; the CLI's `--device` overrides it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

/// Where a model's buffers live and its kernels run: a handle (clones share the device and
/// its error state). Shapes in the ops' comments use N rows
/// of C (or F) columns; every view is row-major and dense.
pub trait Backend: Clone + Debug + 'static {
    /// An owned f32 buffer (activations, saved statistics), grown on demand.
    type Buf: Default + Clone + Debug + Send;
    /// An owned buffer of bf16 bits: an activation kept only for products that read bf16.
    type Buf16: Default + Clone + Debug + Send;
    /// A shared view of f32s: `&[f32]` on the CPU.
    type Ref<'a>: Copy;
    /// An exclusive view of f32s: `&mut [f32]` on the CPU.
    type Mut<'a>;
    /// A shared view of bf16 bits.
    type Ref16<'a>: Copy;
    /// An exclusive view of bf16 bits.
    type Mut16<'a>;

    /// The first `n` elements of `b`, growing it (contents unspecified) if it is shorter.
    fn grow<'a>(&self, b: &'a mut Self::Buf, n: usize) -> Self::Mut<'a>;
    /// As [`Backend::grow`], for bf16 bits.
    fn grow16<'a>(&self, b: &'a mut Self::Buf16, n: usize) -> Self::Mut16<'a>;
    /// The first `n` elements of `b`.
    fn view(b: &Self::Buf, n: usize) -> Self::Ref<'_>;
    /// All of `b`.
    fn view16(b: &Self::Buf16) -> Self::Ref16<'_>;
    /// Elements `r` of `x`.
    fn sub<'a>(x: Self::Ref<'a>, r: Range<usize>) -> Self::Ref<'a>;
    /// The number of elements `x` views.
    fn len(x: Self::Ref<'_>) -> usize;
    /// A shorter-lived exclusive view of the same elements, so `x` can be used again after.
    fn reborrow<'b>(x: &'b mut Self::Mut<'_>) -> Self::Mut<'b>;
    /// A shared view of the elements `x` views.
    fn shared<'b>(x: &'b Self::Mut<'_>) -> Self::Ref<'b>;
    /// The same view for a shorter time. A slice does this by itself (it is covariant); a
    /// generic `Ref<'a>` is not, so generic code says where it needs it.
    fn shorten<'s, 'l: 's>(x: Self::Ref<'l>) -> Self::Ref<'s>;
    /// The elements `x` views, read-only, for as long as `x` would have lived.
    fn into_ref<'a>(x: Self::Mut<'a>) -> Self::Ref<'a>;
    /// The first `n` elements of `x`.
    fn prefix_mut<'a>(x: Self::Mut<'a>, n: usize) -> Self::Mut<'a>;
    /// Elements `r` of `x`, writable.
    fn sub_mut<'a>(x: Self::Mut<'a>, r: Range<usize>) -> Self::Mut<'a>;
    /// Elements `b` holds.
    fn buf_len(b: &Self::Buf) -> usize;

    /// One parameter's values in the flat buffer `p`.
    fn param<'a>(p: Self::Ref<'a>, w: Param) -> Self::Ref<'a> {
        Self::sub(p, w.range())
    }
    /// One parameter's gradient in the flat gradient buffer `g`.
    fn param_mut<'a>(g: Self::Mut<'a>, w: Param) -> Self::Mut<'a>;
    /// Two parameters' gradients (registered in this order) in the flat gradient buffer.
    fn params_mut<'a>(g: Self::Mut<'a>, a: Param, b: Param) -> (Self::Mut<'a>, Self::Mut<'a>);

    /// Whether products round their operands to bf16 (f32 accumulation).
    fn bf16_products(&self) -> bool;

    /// An error naming `kind` where this backend does not run it (checked when a model is
    /// moved here, so a model that cannot run is refused before any work).
    fn runs_attention(&self, kind: AttentionKind) -> crate::error::Result<()>;

    /// Waits for the ops queued so far and reports the first that failed since the last
    /// call (a device's launches fail asynchronously; the CPU's ops cannot fail).
    fn sync(&self) -> crate::error::Result<()>;

    /// `kernels::matmul::matmul_operands`: `out (m, n) (+)= op(a) · op(b)`.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        out: Self::Mut<'_>,
        a: Operand<'_, Self>,
        b: Operand<'_, Self>,
        m: usize,
        k: usize,
        n: usize,
        layouts: (Layout, Layout),
        acc: Acc,
    );
    /// A fully connected layer, `y = x Wᵀ (+ b)`, in the backend's product precision (the CPU
    /// fuses the bias into its bf16 product, `kernels::bf16::linear_bf16`).
    /// x: (N, I), w: (O, I), y: (N, O)
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        y: Self::Mut<'_>,
        x: Operand<'_, Self>,
        w: Self::Ref<'_>,
        bias: Option<Self::Ref<'_>>,
        n: usize,
        i: usize,
        o: usize,
    );
    /// `kernels::activation::column_sum`: `acc (F) += Σ_rows x`. x: (N, F)
    fn column_sum(&self, acc: Self::Mut<'_>, x: Self::Ref<'_>, f: usize);
    /// `kernels::activation::bias_act_forward`: `pre += bias`, `post = act(pre)`.
    /// pre, post: (N, F)
    fn bias_act_forward(
        &self,
        pre: Self::Mut<'_>,
        post: Self::Mut<'_>,
        bias: Self::Ref<'_>,
        act: Activation,
    );
    /// `kernels::activation::bias_act_forward_bf16`: as `bias_act_forward`, `post` in bf16
    /// bits (rows padded as the bf16 product reads them).
    fn bias_act_forward_bf16(
        &self,
        pre: Self::Mut<'_>,
        post: Self::Mut16<'_>,
        bias: Self::Ref<'_>,
        act: Activation,
    );
    /// `kernels::activation::bias_act_backward`: `d ← d·act'(pre)` in place,
    /// `dbias += Σ_rows d`. d, pre: (N, F)
    fn bias_act_backward(
        &self,
        d: Self::Mut<'_>,
        dbias: Self::Mut<'_>,
        pre: Self::Ref<'_>,
        act: Activation,
    );
    /// `kernels::activation::bias_act_backward_bf16`: as `bias_act_backward`, the result in
    /// bf16 bits in `out` (the bias gradient sums the unrounded values).
    fn bias_act_backward_bf16(
        &self,
        d: Self::Ref<'_>,
        dbias: Self::Mut<'_>,
        pre: Self::Ref<'_>,
        act: Activation,
        out: Self::Mut16<'_>,
    );
    /// `kernels::layernorm::layernorm_forward`; mean and rstd (N) are kept for backward.
    /// x, out: (N, C)
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: Self::Mut<'_>,
        mean: Self::Mut<'_>,
        rstd: Self::Mut<'_>,
        x: Self::Ref<'_>,
        w: Self::Ref<'_>,
        b: Self::Ref<'_>,
        c: usize,
        eps: f32,
    );
    /// `kernels::layernorm::residual_layernorm_forward`: `sum = x + dropout(sub)`,
    /// `out = LN(sum)`. All (N, C)
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_forward(
        &self,
        sum: Self::Mut<'_>,
        out: Self::Mut<'_>,
        mean: Self::Mut<'_>,
        rstd: Self::Mut<'_>,
        x: Self::Ref<'_>,
        sub: Self::Ref<'_>,
        params: (Self::Ref<'_>, Self::Ref<'_>),
        c: usize,
        eps: f32,
        drop: Option<Dropout>,
    );
    /// `kernels::layernorm::layernorm_backward`: `dx (+)= LN'(dy)`, `dw += …`, `db += …`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dx: Self::Mut<'_>,
        dparams: (Self::Mut<'_>, Self::Mut<'_>),
        dy: Self::Ref<'_>,
        x: Self::Ref<'_>,
        stats: (Self::Ref<'_>, Self::Ref<'_>),
        w: Self::Ref<'_>,
        c: usize,
        dx_acc: Acc,
    );
    /// `kernels::dropout::residual_add`: `out = x + dropout(sub)`.
    fn residual_add(
        &self,
        out: Self::Mut<'_>,
        x: Self::Ref<'_>,
        sub: Self::Ref<'_>,
        drop: Option<Dropout>,
    );
    /// `dst[..len(src)] = src`.
    fn copy(&self, dst: Self::Mut<'_>, src: Self::Ref<'_>);
    /// `kernels::dropout::backward_into`: `out = dropout'(dy)` (a copy without dropout).
    fn dropout_backward(&self, out: Self::Mut<'_>, dy: Self::Ref<'_>, drop: Option<Dropout>);

    /// `x[r] += row` for every row r of x (N, C): a broadcast row, such as BERT's token type.
    fn add_rows(&self, x: Self::Mut<'_>, row: Self::Ref<'_>);
    /// `kernels::dropout::apply`: in place `x = dropout(x)`.
    fn dropout_apply(&self, x: Self::Mut<'_>, drop: Option<Dropout>);
    /// `x = 0`.
    fn zero(&self, x: Self::Mut<'_>);
    /// `x *= s` (a loss gradient's share of an accumulated update).
    fn scale(&self, x: Self::Mut<'_>, s: f32);
    /// A buffer holding `host` (moved on the CPU, copied to a device).
    fn upload(&self, host: Vec<f32>) -> Self::Buf;
    /// The elements `x` views, on the host: borrowed on the CPU, copied from a device (which
    /// waits for the ops before it and reports the first that failed).
    fn to_host<'a>(&self, x: Self::Ref<'a>) -> crate::error::Result<Cow<'a, [f32]>>;
    /// Run `f` over the elements `x` views, on the host: in place on the CPU; a device copies
    /// them down, and back after `f` (checkpoints, averaging, sums across processes).
    fn host_mut(
        &self,
        x: Self::Mut<'_>,
        f: &mut dyn FnMut(&mut [f32]) -> crate::error::Result<()>,
    ) -> crate::error::Result<()>;

    /// `kernels::optim::sum_squares`: Σ x², in f64. A device waits for it; if it failed, the
    /// sum is NaN and [`Backend::sync`] says why.
    fn sum_squares(&self, x: Self::Ref<'_>) -> f64;
    /// `kernels::optim::adamw_step` with `config`'s settings and learning rate `lr` at update
    /// `step`, after multiplying the gradients by `clip` when given (`kernels::optim::scale`).
    #[allow(clippy::too_many_arguments)]
    fn adamw_step(
        &self,
        data: Self::Mut<'_>,
        grad: Self::Mut<'_>,
        m: Self::Mut<'_>,
        v: Self::Mut<'_>,
        clip: Option<f32>,
        config: &AdamWConfig,
        lr: f32,
        step: u64,
    );

    /// `kernels::embedding::embedding_forward`: `out = table[tokens]·scale + pos[t]`, with
    /// dropout. tokens: (N) on the host, as batches hold them, T per row; out: (N, C)
    #[allow(clippy::too_many_arguments)]
    fn embedding_forward(
        &self,
        out: Self::Mut<'_>,
        tokens: &[u32],
        table: Self::Ref<'_>,
        pos: Self::Ref<'_>,
        scale: f32,
        t_len_c: (usize, usize),
        drop: Option<Dropout>,
    );
    /// `kernels::embedding::embedding_backward`: `dtable[tokens] += dout·scale`,
    /// `dpos[t] += Σ_b dout` when given.
    #[allow(clippy::too_many_arguments)]
    fn embedding_backward(
        &self,
        dtable: Self::Mut<'_>,
        dpos: Option<Self::Mut<'_>>,
        dout: Self::Ref<'_>,
        tokens: &[u32],
        scale: f32,
        t_len_c: (usize, usize),
    );
    /// `kernels::pool::pool_forward`: out (B, C) from h (B, T, C); padding (B, T) on the host.
    fn pool_forward(
        &self,
        out: Self::Mut<'_>,
        h: Self::Ref<'_>,
        pad: &[bool],
        t_c: (usize, usize),
        pool: Pool,
    );
    /// `kernels::pool::pool_backward`: dh (B, T, C), overwritten, from dpooled (B, C).
    fn pool_backward(
        &self,
        dh: Self::Mut<'_>,
        dpooled: Self::Ref<'_>,
        pad: &[bool],
        t_c: (usize, usize),
        pool: Pool,
    );
    /// `kernels::loss::cross_entropy`: the loss of `logits` (N, V) against `targets` (N, on
    /// the host), and ∂(mean loss)/∂logits into `dlogits` when given. A device waits for
    /// the sums; if it failed, the loss is NaN and [`Backend::sync`] says why.
    fn cross_entropy(
        &self,
        dlogits: Option<Self::Mut<'_>>,
        logits: Self::Ref<'_>,
        targets: &[u32],
        v: usize,
        ignore: Option<u32>,
        smoothing: f32,
    ) -> CrossEntropy;

    /// Scaled dot-product attention (§3.2.1) with `kind`'s kernel: `kernels::attention::
    /// attention_forward` (materialized: `saved` gets the probabilities, (B, H, Tq, Tk)),
    /// `kernels::flash::flash_forward` or `kernels::linear_attention::
    /// linear_attention_forward` (`saved` gets (B, H, Tq) statistics). out: (B, Tq, H·D)
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        kind: AttentionKind,
        out: Self::Mut<'_>,
        saved: Self::Mut<'_>,
        qkv: [Heads<'_, Self>; 3],
        s: AttentionShape,
        masks: &Masks,
        scale: f32,
    );
    /// The backward of [`Backend::attention_forward`] with the same `kind`: overwrites the
    /// gradients of q, k and v. `scratch` is the backend's, grown as its kernel needs.
    /// dout, out: (B, Tq, H·D)
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        kind: AttentionKind,
        grads: HeadGrads<'_, Self>,
        dout_out_saved: (Self::Ref<'_>, Self::Ref<'_>, Self::Ref<'_>),
        scratch: &mut Self::Buf,
        qkv: [Heads<'_, Self>; 3],
        s: AttentionShape,
        masks: &Masks,
        scale: f32,
    );

    /// Incremental decoding's cache write: row r of `src` (`width` floats at row stride
    /// `src_rs`) becomes position `pos[r]` of block `block[r]` of `kv`, blocks of `rows`
    /// positions of `width` floats. `block`, `pos`: on the host, as decoding holds them.
    #[allow(clippy::too_many_arguments)]
    fn kv_append(
        &self,
        kv: Self::Mut<'_>,
        rows: usize,
        src: Self::Ref<'_>,
        src_rs: usize,
        width: usize,
        block: &[usize],
        pos: &[usize],
    );
    /// `kernels::attention::attention_one_query`: query row r (row stride `q_rs`) against
    /// keys `keys[r]` (or `keys[0]` for every row) of block `block[r]` of `kv`, laid out as
    /// `layout` says. out: (R, H·D); padding: (blocks, rows) on the host.
    #[allow(clippy::too_many_arguments)]
    fn attention_one_query(
        &self,
        out: Self::Mut<'_>,
        q: Self::Ref<'_>,
        q_rs: usize,
        kv: Self::Ref<'_>,
        layout: KvLayout,
        block: &[usize],
        keys: &[Range<usize>],
        padding: Option<&[bool]>,
        heads: usize,
        head_dim: usize,
        scale: f32,
    );
    /// Within `data`, in order: `len` elements from `from` to `to` for every `(from, to, len)`
    /// (a decoding cache's blocks copied for beam search; no copy's target overlaps a later
    /// copy's source).
    fn copy_within(&self, data: Self::Mut<'_>, copies: &[(usize, usize, usize)]);
    /// `kernels::linear_attention::linear_attention_step`: one position of every row's
    /// recurrent state (R rows of H·(D² + D) floats). out: (R, H·D); qkv: (R, 3·H·D)
    fn linear_attention_step(
        &self,
        out: Self::Mut<'_>,
        state: Self::Mut<'_>,
        qkv: Self::Ref<'_>,
        heads: usize,
        head_dim: usize,
    );
}

/// How a decoding cache's blocks hold keys and values (`kernels::attention::KvBlocks` less
/// its data): `rows` positions of `rs` floats per block, key head h at columns
/// `[k_offset + h·D, …)`, value head h at `[v_offset + h·D, …)`.
#[derive(Clone, Copy, Debug)]
pub struct KvLayout {
    pub rows: usize,
    pub rs: usize,
    pub k_offset: usize,
    pub v_offset: usize,
}

/// Per-head view of a buffer, as `kernels::attention::HeadsRef`: row t of batch b starts at
/// `(b·len + t)·rs + offset`, head h `h·D` further.
pub struct Heads<'a, B: Backend> {
    pub data: B::Ref<'a>,
    pub rs: usize,
    pub offset: usize,
}

impl<B: Backend> Clone for Heads<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Heads<'_, B> {}

/// Where an attention backward writes the gradients of q, k and v (width C = H·D each).
pub enum HeadGrads<'a, B: Backend> {
    /// Side by side in one (B·T, 3C) buffer: self-attention's fused projection.
    Fused(B::Mut<'a>),
    /// dQ in (B·Tq, C), dK and dV side by side in (B·Tk, 2C): cross-attention's.
    Split(B::Mut<'a>, B::Mut<'a>),
}

/// A product's operand: f32s, or bf16 bits a pass before it already rounded (rows padded as
/// the CPU's bf16 product reads them; see `kernels::bf16::Operand`).
pub enum Operand<'a, B: Backend> {
    F32(B::Ref<'a>),
    Bf16(B::Ref16<'a>),
}

impl<B: Backend> Clone for Operand<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Operand<'_, B> {}
