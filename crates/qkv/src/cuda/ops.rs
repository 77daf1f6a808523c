//! Host-side launchers: one per CPU kernel in [`crate::kernels`], with the twin's name,
//! arguments and semantics, on device buffers. Shapes are checked before launch and reported
//! as [`CudaError::Shape`]; a launch never reads or writes outside a buffer.

use std::marker::PhantomData;
use std::ops::Range;

use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};

use super::view::{DevMut, DevRef};
use super::{blas, CudaError, Gpu, Mode};
use crate::kernels::activation::Activation;
use crate::kernels::attention::{AttentionShape, Masks};
use crate::kernels::dropout::Dropout;
use crate::kernels::loss::CrossEntropy;
use crate::kernels::matmul::Layout;
use crate::kernels::pool::Pool;
use crate::kernels::Acc;

/// Threads per block of the elementwise and per-row kernels: 8 warps.
const THREADS: u32 = 256;

fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(THREADS as usize).max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per row, eight rows per block.
fn warp_per_row(n: usize) -> LaunchConfig {
    let rows = (THREADS / 32) as usize;
    LaunchConfig {
        grid_dim: (n.div_ceil(rows).max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks of (32 columns × 8 row stripes) over chunks of rows, for the column sums: enough
/// chunks to fill the device, each long enough that its one atomic per column is cheap.
fn column_tiles(n: usize, c: usize) -> (LaunchConfig, i32) {
    let chunks = n.div_ceil(64).clamp(1, 512);
    let rows_per_chunk = n.div_ceil(chunks).max(1);
    let cfg = LaunchConfig {
        grid_dim: (
            c.div_ceil(32) as u32,
            n.div_ceil(rows_per_chunk).max(1) as u32,
            1,
        ),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    (cfg, rows_per_chunk as i32)
}

/// (p, seed, offset) of a dropout, p = 0 for none.
fn drop_args(drop: Option<Dropout>) -> (f32, u64, u64) {
    drop.map_or((0.0, 0, 0), |d| (d.p, d.seed, d.offset))
}

fn act_code(act: Activation) -> i32 {
    match act {
        Activation::Relu => 0,
        Activation::Gelu => 1,
        Activation::Identity => 2,
    }
}

/// Fails unless every buffer holds at least its elements.
fn need(kernel: &'static str, bufs: &[(&str, usize, usize)]) -> Result<(), CudaError> {
    for &(name, have, want) in bufs {
        if have < want {
            return Err(CudaError::Shape {
                kernel,
                msg: format!("{name} holds {have} elements, {want} needed"),
            });
        }
    }
    Ok(())
}

fn rows_of(kernel: &'static str, len: usize, c: usize) -> Result<usize, CudaError> {
    if c == 0 || !len.is_multiple_of(c) {
        return Err(CudaError::Shape {
            kernel,
            msg: format!("{len} elements are not rows of width {c}"),
        });
    }
    Ok(len / c)
}

/// A null device pointer, for a kernel's optional output.
const NULL: u64 = 0;

impl Gpu {
    /// [`crate::kernels::embedding::embedding_forward`].
    /// tokens: (N); table: (V, C); pos: (≥T, C); out: (N, C)
    #[allow(clippy::too_many_arguments)]
    pub fn embedding_forward<'v>(
        &self,
        out: impl Into<DevMut<'v>>,
        tokens: &CudaSlice<u32>,
        table: impl Into<DevRef<'v>>,
        pos: impl Into<DevRef<'v>>,
        scale: f32,
        t_len: usize,
        c: usize,
        drop: Option<Dropout>,
    ) -> Result<(), CudaError> {
        let out: DevMut = out.into();
        let table: DevRef = table.into();
        let pos: DevRef = pos.into();
        let n = tokens.len();
        need(
            "embedding_forward",
            &[
                ("out", out.len(), n * c),
                ("pos", pos.len(), t_len.min(n) * c),
            ],
        )?;
        let (p, seed, offset) = drop_args(drop);
        let (t, c32, n32) = (t_len as i32, c as i32, n as i32);
        let func = self.function("embedding_forward")?;
        let mut b = self.stream().launch_builder(&func);
        b.arg(&out).arg(tokens).arg(&table).arg(&pos).arg(&scale);
        b.arg(&t)
            .arg(&c32)
            .arg(&n32)
            .arg(&p)
            .arg(&seed)
            .arg(&offset);
        // SAFETY: the argument list matches embedding.cu's signature; out and pos were checked
        // against (N, C) and (T, C), tokens are validated against the vocabulary by the caller.
        unsafe { b.launch(elementwise(n * c)) }?;
        Ok(())
    }

    /// [`crate::kernels::embedding::embedding_backward`]: `dtable[tokens] += dout·scale`,
    /// `dpos[t] += Σ_b dout` when given.
    #[allow(clippy::too_many_arguments)]
    pub fn embedding_backward<'v>(
        &self,
        dtable: impl Into<DevMut<'v>>,
        dpos: Option<DevMut<'v>>,
        dout: impl Into<DevRef<'v>>,
        tokens: &CudaSlice<u32>,
        scale: f32,
        t_len: usize,
        c: usize,
    ) -> Result<(), CudaError> {
        let dtable: DevMut = dtable.into();
        let dout: DevRef = dout.into();
        let n = tokens.len();
        need("embedding_backward", &[("dout", dout.len(), n * c)])?;
        if let Some(dp) = &dpos {
            need(
                "embedding_backward",
                &[("dpos", dp.len(), t_len.min(n) * c)],
            )?;
        }
        let (t, c32, n32) = (t_len as i32, c as i32, n as i32);
        let func = self.function("embedding_backward")?;
        let mut b = self.stream().launch_builder(&func);
        b.arg(&dtable);
        match &dpos {
            Some(dp) => b.arg(dp),
            None => b.arg(&NULL),
        };
        b.arg(&dout)
            .arg(tokens)
            .arg(&scale)
            .arg(&t)
            .arg(&c32)
            .arg(&n32);
        // SAFETY: matches embedding.cu; buffers checked above (tokens index dtable's rows and
        // are validated by the caller).
        unsafe { b.launch(elementwise(n * c)) }?;
        Ok(())
    }

    /// [`crate::kernels::dropout::residual_add`]: `out = x + dropout(sub)`.
    pub fn residual_add<'v>(
        &self,
        out: impl Into<DevMut<'v>>,
        x: impl Into<DevRef<'v>>,
        sub: impl Into<DevRef<'v>>,
        drop: Option<Dropout>,
    ) -> Result<(), CudaError> {
        let out: DevMut = out.into();
        let x: DevRef = x.into();
        let sub: DevRef = sub.into();
        let n = x.len();
        need(
            "residual_add",
            &[("out", out.len(), n), ("sub", sub.len(), n)],
        )?;
        let (p, seed, offset) = drop_args(drop);
        let n64 = n as u64;
        let func = self.function("residual_add")?;
        let mut b = self.stream().launch_builder(&func);
        b.arg(&out)
            .arg(&x)
            .arg(&sub)
            .arg(&n64)
            .arg(&p)
            .arg(&seed)
            .arg(&offset);
        // SAFETY: matches dropout.cu; every buffer holds n elements.
        unsafe { b.launch(elementwise(n)) }?;
        Ok(())
    }

    /// The elements of `x`, on the host (waits for the GPU).
    pub fn to_host<'v>(&self, x: impl Into<DevRef<'v>>) -> Result<Vec<f32>, CudaError> {
        let x: DevRef = x.into();
        let mut host = vec![0.0f32; x.len()];
        // SAFETY: x lies inside a live allocation and `host` holds its elements; the
        // synchronize below completes the copy before `host` is read or dropped.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                &mut host,
                x.addr(),
                self.stream().cu_stream(),
            )
        }?;
        self.synchronize()?;
        Ok(host)
    }

    /// `x = host` (lengths must agree; waits for the copy, so `host` may go right after).
    pub fn write<'v>(&self, x: impl Into<DevMut<'v>>, host: &[f32]) -> Result<(), CudaError> {
        let x: DevMut = x.into();
        if host.len() != x.len() {
            return Err(CudaError::Shape {
                kernel: "write",
                msg: format!("{} host elements into {} on the GPU", host.len(), x.len()),
            });
        }
        // SAFETY: x lies inside a live allocation of host.len() elements; the synchronize
        // below completes the copy before `host` can be dropped.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                x.shared().addr(),
                host,
                self.stream().cu_stream(),
            )
        }?;
        self.synchronize()
    }

    /// `x = 0`, on the stream.
    pub fn zero<'v>(&self, x: impl Into<DevMut<'v>>) -> Result<(), CudaError> {
        let x: DevMut = x.into();
        let bytes = x.len() * size_of::<f32>();
        // SAFETY: x lies inside a live allocation of at least `bytes` bytes; the memset is
        // ordered on the stream with every launch.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                x.shared().addr(),
                0,
                bytes,
                self.stream().cu_stream(),
            )
        }?;
        Ok(())
    }

    /// `dst = src`, on the stream.
    pub fn copy<'v>(
        &self,
        dst: impl Into<DevMut<'v>>,
        src: impl Into<DevRef<'v>>,
    ) -> Result<(), CudaError> {
        let (dst, src): (DevMut, DevRef) = (dst.into(), src.into());
        need("copy", &[("dst", dst.len(), src.len())])?;
        let bytes = src.len() * size_of::<f32>();
        // SAFETY: both views lie inside live allocations (their lifetimes say so) and dst
        // holds src's elements; the copy is ordered on the stream with every launch.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                dst.shared().addr(),
                src.addr(),
                bytes,
                self.stream().cu_stream(),
            )
        }?;
        Ok(())
    }

    /// [`crate::kernels::dropout::apply`]: in place `x = dropout(x)`.
    pub fn dropout_apply<'v>(
        &self,
        x: impl Into<DevMut<'v>>,
        drop: Option<Dropout>,
    ) -> Result<(), CudaError> {
        let x: DevMut = x.into();
        let Some(d) = drop else { return Ok(()) };
        let n = x.len() as u64;
        let func = self.function("dropout_apply")?;
        let mut b = self.stream().launch_builder(&func);
        b.arg(&x).arg(&n).arg(&d.p).arg(&d.seed).arg(&d.offset);
        // SAFETY: matches dropout.cu; n is x's length.
        unsafe { b.launch(elementwise(n as usize)) }?;
        Ok(())
    }

    /// [`crate::kernels::layernorm::layernorm_forward`]. x, out: (N, C); mean, rstd: (N)
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward<'v>(
        &self,
        out: impl Into<DevMut<'v>>,
        mean: impl Into<DevMut<'v>>,
        rstd: impl Into<DevMut<'v>>,
        x: impl Into<DevRef<'v>>,
        w: impl Into<DevRef<'v>>,
        bias: impl Into<DevRef<'v>>,
        c: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        let out: DevMut = out.into();
        let mean: DevMut = mean.into();
        let rstd: DevMut = rstd.into();
        let x: DevRef = x.into();
        let w: DevRef = w.into();
        let bias: DevRef = bias.into();
        let n = rows_of("layernorm_forward", x.len(), c)?;
        need(
            "layernorm_forward",
            &[
                ("out", out.len(), n * c),
                ("mean", mean.len(), n),
                ("rstd", rstd.len(), n),
                ("w", w.len(), c),
                ("b", bias.len(), c),
            ],
        )?;
        let (n32, c32) = (n as i32, c as i32);
        let func = self.function("layernorm_forward")?;
        let mut b = self.stream().launch_builder(&func);
        b.arg(&out).arg(&mean).arg(&rstd).arg(&x).arg(&w).arg(&bias);
        b.arg(&n32).arg(&c32).arg(&eps);
        // SAFETY: matches layernorm.cu; shapes checked above.
        unsafe { b.launch(warp_per_row(n)) }?;
        Ok(())
    }

    /// [`crate::kernels::layernorm::residual_layernorm_forward`], in one kernel:
    /// `sum = x + dropout(sub)`, `out = LN(sum)`.
    #[allow(clippy::too_many_arguments)]
    pub fn residual_layernorm_forward<'v>(
        &self,
        sum: impl Into<DevMut<'v>>,
        out: impl Into<DevMut<'v>>,
        mean: impl Into<DevMut<'v>>,
        rstd: impl Into<DevMut<'v>>,
        x: impl Into<DevRef<'v>>,
        sub: impl Into<DevRef<'v>>,
        w: impl Into<DevRef<'v>>,
        bias: impl Into<DevRef<'v>>,
        c: usize,
        eps: f32,
        drop: Option<Dropout>,
    ) -> Result<(), CudaError> {
        let sum: DevMut = sum.into();
        let out: DevMut = out.into();
        let mean: DevMut = mean.into();
        let rstd: DevMut = rstd.into();
        let x: DevRef = x.into();
        let sub: DevRef = sub.into();
        let w: DevRef = w.into();
        let bias: DevRef = bias.into();
        let kernel = "residual_layernorm_forward";
        let n = rows_of(kernel, x.len(), c)?;
        need(
            kernel,
            &[
                ("sum", sum.len(), n * c),
                ("out", out.len(), n * c),
                ("sub", sub.len(), n * c),
                ("mean", mean.len(), n),
                ("rstd", rstd.len(), n),
                ("w", w.len(), c),
                ("b", bias.len(), c),
            ],
        )?;
        let (p, seed, offset) = drop_args(drop);
        let (n32, c32) = (n as i32, c as i32);
        let func = self.function(kernel)?;
        let mut b = self.stream().launch_builder(&func);
        b.arg(&sum)
            .arg(&out)
            .arg(&mean)
            .arg(&rstd)
            .arg(&x)
            .arg(&sub)
            .arg(&w)
            .arg(&bias);
        b.arg(&n32)
            .arg(&c32)
            .arg(&eps)
            .arg(&p)
            .arg(&seed)
            .arg(&offset);
        // SAFETY: matches layernorm.cu; shapes checked above.
        unsafe { b.launch(warp_per_row(n)) }?;
        Ok(())
    }

    /// [`crate::kernels::layernorm::layernorm_backward`]: `dx (+)= ∂L/∂x`, `dw += …`, `db += …`.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward<'v>(
        &self,
        dx: impl Into<DevMut<'v>>,
        dw: impl Into<DevMut<'v>>,
        db: impl Into<DevMut<'v>>,
        dy: impl Into<DevRef<'v>>,
        x: impl Into<DevRef<'v>>,
        mean: impl Into<DevRef<'v>>,
        rstd: impl Into<DevRef<'v>>,
        w: impl Into<DevRef<'v>>,
        c: usize,
        dx_acc: Acc,
    ) -> Result<(), CudaError> {
        let dx: DevMut = dx.into();
        let dw: DevMut = dw.into();
        let db: DevMut = db.into();
        let dy: DevRef = dy.into();
        let x: DevRef = x.into();
        let mean: DevRef = mean.into();
        let rstd: DevRef = rstd.into();
        let w: DevRef = w.into();
        let kernel = "layernorm_backward";
        let n = rows_of(kernel, x.len(), c)?;
        need(
            kernel,
            &[
                ("dx", dx.len(), n * c),
                ("dy", dy.len(), n * c),
                ("mean", mean.len(), n),
                ("rstd", rstd.len(), n),
                ("w", w.len(), c),
                ("dw", dw.len(), c),
                ("db", db.len(), c),
            ],
        )?;
        let (n32, c32, acc) = (n as i32, c as i32, dx_acc.adds() as i32);
        let func = self.function("layernorm_backward_input")?;
        let mut b = self.stream().launch_builder(&func);
        b.arg(&dx).arg(&dy).arg(&x).arg(&mean).arg(&rstd).arg(&w);
        b.arg(&n32).arg(&c32).arg(&acc);
        // SAFETY: matches layernorm.cu; shapes checked above.
        unsafe { b.launch(warp_per_row(n)) }?;
        let (cfg, rows_per_chunk) = column_tiles(n, c);
        let func = self.function("layernorm_param_grads")?;
        let mut b = self.stream().launch_builder(&func);
        b.arg(&dw).arg(&db).arg(&dy).arg(&x).arg(&mean).arg(&rstd);
        b.arg(&n32).arg(&c32).arg(&rows_per_chunk);
        // SAFETY: matches layernorm.cu; shapes checked above, the grid covers c columns and
        // n rows in chunks of rows_per_chunk.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::kernels::activation::bias_act_forward`]: `pre += bias`, `post = act(pre)`.
    /// `post` may be `None` only for `Identity`. pre, post: (N, F); bias: (F)
    pub fn bias_act_forward<'v>(
        &self,
        pre: impl Into<DevMut<'v>>,
        post: Option<DevMut<'v>>,
        bias: impl Into<DevRef<'v>>,
        act: Activation,
    ) -> Result<(), CudaError> {
        let pre: DevMut = pre.into();
        let bias: DevRef = bias.into();
        let kernel = "bias_act_forward";
        let f = bias.len();
        let n = rows_of(kernel, pre.len(), f)?;
        match &post {
            Some(p) => need(kernel, &[("post", p.len(), n * f)])?,
            None if act != Activation::Identity => {
                return Err(CudaError::Shape {
                    kernel,
                    msg: format!("{act:?} needs an output buffer"),
                })
            }
            None => {}
        }
        let (n64, f32_, code) = (n as u64, f as i32, act_code(act));
        let func = self.function(kernel)?;
        let mut b = self.stream().launch_builder(&func);
        b.arg(&pre);
        match &post {
            Some(p) => b.arg(p),
            None => b.arg(&NULL),
        };
        b.arg(&bias).arg(&n64).arg(&f32_).arg(&code);
        // SAFETY: matches activation.cu; shapes checked above, post is null only for Identity,
        // which does not write it.
        unsafe { b.launch(elementwise(n * f)) }?;
        Ok(())
    }

    /// [`crate::kernels::activation::bias_act_backward`]: in place `d = dpost·act'(pre)`,
    /// `dbias += Σ_rows d`.
    pub fn bias_act_backward<'v>(
        &self,
        d: impl Into<DevMut<'v>>,
        dbias: impl Into<DevMut<'v>>,
        pre: impl Into<DevRef<'v>>,
        act: Activation,
    ) -> Result<(), CudaError> {
        let d: DevMut = d.into();
        let dbias: DevMut = dbias.into();
        let pre: DevRef = pre.into();
        let kernel = "bias_act_backward";
        let f = dbias.len();
        let n = rows_of(kernel, d.len(), f)?;
        if act != Activation::Identity {
            need(kernel, &[("pre", pre.len(), n * f)])?;
        }
        let (cfg, rows_per_chunk) = column_tiles(n, f);
        let (n32, f32_, code) = (n as i32, f as i32, act_code(act));
        let func = self.function(kernel)?;
        let mut b = self.stream().launch_builder(&func);
        b.arg(&d)
            .arg(&dbias)
            .arg(&pre)
            .arg(&n32)
            .arg(&f32_)
            .arg(&code)
            .arg(&rows_per_chunk);
        // SAFETY: matches activation.cu; shapes checked above (pre is not read for Identity).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::kernels::activation::column_sum`]: `acc (F) += Σ_rows x`. x: (N, F)
    pub fn column_sum<'v>(
        &self,
        acc: impl Into<DevMut<'v>>,
        x: impl Into<DevRef<'v>>,
    ) -> Result<(), CudaError> {
        let (acc, x): (DevMut, DevRef) = (acc.into(), x.into());
        let kernel = "column_sum";
        let f = acc.len();
        let n = rows_of(kernel, x.len(), f)?;
        let (cfg, rows_per_chunk) = column_tiles(n, f);
        let (n32, f32_, code) = (n as i32, f as i32, act_code(Activation::Identity));
        let func = self.function("bias_act_backward")?;
        let mut b = self.stream().launch_builder(&func);
        b.arg(&x).arg(&acc).arg(&x);
        b.arg(&n32).arg(&f32_).arg(&code).arg(&rows_per_chunk);
        // SAFETY: bias_act_backward with ACT_IDENTITY reads `d` and never writes it, so x may
        // be passed as `d` (and, unread, as `pre`); x holds (N, F), acc (F).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::kernels::activation::bias_act_forward_bf16`]: `pre += bias`,
    /// `post = bf16(act(pre))`. pre, post: (N, F); act is not `Identity`.
    pub fn bias_act_forward_bf16<'v>(
        &self,
        pre: impl Into<DevMut<'v>>,
        post: impl Into<DevMut<'v, u16>>,
        bias: impl Into<DevRef<'v>>,
        act: Activation,
    ) -> Result<(), CudaError> {
        let (pre, post, bias): (DevMut, DevMut<u16>, DevRef) =
            (pre.into(), post.into(), bias.into());
        let kernel = "bias_act_forward_bf16";
        let f = bias.len();
        let n = rows_of(kernel, pre.len(), f)?;
        need(kernel, &[("post", post.len(), n * f)])?;
        if act == Activation::Identity {
            return Err(CudaError::Shape {
                kernel,
                msg: "no activation to write".into(),
            });
        }
        let (n64, f32_, code) = (n as u64, f as i32, act_code(act));
        let func = self.function(kernel)?;
        let mut b = self.stream().launch_builder(&func);
        b.arg(&pre)
            .arg(&post)
            .arg(&bias)
            .arg(&n64)
            .arg(&f32_)
            .arg(&code);
        // SAFETY: matches activation.cu; pre and post hold (N, F), bias (F).
        unsafe { b.launch(elementwise(n * f)) }?;
        Ok(())
    }

    /// [`crate::kernels::activation::bias_act_backward_bf16`]: `out = bf16(d · act'(pre))`,
    /// `dbias += Σ_rows d · act'(pre)` (unrounded). d, pre, out: (N, F)
    pub fn bias_act_backward_bf16<'v>(
        &self,
        d: impl Into<DevRef<'v>>,
        dbias: impl Into<DevMut<'v>>,
        pre: impl Into<DevRef<'v>>,
        act: Activation,
        out: impl Into<DevMut<'v, u16>>,
    ) -> Result<(), CudaError> {
        let (d, dbias, pre, out): (DevRef, DevMut, DevRef, DevMut<u16>) =
            (d.into(), dbias.into(), pre.into(), out.into());
        let kernel = "bias_act_backward_bf16";
        let f = dbias.len();
        let n = rows_of(kernel, d.len(), f)?;
        need(
            kernel,
            &[("pre", pre.len(), n * f), ("out", out.len(), n * f)],
        )?;
        let (cfg, rows_per_chunk) = column_tiles(n, f);
        let (n32, f32_, code) = (n as i32, f as i32, act_code(act));
        let func = self.function(kernel)?;
        let mut b = self.stream().launch_builder(&func);
        b.arg(&d).arg(&dbias).arg(&pre).arg(&out);
        b.arg(&n32).arg(&f32_).arg(&code).arg(&rows_per_chunk);
        // SAFETY: matches activation.cu; d, pre and out hold (N, F), dbias (F).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::kernels::pool::pool_forward`]: out (B, C) from h (B, T, C); padding (B, T)
    /// on the host, as batches hold it.
    pub fn pool_forward<'v>(
        &self,
        out: impl Into<DevMut<'v>>,
        h: impl Into<DevRef<'v>>,
        pad: &[bool],
        (t, c): (usize, usize),
        pool: Pool,
    ) -> Result<(), CudaError> {
        let (out, h): (DevMut, DevRef) = (out.into(), h.into());
        let b = rows_of("pool_forward", out.len(), c)?;
        self.pool_launch(
            "pool_forward",
            (out, b * c),
            (h, b * t * c),
            pad,
            [b, t, c],
            pool,
        )
    }

    /// [`crate::kernels::pool::pool_backward`]: dh (B, T, C), overwritten, from dpooled (B, C).
    pub fn pool_backward<'v>(
        &self,
        dh: impl Into<DevMut<'v>>,
        dpooled: impl Into<DevRef<'v>>,
        pad: &[bool],
        (t, c): (usize, usize),
        pool: Pool,
    ) -> Result<(), CudaError> {
        let (dh, dpooled): (DevMut, DevRef) = (dh.into(), dpooled.into());
        let b = rows_of("pool_backward", dpooled.len(), c)?;
        let (out, input) = ((dh, b * t * c), (dpooled, b * c));
        self.pool_launch("pool_backward", out, input, pad, [b, t, c], pool)
    }

    /// Checks and launches one of pool.cu's kernels, which share their arguments: the output
    /// and input with the lengths they need, the padding (B, T), the sizes, the pooling.
    fn pool_launch(
        &self,
        kernel: &'static str,
        (out, out_len): (DevMut, usize),
        (input, input_len): (DevRef, usize),
        pad: &[bool],
        [b, t, c]: [usize; 3],
        pool: Pool,
    ) -> Result<(), CudaError> {
        need(
            kernel,
            &[
                ("out", out.len(), out_len),
                ("in", input.len(), input_len),
                ("padding", pad.len(), b * t),
            ],
        )?;
        let pad = self.bytes(&pad[..b * t])?;
        let ints = [b, t, c].map(|x| x as i32);
        let code = (pool == Pool::Mean) as i32;
        let func = self.function(kernel)?;
        let mut l = self.stream().launch_builder(&func);
        l.arg(&out).arg(&input).arg(&pad);
        l.arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&code);
        // SAFETY: both pool.cu kernels take (out, in, pad, B, T, C, pool); out, in and the
        // padding were checked against the lengths the kernel reads, and a thread per output
        // element is launched.
        unsafe { l.launch(elementwise(out_len)) }?;
        Ok(())
    }

    /// A host mask as bytes on the device (at least one, so the buffer is never empty).
    fn bytes(&self, mask: &[bool]) -> Result<CudaSlice<u8>, CudaError> {
        let mut bytes: Vec<u8> = mask.iter().map(|&m| m as u8).collect();
        if bytes.is_empty() {
            bytes.push(0);
        }
        Ok(self.stream().clone_htod(&bytes)?)
    }

    /// [`crate::kernels::loss::cross_entropy`]: loss over the rows whose target is not
    /// `ignore`, and ∂(mean loss)/∂logits into `dlogits` when given. The per-row losses are
    /// summed on the host in f64 (this call waits for the GPU).
    /// logits, dlogits: (N, V); targets: (N), on the host, as the batch that made them.
    pub fn cross_entropy<'v>(
        &self,
        dlogits: Option<DevMut<'v>>,
        logits: impl Into<DevRef<'v>>,
        targets: &[u32],
        v: usize,
        ignore: Option<u32>,
        smoothing: f32,
    ) -> Result<CrossEntropy, CudaError> {
        let logits: DevRef = logits.into();
        let kernel = "cross_entropy";
        let n = targets.len();
        need(kernel, &[("logits", logits.len(), n * v)])?;
        if let Some(d) = &dlogits {
            need(kernel, &[("dlogits", d.len(), n * v)])?;
        }
        if let Some((i, &t)) = targets
            .iter()
            .enumerate()
            .find(|&(_, &t)| t as usize >= v && Some(t) != ignore)
        {
            return Err(CudaError::Shape {
                kernel,
                msg: format!("target {t} at row {i} is outside the vocabulary ({v})"),
            });
        }
        let count = targets.iter().filter(|&&t| Some(t) != ignore).count();
        let inv = 1.0 / count.max(1) as f32;
        let dev_targets = self.stream().clone_htod(targets)?;
        let mut rows = self.stream().alloc_zeros::<f32>(2 * n.max(1))?;
        let (v32, ign) = (v as i32, ignore.map_or(-1i64, i64::from));
        let func = self.function(kernel)?;
        let mut b = self.stream().launch_builder(&func);
        match &dlogits {
            Some(d) => b.arg(d),
            None => b.arg(&NULL),
        };
        b.arg(&mut rows).arg(&logits).arg(&dev_targets);
        b.arg(&v32).arg(&ign).arg(&smoothing).arg(&inv);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (THREADS * 2, 1, 1),
            shared_mem_bytes: 0,
        };
        if n > 0 {
            // SAFETY: matches loss.cu; one block per row, shapes and targets checked above.
            unsafe { b.launch(cfg) }?;
        }
        let host = self.stream().clone_dtoh(&rows)?;
        let (mut total, mut nll_sum) = (0.0f64, 0.0f64);
        for r in host[..2 * n].chunks_exact(2) {
            total += r[0] as f64;
            nll_sum += r[1] as f64;
        }
        Ok(CrossEntropy {
            mean: if count == 0 {
                0.0
            } else {
                (total / count as f64) as f32
            },
            nll_sum,
            count,
        })
    }

    /// [`crate::kernels::optim::adamw_step`], one pass over (param, grad, m, v).
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step<'v>(
        &self,
        params: impl Into<DevMut<'v>>,
        grads: impl Into<DevRef<'v>>,
        m: impl Into<DevMut<'v>>,
        v: impl Into<DevMut<'v>>,
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        step: u64,
    ) -> Result<(), CudaError> {
        let params: DevMut = params.into();
        let grads: DevRef = grads.into();
        let m: DevMut = m.into();
        let v: DevMut = v.into();
        let n = params.len();
        need(
            "adamw_step",
            &[
                ("grads", grads.len(), n),
                ("m", m.len(), n),
                ("v", v.len(), n),
            ],
        )?;
        // The scalars exactly as the CPU forms them.
        let bc1 = 1.0 - (beta1 as f64).powi(step as i32);
        let bc2 = 1.0 - (beta2 as f64).powi(step as i32);
        let step_size = (lr as f64 / bc1) as f32;
        let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
        let decay = 1.0 - lr * weight_decay;
        let n64 = n as u64;
        let func = self.function("adamw_step")?;
        let mut b = self.stream().launch_builder(&func);
        b.arg(&params).arg(&grads).arg(&m).arg(&v).arg(&n64);
        b.arg(&step_size).arg(&inv_sqrt_bc2).arg(&decay);
        b.arg(&beta1).arg(&beta2).arg(&eps);
        // SAFETY: matches optim.cu; every buffer holds n elements.
        unsafe { b.launch(elementwise(n)) }?;
        Ok(())
    }

    /// [`crate::kernels::optim::sum_squares`] (waits for the GPU).
    pub fn sum_squares<'v>(&self, x: impl Into<DevRef<'v>>) -> Result<f64, CudaError> {
        let x: DevRef = x.into();
        let mut out = self.stream().alloc_zeros::<f64>(1)?;
        let n = x.len() as u64;
        let blocks = x.len().div_ceil(THREADS as usize).clamp(1, 1024) as u32;
        let func = self.function("sum_squares")?;
        let mut b = self.stream().launch_builder(&func);
        b.arg(&mut out).arg(&x).arg(&n);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches optim.cu; grid-stride over x's n elements into one f64.
        unsafe { b.launch(cfg) }?;
        Ok(self.stream().clone_dtoh(&out)?[0])
    }

    /// [`crate::kernels::optim::scale`]: `x *= s`.
    pub fn scale<'v>(&self, x: impl Into<DevMut<'v>>, s: f32) -> Result<(), CudaError> {
        let x: DevMut = x.into();
        let n = x.len() as u64;
        let func = self.function("scale")?;
        let mut b = self.stream().launch_builder(&func);
        b.arg(&x).arg(&n).arg(&s);
        // SAFETY: matches optim.cu; n is x's length.
        unsafe { b.launch(elementwise(n as usize)) }?;
        Ok(())
    }
}

