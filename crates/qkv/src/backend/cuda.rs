//! The CUDA backend: buffers in GPU memory, ops launched by [`crate::cuda::Gpu`] on its one
//! stream (cuBLASLt products: TF32, or bf16 operands with f32 sums; NVRTC-compiled kernels).
//!
//! A launch fails asynchronously on a GPU, so the ops do not return errors: the first one is
//! kept, every op after it does nothing, and [`Backend::sync`] reports it. Nothing a failed
//! op left behind is read before then.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use super::{Backend, HeadGrads, Heads, KvLayout, Operand};
use crate::cuda::ops::{DevHeads, DevHeadsMut, DevKvBlocks};
use crate::cuda::view::{DevMut, DevRef};
use crate::cuda::{CudaError, Gpu};
use crate::error::Result;
use crate::kernels::activation::Activation;
use crate::kernels::attention::{AttentionKind, AttentionShape, Masks};
use crate::kernels::dropout::Dropout;
use crate::kernels::loss::CrossEntropy;
use crate::kernels::matmul::Layout;
use crate::kernels::pool::Pool;
use crate::kernels::Acc;
use crate::optim::AdamWConfig;
use crate::params::Param;
use std::borrow::Cow;

/// One GPU, its product precision, and the first failure since the last [`Backend::sync`]
/// (shared by the handle's clones: they queue on the same stream).
#[derive(Clone)]
pub struct Cuda {
    gpu: Arc<Gpu>,
    bf16: bool,
    failed: Arc<Mutex<Option<CudaError>>>,
}

impl fmt::Debug for Cuda {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let precision = if self.bf16 { "bf16" } else { "tf32" };
        write!(f, "Cuda({}, {precision})", self.gpu.describe())
    }
}

impl Cuda {
    /// The backend on `gpu`; `bf16`: products round their operands to bf16 (mixed precision,
    /// as the CPU's `Precision::Bf16`), otherwise TF32.
    pub fn new(gpu: Arc<Gpu>, bf16: bool) -> Self {
        Self {
            gpu,
            bf16,
            failed: Arc::new(Mutex::new(None)),
        }
    }

    /// The backend on the first GPU, its products in bf16 (mixed precision) or TF32. Without
    /// a usable GPU (driver, NVRTC, cuBLASLt) an error says what is missing.
    pub fn first_gpu(bf16: bool) -> Result<Self> {
        Ok(Self::new(Arc::new(Gpu::new(0)?), bf16))
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Whether attention runs on tensor cores: with bf16 products, at the head widths whose
    /// forward and backward both have a tensor-core kernel (32, 64); otherwise in f32.
    fn tensor_core_attention(&self, head_dim: usize) -> bool {
        self.bf16 && matches!(head_dim, 32 | 64)
    }

    /// Runs `op` unless an earlier op failed; keeps its failure.
    fn run(&self, op: impl FnOnce(&Gpu) -> Result<(), CudaError>) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed.is_none() {
            *failed = op(&self.gpu).err();
        }
    }

    fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Option<CudaSlice<T>> {
        let mut slice = None;
        self.run(|gpu| {
            slice = Some(gpu.stream().alloc_zeros::<T>(n.max(1))?);
            Ok(())
        });
        slice
    }

    /// Both operands of a product as bf16 bits: rounded here when given in f32.
    fn bf16_operand<'a>(&self, x: Operand<'a, Cuda>, n: usize) -> Bits<'a> {
        match x {
            Operand::Bf16(x) => Bits::Borrowed(x),
            Operand::F32(x) => {
                let mut out = None;
                self.run(|gpu| {
                    out = Some(gpu.to_bf16(x, n)?);
                    Ok(())
                });
                Bits::Owned(out)
            }
        }
    }
}

fn dev_heads(h: Heads<'_, Cuda>) -> DevHeads<'_> {
    DevHeads {
        data: h.data,
        rs: h.rs,
        offset: h.offset,
    }
}

/// The GPU runs flash attention only; the other kinds are named in the error.
fn flash_only(kind: AttentionKind) -> Result<(), CudaError> {
    match kind {
        AttentionKind::Flash => Ok(()),
        AttentionKind::Materialized => Err(CudaError::Unsupported(
            "materialized attention (attention weights) is not on CUDA: record weights on the \
             CPU, or use \"attention\": \"flash\""
                .into(),
        )),
        AttentionKind::Linear => Err(CudaError::Unsupported(
            "linear attention is not on CUDA: use \"attention\": \"flash\" (a model trained \
             with linear attention runs on the CPU)"
                .into(),
        )),
    }
}

/// A product operand in bf16 bits: a caller's, or rounded for this product.
enum Bits<'a> {
    Borrowed(DevRef<'a, u16>),
    Owned(Option<CudaSlice<u16>>),
}

impl Bits<'_> {
    fn view(&self) -> Option<DevRef<'_, u16>> {
        match self {
            Bits::Borrowed(x) => Some(*x),
            Bits::Owned(x) => x.as_ref().map(DevRef::from),
        }
    }
}