impl Gpu {
    /// [`crate::kernels::matmul::matmul`] on cuBLASLt: `out (+)= op(a)·op(b)` with row-major
    /// (m, k) and (k, n) as the layouts say, in TF32 (tensor cores, f32 accumulation: the GPU's
    /// f32 mode, as PyTorch's `allow_tf32`; about 10 mantissa bits per operand).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul<'v>(
        &self,
        out: impl Into<DevMut<'v>>,
        a: impl Into<DevRef<'v>>,
        b: impl Into<DevRef<'v>>,
        m: usize,
        k: usize,
        n: usize,
        a_layout: Layout,
        b_layout: Layout,
        acc: Acc,
    ) -> Result<(), CudaError> {
        let out: DevMut = out.into();
        let a: DevRef = a.into();
        let b: DevRef = b.into();
        let Some(shape) = product_shape(
            "matmul",
            out.len(),
            a.len(),
            b.len(),
            (m, k, n),
            (a_layout, b_layout),
            acc,
            Mode::Tf32,
        )?
        else {
            return Ok(());
        };
        // SAFETY: `product_shape` checked the buffers against the shape it describes.
        unsafe { self.blas().matmul(&shape, b, a, out) }
    }

    /// [`crate::kernels::bf16::matmul_bf16`]: as [`Gpu::matmul`], with both operands rounded
    /// to bf16 (to nearest even, as the CPU's `bf16_bits`) and f32 accumulation and output.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_bf16<'v>(
        &self,
        out: impl Into<DevMut<'v>>,
        a: impl Into<DevRef<'v>>,
        b: impl Into<DevRef<'v>>,
        m: usize,
        k: usize,
        n: usize,
        a_layout: Layout,
        b_layout: Layout,
        acc: Acc,
    ) -> Result<(), CudaError> {
        let out: DevMut = out.into();
        let a: DevRef = a.into();
        let b: DevRef = b.into();
        if product_shape(
            "matmul_bf16",
            out.len(),
            a.len(),
            b.len(),
            (m, k, n),
            (a_layout, b_layout),
            acc,
            Mode::Bf16,
        )?
        .is_none()
        {
            return Ok(());
        }
        let (a16, b16) = (self.to_bf16(a, m * k)?, self.to_bf16(b, k * n)?);
        let layouts = (a_layout, b_layout);
        self.matmul_bf16_bits(out, &a16, &b16, (m, k, n), layouts, acc)
    }

    /// [`Gpu::matmul_bf16`] on operands already rounded to bf16 bits.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_bf16_bits<'v>(
        &self,
        out: impl Into<DevMut<'v>>,
        a: impl Into<DevRef<'v, u16>>,
        b: impl Into<DevRef<'v, u16>>,
        (m, k, n): (usize, usize, usize),
        layouts: (Layout, Layout),
        acc: Acc,
    ) -> Result<(), CudaError> {
        let (out, a, b): (DevMut, DevRef<u16>, DevRef<u16>) = (out.into(), a.into(), b.into());
        let kernel = "matmul_bf16";
        let shape = (m, k, n);
        let Some(shape) = product_shape(
            kernel,
            out.len(),
            a.len(),
            b.len(),
            shape,
            layouts,
            acc,
            Mode::Bf16,
        )?
        else {
            return Ok(());
        };
        // SAFETY: `product_shape` checked the buffers against the shape; both operands are bf16
        // bits, as Mode::Bf16's plan reads them.
        unsafe { self.blas().matmul(&shape, b, a, out) }
    }

    /// The first `n` elements of `x` rounded to bf16 bits, in a new buffer.
    pub fn to_bf16<'v>(
        &self,
        x: impl Into<DevRef<'v>>,
        n: usize,
    ) -> Result<CudaSlice<u16>, CudaError> {
        let x: DevRef = x.into();
        need("to_bf16", &[("x", x.len(), n)])?;
        let mut out = self.stream().alloc_zeros::<u16>(n.max(1))?;
        let n64 = n as u64;
        let func = self.function("to_bf16")?;
        let mut l = self.stream().launch_builder(&func);
        l.arg(&mut out).arg(&x).arg(&n64);
        // SAFETY: matches convert.cu; both buffers hold n elements.
        unsafe { l.launch(elementwise(n)) }?;
        Ok(out)
    }
}

/// The cuBLASLt shape of row-major `out (+)= op(a)·op(b)`, after checking the buffers; `None`
/// when the product is empty.
#[allow(clippy::too_many_arguments)]
fn product_shape(
    kernel: &'static str,
    out_len: usize,
    a_len: usize,
    b_len: usize,
    (m, k, n): (usize, usize, usize),
    (a_layout, b_layout): (Layout, Layout),
    acc: Acc,
    mode: Mode,
) -> Result<Option<blas::Shape>, CudaError> {
    need(
        kernel,
        &[
            ("out", out_len, m * n),
            ("a", a_len, m * k),
            ("b", b_len, k * n),
        ],
    )?;
    if m == 0 || n == 0 || k == 0 {
        if k == 0 && !acc.adds() && m * n > 0 {
            return Err(CudaError::Shape {
                kernel,
                msg: "an empty inner dimension (k = 0) with Acc::Set".into(),
            });
        }
        return Ok(None);
    }
    // cuBLAS is column-major: a row-major (r, c) buffer is its (c, r) transpose there, so
    // row-major out = op(a)·op(b) is column-major outᵀ = op(b)ᵀ·op(a)ᵀ: b goes first.
    let (b_t, a_t) = (
        b_layout == Layout::Transposed,
        a_layout == Layout::Transposed,
    );
    Ok(Some(blas::Shape {
        m: n as u64,
        n: m as u64,
        k: k as u64,
        trans_a: b_t,
        trans_b: a_t,
        lda: if b_t { k } else { n } as i64,
        ldb: if a_t { m } else { k } as i64,
        ldc: n as i64,
        mode,
        accumulate: acc.adds(),
    }))
}