/// A grow-only buffer in GPU memory (empty until first grown).
#[derive(Debug)]
pub struct DevBuf<T>(Option<CudaSlice<T>>);

impl<T> Default for DevBuf<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<T: DeviceRepr> Clone for DevBuf<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: DeviceRepr + ValidAsZeroBits> DevBuf<T> {
    pub(crate) fn grow<'a>(&'a mut self, cuda: &Cuda, n: usize) -> DevMut<'a, T> {
        if self.0.as_ref().is_none_or(|s| s.len() < n) {
            self.0 = cuda.alloc(n);
        }
        match &mut self.0 {
            Some(s) => DevMut::from(s).slice(0..n),
            // Allocation failed: `cuda` is failed and launches nothing with this view.
            None => DevMut::unbacked(n),
        }
    }

    /// Elements held (0 before the first grow).
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |s| s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All of the buffer, writable (a model's flat parameters or gradients).
    pub fn view_mut(&mut self) -> DevMut<'_, T> {
        match &mut self.0 {
            Some(s) => DevMut::from(s),
            None => DevMut::unbacked(0),
        }
    }

    fn view(&self, n: usize) -> DevRef<'_, T> {
        match &self.0 {
            Some(s) => DevRef::from(s).slice(0..n),
            None => DevRef::unbacked(0).slice(0..n),
        }
    }
}

impl Backend for Cuda {
    type Buf = DevBuf<f32>;
    type Buf16 = DevBuf<u16>;
    type Ref<'a> = DevRef<'a>;
    type Mut<'a> = DevMut<'a>;
    type Ref16<'a> = DevRef<'a, u16>;
    type Mut16<'a> = DevMut<'a, u16>;