/// A per-head view of a device buffer, as [`crate::kernels::attention::HeadsRef`]: row `t` of
/// batch `b` starts at `(b·len + t)·rs + offset`, head `h` `h·D` further.
#[derive(Clone, Copy)]
pub struct DevHeads<'a> {
    pub data: DevRef<'a>,
    pub rs: usize,
    pub offset: usize,
}

/// A writable per-head view, as [`crate::kernels::attention::HeadsMut`]: several may point into
/// one buffer (dQ, dK, dV inside one (B·T, 3C) gradient), with disjoint column ranges.
pub struct DevHeadsMut<'a> {
    ptr: u64,
    len: usize,
    rs: usize,
    offset: usize,
    _borrow: PhantomData<&'a mut CudaSlice<f32>>,
}

impl<'a> DevHeadsMut<'a> {
    /// Views of `width` columns starting at each of `offsets`, rows of stride `rs`.
    pub fn split<const N: usize>(
        buf: impl Into<DevMut<'a>>,
        rs: usize,
        width: usize,
        offsets: [usize; N],
    ) -> Result<[DevHeadsMut<'a>; N], CudaError> {
        for (i, &a) in offsets.iter().enumerate() {
            let overlap = offsets[i + 1..]
                .iter()
                .any(|&b| !(a + width <= b || b + width <= a));
            if a + width > rs || overlap {
                return Err(CudaError::Shape {
                    kernel: "DevHeadsMut::split",
                    msg: format!("views {offsets:?} of width {width} in rows of {rs}"),
                });
            }
        }
        let buf: DevMut = buf.into();
        let (ptr, len) = (buf.shared().addr(), buf.len());
        Ok(offsets.map(|offset| DevHeadsMut {
            ptr,
            len,
            rs,
            offset,
            _borrow: PhantomData,
        }))
    }
}

/// Fails unless a view with `len` rows per batch row holds `heads` heads of `d` columns.
fn check_view(
    kernel: &'static str,
    name: &str,
    (data_len, rs, offset): (usize, usize, usize),
    batch: usize,
    len: usize,
    heads: usize,
    d: usize,
) -> Result<(), CudaError> {
    let rows = batch * len;
    let end = if rows == 0 {
        0
    } else {
        (rows - 1) * rs + offset + heads * d
    };
    if offset + heads * d > rs || end > data_len {
        return Err(CudaError::Shape {
            kernel,
            msg: format!(
                "{name}: {rows} rows of stride {rs} from offset {offset} with {heads} heads of \
                 {d} do not fit {data_len} elements"
            ),
        });
    }
    Ok(())
}

/// The kernels' head-width bound for head width `d`: 32, 64 or 128.
fn head_bound(kernel: &'static str, d: usize) -> Result<usize, CudaError> {
    match d {
        1..=32 => Ok(32),
        33..=64 => Ok(64),
        65..=128 => Ok(128),
        _ => Err(CudaError::Shape {
            kernel,
            msg: format!("head width {d}: the CUDA kernels take 1 to 128"),
        }),
    }
}

/// Query rows per block of flash_forward and flash_backward_dq (FLASH_THREADS in flash.cu).
const FLASH_THREADS: u32 = 64;