    fn grow<'a>(&self, b: &'a mut DevBuf<f32>, n: usize) -> DevMut<'a> {
        b.grow(self, n)
    }
    fn grow16<'a>(&self, b: &'a mut DevBuf<u16>, n: usize) -> DevMut<'a, u16> {
        b.grow(self, n)
    }
    fn view(b: &DevBuf<f32>, n: usize) -> DevRef<'_> {
        b.view(n)
    }
    fn view16(b: &DevBuf<u16>) -> DevRef<'_, u16> {
        b.view(b.0.as_ref().map_or(0, |s| s.len()))
    }
    fn sub<'a>(x: Self::Ref<'a>, r: Range<usize>) -> Self::Ref<'a> {
        x.slice(r)
    }
    fn len(x: DevRef<'_>) -> usize {
        x.len()
    }
    fn reborrow<'b>(x: &'b mut DevMut<'_>) -> DevMut<'b> {
        x.reborrow()
    }
    fn shared<'b>(x: &'b DevMut<'_>) -> DevRef<'b> {
        x.shared()
    }
    fn shorten<'s, 'l: 's>(x: Self::Ref<'l>) -> Self::Ref<'s> {
        x
    }
    fn into_ref<'a>(x: Self::Mut<'a>) -> Self::Ref<'a> {
        x.into()
    }
    fn prefix_mut<'a>(x: Self::Mut<'a>, n: usize) -> Self::Mut<'a> {
        x.slice(0..n)
    }
    fn sub_mut<'a>(x: Self::Mut<'a>, r: Range<usize>) -> Self::Mut<'a> {
        x.slice(r)
    }
    fn buf_len(b: &DevBuf<f32>) -> usize {
        b.len()
    }
    fn param_mut<'a>(g: Self::Mut<'a>, w: Param) -> Self::Mut<'a> {
        g.slice(w.range())
    }
    fn params_mut<'a>(g: Self::Mut<'a>, a: Param, b: Param) -> (Self::Mut<'a>, Self::Mut<'a>) {
        g.split(a.range(), b.range())
    }

    fn bf16_products(&self) -> bool {
        self.bf16
    }

    fn runs_attention(&self, kind: AttentionKind) -> Result<()> {
        Ok(flash_only(kind)?)
    }

    fn sync(&self) -> Result<()> {
        self.run(|gpu| gpu.synchronize());
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        match failed.take() {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn matmul(
        &self,
        out: DevMut<'_>,
        a: Operand<'_, Cuda>,
        b: Operand<'_, Cuda>,
        m: usize,
        k: usize,
        n: usize,
        layouts: (Layout, Layout),
        acc: Acc,
    ) {
        if let (Operand::F32(a), Operand::F32(b), false) = (a, b, self.bf16) {
            let (la, lb) = layouts;
            return self.run(|gpu| gpu.matmul(out, a, b, m, k, n, la, lb, acc));
        }
        let (a, b) = (self.bf16_operand(a, m * k), self.bf16_operand(b, k * n));
        if let (Some(a), Some(b)) = (a.view(), b.view()) {
            self.run(|gpu| gpu.matmul_bf16_bits(out, a, b, (m, k, n), layouts, acc));
        }
    }

    fn linear(
        &self,
        mut y: DevMut<'_>,
        x: Operand<'_, Cuda>,
        w: DevRef<'_>,
        bias: Option<DevRef<'_>>,
        n: usize,
        i: usize,
        o: usize,
    ) {
        let layouts = (Layout::RowMajor, Layout::Transposed);
        let y_rows = y.reborrow().slice(0..n * o);
        self.matmul(y_rows, x, Operand::F32(w), n, i, o, layouts, Acc::Set);
        if let Some(b) = bias {
            let y_rows = y.slice(0..n * o);
            self.run(|gpu| gpu.bias_act_forward(y_rows, None, b, Activation::Identity));
        }
    }

    fn column_sum(&self, acc: DevMut<'_>, x: DevRef<'_>, _f: usize) {
        self.run(|gpu| gpu.column_sum(acc, x));
    }
    fn bias_act_forward(
        &self,
        pre: DevMut<'_>,
        post: DevMut<'_>,
        bias: DevRef<'_>,
        act: Activation,
    ) {
        let post = (act != Activation::Identity).then_some(post);
        self.run(|gpu| gpu.bias_act_forward(pre, post, bias, act));
    }
    fn bias_act_forward_bf16(
        &self,
        pre: DevMut<'_>,
        post: DevMut<'_, u16>,
        bias: DevRef<'_>,
        act: Activation,
    ) {
        self.run(|gpu| gpu.bias_act_forward_bf16(pre, post, bias, act));
    }
    fn bias_act_backward(
        &self,
        d: DevMut<'_>,
        dbias: DevMut<'_>,
        pre: DevRef<'_>,
        act: Activation,
    ) {
        self.run(|gpu| gpu.bias_act_backward(d, dbias, pre, act));
    }
    fn bias_act_backward_bf16(
        &self,
        d: DevRef<'_>,
        dbias: DevMut<'_>,
        pre: DevRef<'_>,
        act: Activation,
        out: DevMut<'_, u16>,
    ) {
        self.run(|gpu| gpu.bias_act_backward_bf16(d, dbias, pre, act, out));
    }

    fn layernorm_forward(
        &self,
        out: DevMut<'_>,
        mean: DevMut<'_>,
        rstd: DevMut<'_>,
        x: DevRef<'_>,
        w: DevRef<'_>,
        b: DevRef<'_>,
        c: usize,
        eps: f32,
    ) {
        self.run(|gpu| gpu.layernorm_forward(out, mean, rstd, x, w, b, c, eps));
    }
    fn residual_layernorm_forward(
        &self,
        sum: DevMut<'_>,
        out: DevMut<'_>,
        mean: DevMut<'_>,
        rstd: DevMut<'_>,
        x: DevRef<'_>,
        sub: DevRef<'_>,
        (w, b): (DevRef<'_>, DevRef<'_>),
        c: usize,
        eps: f32,
        drop: Option<Dropout>,
    ) {
        self.run(|gpu| {
            gpu.residual_layernorm_forward(sum, out, mean, rstd, x, sub, w, b, c, eps, drop)
        });
    }
    fn layernorm_backward(
        &self,
        dx: DevMut<'_>,
        (dw, db): (DevMut<'_>, DevMut<'_>),
        dy: DevRef<'_>,
        x: DevRef<'_>,
        (mean, rstd): (DevRef<'_>, DevRef<'_>),
        w: DevRef<'_>,
        c: usize,
        dx_acc: Acc,
    ) {
        self.run(|gpu| gpu.layernorm_backward(dx, dw, db, dy, x, mean, rstd, w, c, dx_acc));
    }

    fn residual_add(&self, out: DevMut<'_>, x: DevRef<'_>, sub: DevRef<'_>, drop: Option<Dropout>) {
        self.run(|gpu| gpu.residual_add(out, x, sub, drop));
    }
    fn copy(&self, dst: DevMut<'_>, src: DevRef<'_>) {
        let dst = dst.slice(0..src.len());
        self.run(|gpu| gpu.copy(dst, src));
    }
    fn dropout_backward(&self, out: DevMut<'_>, dy: DevRef<'_>, drop: Option<Dropout>) {
        let mut out = out.slice(0..dy.len());
        self.run(|gpu| {
            gpu.copy(out.reborrow(), dy)?;
            gpu.dropout_apply(out, drop)
        });
    }

    fn add_rows(&self, x: DevMut<'_>, row: DevRef<'_>) {
        self.run(|gpu| gpu.bias_act_forward(x, None, row, Activation::Identity));
    }
    fn dropout_apply(&self, x: DevMut<'_>, drop: Option<Dropout>) {
        self.run(|gpu| gpu.dropout_apply(x, drop));
    }
    fn zero(&self, x: DevMut<'_>) {
        self.run(|gpu| gpu.zero(x));
    }
    fn scale(&self, x: DevMut<'_>, s: f32) {
        if s != 1.0 {
            self.run(|gpu| gpu.scale(x, s));
        }
    }
    fn upload(&self, host: Vec<f32>) -> DevBuf<f32> {
        let mut slice = None;
        self.run(|gpu| {
            slice = Some(gpu.stream().clone_htod(&host)?);
            Ok(())
        });
        DevBuf(slice)
    }

    fn to_host<'a>(&self, x: Self::Ref<'a>) -> Result<Cow<'a, [f32]>> {
        let mut host = Vec::new();
        self.run(|gpu| {
            host = gpu.to_host(x)?;
            Ok(())
        });
        self.sync()?;
        Ok(Cow::Owned(host))
    }
    fn host_mut(
        &self,
        mut x: DevMut<'_>,
        f: &mut dyn FnMut(&mut [f32]) -> Result<()>,
    ) -> Result<()> {
        let mut host = self.to_host(x.shared())?.into_owned();
        f(&mut host)?;
        self.run(|gpu| gpu.write(x.reborrow(), &host));
        self.sync()
    }
    fn sum_squares(&self, x: DevRef<'_>) -> f64 {
        let mut sum = f64::NAN;
        self.run(|gpu| {
            sum = gpu.sum_squares(x)?;
            Ok(())
        });
        sum
    }
    fn adamw_step(
        &self,
        data: DevMut<'_>,
        mut grad: DevMut<'_>,
        m: DevMut<'_>,
        v: DevMut<'_>,
        clip: Option<f32>,
        c: &AdamWConfig,
        lr: f32,
        step: u64,
    ) {
        self.run(|gpu| {
            if let Some(coef) = clip {
                gpu.scale(grad.reborrow(), coef)?;
            }
            let (b1, b2, eps, wd) = (c.beta1, c.beta2, c.eps, c.weight_decay);
            gpu.adamw_step(data, grad.shared(), m, v, lr, b1, b2, eps, wd, step)
        });
    }

    fn embedding_forward(
        &self,
        out: DevMut<'_>,
        tokens: &[u32],
        table: DevRef<'_>,
        pos: DevRef<'_>,
        scale: f32,
        (t_len, c): (usize, usize),
        drop: Option<Dropout>,
    ) {
        self.run(|gpu| {
            let tokens = gpu.stream().clone_htod(tokens)?;
            gpu.embedding_forward(out, &tokens, table, pos, scale, t_len, c, drop)
        });
    }
    fn embedding_backward(
        &self,
        dtable: DevMut<'_>,
        dpos: Option<DevMut<'_>>,
        dout: DevRef<'_>,
        tokens: &[u32],
        scale: f32,
        (t_len, c): (usize, usize),
    ) {
        self.run(|gpu| {
            let tokens = gpu.stream().clone_htod(tokens)?;
            gpu.embedding_backward(dtable, dpos, dout, &tokens, scale, t_len, c)
        });
    }
    fn pool_forward(
        &self,
        out: DevMut<'_>,
        h: DevRef<'_>,
        pad: &[bool],
        (t, c): (usize, usize),
        pool: Pool,
    ) {
        self.run(|gpu| gpu.pool_forward(out, h, pad, (t, c), pool));
    }
    fn pool_backward(
        &self,
        dh: DevMut<'_>,
        dpooled: DevRef<'_>,
        pad: &[bool],
        (t, c): (usize, usize),
        pool: Pool,
    ) {
        self.run(|gpu| gpu.pool_backward(dh, dpooled, pad, (t, c), pool));
    }
    fn cross_entropy(
        &self,
        dlogits: Option<DevMut<'_>>,
        logits: DevRef<'_>,
        targets: &[u32],
        v: usize,
        ignore: Option<u32>,
        smoothing: f32,
    ) -> CrossEntropy {
        let mut out = CrossEntropy {
            mean: f32::NAN,
            nll_sum: f64::NAN,
            count: 0,
        };
        self.run(|gpu| {
            out = gpu.cross_entropy(dlogits, logits, targets, v, ignore, smoothing)?;
            Ok(())
        });
        out
    }

    fn attention_forward(
        &self,
        kind: AttentionKind,
        out: DevMut<'_>,
        saved: DevMut<'_>,
        qkv: [Heads<'_, Cuda>; 3],
        s: AttentionShape,
        masks: &Masks,
        scale: f32,
    ) {
        let [q, k, v] = qkv.map(dev_heads);
        let tensor_cores = self.tensor_core_attention(s.head_dim);
        self.run(|gpu| {
            flash_only(kind)?;
            if tensor_cores {
                gpu.flash_forward_bf16(out, saved, q, k, v, s, masks, scale)
            } else {
                gpu.flash_forward(out, saved, q, k, v, s, masks, scale)
            }
        });
    }

    fn attention_backward(
        &self,
        kind: AttentionKind,
        grads: HeadGrads<'_, Cuda>,
        (dout, out, saved): (DevRef<'_>, DevRef<'_>, DevRef<'_>),
        _scratch: &mut DevBuf<f32>,
        qkv: [Heads<'_, Cuda>; 3],
        s: AttentionShape,
        masks: &Masks,
        scale: f32,
    ) {
        let [q, k, v] = qkv.map(dev_heads);
        let c = s.heads * s.head_dim;
        let tensor_cores = self.tensor_core_attention(s.head_dim);
        self.run(|gpu| {
            flash_only(kind)?;
            let [dq, dk, dv] = match grads {
                HeadGrads::Fused(d) => DevHeadsMut::split(d, 3 * c, c, [0, c, 2 * c])?,
                HeadGrads::Split(dq, dkv) => {
                    let [dq] = DevHeadsMut::split(dq, c, c, [0])?;
                    let [dk, dv] = DevHeadsMut::split(dkv, 2 * c, c, [0, c])?;
                    [dq, dk, dv]
                }
            };
            let (dq, dk, dv) = (&dq, &dk, &dv);
            if tensor_cores {
                gpu.flash_backward_bf16(dq, dk, dv, dout, out, saved, q, k, v, s, masks, scale)
            } else {
                gpu.flash_backward(dq, dk, dv, dout, out, saved, q, k, v, s, masks, scale)
            }
        });
    }

    fn kv_append(
        &self,
        kv: DevMut<'_>,
        rows: usize,
        src: DevRef<'_>,
        src_rs: usize,
        width: usize,
        block: &[usize],
        pos: &[usize],
    ) {
        self.run(|gpu| gpu.kv_append(kv, rows, src, src_rs, width, block, pos));
    }

    fn attention_one_query(
        &self,
        out: DevMut<'_>,
        q: DevRef<'_>,
        q_rs: usize,
        kv: DevRef<'_>,
        layout: KvLayout,
        block: &[usize],
        keys: &[Range<usize>],
        padding: Option<&[bool]>,
        heads: usize,
        head_dim: usize,
        scale: f32,
    ) {
        let kv = DevKvBlocks {
            data: kv,
            rows: layout.rows,
            rs: layout.rs,
            k_offset: layout.k_offset,
            v_offset: layout.v_offset,
        };
        self.run(|gpu| {
            gpu.attention_one_query(
                out, q, q_rs, kv, block, keys, padding, heads, head_dim, scale,
            )
        });
    }

    fn copy_within(&self, data: DevMut<'_>, copies: &[(usize, usize, usize)]) {
        self.run(|gpu| gpu.copy_within(data, copies));
    }

    fn linear_attention_step(
        &self,
        _: DevMut<'_>,
        _: DevMut<'_>,
        _: DevRef<'_>,
        _: usize,
        _: usize,
    ) {
        self.run(|_| flash_only(AttentionKind::Linear));
    }
}