/// What every flash kernel takes after its outputs, in flash.cu's order: the Q, K and V views,
/// the key padding, the sizes and the masks.
struct AttnArgs<'a> {
    data: [DevRef<'a>; 3],
    views: [(i64, i64); 3],
    pad: Option<CudaSlice<u8>>,
    ints: [i32; 4],
    masks: [i32; 2],
    scale: f32,
}

impl<'a> AttnArgs<'a> {
    fn push<'b>(&'b self, l: &mut LaunchArgs<'b>)
    where
        'a: 'b,
    {
        for (data, (rs, off)) in self.data.iter().zip(&self.views) {
            l.arg(data).arg(rs).arg(off);
        }
        match &self.pad {
            Some(p) => l.arg(p),
            None => l.arg(&NULL),
        };
        for x in self.ints.iter().chain(&self.masks) {
            l.arg(x);
        }
        l.arg(&self.scale);
    }
}

impl Gpu {
    /// The key-padding mask as bytes on the device (or a null pointer), and its length check.
    fn padding(
        &self,
        kernel: &'static str,
        masks: &Masks,
        s: &AttentionShape,
    ) -> Result<Option<CudaSlice<u8>>, CudaError> {
        let Some(pad) = masks.key_padding else {
            return Ok(None);
        };
        need(kernel, &[("key padding", pad.len(), s.batch * s.k_len)])?;
        let bytes: Vec<u8> = pad[..s.batch * s.k_len].iter().map(|&p| p as u8).collect();
        Ok(Some(self.stream().clone_htod(&bytes)?))
    }

    /// A backward's checks: the inputs as forward's, the gradient views, and dout, out and lse
    /// (B, Tq, H·D), (B, Tq, H·D) and (B, H, Tq). Returns the head-width bound.
    fn check_backward(
        &self,
        kernel: &'static str,
        s: &AttentionShape,
        [q, k, v]: [DevHeads; 3],
        grads: [&DevHeadsMut; 3],
        [dout, out, lse]: [DevRef; 3],
    ) -> Result<usize, CudaError> {
        let bound = self.check_attention(kernel, s, &q, &k, &v)?;
        let (b, h, tq, tk, d) = (s.batch, s.heads, s.q_len, s.k_len, s.head_dim);
        need(
            kernel,
            &[
                ("dout", dout.len(), b * tq * h * d),
                ("out", out.len(), b * tq * h * d),
                ("lse", lse.len(), b * h * tq),
            ],
        )?;
        let [dq, dk, dv] = grads;
        for (name, x, len) in [("dq", dq, tq), ("dk", dk, tk), ("dv", dv, tk)] {
            check_view(kernel, name, (x.len, x.rs, x.offset), b, len, h, d)?;
        }
        Ok(bound)
    }

    /// FlashAttention-2's D = rowsum(dO ∘ O), (B, H, Tq): what every backward kernel reads.
    fn flash_delta<'v>(
        &self,
        dout: impl Into<DevRef<'v>>,
        out: impl Into<DevRef<'v>>,
        s: &AttentionShape,
    ) -> Result<CudaSlice<f32>, CudaError> {
        let dout: DevRef = dout.into();
        let out: DevRef = out.into();
        let rows = s.batch * s.heads * s.q_len;
        let mut delta = self.stream().alloc_zeros::<f32>(rows.max(1))?;
        if rows == 0 {
            return Ok(delta);
        }
        let dims = [s.batch, s.heads, s.q_len, s.head_dim].map(|x| x as i32);
        let func = self.function("flash_delta")?;
        let mut l = self.stream().launch_builder(&func);
        l.arg(&mut delta).arg(&dout).arg(&out);
        for x in &dims {
            l.arg(x);
        }
        // SAFETY: matches flash.cu's flash_delta; the callers checked dout and out against
        // (B, Tq, H·D); delta holds (B, H, Tq).
        unsafe { l.launch(elementwise(rows)) }?;
        Ok(delta)
    }

    /// The flash kernels' shared arguments, with the padding uploaded.
    #[allow(clippy::too_many_arguments)]
    fn attn_args<'a>(
        &self,
        kernel: &'static str,
        s: &AttentionShape,
        q: DevHeads<'a>,
        k: DevHeads<'a>,
        v: DevHeads<'a>,
        masks: &Masks,
        scale: f32,
    ) -> Result<AttnArgs<'a>, CudaError> {
        Ok(AttnArgs {
            data: [q.data, k.data, v.data],
            views: [q, k, v].map(|x| (x.rs as i64, x.offset as i64)),
            pad: self.padding(kernel, masks, s)?,
            ints: [s.heads, s.q_len, s.k_len, s.head_dim].map(|x| x as i32),
            masks: [masks.causal as i32, masks.window.unwrap_or(0) as i32],
            scale,
        })
    }

    fn check_attention(
        &self,
        kernel: &'static str,
        s: &AttentionShape,
        q: &DevHeads,
        k: &DevHeads,
        v: &DevHeads,
    ) -> Result<usize, CudaError> {
        let (b, h, d) = (s.batch, s.heads, s.head_dim);
        let bound = head_bound(kernel, d)?;
        for (name, x, len) in [("q", q, s.q_len), ("k", k, s.k_len), ("v", v, s.k_len)] {
            check_view(kernel, name, (x.data.len(), x.rs, x.offset), b, len, h, d)?;
        }
        Ok(bound)
    }

    /// [`crate::kernels::flash::flash_forward`]: out (B, Tq, H·D) contiguous, lse (B, H, Tq).
    #[allow(clippy::too_many_arguments)]
    pub fn flash_forward<'v>(
        &self,
        out: impl Into<DevMut<'v>>,
        lse: impl Into<DevMut<'v>>,
        q: DevHeads,
        k: DevHeads,
        v: DevHeads,
        s: AttentionShape,
        masks: &Masks,
        scale: f32,
    ) -> Result<(), CudaError> {
        let out: DevMut = out.into();
        let lse: DevMut = lse.into();
        let kernel = "flash_forward";
        let f = match head_bound(kernel, s.head_dim)? {
            32 => "flash_forward_d32",
            64 => "flash_forward_d64",
            _ => "flash_forward_d128",
        };
        let block = (FLASH_THREADS as usize, FLASH_THREADS);
        self.forward_with(kernel, f, block, out, lse, q, k, v, s, masks, scale)
    }

    /// Flash attention's forward on tensor cores: [`Gpu::flash_forward`] with Q, K, V and P
    /// rounded to bf16 for the products (f32 sums, f32 softmax statistics), as the CPU's bf16
    /// flash. Head widths 32, 64 or 128.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_forward_bf16<'v>(
        &self,
        out: impl Into<DevMut<'v>>,
        lse: impl Into<DevMut<'v>>,
        q: DevHeads,
        k: DevHeads,
        v: DevHeads,
        s: AttentionShape,
        masks: &Masks,
        scale: f32,
    ) -> Result<(), CudaError> {
        let out: DevMut = out.into();
        let lse: DevMut = lse.into();
        let kernel = "flash_forward_bf16";
        let f = match s.head_dim {
            32 => "flash_forward_tc_d32",
            64 => "flash_forward_tc_d64",
            128 => "flash_forward_tc_d128",
            d => {
                return Err(CudaError::Shape {
                    kernel,
                    msg: format!("head width {d}: the tensor-core kernels take 32, 64 or 128"),
                })
            }
        };
        // 4 warps, 16 query rows each.
        self.forward_with(kernel, f, (64, 128), out, lse, q, k, v, s, masks, scale)
    }

    /// Checks and launches forward kernel `f` (flash.cu's or flash_tc.cu's argument list),
    /// one block of `threads` threads per `rows` query rows of a head.
    #[allow(clippy::too_many_arguments)]
    fn forward_with<'v>(
        &self,
        kernel: &'static str,
        f: &'static str,
        (rows, threads): (usize, u32),
        out: impl Into<DevMut<'v>>,
        lse: impl Into<DevMut<'v>>,
        q: DevHeads,
        k: DevHeads,
        v: DevHeads,
        s: AttentionShape,
        masks: &Masks,
        scale: f32,
    ) -> Result<(), CudaError> {
        let out: DevMut = out.into();
        let lse: DevMut = lse.into();
        self.check_attention(kernel, &s, &q, &k, &v)?;
        let (b, h, tq, d) = (s.batch, s.heads, s.q_len, s.head_dim);
        need(
            kernel,
            &[
                ("out", out.len(), b * tq * h * d),
                ("lse", lse.len(), b * h * tq),
            ],
        )?;
        if b * h * tq == 0 {
            return Ok(());
        }
        let args = self.attn_args(kernel, &s, q, k, v, masks, scale)?;
        let func = self.function(f)?;
        let mut l = self.stream().launch_builder(&func);
        l.arg(&out).arg(&lse);
        args.push(&mut l);
        let cfg = LaunchConfig {
            grid_dim: (tq.div_ceil(rows) as u32, h as u32, b as u32),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `f` takes (out, lse) and then the shared attention arguments; the views, out,
        // lse and the padding were checked against the shape above, the head width against
        // the kernel's (the callers' choice of `f`), and each kernel's block covers `rows`
        // query rows with `threads` threads, as launched.
        unsafe { l.launch(cfg) }?;
        Ok(())
    }

    /// Flash attention's backward on tensor cores: [`Gpu::flash_backward`] with Q, K, V, dO,
    /// P and dS rounded to bf16 for the products (f32 sums); dQ is summed with f32 atomics.
    /// Head widths 32 and 64.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_backward_bf16<'v>(
        &self,
        dq: &DevHeadsMut,
        dk: &DevHeadsMut,
        dv: &DevHeadsMut,
        dout: impl Into<DevRef<'v>>,
        out: impl Into<DevRef<'v>>,
        lse: impl Into<DevRef<'v>>,
        q: DevHeads,
        k: DevHeads,
        v: DevHeads,
        s: AttentionShape,
        masks: &Masks,
        scale: f32,
    ) -> Result<(), CudaError> {
        let dout: DevRef = dout.into();
        let out: DevRef = out.into();
        let lse: DevRef = lse.into();
        let kernel = "flash_backward_bf16";
        let f = match s.head_dim {
            32 => "flash_backward_tc_d32",
            64 => "flash_backward_tc_d64",
            d => {
                return Err(CudaError::Shape {
                    kernel,
                    msg: format!("head width {d}: the tensor-core backward takes 32 or 64"),
                })
            }
        };
        self.check_backward(kernel, &s, [q, k, v], [dq, dk, dv], [dout, out, lse])?;
        let (b, h, tq, tk, d) = (s.batch, s.heads, s.q_len, s.k_len, s.head_dim);
        if b * h == 0 || tq == 0 || tk == 0 {
            return Err(CudaError::Shape {
                kernel,
                msg: "empty queries or keys: use flash_backward".into(),
            });
        }
        let args = self.attn_args(kernel, &s, q, k, v, masks, scale)?;
        let rows = b * h * tq;
        let delta = self.flash_delta(dout, out, &s)?;
        let mut dq_acc = self.stream().alloc_zeros::<f32>(rows * d)?;
        let dims = [b, h, tq, d].map(|x| x as i32);

        let outs = [dk, dv].map(|x| (x.ptr, x.rs as i64, x.offset as i64));
        let func = self.function(f)?;
        let mut l = self.stream().launch_builder(&func);
        l.arg(&mut dq_acc);
        for o in &outs {
            l.arg(&o.0).arg(&o.1).arg(&o.2);
        }
        l.arg(&dout).arg(&lse).arg(&delta);
        args.push(&mut l);
        let cfg = LaunchConfig {
            grid_dim: (tk.div_ceil(64) as u32, h as u32, b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches flash_tc.cu's backward entry for this head width (4 warps, 64 keys per
        // block); dk and dv are disjoint views checked against (B, Tk, H, D), dq_acc holds
        // (B, H, Tq, D), the inputs as in forward.
        unsafe { l.launch(cfg) }?;

        let (dq_rs, dq_off) = (dq.rs as i64, dq.offset as i64);
        let func = self.function("flash_dq_scatter")?;
        let mut l = self.stream().launch_builder(&func);
        l.arg(&dq.ptr).arg(&dq_rs).arg(&dq_off).arg(&dq_acc);
        for x in &dims {
            l.arg(x);
        }
        // SAFETY: matches flash_tc.cu's flash_dq_scatter; dq was checked against
        // (B, Tq, H, D) and dq_acc holds (B, H, Tq, D).
        unsafe { l.launch(elementwise(rows * d)) }?;
        Ok(())
    }

    /// [`crate::kernels::flash::flash_backward`]: overwrites dq, dk, dv (views that may share
    /// one buffer). dout, out: (B, Tq, H·D); lse from [`Gpu::flash_forward`].
    #[allow(clippy::too_many_arguments)]
    pub fn flash_backward<'v>(
        &self,
        dq: &DevHeadsMut,
        dk: &DevHeadsMut,
        dv: &DevHeadsMut,
        dout: impl Into<DevRef<'v>>,
        out: impl Into<DevRef<'v>>,
        lse: impl Into<DevRef<'v>>,
        q: DevHeads,
        k: DevHeads,
        v: DevHeads,
        s: AttentionShape,
        masks: &Masks,
        scale: f32,
    ) -> Result<(), CudaError> {
        let dout: DevRef = dout.into();
        let out: DevRef = out.into();
        let lse: DevRef = lse.into();
        let kernel = "flash_backward";
        let bound = self.check_backward(kernel, &s, [q, k, v], [dq, dk, dv], [dout, out, lse])?;
        let (b, h, tq, tk) = (s.batch, s.heads, s.q_len, s.k_len);
        if b * h == 0 || tq + tk == 0 {
            return Ok(());
        }
        let args = self.attn_args(kernel, &s, q, k, v, masks, scale)?;
        let delta = self.flash_delta(dout, out, &s)?;
        let outs = [dq, dk, dv].map(|x| (x.ptr, x.rs as i64, x.offset as i64));
        let name = |stem: &str| -> &'static str {
            match (stem, bound) {
                ("dkdv", 32) => "flash_backward_dkdv_d32",
                ("dkdv", 64) => "flash_backward_dkdv_d64",
                ("dkdv", _) => "flash_backward_dkdv_d128",
                (_, 32) => "flash_backward_dq_d32",
                (_, 64) => "flash_backward_dq_d64",
                _ => "flash_backward_dq_d128",
            }
        };
        if tk > 0 {
            let func = self.function(name("dkdv"))?;
            let mut l = self.stream().launch_builder(&func);
            l.arg(&outs[1].0).arg(&outs[1].1).arg(&outs[1].2);
            l.arg(&outs[2].0).arg(&outs[2].1).arg(&outs[2].2);
            l.arg(&dout).arg(&lse).arg(&delta);
            args.push(&mut l);
            let cfg = LaunchConfig {
                grid_dim: (tk.div_ceil(32) as u32, h as u32, b as u32),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches flash.cu's flash_backward_dkdv entry; dk and dv are disjoint
            // views checked against (B, Tk, H, D), the inputs as in forward.
            unsafe { l.launch(cfg) }?;
        }
        if tq > 0 {
            let func = self.function(name("dq"))?;
            let mut l = self.stream().launch_builder(&func);
            l.arg(&outs[0].0).arg(&outs[0].1).arg(&outs[0].2);
            l.arg(&dout).arg(&lse).arg(&delta);
            args.push(&mut l);
            let cfg = LaunchConfig {
                grid_dim: (
                    tq.div_ceil(FLASH_THREADS as usize) as u32,
                    h as u32,
                    b as u32,
                ),
                block_dim: (FLASH_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches flash.cu's flash_backward_dq entry; dq checked against
            // (B, Tq, H, D), the inputs as in forward.
            unsafe { l.launch(cfg) }?;
        }
        Ok(())
    }
}

/// A device KV cache as [`crate::kernels::attention::KvBlocks`]: `blocks` of `rows` rows of
/// stride `rs`, keys at `k_offset` and values at `v_offset` in each row.
#[derive(Clone, Copy)]
pub struct DevKvBlocks<'a> {
    pub data: DevRef<'a>,
    pub rows: usize,
    pub rs: usize,
    pub k_offset: usize,
    pub v_offset: usize,
}

impl Gpu {
    /// [`crate::kernels::attention::attention_one_query`]: query row r (row stride `q_rs`)
    /// against keys `keys[r]` (or `keys[0]` for every row) of block `block[r]`. out: (R, H·D);
    /// `block`, `keys` and padding (blocks, rows) on the host, as decoding holds them.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_one_query<'v>(
        &self,
        out: impl Into<DevMut<'v>>,
        q: impl Into<DevRef<'v>>,
        q_rs: usize,
        kv: DevKvBlocks,
        block: &[usize],
        keys: &[Range<usize>],
        padding: Option<&[bool]>,
        heads: usize,
        head_dim: usize,
        scale: f32,
    ) -> Result<(), CudaError> {
        let out: DevMut = out.into();
        let q: DevRef = q.into();
        let kernel = "attention_one_query";
        let (r, w) = (block.len(), heads * head_dim);
        if keys.len() != 1 && keys.len() != r {
            return Err(CudaError::Shape {
                kernel,
                msg: format!(
                    "{} key ranges for {r} rows (one, or one per row)",
                    keys.len()
                ),
            });
        }
        if let Some(k) = keys.iter().find(|k| !(k.start < k.end && k.end <= kv.rows)) {
            return Err(CudaError::Shape {
                kernel,
                msg: format!("keys {k:?} of blocks of {} rows", kv.rows),
            });
        }
        if r == 0 {
            return Ok(());
        }
        let n = keys.iter().map(|k| k.end - k.start).max().unwrap_or(0);
        if n > 12 * 1024 {
            return Err(CudaError::Shape {
                kernel,
                msg: format!("{n} keys: the scores' shared memory holds 12288"),
            });
        }
        need(
            kernel,
            &[
                ("out", out.len(), r * w),
                ("q", q.len(), (r - 1) * q_rs + w),
                ("kv offsets", kv.rs, kv.k_offset.max(kv.v_offset) + w),
            ],
        )?;
        // An index past the cache would read outside it.
        let blocks = kv.data.len() / (kv.rows * kv.rs).max(1);
        if let Some((i, b)) = block.iter().enumerate().find(|&(_, &b)| b >= blocks) {
            return Err(CudaError::Shape {
                kernel,
                msg: format!("row {i} names block {b}, the cache holds {blocks}"),
            });
        }
        let block: Vec<u32> = block.iter().map(|&b| b as u32).collect();
        let block = self.stream().clone_htod(&block)?;
        let spans: Vec<i32> = (0..r)
            .map(|i| &keys[if keys.len() == 1 { 0 } else { i }])
            .flat_map(|k| [k.start as i32, k.end as i32])
            .collect();
        let spans = self.stream().clone_htod(&spans)?;
        let pad = match padding {
            Some(p) => {
                need(kernel, &[("padding", p.len(), blocks * kv.rows)])?;
                let bytes: Vec<u8> = p.iter().map(|&m| m as u8).collect();
                Some(self.stream().clone_htod(&bytes)?)
            }
            None => None,
        };
        let longs = [q_rs, kv.rows, kv.rs, kv.k_offset, kv.v_offset].map(|x| x as i64);
        let (h32, d32) = (heads as i32, head_dim as i32);
        let func = self.function(kernel)?;
        let mut l = self.stream().launch_builder(&func);
        l.arg(&out).arg(&q).arg(&longs[0]).arg(&kv.data);
        l.arg(&longs[1])
            .arg(&longs[2])
            .arg(&longs[3])
            .arg(&longs[4]);
        l.arg(&block).arg(&spans);
        match &pad {
            Some(p) => l.arg(p),
            None => l.arg(&NULL),
        };
        l.arg(&h32).arg(&d32).arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (r as u32, heads as u32, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: (n * 4) as u32,
        };
        // SAFETY: matches decode.cu; out, q and the row layout checked above, every block index
        // is inside the cache, every row's keys lie inside a block, and the longest row's
        // scores fit the dynamic shared memory asked for.
        unsafe { l.launch(cfg) }?;
        Ok(())
    }

    /// The cache write of a decoding step (`Backend::kv_append`): row r of `src` (`width`
    /// floats at row stride `src_rs`) to position `pos[r]` of block `block[r]` of `kv`, blocks
    /// of `rows` positions of `width` floats. `block`, `pos` on the host.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_append<'v>(
        &self,
        kv: impl Into<DevMut<'v>>,
        rows: usize,
        src: impl Into<DevRef<'v>>,
        src_rs: usize,
        width: usize,
        block: &[usize],
        pos: &[usize],
    ) -> Result<(), CudaError> {
        let (kv, src): (DevMut, DevRef) = (kv.into(), src.into());
        let kernel = "kv_append";
        let r = block.len();
        if pos.len() != r {
            return Err(CudaError::Shape {
                kernel,
                msg: format!("{} positions for {r} rows", pos.len()),
            });
        }
        if r == 0 {
            return Ok(());
        }
        need(kernel, &[("src", src.len(), (r - 1) * src_rs + width)])?;
        // A block or position past the cache would write outside it.
        let blocks = kv.len() / (rows * width).max(1);
        if let Some(i) = (0..r).find(|&i| block[i] >= blocks || pos[i] >= rows) {
            return Err(CudaError::Shape {
                kernel,
                msg: format!(
                    "row {i} writes position {} of block {}: the cache holds {blocks} blocks \
                     of {rows}",
                    pos[i], block[i]
                ),
            });
        }
        let block: Vec<u32> = block.iter().map(|&b| b as u32).collect();
        let block = self.stream().clone_htod(&block)?;
        let pos: Vec<i32> = pos.iter().map(|&p| p as i32).collect();
        let pos = self.stream().clone_htod(&pos)?;
        let longs = [rows, width, src_rs].map(|x| x as i64);
        let func = self.function(kernel)?;
        let mut l = self.stream().launch_builder(&func);
        l.arg(&kv)
            .arg(&longs[0])
            .arg(&longs[1])
            .arg(&src)
            .arg(&longs[2]);
        l.arg(&block).arg(&pos);
        let cfg = LaunchConfig {
            grid_dim: (r as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches decode.cu's kv_append; every row's source lies in src and every
        // (block, position) inside kv, checked above.
        unsafe { l.launch(cfg) }?;
        Ok(())
    }

    /// `Backend::copy_within`: `len` elements from `from` to `to` inside `data` for every
    /// `(from, to, len)`; the targets must be disjoint and overlap no source (checked).
    pub fn copy_within<'v>(
        &self,
        data: impl Into<DevMut<'v>>,
        copies: &[(usize, usize, usize)],
    ) -> Result<(), CudaError> {
        let data: DevMut = data.into();
        let kernel = "copy_within";
        let copies: Vec<_> = copies.iter().filter(|c| c.2 > 0).copied().collect();
        if copies.is_empty() {
            return Ok(());
        }
        let overlap = |a: usize, b: usize, n: usize, m: usize| a < b + m && b < a + n;
        for (i, &(from, to, len)) in copies.iter().enumerate() {
            if from.max(to) + len > data.len() {
                return Err(CudaError::Shape {
                    kernel,
                    msg: format!(
                        "copy {i} ({from} → {to}, {len}) outside {} elements",
                        data.len()
                    ),
                });
            }
            // Run at once, a copy must not write what another reads or writes.
            if let Some(j) = (copies.iter().enumerate()).position(|(j, &(f, t, n))| {
                (j != i && overlap(to, t, len, n)) || overlap(to, f, len, n)
            }) {
                return Err(CudaError::Shape {
                    kernel,
                    msg: format!("copy {i}'s target overlaps copy {j}"),
                });
            }
        }
        let spans: Vec<i64> = (copies.iter())
            .flat_map(|&(from, to, len)| [from as i64, to as i64, len as i64])
            .collect();
        let spans = self.stream().clone_htod(&spans)?;
        let longest = copies.iter().map(|c| c.2).max().unwrap_or(0);
        let func = self.function(kernel)?;
        let mut l = self.stream().launch_builder(&func);
        l.arg(&data).arg(&spans);
        let cfg = LaunchConfig {
            grid_dim: (longest.div_ceil(256).min(64) as u32, copies.len() as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches decode.cu's copy_within; every copy lies inside `data` and no
        // target overlaps another copy's target or any source (checked above), so the
        // copies' threads never race.
        unsafe { l.launch(cfg) }?;
        Ok(())
    }
}
