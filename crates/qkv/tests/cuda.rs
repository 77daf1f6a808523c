//! Every CUDA kernel against its CPU twin in `qkv::kernels`, and the layers written against
//! `qkv::backend::Backend` on `Cuda` against `Cpu`, on a GPU. Without one these tests skip with
//! a message; `QKV_REQUIRE_CUDA=1` (set by `scripts/gpu/run.sh`) makes that a failure.
//!
//! Tolerances: the GPU contracts `a + b·c` into fused multiply-adds and sums in another order
//! (warp shuffles, atomics), so results agree to float rounding, not bit for bit; dropout masks
//! agree exactly (the same counter-based hash).

mod common;
use common::{padded_source, random_vec, rel_err, BEAM_ORDERS};
use cudarc::driver::CudaSlice;
use qkv::cuda::ops::{DevHeads, DevHeadsMut, DevKvBlocks};
use qkv::cuda::{CudaError, Gpu};
use qkv::kernels::activation::{bias_act_backward, bias_act_forward, Activation};
use qkv::kernels::attention::{
    attention_one_query, AttentionShape, HeadsMut, HeadsRef, KvBlocks, Masks,
};
use qkv::kernels::bf16::{bf16_bits, round_bf16};
use qkv::kernels::dropout::{self, Dropout};
use qkv::kernels::embedding::{embedding_backward, embedding_forward, sinusoidal_table};
use qkv::kernels::flash::{flash_backward, flash_forward};
use qkv::kernels::layernorm::{layernorm_backward, layernorm_forward, residual_layernorm_forward};
use qkv::kernels::loss::cross_entropy;
use qkv::kernels::matmul::{matmul_naive, Layout};
use qkv::kernels::optim::{adamw_step, scale, sum_squares};
use qkv::kernels::Acc;
use qkv::rng::Rng;

fn gpu() -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(g) => Some(g),
        Err(e) => {
            if std::env::var_os("QKV_REQUIRE_CUDA").is_some() {
                panic!("QKV_REQUIRE_CUDA is set but: {e}");
            }
            eprintln!("skipping: {e}");
            None
        }
    }
}

fn up<T: cudarc::driver::DeviceRepr>(g: &Gpu, x: &[T]) -> CudaSlice<T> {
    g.stream().clone_htod(x).unwrap()
}

fn down(g: &Gpu, x: &CudaSlice<f32>) -> Vec<f32> {
    g.stream().clone_dtoh(x).unwrap()
}

fn assert_near(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
}

const N: usize = 37;
const WIDTHS: [usize; 3] = [32, 96, 200];

#[test]
fn embedding_forward_and_backward_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(1);
    let (v, c, t_len) = (50, 96, 8);
    let n = 4 * t_len;
    // Repeated tokens: their gradients meet in the same table row.
    let tokens: Vec<u32> = (0..n).map(|i| (i * 7 % 13) as u32).collect();
    let table = random_vec(&mut rng, v * c, 1.0);
    let pos = sinusoidal_table(t_len, c);
    for drop in [None, Dropout::new(0.3, 11).map(|d| d.at(5))] {
        let mut want = vec![0.0; n * c];
        embedding_forward(&mut want, &tokens, &table, &pos, 3.0, t_len, c, drop);
        let mut out = g.stream().alloc_zeros::<f32>(n * c).unwrap();
        let (dt, dtab, dpos) = (up(&g, &tokens), up(&g, &table), up(&g, &pos));
        g.embedding_forward(&mut out, &dt, &dtab, &dpos, 3.0, t_len, c, drop)
            .unwrap();
        let got = down(&g, &out);
        assert_near("embedding forward", &got, &want, 1e-6);
        let zeros = |x: &[f32]| x.iter().map(|&v| v == 0.0).collect::<Vec<_>>();
        assert_eq!(zeros(&got), zeros(&want), "dropout masks differ");
    }
    let dout = random_vec(&mut rng, n * c, 1.0);
    let (mut want_t, mut want_p) = (vec![0.0; v * c], vec![0.0; t_len * c]);
    embedding_backward(
        &mut want_t,
        Some(&mut want_p),
        &dout,
        &tokens,
        3.0,
        t_len,
        c,
    );
    let mut dtab = g.stream().alloc_zeros::<f32>(v * c).unwrap();
    let mut dpos = g.stream().alloc_zeros::<f32>(t_len * c).unwrap();
    let (ddout, dt) = (up(&g, &dout), up(&g, &tokens));
    g.embedding_backward(
        &mut dtab,
        Some((&mut dpos).into()),
        &ddout,
        &dt,
        3.0,
        t_len,
        c,
    )
    .unwrap();
    assert_near("embedding dtable", &down(&g, &dtab), &want_t, 1e-5);
    assert_near("embedding dpos", &down(&g, &dpos), &want_p, 1e-5);
}

#[test]
fn residual_add_and_dropout_match_the_cpu_with_the_same_mask() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(2);
    let n = 10_007;
    let (x, sub) = (random_vec(&mut rng, n, 1.0), random_vec(&mut rng, n, 1.0));
    for drop in [
        None,
        Dropout::new(0.1, 3),
        Dropout::new(0.5, 4).map(|d| d.at(999)),
    ] {
        let mut want = vec![0.0; n];
        dropout::residual_add(&mut want, &x, &sub, drop);
        let mut out = g.stream().alloc_zeros::<f32>(n).unwrap();
        g.residual_add(&mut out, &up(&g, &x), &up(&g, &sub), drop)
            .unwrap();
        assert_near("residual add", &down(&g, &out), &want, 1e-6);

        let mut want = x.clone();
        dropout::apply(&mut want, drop);
        let mut dx = up(&g, &x);
        g.dropout_apply(&mut dx, drop).unwrap();
        assert_eq!(down(&g, &dx), want, "dropout apply is one multiply: exact");
    }
}

#[test]
fn layernorm_forward_backward_and_add_and_norm_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(3);
    for c in WIDTHS {
        let x = random_vec(&mut rng, N * c, 2.0);
        let sub = random_vec(&mut rng, N * c, 1.0);
        let w = random_vec(&mut rng, c, 1.0);
        let b = random_vec(&mut rng, c, 1.0);
        let dy = random_vec(&mut rng, N * c, 1.0);
        let drop = Dropout::new(0.2, 9);
        let (mut sum, mut out, mut mean, mut rstd) = (
            vec![0.0; N * c],
            vec![0.0; N * c],
            vec![0.0; N],
            vec![0.0; N],
        );
        residual_layernorm_forward(
            &mut sum, &mut out, &mut mean, &mut rstd, &x, &sub, &w, &b, c, 1e-5, drop,
        );
        let z = |n| g.stream().alloc_zeros::<f32>(n).unwrap();
        let (mut gsum, mut gout, mut gmean, mut grstd) = (z(N * c), z(N * c), z(N), z(N));
        let (gx, gsub, gw, gb) = (up(&g, &x), up(&g, &sub), up(&g, &w), up(&g, &b));
        g.residual_layernorm_forward(
            &mut gsum, &mut gout, &mut gmean, &mut grstd, &gx, &gsub, &gw, &gb, c, 1e-5, drop,
        )
        .unwrap();
        assert_near("add & norm sum", &down(&g, &gsum), &sum, 1e-6);
        assert_near("add & norm out", &down(&g, &gout), &out, 1e-5);
        assert_near("add & norm mean", &down(&g, &gmean), &mean, 1e-5);
        assert_near("add & norm rstd", &down(&g, &grstd), &rstd, 1e-5);

        layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &b, c, 1e-5);
        g.layernorm_forward(&mut gout, &mut gmean, &mut grstd, &gx, &gw, &gb, c, 1e-5)
            .unwrap();
        assert_near("layernorm out", &down(&g, &gout), &out, 1e-5);

        for acc in [Acc::Set, Acc::Add] {
            let dx0 = random_vec(&mut rng, N * c, 1.0);
            let (mut dx, mut dw, mut db) = (dx0.clone(), vec![0.5; c], vec![0.25; c]);
            layernorm_backward(&mut dx, &mut dw, &mut db, &dy, &x, &mean, &rstd, &w, c, acc);
            let (mut gdx, mut gdw, mut gdb) = (
                up(&g, &dx0),
                up(&g, &[0.5; 200][..c]),
                up(&g, &[0.25; 200][..c]),
            );
            g.layernorm_backward(
                &mut gdx,
                &mut gdw,
                &mut gdb,
                &up(&g, &dy),
                &gx,
                &gmean,
                &grstd,
                &gw,
                c,
                acc,
            )
            .unwrap();
            assert_near(
                &format!("layernorm dx ({acc:?})"),
                &down(&g, &gdx),
                &dx,
                1e-5,
            );
            assert_near("layernorm dw", &down(&g, &gdw), &dw, 1e-5);
            assert_near("layernorm db", &down(&g, &gdb), &db, 1e-5);
        }
    }
}

#[test]
fn bias_and_activation_forward_and_backward_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(4);
    for f in WIDTHS {
        for act in [Activation::Relu, Activation::Gelu, Activation::Identity] {
            let pre0 = random_vec(&mut rng, N * f, 2.0);
            let bias = random_vec(&mut rng, f, 1.0);
            let (mut pre, mut post) = (pre0.clone(), vec![0.0; N * f]);
            bias_act_forward(&mut pre, &mut post, &bias, act);
            let (mut gpre, mut gpost) =
                (up(&g, &pre0), g.stream().alloc_zeros::<f32>(N * f).unwrap());
            let gbias = up(&g, &bias);
            let post_arg = (act != Activation::Identity).then(|| (&mut gpost).into());
            g.bias_act_forward(&mut gpre, post_arg, &gbias, act)
                .unwrap();
            assert_near("bias", &down(&g, &gpre), &pre, 1e-6);
            if act != Activation::Identity {
                assert_near(&format!("{act:?}"), &down(&g, &gpost), &post, 1e-5);
            }

            let d0 = random_vec(&mut rng, N * f, 1.0);
            let (mut d, mut dbias) = (d0.clone(), vec![1.0; f]);
            bias_act_backward(&mut d, &mut dbias, &pre, act);
            let (mut gd, mut gdbias) = (up(&g, &d0), up(&g, &vec![1.0; f]));
            g.bias_act_backward(&mut gd, &mut gdbias, &gpre, act)
                .unwrap();
            assert_near(&format!("{act:?} backward"), &down(&g, &gd), &d, 1e-5);
            assert_near(&format!("{act:?} dbias"), &down(&g, &gdbias), &dbias, 1e-5);
        }
    }
}

#[test]
fn cross_entropy_with_smoothing_and_padding_matches_the_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(5);
    for v in [7, 1000, 8000] {
        let logits = random_vec(&mut rng, N * v, 3.0);
        let targets: Vec<u32> = (0..N).map(|i| (i * 31 % v) as u32).collect();
        let glogits = up(&g, &logits);
        for (ignore, smoothing) in [(None, 0.0), (Some(targets[3]), 0.1)] {
            let mut want_d = vec![0.0; N * v];
            let want = cross_entropy(Some(&mut want_d), &logits, &targets, v, ignore, smoothing);
            let mut gd = g.stream().alloc_zeros::<f32>(N * v).unwrap();
            let got = g
                .cross_entropy(
                    Some((&mut gd).into()),
                    &glogits,
                    &targets,
                    v,
                    ignore,
                    smoothing,
                )
                .unwrap();
            assert_eq!(got.count, want.count);
            assert!(
                (got.mean - want.mean).abs() <= 1e-5 * want.mean.abs(),
                "{got:?} vs {want:?}"
            );
            assert!((got.nll_sum - want.nll_sum).abs() <= 1e-5 * want.nll_sum.abs());
            assert_near("dlogits", &down(&g, &gd), &want_d, 1e-5);
            let eval = g
                .cross_entropy(None, &glogits, &targets, v, ignore, smoothing)
                .unwrap();
            assert_eq!(eval, got, "evaluation's loss equals training's");
        }
    }
    let bad = g.cross_entropy(None, &up(&g, &[0.0f32; 7]), &[7], 7, None, 0.0);
    assert!(matches!(bad, Err(CudaError::Shape { .. })), "{bad:?}");
}

#[test]
fn adamw_and_clipping_passes_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(6);
    let n = 100_003;
    let (p0, grad) = (random_vec(&mut rng, n, 1.0), random_vec(&mut rng, n, 0.1));
    let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
    let (mut gp, mut gm, mut gv) = (up(&g, &p0), up(&g, &m), up(&g, &v));
    let gg = up(&g, &grad);
    for step in 1..=3 {
        adamw_step(
            &mut p, &grad, &mut m, &mut v, 1e-3, 0.9, 0.98, 1e-9, 0.01, step,
        );
        g.adamw_step(
            &mut gp, &gg, &mut gm, &mut gv, 1e-3, 0.9, 0.98, 1e-9, 0.01, step,
        )
        .unwrap();
    }
    assert_near("adamw params", &down(&g, &gp), &p, 1e-6);
    assert_near("adamw m", &down(&g, &gm), &m, 1e-6);
    assert_near("adamw v", &down(&g, &gv), &v, 1e-6);

    let (want, got) = (sum_squares(&grad), g.sum_squares(&gg).unwrap());
    assert!((got - want).abs() <= 1e-5 * want, "{got} vs {want}");
    let mut x = grad.clone();
    scale(&mut x, 0.5);
    let mut gx = up(&g, &grad);
    g.scale(&mut gx, 0.5).unwrap();
    assert_eq!(down(&g, &gx), x);
}

#[test]
fn products_in_every_layout_match_the_cpu_to_tf32_rounding() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(7);
    for (m, k, n) in [(1, 1, 1), (37, 19, 23), (128, 256, 64), (300, 512, 96)] {
        for (al, bl) in [
            (Layout::RowMajor, Layout::RowMajor),
            (Layout::RowMajor, Layout::Transposed),
            (Layout::Transposed, Layout::RowMajor),
            (Layout::Transposed, Layout::Transposed),
        ] {
            let a = random_vec(&mut rng, m * k, 1.0);
            let b = random_vec(&mut rng, k * n, 1.0);
            for acc in [Acc::Set, Acc::Add] {
                let out0 = random_vec(&mut rng, m * n, 1.0);
                let mut want = out0.clone();
                matmul_naive(&mut want, &a, &b, m, k, n, al, bl, acc);
                let mut out = up(&g, &out0);
                g.matmul(&mut out, &up(&g, &a), &up(&g, &b), m, k, n, al, bl, acc)
                    .unwrap();
                // TF32 rounds each operand to 10 mantissa bits: relative 2⁻¹¹ per product,
                // growing as √k in a sum of random signs.
                let what = format!("matmul {m}x{k}x{n} {al:?}/{bl:?} {acc:?}");
                assert_near(&what, &down(&g, &out), &want, 5e-3);
            }
        }
    }
}

/// Flash attention, forward and backward, on fused (B·T, 3C) QKV views as self-attention uses
/// them, for each head width bound and mask.
#[test]
fn flash_attention_forward_and_backward_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(8);
    let (batch, heads, t) = (2, 3, 45);
    for d in [16, 64, 80] {
        let c = heads * d;
        let shape = AttentionShape {
            batch,
            heads,
            q_len: t,
            k_len: t,
            head_dim: d,
        };
        let qkv = random_vec(&mut rng, batch * t * 3 * c, 1.0);
        let dout = random_vec(&mut rng, batch * t * c, 1.0);
        let pad: Vec<bool> = (0..batch * t).map(|i| i % t >= t - 3 * (i / t)).collect();
        let scale = 1.0 / (d as f32).sqrt();
        let maskings = [
            Masks::default(),
            Masks {
                key_padding: Some(&pad),
                ..Masks::default()
            },
            Masks {
                causal: true,
                ..Masks::default()
            },
            Masks {
                causal: true,
                window: Some(5),
                ..Masks::default()
            },
            Masks {
                window: Some(7),
                key_padding: Some(&pad),
                ..Masks::default()
            },
        ];
        let gqkv = up(&g, &qkv);
        for masks in &maskings {
            let view = |o| HeadsRef {
                data: &qkv,
                rs: 3 * c,
                offset: o,
            };
            let (mut out, mut lse) = (vec![0.0; batch * t * c], vec![0.0; batch * heads * t]);
            flash_forward(
                &mut out,
                &mut lse,
                view(0),
                view(c),
                view(2 * c),
                shape,
                masks,
                scale,
            );
            let gview = |o| DevHeads {
                data: (&gqkv).into(),
                rs: 3 * c,
                offset: o,
            };
            let mut gout = g.stream().alloc_zeros::<f32>(batch * t * c).unwrap();
            let mut glse = g.stream().alloc_zeros::<f32>(batch * heads * t).unwrap();
            g.flash_forward(
                &mut gout,
                &mut glse,
                gview(0),
                gview(c),
                gview(2 * c),
                shape,
                masks,
                scale,
            )
            .unwrap();
            let what = format!("d {d}, {masks:?}");
            assert_near(&format!("flash out, {what}"), &down(&g, &gout), &out, 1e-5);
            let (gl, l) = (down(&g, &glse), lse.clone());
            for (a, b) in gl.iter().zip(&l) {
                assert!(
                    a == b || (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "lse {a} vs {b}, {what}"
                );
            }

            let mut dqkv = vec![0.0; batch * t * 3 * c];
            {
                let [dq, dk, dv] = HeadsMut::split(&mut dqkv, 3 * c, c, [0, c, 2 * c]);
                flash_backward(
                    &dq,
                    &dk,
                    &dv,
                    &dout,
                    &out,
                    &lse,
                    view(0),
                    view(c),
                    view(2 * c),
                    shape,
                    masks,
                    scale,
                );
            }
            let mut gd = g.stream().alloc_zeros::<f32>(batch * t * 3 * c).unwrap();
            {
                let [dq, dk, dv] = DevHeadsMut::split(&mut gd, 3 * c, c, [0, c, 2 * c]).unwrap();
                g.flash_backward(
                    &dq,
                    &dk,
                    &dv,
                    &up(&g, &dout),
                    &gout,
                    &glse,
                    gview(0),
                    gview(c),
                    gview(2 * c),
                    shape,
                    masks,
                    scale,
                )
                .unwrap();
            }
            assert_near(&format!("flash dqkv, {what}"), &down(&g, &gd), &dqkv, 1e-4);
        }
    }
    // Cross-attention: queries and keys of different lengths, in separate buffers.
    let (tq, tk, d) = (9, 70, 32);
    let c = heads * d;
    let shape = AttentionShape {
        batch,
        heads,
        q_len: tq,
        k_len: tk,
        head_dim: d,
    };
    let q = random_vec(&mut rng, batch * tq * c, 1.0);
    let kv = random_vec(&mut rng, batch * tk * 2 * c, 1.0);
    let (mut out, mut lse) = (vec![0.0; batch * tq * c], vec![0.0; batch * heads * tq]);
    let masks = Masks::default();
    flash_forward(
        &mut out,
        &mut lse,
        HeadsRef {
            data: &q,
            rs: c,
            offset: 0,
        },
        HeadsRef {
            data: &kv,
            rs: 2 * c,
            offset: 0,
        },
        HeadsRef {
            data: &kv,
            rs: 2 * c,
            offset: c,
        },
        shape,
        &masks,
        0.2,
    );
    let (gq, gkv) = (up(&g, &q), up(&g, &kv));
    let mut gout = g.stream().alloc_zeros::<f32>(batch * tq * c).unwrap();
    let mut glse = g.stream().alloc_zeros::<f32>(batch * heads * tq).unwrap();
    g.flash_forward(
        &mut gout,
        &mut glse,
        DevHeads {
            data: (&gq).into(),
            rs: c,
            offset: 0,
        },
        DevHeads {
            data: (&gkv).into(),
            rs: 2 * c,
            offset: 0,
        },
        DevHeads {
            data: (&gkv).into(),
            rs: 2 * c,
            offset: c,
        },
        shape,
        &masks,
        0.2,
    )
    .unwrap();
    assert_near("cross-attention out", &down(&g, &gout), &out, 1e-5);
    let too_wide = AttentionShape {
        head_dim: 160,
        heads: 1,
        ..shape
    };
    let err = g
        .flash_forward(
            &mut gout,
            &mut glse,
            DevHeads {
                data: (&gq).into(),
                rs: 160,
                offset: 0,
            },
            DevHeads {
                data: (&gkv).into(),
                rs: 320,
                offset: 0,
            },
            DevHeads {
                data: (&gkv).into(),
                rs: 320,
                offset: 160,
            },
            too_wide,
            &masks,
            0.2,
        )
        .unwrap_err();
    assert!(err.to_string().contains("head width 160"), "{err}");
}

#[test]
fn bf16_products_equal_f32_products_of_the_rounded_operands() {
    let Some(g) = gpu() else { return };
    let specials = [
        0.0f32,
        -0.0,
        1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1.0e-40,
        3.0e38,
        f32::from_bits(0x3F80_8000),
        f32::from_bits(0x3F81_8000),
        f32::from_bits(0x3F80_7FFF),
    ];
    let bits: Vec<u16> = g
        .stream()
        .clone_dtoh(&g.to_bf16(&up(&g, &specials), specials.len()).unwrap())
        .unwrap();
    let want: Vec<u16> = specials.iter().map(|&x| bf16_bits(x) as u16).collect();
    assert_eq!(bits, want, "rounding to bf16 (ties to even, NaN quiet)");

    let mut rng = Rng::new(9);
    for (m, k, n) in [(37, 19, 23), (256, 256, 768), (64, 1024, 256)] {
        for (al, bl) in [
            (Layout::RowMajor, Layout::Transposed),
            (Layout::Transposed, Layout::RowMajor),
            (Layout::RowMajor, Layout::RowMajor),
        ] {
            let a = random_vec(&mut rng, m * k, 1.0);
            let b = random_vec(&mut rng, k * n, 1.0);
            let (ra, rb): (Vec<f32>, Vec<f32>) = (
                a.iter().map(|&x| round_bf16(x)).collect(),
                b.iter().map(|&x| round_bf16(x)).collect(),
            );
            for acc in [Acc::Set, Acc::Add] {
                let out0 = random_vec(&mut rng, m * n, 1.0);
                let mut want = out0.clone();
                matmul_naive(&mut want, &ra, &rb, m, k, n, al, bl, acc);
                let mut out = up(&g, &out0);
                g.matmul_bf16(&mut out, &up(&g, &a), &up(&g, &b), m, k, n, al, bl, acc)
                    .unwrap();
                // Exact products of bf16 values, summed in f32 in another order.
                assert_near(
                    &format!("bf16 matmul {m}x{k}x{n} {al:?}/{bl:?} {acc:?}"),
                    &down(&g, &out),
                    &want,
                    2e-5,
                );
            }
        }
    }
}

/// Decoding's one-query attention over a cache of (K | V) rows, with beam rows sharing blocks,
/// a window of keys, padding (one row fully masked: zeros) and rows at different positions
/// (continuous batching).
#[test]
#[allow(clippy::single_range_in_vec_init)] // one key range for every row, as decoding passes
fn one_query_attention_over_the_cache_matches_the_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(10);
    let (heads, d, blocks, rows) = (4, 64, 3, 50);
    let (w, rs) = (heads * d, 2 * heads * d + 8);
    let kv = random_vec(&mut rng, blocks * rows * rs, 1.0);
    let block = [0usize, 0, 1, 2, 2, 2];
    let q_rs = w + 5;
    let q = random_vec(&mut rng, block.len() * q_rs, 1.0);
    let mut pad = vec![false; blocks * rows];
    pad[rows + 3..2 * rows].iter_mut().for_each(|p| *p = true);
    let gkv = up(&g, &kv);
    let per_row = [0..7, 0..50, 1..2, 4..30, 0..1, 10..49];
    for (keys, padding) in [
        (&[0..1][..], None),
        (&[0..50], None),
        (&[2..41], Some(&pad[..])),
        (&[3..50], Some(&pad[..])),
        (&per_row, Some(&pad[..])),
    ] {
        let mut want = vec![0.0; block.len() * w];
        let cpu = KvBlocks {
            data: &kv,
            rows,
            rs,
            k_offset: 4,
            v_offset: 4 + w,
        };
        attention_one_query(
            &mut want, &q, q_rs, cpu, &block, keys, padding, heads, d, 0.125,
        );
        let mut out = g.stream().alloc_zeros::<f32>(block.len() * w).unwrap();
        let dev = DevKvBlocks {
            data: (&gkv).into(),
            rows,
            rs,
            k_offset: 4,
            v_offset: 4 + w,
        };
        g.attention_one_query(
            &mut out,
            &up(&g, &q),
            q_rs,
            dev,
            &block,
            keys,
            padding,
            heads,
            d,
            0.125,
        )
        .unwrap();
        assert_near(
            &format!("one-query attention, keys {keys:?}"),
            &down(&g, &out),
            &want,
            1e-5,
        );
    }
    let mut out = g.stream().alloc_zeros::<f32>(block.len() * w).unwrap();
    let dev = DevKvBlocks {
        data: (&gkv).into(),
        rows,
        rs,
        k_offset: 4,
        v_offset: 4 + w,
    };
    let err = g
        .attention_one_query(
            &mut out,
            &up(&g, &q),
            q_rs,
            dev,
            &[0, 3],
            &[0..5],
            None,
            heads,
            d,
            0.125,
        )
        .unwrap_err();
    assert!(err.to_string().contains("names block 3"), "{err}");
}

/// The tensor-core forward against the CPU's f32 forward on the same bf16-rounded inputs: what
/// remains is P's rounding to bf16 before P·V (relative 2⁻⁹ per weight).
#[test]
fn tensor_core_flash_forward_matches_the_cpu_on_bf16_inputs() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(11);
    let (batch, heads) = (2, 2);
    for (d, tq, tk) in [(32, 100, 100), (64, 130, 130), (128, 70, 70), (64, 17, 200)] {
        let c = heads * d;
        let shape = AttentionShape {
            batch,
            heads,
            q_len: tq,
            k_len: tk,
            head_dim: d,
        };
        let round = |x: Vec<f32>| x.into_iter().map(round_bf16).collect::<Vec<f32>>();
        let q = round(random_vec(&mut rng, batch * tq * c, 1.0));
        let kv = round(random_vec(&mut rng, batch * tk * 2 * c, 1.0));
        let pad: Vec<bool> = (0..batch * tk)
            .map(|i| i / tk == 1 && i % tk >= tk - 5)
            .collect();
        let self_attention = tq == tk;
        let mut maskings = vec![
            Masks::default(),
            Masks {
                key_padding: Some(&pad),
                ..Masks::default()
            },
        ];
        if self_attention {
            maskings.push(Masks {
                causal: true,
                ..Masks::default()
            });
            maskings.push(Masks {
                causal: true,
                window: Some(9),
                ..Masks::default()
            });
        }
        let (gq, gkv) = (up(&g, &q), up(&g, &kv));
        let scale = 1.0 / (d as f32).sqrt();
        for masks in &maskings {
            let (mut out, mut lse) = (vec![0.0; batch * tq * c], vec![0.0; batch * heads * tq]);
            flash_forward(
                &mut out,
                &mut lse,
                HeadsRef {
                    data: &q,
                    rs: c,
                    offset: 0,
                },
                HeadsRef {
                    data: &kv,
                    rs: 2 * c,
                    offset: 0,
                },
                HeadsRef {
                    data: &kv,
                    rs: 2 * c,
                    offset: c,
                },
                shape,
                masks,
                scale,
            );
            let mut gout = g.stream().alloc_zeros::<f32>(batch * tq * c).unwrap();
            let mut glse = g.stream().alloc_zeros::<f32>(batch * heads * tq).unwrap();
            g.flash_forward_bf16(
                &mut gout,
                &mut glse,
                DevHeads {
                    data: (&gq).into(),
                    rs: c,
                    offset: 0,
                },
                DevHeads {
                    data: (&gkv).into(),
                    rs: 2 * c,
                    offset: 0,
                },
                DevHeads {
                    data: (&gkv).into(),
                    rs: 2 * c,
                    offset: c,
                },
                shape,
                masks,
                scale,
            )
            .unwrap();
            let what = format!("d {d}, tq {tq}, tk {tk}, {masks:?}");
            assert_near(
                &format!("tensor-core flash out, {what}"),
                &down(&g, &gout),
                &out,
                1e-2,
            );
            for (a, b) in down(&g, &glse).iter().zip(&lse) {
                assert!(
                    a == b || (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "lse {a} vs {b}, {what}"
                );
            }
        }
    }
}

/// The tensor-core backward against the CPU's f32 backward on bf16-rounded Q, K, V and dO:
/// what remains is P's and dS's rounding to bf16 inside the products.
#[test]
fn tensor_core_flash_backward_matches_the_cpu_on_bf16_inputs() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(13);
    let (batch, heads) = (2, 2);
    let round = |x: Vec<f32>| x.into_iter().map(round_bf16).collect::<Vec<f32>>();
    for (d, t) in [(32, 100), (64, 130)] {
        let c = heads * d;
        let shape = AttentionShape {
            batch,
            heads,
            q_len: t,
            k_len: t,
            head_dim: d,
        };
        let qkv = round(random_vec(&mut rng, batch * t * 3 * c, 1.0));
        let dout = round(random_vec(&mut rng, batch * t * c, 1.0));
        let pad: Vec<bool> = (0..batch * t)
            .map(|i| i / t == 1 && i % t >= t - 7)
            .collect();
        let scale = 1.0 / (d as f32).sqrt();
        let maskings = [
            Masks::default(),
            Masks {
                key_padding: Some(&pad),
                ..Masks::default()
            },
            Masks {
                causal: true,
                ..Masks::default()
            },
            Masks {
                causal: true,
                window: Some(20),
                key_padding: Some(&pad),
            },
        ];
        let (gqkv, gdout) = (up(&g, &qkv), up(&g, &dout));
        for masks in &maskings {
            let view = |o| HeadsRef {
                data: &qkv,
                rs: 3 * c,
                offset: o,
            };
            let (mut out, mut lse) = (vec![0.0; batch * t * c], vec![0.0; batch * heads * t]);
            flash_forward(
                &mut out,
                &mut lse,
                view(0),
                view(c),
                view(2 * c),
                shape,
                masks,
                scale,
            );
            let mut dqkv = vec![0.0; batch * t * 3 * c];
            {
                let [dq, dk, dv] = HeadsMut::split(&mut dqkv, 3 * c, c, [0, c, 2 * c]);
                flash_backward(
                    &dq,
                    &dk,
                    &dv,
                    &dout,
                    &out,
                    &lse,
                    view(0),
                    view(c),
                    view(2 * c),
                    shape,
                    masks,
                    scale,
                );
            }
            // The saved forward from the CPU, so only the backward is compared.
            let (gout, glse) = (up(&g, &out), up(&g, &lse));
            let gview = |o| DevHeads {
                data: (&gqkv).into(),
                rs: 3 * c,
                offset: o,
            };
            let mut gd = g.stream().alloc_zeros::<f32>(batch * t * 3 * c).unwrap();
            {
                let [dq, dk, dv] = DevHeadsMut::split(&mut gd, 3 * c, c, [0, c, 2 * c]).unwrap();
                g.flash_backward_bf16(
                    &dq,
                    &dk,
                    &dv,
                    &gdout,
                    &gout,
                    &glse,
                    gview(0),
                    gview(c),
                    gview(2 * c),
                    shape,
                    masks,
                    scale,
                )
                .unwrap();
            }
            let what = format!("tensor-core flash dqkv, d {d}, {masks:?}");
            assert_near(&what, &down(&g, &gd), &dqkv, 3e-2);
        }
    }
}

#[test]
fn a_kernel_given_short_buffers_is_a_shape_error() {
    let Some(g) = gpu() else { return };
    let z = |n| g.stream().alloc_zeros::<f32>(n).unwrap();
    let (mut out, mut mean, mut rstd) = (z(10), z(4), z(4));
    let err = g
        .layernorm_forward(
            &mut out,
            &mut mean,
            &mut rstd,
            &z(16),
            &z(4),
            &z(4),
            4,
            1e-5,
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("out holds 10 elements, 16 needed"),
        "{err}"
    );
    // A decoding step's cache write past its blocks or positions names the row.
    let (mut kv, src) = (z(2 * 4 * 6), z(3 * 6));
    let err = g
        .kv_append(&mut kv, 4, &src, 6, 6, &[0, 2, 1], &[0, 0, 0])
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("row 1 writes position 0 of block 2"),
        "{err}"
    );
    let err = g
        .kv_append(&mut kv, 4, &src, 6, 6, &[0, 1, 1], &[0, 4, 0])
        .unwrap_err();
    assert!(err.to_string().contains("row 1 writes position 4"), "{err}");
    let err = g
        .kv_append(&mut kv, 4, &src, 6, 6, &[0, 1], &[0, 0, 0])
        .unwrap_err();
    assert!(err.to_string().contains("3 positions for 2 rows"), "{err}");
}

/// The optimizer step on the GPU against the CPU's, over a real model's parameter layout:
/// clipping active, three steps; a non-finite gradient names its parameter and changes nothing.
#[test]
fn adamw_step_on_device_parameters_matches_the_cpu_optimizer() {
    use qkv::backend::{Backend, Cuda};
    use qkv::model::{Family, ModelConfig, Seq2Seq};
    use qkv::optim::{AdamW, AdamWConfig};
    use qkv::params::Params;
    let Some(g) = gpu() else { return };
    let be = Cuda::new(std::sync::Arc::new(g), false);
    let cfg = ModelConfig::preset("tiny", Family::Seq2seq, 50).unwrap();
    let mut model = Seq2Seq::new(cfg, 1).unwrap();
    let mut rng = Rng::new(12);
    let n = model.params.data.len();
    let config = AdamWConfig {
        clip_norm: Some(0.5),
        ..AdamWConfig::default()
    };
    let mut cpu = AdamW::new(config.clone(), n);
    let mut dev = Params::upload(&be, model.params.clone());
    let mut dev_opt = AdamW::on(&be, config, n);
    let set_grad = |dev: &mut Params<Cuda>, grad: &[f32]| {
        be.host_mut(be.grow(&mut dev.grad, n), &mut |h| {
            h.copy_from_slice(grad);
            Ok(())
        })
        .unwrap()
    };
    let values = |dev: &Params<Cuda>| be.to_host(Cuda::view(&dev.data, n)).unwrap().into_owned();
    for step in 0..3 {
        let grad = random_vec(&mut rng, n, 0.1);
        model.params.grad.copy_from_slice(&grad);
        set_grad(&mut dev, &grad);
        let want = cpu.step(&mut model.params, 1e-3).unwrap();
        let got = dev_opt.step_on(&be, &mut dev, 1e-3).unwrap();
        assert!(
            (got - want).abs() <= 1e-5 * want,
            "step {step}: norm {got} vs {want}"
        );
    }
    assert_near(
        "parameters after 3 steps",
        &values(&dev),
        &model.params.data,
        1e-6,
    );

    let mut grad = vec![0.0f32; n];
    let spec = &model.params.specs[5];
    grad[spec.offset + 2] = f32::NAN;
    set_grad(&mut dev, &grad);
    let before = values(&dev);
    let err = dev_opt
        .step_on(&be, &mut dev, 1e-3)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("gradient of {} (element 2)", spec.name)),
        "{err}"
    );
    assert_eq!(values(&dev), before, "parameters changed");
}

// The layers written against `qkv::backend::Backend`, on the `Cuda` backend against the `Cpu`
// backend with the same parameters and inputs: one model code for both devices (issue 18).

/// A layer's parameters: the builder's initialisation moved off ones and zeros, which would
/// hide a swapped weight and bias.
fn layer_params(pb: qkv::params::ParamBuilder, rng: &mut Rng) -> Vec<f32> {
    let mut params = pb.build(3).unwrap().data;
    params.iter_mut().for_each(|v| *v += 0.1 * rng.normal());
    params
}

#[test]
fn feed_forward_on_the_cuda_backend_matches_the_cpu_backend() {
    use qkv::backend::{Backend, Cpu, Cuda};
    use qkv::model::feed_forward::FeedForward;
    use qkv::params::ParamBuilder;

    let Some(g) = gpu() else { return };
    let g = std::sync::Arc::new(g);
    let mut rng = Rng::new(41);
    let (n, c, f) = (N, 48, 160);
    let x = random_vec(&mut rng, n * c, 1.0);
    let dy = random_vec(&mut rng, n * c, 1.0);
    let dx0 = random_vec(&mut rng, n * c, 1.0);
    let (gx, gdy) = (up(&g, &x), up(&g, &dy));
    // TF32 products against f32 (see the products test); bf16 operands: 8-bit mantissas.
    for (bf16, tol) in [(false, 5e-3), (true, 3e-2)] {
        let be = Cuda::new(g.clone(), bf16);
        for act in [Activation::Relu, Activation::Gelu] {
            let mut pb = ParamBuilder::default();
            let mut cpu: FeedForward = FeedForward::new(&mut pb, "ffn", c, f, act);
            // An empty builder registers the same layout: the GPU layer reads the same `p`.
            let mut dev: FeedForward<Cuda> =
                FeedForward::new(&mut ParamBuilder::default(), "ffn", c, f, act);
            let p = layer_params(pb, &mut rng);
            let y = cpu.forward(&Cpu, &p, &x).to_vec();
            let (mut grad, mut dx) = (vec![0.0; p.len()], dx0.clone());
            cpu.backward(&Cpu, &p, &mut grad, &x, &dy, &mut dx, Acc::Add);

            let (gp, mut gg, mut gdx) = (up(&g, &p), up(&g, &vec![0.0; p.len()]), up(&g, &dx0));
            let gy = dev.forward(&be, (&gp).into(), (&gx).into());
            let gy = g.to_host(gy).unwrap();
            let (gpv, gxv, gdyv) = ((&gp).into(), (&gx).into(), (&gdy).into());
            let (ggv, gdxv) = ((&mut gg).into(), (&mut gdx).into());
            dev.backward(&be, gpv, ggv, gxv, gdyv, gdxv, Acc::Add);
            be.sync().unwrap();
            let what = |s: &str| format!("ffn {act:?} bf16 {bf16}: {s}");
            assert_near(&what("output"), &gy, &y, tol);
            assert_near(&what("dx"), &down(&g, &gdx), &dx, tol);
            assert_near(&what("parameter gradients"), &down(&g, &gg), &grad, tol);
        }
    }
}

#[test]
fn add_and_norm_on_the_cuda_backend_matches_the_cpu_backend() {
    use qkv::backend::{Backend, Cpu, Cuda};
    use qkv::model::config::NormPlacement;
    use qkv::model::norm::AddNorm;
    use qkv::model::Mode;
    use qkv::params::ParamBuilder;

    let Some(g) = gpu() else { return };
    let be = Cuda::new(std::sync::Arc::new(g), false);
    let g = be.gpu();
    let mut rng = Rng::new(43);
    let (n, c) = (N, 48);
    let [x, sub, dy, fill] = [0; 4].map(|_| random_vec(&mut rng, n * c, 1.0));
    let (gx, gsub, gdy) = (up(g, &x), up(g, &sub), up(g, &dy));
    let zeros = |len: usize| up(g, &vec![0.0f32; len]);
    // What a sublayer's backward does with its input gradient: overwrite or add `fill`.
    let write = |mut d: Vec<f32>, acc: Acc| {
        d.iter_mut()
            .zip(&fill)
            .for_each(|(d, f)| *d = if acc.adds() { *d + f } else { *f });
        d
    };
    for placement in [NormPlacement::Post, NormPlacement::Pre] {
        // Residual dropout draws the same mask on both devices.
        let mode = Mode::train(0.1, 0.0, 9);
        let mut pb = ParamBuilder::default();
        let mut cpu: AddNorm = AddNorm::new(&mut pb, "norm", c, 1e-5, placement, 4);
        let mut dev: AddNorm<Cuda> =
            AddNorm::new(&mut ParamBuilder::default(), "norm", c, 1e-5, placement, 4);
        let p = layer_params(pb, &mut rng);

        let input = cpu.sublayer_input(&Cpu, &p, &x).to_vec();
        let mut y = vec![0.0; n * c];
        cpu.finish(&Cpu, &p, &x, &sub, &mut y, mode);
        let (mut grad, mut dx) = (vec![0.0; p.len()], vec![0.0; n * c]);
        let s = cpu.backward_output(&Cpu, &p, &mut grad, &x, &dy, &mut dx);
        let (d_output, sub_input) = (s.d_output.to_vec(), s.input.to_vec());
        let d_input = s.d_input.to_vec();
        s.d_input.copy_from_slice(&write(d_input.clone(), s.acc));
        cpu.backward_input(&Cpu, &p, &mut grad, &x, &mut dx);

        let gp = up(g, &p);
        let (mut gg, mut gy, mut gdx) = (zeros(p.len()), zeros(n * c), zeros(n * c));
        let gin = dev.sublayer_input(&be, (&gp).into(), (&gx).into());
        let gin = g.to_host(gin).unwrap();
        let (gpv, gxv) = ((&gp).into(), (&gx).into());
        dev.finish(&be, gpv, gxv, (&gsub).into(), (&mut gy).into(), mode);
        let (gpv, gxv, gdyv) = ((&gp).into(), (&gx).into(), (&gdy).into());
        let s = dev.backward_output(&be, gpv, (&mut gg).into(), gxv, gdyv, (&mut gdx).into());
        let g_d_output = g.to_host(s.d_output).unwrap();
        let g_sub_input = g.to_host(s.input).unwrap();
        let mut g_d_input = s.d_input;
        let g_d_input_host = g.to_host(g_d_input.shared()).unwrap();
        let written = up(g, &write(g_d_input_host.clone(), s.acc));
        be.copy(g_d_input.reborrow(), (&written).into());
        dev.backward_input(
            &be,
            (&gp).into(),
            (&mut gg).into(),
            (&gx).into(),
            (&mut gdx).into(),
        );
        be.sync().unwrap();

        let what = |s: &str| format!("add & norm {placement:?}: {s}");
        assert_near(&what("sublayer input"), &gin, &input, 1e-5);
        assert_near(&what("y"), &down(g, &gy), &y, 1e-5);
        assert_near(&what("d_output"), &g_d_output, &d_output, 1e-5);
        assert_near(&what("input"), &g_sub_input, &sub_input, 1e-5);
        assert_near(&what("d_input"), &g_d_input_host, &d_input, 1e-5);
        assert_near(&what("dx"), &down(g, &gdx), &dx, 1e-4);
        assert_near(&what("parameter gradients"), &down(g, &gg), &grad, 1e-4);
    }
}

#[test]
fn self_and_cross_attention_on_the_cuda_backend_match_the_cpu_backend() {
    use qkv::backend::{Backend, Cpu, Cuda};
    use qkv::model::attention::{CrossAttention, SelfAttention};
    use qkv::model::config::{Family, ModelConfig};
    use qkv::params::ParamBuilder;

    let Some(g) = gpu() else { return };
    let g = std::sync::Arc::new(g);
    let mut rng = Rng::new(47);
    let (batch, tq, tk) = (3, 11, 7);
    // Head widths 64 (tensor cores with bf16) and 40 (f32 kernels either way).
    for (d_model, heads) in [(128, 2), (80, 2)] {
        let mut cfg = ModelConfig::preset("tiny", Family::Seq2seq, 50).unwrap();
        (cfg.d_model, cfg.n_heads) = (d_model, heads);
        let c = d_model;
        let x = random_vec(&mut rng, batch * tq * c, 1.0);
        let memory = random_vec(&mut rng, batch * tk * c, 1.0);
        let dy = random_vec(&mut rng, batch * tq * c, 1.0);
        let dx0 = random_vec(&mut rng, batch * tq * c, 1.0);
        // The last two keys of the second row are padding.
        let padding: Vec<bool> = (0..batch * tq)
            .map(|i| i / tq == 1 && i % tq >= tq - 2)
            .collect();
        let memory_padding: Vec<bool> = (0..batch * tk).map(|i| i % tk == tk - 1).collect();
        let (gx, gmem, gdy) = (up(&g, &x), up(&g, &memory), up(&g, &dy));
        for (bf16, tol) in [(false, 5e-3), (true, 3e-2)] {
            let be = Cuda::new(g.clone(), bf16);
            for causal in [false, true] {
                let masks = Masks {
                    key_padding: Some(&padding),
                    causal,
                    window: None,
                };
                let mut pb = ParamBuilder::default();
                let mut cpu: SelfAttention = SelfAttention::new(&mut pb, "attn", &cfg);
                let mut dev: SelfAttention<Cuda> =
                    SelfAttention::new(&mut ParamBuilder::default(), "attn", &cfg);
                let p = layer_params(pb, &mut rng);
                let y = cpu.forward(&Cpu, &p, &x, batch, tq, &masks).to_vec();
                let (mut grad, mut dx) = (vec![0.0; p.len()], dx0.clone());
                cpu.backward(&Cpu, &p, &mut grad, &x, &dy, Some(&mut dx), Acc::Add);

                let gp = up(&g, &p);
                let (mut gg, mut gdx) = (up(&g, &vec![0.0; p.len()]), up(&g, &dx0));
                let gy = dev.forward(&be, (&gp).into(), (&gx).into(), batch, tq, &masks);
                let gy = g.to_host(gy).unwrap();
                let (gpv, gxv, gdyv) = ((&gp).into(), (&gx).into(), (&gdy).into());
                let gdxv = Some((&mut gdx).into());
                dev.backward(&be, gpv, (&mut gg).into(), gxv, gdyv, gdxv, Acc::Add);
                be.sync().unwrap();
                let what =
                    |s: &str| format!("self-attention C {c} causal {causal} bf16 {bf16}: {s}");
                assert_near(&what("output"), &gy, &y, tol);
                assert_near(&what("dx"), &down(&g, &gdx), &dx, tol);
                assert_near(&what("parameter gradients"), &down(&g, &gg), &grad, tol);
            }

            let mut pb = ParamBuilder::default();
            let mut cpu: CrossAttention = CrossAttention::new(&mut pb, "cross", &cfg);
            let mut dev: CrossAttention<Cuda> =
                CrossAttention::new(&mut ParamBuilder::default(), "cross", &cfg);
            let p = layer_params(pb, &mut rng);
            let mp = Some(memory_padding.as_slice());
            let y = cpu
                .forward(&Cpu, &p, &x, &memory, batch, tq, tk, mp)
                .to_vec();
            let (mut grad, mut dx) = (vec![0.0; p.len()], dx0.clone());
            let mut dmem = vec![0.5; memory.len()];
            cpu.backward(
                &Cpu,
                &p,
                &mut grad,
                &x,
                &memory,
                &dy,
                &mut dx,
                Acc::Add,
                &mut dmem,
            );

            let gp = up(&g, &p);
            let (mut gg, mut gdx) = (up(&g, &vec![0.0; p.len()]), up(&g, &dx0));
            let mut gdmem = up(&g, &vec![0.5; memory.len()]);
            let (gpv, gxv, gmv) = ((&gp).into(), (&gx).into(), (&gmem).into());
            let gy = dev.forward(&be, gpv, gxv, gmv, batch, tq, tk, mp);
            let gy = g.to_host(gy).unwrap();
            let (gpv, gxv, gmv, gdyv) = ((&gp).into(), (&gx).into(), (&gmem).into(), (&gdy).into());
            let (ggv, gdxv, gdmv) = ((&mut gg).into(), (&mut gdx).into(), (&mut gdmem).into());
            dev.backward(&be, gpv, ggv, gxv, gmv, gdyv, gdxv, Acc::Add, gdmv);
            be.sync().unwrap();
            let what = |s: &str| format!("cross-attention C {c} bf16 {bf16}: {s}");
            assert_near(&what("output"), &gy, &y, tol);
            assert_near(&what("dx"), &down(&g, &gdx), &dx, tol);
            assert_near(&what("dmemory"), &down(&g, &gdmem), &dmem, tol);
            assert_near(&what("parameter gradients"), &down(&g, &gg), &grad, tol);
        }
    }
}

/// A decoder stack (self-attention with a causal and a padding mask, cross-attention over a
/// padded memory, feed-forward) in both norm placements, with dropout: output, every
/// parameter gradient, the input's and the memory's gradients.
#[test]
fn a_decoder_stack_on_the_cuda_backend_matches_the_cpu_backend() {
    use qkv::backend::{Backend, Cpu, Cuda};
    use qkv::model::config::{Family, ModelConfig, NormPlacement};
    use qkv::model::stack::{InputGrad, Memory, Stack};
    use qkv::model::{Mode, SiteIds};
    use qkv::params::ParamBuilder;

    let Some(g) = gpu() else { return };
    let be = Cuda::new(std::sync::Arc::new(g), false);
    let g = be.gpu();
    let mut rng = Rng::new(53);
    let (batch, t, s_len) = (2, 9, 6);
    for placement in [NormPlacement::Post, NormPlacement::Pre] {
        let mut cfg = ModelConfig::preset("tiny", Family::Seq2seq, 50).unwrap();
        cfg.norm = placement;
        let c = cfg.d_model;
        let mode = Mode::train(0.1, 0.0, 17);
        // Built alike, the two stacks have one parameter layout and one set of dropout sites.
        let mut pb = ParamBuilder::default();
        let mut cpu: Stack = Stack::new(&mut pb, "decoder", 2, true, &cfg, &mut SiteIds::default());
        let mut dev: Stack<Cuda> = Stack::new(
            &mut ParamBuilder::default(),
            "decoder",
            2,
            true,
            &cfg,
            &mut SiteIds::default(),
        );
        let p = layer_params(pb, &mut rng);
        let x = random_vec(&mut rng, batch * t * c, 1.0);
        let memory = random_vec(&mut rng, batch * s_len * c, 1.0);
        let dy = random_vec(&mut rng, batch * t * c, 1.0);
        let padding: Vec<bool> = (0..batch * t).map(|i| i >= 2 * t - 3).collect();
        let memory_padding: Vec<bool> = (0..batch * s_len)
            .map(|i| i % s_len == 0 && i > 0)
            .collect();
        let masks = Masks {
            key_padding: Some(&padding),
            causal: true,
            window: None,
        };

        let mem = Memory {
            states: memory.as_slice(),
            len: s_len,
            padding: Some(&memory_padding),
        };
        let y = cpu
            .forward(&Cpu, &p, &x, batch, t, &masks, Some(mem), mode)
            .to_vec();
        let (mut grad, mut dmem) = (vec![0.0; p.len()], vec![0.0; memory.len()]);
        let dx = cpu
            .backward(
                &Cpu,
                &p,
                &mut grad,
                &dy,
                InputGrad::Wanted,
                Some((&memory, &mut dmem)),
                &mut |_| {},
            )
            .to_vec();

        let (gp, gx, gmem, gdy) = (up(g, &p), up(g, &x), up(g, &memory), up(g, &dy));
        let (mut gg, mut gdmem) = (up(g, &vec![0.0; p.len()]), up(g, &vec![0.0; memory.len()]));
        let mem = Memory {
            states: (&gmem).into(),
            len: s_len,
            padding: Some(&memory_padding),
        };
        let (gpv, gxv) = ((&gp).into(), (&gx).into());
        let gy = dev.forward(&be, gpv, gxv, batch, t, &masks, Some(mem), mode);
        let gy = g.to_host(gy).unwrap();
        let memory_grad = Some(((&gmem).into(), (&mut gdmem).into()));
        let (gpv, ggv, gdyv) = ((&gp).into(), (&mut gg).into(), (&gdy).into());
        let gdx = dev.backward(
            &be,
            gpv,
            ggv,
            gdyv,
            InputGrad::Wanted,
            memory_grad,
            &mut |_| {},
        );
        let gdx = g.to_host(gdx).unwrap();
        be.sync().unwrap();
        let what = |s: &str| format!("decoder stack {placement:?}: {s}");
        assert_near(&what("output"), &gy, &y, 5e-3);
        assert_near(&what("dx"), &gdx, &dx, 5e-3);
        assert_near(&what("dmemory"), &down(g, &gdmem), &dmem, 5e-3);
        assert_near(&what("parameter gradients"), &down(g, &gg), &grad, 5e-3);
    }
}

/// Embeddings (sinusoidal and learned positions, with dropout), the tied output projection
/// and the loss: output, logits, loss and every gradient.
#[test]
fn embedding_projection_and_loss_on_the_cuda_backend_match_the_cpu_backend() {
    use qkv::backend::{Backend, Cpu, Cuda};
    use qkv::model::config::Positional;
    use qkv::model::embedding::Embedding;
    use qkv::model::linear::{project_out, project_out_backward};
    use qkv::model::{Mode, Tokens};
    use qkv::params::ParamBuilder;

    let Some(g) = gpu() else { return };
    let be = Cuda::new(std::sync::Arc::new(g), false);
    let g = be.gpu();
    let mut rng = Rng::new(59);
    let (batch, t, c, vocab, max_len) = (3, 7, 32, 41, 16);
    let ids: Vec<u32> = (0..batch * t).map(|i| (i * 7 % vocab) as u32).collect();
    let targets: Vec<u32> = (0..batch * t).map(|i| (i * 5 % vocab) as u32).collect();
    let tokens = Tokens::new(&ids, batch, t).unwrap();
    let mode = Mode::train(0.1, 0.1, 23);
    for positional in [Positional::Sinusoidal, Positional::Learned] {
        let (v, m, pos) = (vocab, max_len, positional);
        let mut pb = ParamBuilder::default();
        let mut cpu: Embedding = Embedding::new(
            &mut pb, "embed", None, "pos", v, c, m, pos, true, "tokens", 1,
        );
        let mut dev: Embedding<Cuda> = Embedding::new(
            &mut ParamBuilder::default(),
            "embed",
            None,
            "pos",
            v,
            c,
            m,
            pos,
            true,
            "tokens",
            1,
        );
        let table = cpu.table;
        let p = layer_params(pb, &mut rng);

        let x = cpu.forward(&Cpu, &p, tokens, mode).unwrap().to_vec();
        let mut logits = Vec::new();
        project_out(&Cpu, &p, table, &x, &mut logits, c);
        let mut dlogits = vec![0.0; logits.len()];
        let loss = Cpu.cross_entropy(Some(&mut dlogits), &logits, &targets, v, None, 0.1);
        let (mut grad, mut dx) = (vec![0.0; p.len()], vec![0.0; x.len()]);
        project_out_backward(&Cpu, &p, &mut grad, table, &x, &dlogits, &mut dx, c);
        cpu.backward(&Cpu, &p, &mut grad, &dx);

        let gp = up(g, &p);
        let mut gg = up(g, &vec![0.0; p.len()]);
        let gx = dev.forward(&be, (&gp).into(), tokens, mode).unwrap();
        let gx_host = g.to_host(gx).unwrap();
        let mut glogits = qkv::backend::DevBuf::default();
        project_out(&be, (&gp).into(), table, gx, &mut glogits, c);
        let glv = Cuda::view(&glogits, logits.len());
        let mut gdlogits = up(g, &vec![0.0; logits.len()]);
        let gloss = be.cross_entropy(Some((&mut gdlogits).into()), glv, &targets, v, None, 0.1);
        let mut gdx = up(g, &vec![0.0; x.len()]);
        let (gpv, ggv, gdl) = ((&gp).into(), (&mut gg).into(), (&gdlogits).into());
        project_out_backward(&be, gpv, ggv, table, gx, gdl, (&mut gdx).into(), c);
        let glogits_host = g.to_host(glv).unwrap();
        dev.backward(&be, (&gp).into(), (&mut gg).into(), (&gdx).into());
        be.sync().unwrap();
        let what = |s: &str| format!("{positional:?} positions: {s}");
        assert_near(&what("embeddings"), &gx_host, &x, 1e-5);
        assert_near(&what("logits"), &glogits_host, &logits, 5e-3);
        assert!(
            (gloss.mean - loss.mean).abs() <= 1e-3 * loss.mean.abs(),
            "{}",
            what("loss")
        );
        assert_eq!(gloss.count, loss.count);
        assert_near(&what("dx"), &down(g, &gdx), &dx, 5e-3);
        assert_near(&what("parameter gradients"), &down(g, &gg), &grad, 5e-3);
    }
}

/// One training forward and backward (its loss gradient scaled by `scale`) of the same model
/// on both backends: the loss, the logits and every parameter gradient agree.
fn assert_models_agree<M, D>(
    what: &str,
    cpu: &mut M,
    dev: &mut D,
    g: &Gpu,
    batch: &M::Batch,
    mode: qkv::model::Mode,
    scale: f32,
) where
    M: qkv::model::Model<qkv::backend::Cpu>,
    D: qkv::model::Model<qkv::backend::Cuda, Batch = M::Batch>,
{
    use qkv::backend::{Backend, Cuda};
    let f = cpu.forward(batch, mode).unwrap();
    let (loss, logits) = (f.loss, f.logits.to_vec());
    cpu.backward(scale).unwrap();
    let gf = dev.forward(batch, mode).unwrap();
    let gloss = gf.loss;
    let glogits = g.to_host(gf.logits).unwrap();
    dev.backward(scale).unwrap();
    let grad = g.to_host(Cuda::view(&dev.params().grad, dev.params().len()));
    let what = |s: &str| format!("{what}: {s}");
    assert!(
        (gloss.mean - loss.mean).abs() <= 1e-3 * loss.mean,
        "{}",
        what("loss")
    );
    assert_eq!(gloss.count, loss.count, "{}", what("counted targets"));
    assert_near(&what("logits"), &glogits, &logits, 5e-3);
    assert_near(&what("gradients"), &grad.unwrap(), &cpu.params().grad, 5e-3);
}

/// The language model, whole: the same model code on both backends from the same seed gives
/// the same loss, logits and gradients (pre-LN, learned positions, dropout, label smoothing).
#[test]
fn a_language_model_on_the_cuda_backend_matches_the_cpu_backend() {
    use qkv::backend::{Cpu, Cuda};
    use qkv::data::LmBatch;
    use qkv::model::config::{Family, ModelConfig, NormPlacement, Positional};
    use qkv::model::{LanguageModel, Mode};

    let Some(g) = gpu() else { return };
    let g = std::sync::Arc::new(g);
    let be = Cuda::new(g.clone(), false);
    let mut cfg = ModelConfig::preset("tiny", Family::Lm, 60).unwrap();
    (cfg.norm, cfg.positional, cfg.max_len) = (NormPlacement::Pre, Positional::Learned, 32);
    let mut cpu = LanguageModel::on(Cpu, cfg.clone(), 5).unwrap();
    let mut dev = LanguageModel::on(be, cfg, 5).unwrap();
    let blocks: Vec<Vec<u32>> = (0..3)
        .map(|r| {
            (0..13)
                .map(|i| (1 + (r * 17 + i * 7) % 59) as u32)
                .collect()
        })
        .collect();
    let blocks: Vec<&[u32]> = blocks.iter().map(|b| b.as_slice()).collect();
    let batch = LmBatch::new(&blocks);
    let mode = Mode::train(0.1, 0.1, 31);

    assert_models_agree("language model", &mut cpu, &mut dev, &g, &batch, mode, 0.5);
}

/// The paper's model, whole: encoder, decoder over the padded memory, tied projection, from
/// one seed on both backends: loss, logits and every gradient (post-LN, sinusoidal positions,
/// dropout, label smoothing, sources and targets of different lengths).
#[test]
fn a_sequence_to_sequence_model_on_the_cuda_backend_matches_the_cpu_backend() {
    use qkv::backend::{Cpu, Cuda};
    use qkv::data::Seq2SeqBatch;
    use qkv::model::config::{Family, ModelConfig};
    use qkv::model::{Mode, Seq2Seq};

    let Some(g) = gpu() else { return };
    let g = std::sync::Arc::new(g);
    let mut cfg = ModelConfig::preset("tiny", Family::Seq2seq, 60).unwrap();
    cfg.max_len = 32;
    let mut cpu = Seq2Seq::on(Cpu, cfg.clone(), 7).unwrap();
    let mut dev = Seq2Seq::on(Cuda::new(g.clone(), false), cfg, 7).unwrap();
    let rows: Vec<(Vec<u32>, Vec<u32>)> = (0..3)
        .map(|r| {
            let src = (0..5 + 3 * r)
                .map(|i| (3 + (r * 11 + i * 5) % 57) as u32)
                .collect();
            let tgt = (0..9 - 2 * r)
                .map(|i| (3 + (r * 13 + i * 3) % 57) as u32)
                .collect();
            (src, tgt)
        })
        .collect();
    let pairs: Vec<(&[u32], &[u32])> = rows.iter().map(|(s, t)| (&s[..], &t[..])).collect();
    let batch = Seq2SeqBatch::new(&pairs, 0, 1, 2);
    let mode = Mode::train(0.1, 0.1, 37);

    assert_models_agree(
        "sequence to sequence",
        &mut cpu,
        &mut dev,
        &g,
        &batch,
        mode,
        1.0,
    );
}

#[test]
fn pooling_forward_and_backward_match_the_cpu() {
    use qkv::kernels::pool::{pool_backward, pool_forward, Pool};
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(61);
    let (b, t, c) = (4, 9, 40);
    let h = random_vec(&mut rng, b * t * c, 1.0);
    let dp = random_vec(&mut rng, b * c, 1.0);
    // Row 2 is all padding (the mean counts one position), row 1 half.
    let pad: Vec<bool> = (0..b * t)
        .map(|i| i / t == 2 || (i / t == 1 && i % t >= 4))
        .collect();
    for pool in [Pool::First, Pool::Mean] {
        let mut want = vec![0.0; b * c];
        pool_forward(&mut want, &h, &pad, t, c, pool);
        let mut out = up(&g, &vec![1.0; b * c]);
        g.pool_forward(&mut out, &up(&g, &h), &pad, (t, c), pool)
            .unwrap();
        assert_near(&format!("{pool:?} pool"), &down(&g, &out), &want, 1e-6);
        let mut want_dh = vec![0.0; b * t * c];
        pool_backward(&mut want_dh, &dp, &pad, t, c, pool);
        let mut dh = up(&g, &vec![1.0; b * t * c]);
        g.pool_backward(&mut dh, &up(&g, &dp), &pad, (t, c), pool)
            .unwrap();
        assert_near(
            &format!("{pool:?} pool backward"),
            &down(&g, &dh),
            &want_dh,
            1e-6,
        );
    }
}

/// The classifier, whole, in both poolings: loss, logits and every gradient from one seed.
#[test]
fn a_classifier_on_the_cuda_backend_matches_the_cpu_backend() {
    use qkv::backend::{Cpu, Cuda};
    use qkv::data::ClassifyBatch;
    use qkv::model::config::{Family, ModelConfig, NormPlacement, Pooling, Positional};
    use qkv::model::{Classifier, Mode};

    let Some(g) = gpu() else { return };
    let g = std::sync::Arc::new(g);
    let rows: Vec<(Vec<u32>, u32)> = (0..4)
        .map(|r| {
            (
                (0..4 + 2 * r)
                    .map(|i| (1 + (r * 7 + i * 3) % 49) as u32)
                    .collect(),
                r as u32 % 3,
            )
        })
        .collect();
    let examples: Vec<(&[u32], u32)> = rows.iter().map(|(x, y)| (&x[..], *y)).collect();
    let batch = ClassifyBatch::new(&examples, 0);
    let mode = Mode::train(0.1, 0.0, 43);
    // The last: a BERT-family classifier as `pretrained` fine-tuning builds it from a Hugging
    // Face encoder (learned positions, token types, embedding LayerNorm, GELU, post-LN).
    for (pooling, bert) in [
        (Pooling::Mean, false),
        (Pooling::First, false),
        (Pooling::Mean, true),
    ] {
        let mut cfg = ModelConfig::preset("tiny", Family::Classifier, 50).unwrap();
        (cfg.n_classes, cfg.max_len, cfg.pooling) = (3, 16, pooling);
        if bert {
            (cfg.positional, cfg.token_types, cfg.embed_norm) = (Positional::Learned, 2, true);
            (cfg.activation, cfg.norm, cfg.layer_norm_eps) =
                (Activation::Gelu, NormPlacement::Post, 1e-12);
            cfg.scale_embeddings = false;
        }
        let mut cpu = Classifier::on(Cpu, cfg.clone(), 9).unwrap();
        let mut dev = Classifier::on(Cuda::new(g.clone(), false), cfg, 9).unwrap();
        let what = format!("classifier, {pooling:?} pooling, BERT-style {bert}");
        assert_models_agree(&what, &mut cpu, &mut dev, &g, &batch, mode, 1.0);
    }
}

/// Attention kinds the GPU does not run are an error naming what to use, reported where the
/// model next synchronises: never a wrong result.
#[test]
fn attention_kinds_the_gpu_does_not_run_are_named_errors() {
    use qkv::backend::{Backend, Cuda};
    use qkv::model::attention::SelfAttention;
    use qkv::model::config::{AttentionKind, Family, ModelConfig};
    use qkv::params::ParamBuilder;

    let Some(g) = gpu() else { return };
    let be = Cuda::new(std::sync::Arc::new(g), false);
    let (batch, t) = (2, 5);
    for (kind, named) in [
        (AttentionKind::Materialized, "materialized attention"),
        (AttentionKind::Linear, "linear attention"),
    ] {
        let mut cfg = ModelConfig::preset("tiny", Family::Lm, 50).unwrap();
        cfg.attention = kind;
        let mut pb = ParamBuilder::default();
        let mut attn: SelfAttention<Cuda> = SelfAttention::new(&mut pb, "attn", &cfg);
        let p = up(be.gpu(), &pb.build(1).unwrap().data);
        let x = up(be.gpu(), &vec![0.5; batch * t * cfg.d_model]);
        attn.forward(&be, (&p).into(), (&x).into(), batch, t, &Masks::default());
        let err = be.sync().unwrap_err().to_string();
        assert!(
            err.contains(named) && err.contains("flash"),
            "{kind:?}: {err}"
        );
        // The failure is reported once; the backend is usable again after.
        be.sync().unwrap();
        // A model of that kind is refused when it is moved to the GPU, before any work.
        let cpu = qkv::model::LanguageModel::new(cfg, 1).unwrap();
        let err = qkv::model::ToBackend::to_backend(&cpu, be.clone()).err();
        let err = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(named), "{kind:?}: {err:?}");
    }
}

/// The cache's block copies in one launch: the CPU's `copy_within` results, and copies whose
/// targets overlap (which one launch would race on) refused.
#[test]
fn block_copies_within_a_buffer_match_the_cpu() {
    use qkv::backend::{Backend, Cpu};
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(12);
    let data = random_vec(&mut rng, 10 * 700, 1.0);
    // Blocks of 700: copies up and down, an empty one, one of a whole block.
    let copies = [
        (0, 2100, 500),
        (700, 4900, 650),
        (6300, 1400, 3),
        (3500, 5600, 0),
        (2800, 5600, 700),
    ];
    let mut want = data.clone();
    Cpu.copy_within(&mut want, &copies);
    let mut dev = up(&g, &data);
    g.copy_within(&mut dev, &copies).unwrap();
    assert_eq!(down(&g, &dev), want);
    let err = g
        .copy_within(&mut dev, &[(0, 700, 10), (1400, 705, 10)])
        .unwrap_err();
    assert!(err.to_string().contains("overlaps"), "{err}");
    let err = g.copy_within(&mut dev, &[(0, 6995, 10)]).unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");
}

/// Ten updates of the trainer (token-budget batches, accumulation, AdamW with clipping, the
/// schedule, dropout, validation, checkpoints) on the CPU and on the GPU from the same weights,
/// the GPU run as `train.device` cuda runs it (the model's `ToBackend` twin): the loss
/// trajectories, the validations and the saved weights agree within TF32's rounding.
#[test]
fn ten_trainer_updates_on_the_gpu_follow_the_cpu_trajectory() {
    use qkv::backend::{Backend, Cuda};
    use qkv::data::Seq2SeqBatch;
    use qkv::model::{Family, Model, ModelConfig, Seq2Seq, ToBackend};
    use qkv::schedule::Schedule;
    use qkv::train::{
        loss_tally, Observer, Part, RunDir, StepLog, Tally, TrainConfig, TrainData, Trainer,
        Validation,
    };

    /// Reversed random strings, eight pairs a batch; validation on the first batch.
    struct Reverse(Vec<Seq2SeqBatch>);
    impl<B: Backend, M: Model<B, Batch = Seq2SeqBatch>> TrainData<M, B> for Reverse {
        fn epoch(&self, _: u64) -> qkv::Result<Vec<Seq2SeqBatch>> {
            Ok(self.0.clone())
        }
        fn validate(&mut self, m: &mut M, part: Part) -> qkv::Result<Tally> {
            loss_tally(m, &self.0[..1], part)
        }
    }
    #[derive(Default)]
    struct Seen(Vec<f32>, Vec<f64>);
    impl Observer for Seen {
        fn on_step(&mut self, log: &StepLog) {
            self.0.push(log.loss);
        }
        fn on_validation(&mut self, _: u64, v: &Validation) {
            self.1.push(v.loss);
        }
    }

    let Some(g) = gpu() else { return };
    let be = Cuda::new(std::sync::Arc::new(g), false);
    let mut rng = Rng::new(4);
    let batches: Vec<Seq2SeqBatch> = (0..3)
        .map(|_| {
            let seqs: Vec<Vec<u32>> = (0..8)
                .map(|_| {
                    let len = 3 + rng.below(6) as usize;
                    (0..len).map(|_| 3 + rng.below(40) as u32).collect()
                })
                .collect();
            let rev: Vec<Vec<u32>> = seqs
                .iter()
                .map(|s| s.iter().rev().copied().collect())
                .collect();
            let pairs: Vec<(&[u32], &[u32])> = seqs
                .iter()
                .zip(&rev)
                .map(|(s, t)| (&s[..], &t[..]))
                .collect();
            Seq2SeqBatch::new(&pairs, 0, 1, 2)
        })
        .collect();
    let cfg = ModelConfig::preset("tiny", Family::Seq2seq, 50).unwrap();
    let train = TrainConfig {
        max_steps: 10,
        accumulate: 2,
        schedule: Schedule::Cosine {
            peak: 3e-3,
            min: 1e-4,
            warmup: 3,
            total: 10,
        },
        valid_every: 5,
        save_every: 5,
        seed: 3,
        ..TrainConfig::default()
    };
    let tmp = std::env::temp_dir().join(format!("qkv-cuda-trainer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let run = |name: &str| RunDir {
        path: tmp.join(name),
        extra_files: vec![],
    };
    let host = Seq2Seq::new(cfg, 1).unwrap();
    let twin = host.to_backend(be).unwrap();
    let mut cpu_seen = Seen::default();
    let mut cpu = Trainer::new(host, train.clone(), Some(run("cpu"))).unwrap();
    cpu.fit(&mut Reverse(batches.clone()), &mut cpu_seen)
        .unwrap();
    let mut gpu_seen = Seen::default();
    let mut dev = Trainer::new(twin, train, Some(run("cuda"))).unwrap();
    dev.fit(&mut Reverse(batches), &mut gpu_seen).unwrap();

    assert_eq!(gpu_seen.0.len(), 10);
    for (i, (a, b)) in gpu_seen.0.iter().zip(&cpu_seen.0).enumerate() {
        assert!(
            (a - b).abs() <= 1e-2 * b,
            "update {}: loss {a} vs {b}",
            i + 1
        );
    }
    assert_eq!(gpu_seen.1.len(), cpu_seen.1.len());
    for (a, b) in gpu_seen.1.iter().zip(&cpu_seen.1) {
        assert!((a - b).abs() <= 1e-2 * b, "validation loss {a} vs {b}");
    }
    // The last checkpoint: `best/` could be another update's where validations nearly tie.
    let saved = |name: &str| {
        let mut m = Seq2Seq::new(cpu.model.config.clone(), 2).unwrap();
        let last = tmp.join(name).join("checkpoint-0000010");
        qkv::checkpoint::load(&last, &m.config.clone(), &mut m.params).unwrap();
        m.params.data
    };
    assert_near("saved weights", &saved("cuda"), &saved("cpu"), 2e-2);
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The PyTorch golden fixtures (`scripts/reference/make_fixtures.py`: the three families, both
/// norm placements) on the GPU: each fixture's model moved to the CUDA backend
/// (`ToBackend`), against PyTorch's float64 logits, loss, every parameter gradient and 10-step
/// AdamW loss trajectory. Tolerances, relative as `golden.rs`'s 1e-4 for the CPU in f32:
/// 5e-3 with TF32 products (10-bit mantissas), 3e-2 with bf16 operands (8-bit).
#[test]
fn golden_fixtures_match_pytorch_on_the_gpu() {
    use common::{fixture, fixture_case, Case};
    use qkv::backend::Cuda;
    use qkv::model::ToBackend;
    let Some(g) = gpu() else { return };
    let g = std::sync::Arc::new(g);
    for (bf16, tol) in [(false, 5e-3), (true, 3e-2)] {
        for name in [
            "seq2seq_post",
            "seq2seq_pre",
            "classifier_post",
            "classifier_pre",
            "lm_post",
            "lm_pre",
        ] {
            let f = fixture(name);
            let be = Cuda::new(g.clone(), bf16);
            let what = format!("{name} ({})", if bf16 { "bf16" } else { "tf32" });
            match fixture_case(&f) {
                Case::Seq2Seq(m, b) => golden_on(&what, &f, m.to_backend(be).unwrap(), &b, tol),
                Case::Classifier(m, b) => golden_on(&what, &f, m.to_backend(be).unwrap(), &b, tol),
                Case::Lm(m, b) => golden_on(&what, &f, m.to_backend(be).unwrap(), &b, tol),
            }
        }
    }
}

/// `golden.rs`'s checks for a model on the CUDA backend, within `tol`.
fn golden_on<M: qkv::model::Model<qkv::backend::Cuda>>(
    what: &str,
    f: &qkv::checkpoint::TensorFile,
    mut m: M,
    batch: &M::Batch,
    tol: f32,
) {
    use common::{fixture_adamw, fixture_f32s, fixture_meta, train_mode};
    use qkv::backend::{Backend, Cuda};
    use qkv::model::Mode;
    use qkv::optim::AdamW;
    let (be, n) = (m.backend().clone(), m.params().len());
    let logits = {
        let out = m.forward(batch, Mode::EVAL).unwrap();
        be.to_host(out.logits).unwrap().into_owned()
    };
    let e = rel_err(&logits, &fixture_f32s(f, "output.logits"));
    assert!(e <= tol, "{what}: logits relative error {e:.2e}");
    let ls = fixture_meta(f, "label_smoothing");
    let loss_and_grad = |m: &mut M| {
        m.params_mut().zero_grad_on(&be);
        let loss = m.forward(batch, train_mode(ls)).unwrap().loss.mean;
        m.backward(1.0).unwrap();
        loss
    };
    let loss = loss_and_grad(&mut m);
    let want = fixture_f32s(f, "output.loss")[0];
    assert!(
        (loss - want).abs() <= tol * want.abs(),
        "{what}: loss {loss}, PyTorch {want}"
    );
    let grad = be.to_host(Cuda::view(&m.params().grad, n)).unwrap();
    for s in &m.params().specs {
        let want = fixture_f32s(f, &format!("grad.{}", s.name));
        let e = rel_err(&grad[s.offset..s.offset + s.len], &want);
        assert!(
            e <= tol,
            "{what}: gradient of {}: relative error {e:.2e}",
            s.name
        );
    }
    let mut opt = AdamW::on(&be, fixture_adamw(f), n);
    let lr = fixture_meta(f, "lr");
    for (i, &w) in fixture_f32s(f, "train.losses").iter().enumerate() {
        let loss = loss_and_grad(&mut m);
        let rel = (loss - w).abs() / w.abs();
        assert!(
            rel <= tol,
            "{what}: loss at step {i} is {loss}, PyTorch {w}"
        );
        opt.step_on(&be, m.params_mut(), lr).unwrap();
    }
}

/// `train.device` cuda end to end, as `qkv train --device cuda` runs it: a tiny translation
/// job (BPE tokenizer, token batches, checkpoints, `best/` chosen by validation BLEU, decoded
/// on the GPU) trains there and its best checkpoint is scored on the test set; the same job
/// on the CPU ends at a validation loss within 5%; `qkv eval --device cuda` of the GPU run's
/// best checkpoint decodes the test set there to the CPU's BLEU within five points (TF32 may
/// flip a near-tie of a model trained this briefly).
#[test]
fn a_translation_job_trains_on_the_gpu_end_to_end() {
    use qkv::backend::Device;
    use qkv::tasks::Report;
    use qkv::train::{read_metrics, Outcome, RowKind};
    if gpu().is_none() {
        return;
    }
    let dir = common::scratch("cuda-job");
    let words = [
        "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho",
    ];
    let mut rng = Rng::new(9);
    let mut corpus = |n: usize| -> String {
        (0..n)
            .map(|_| {
                let len = 2 + rng.below(5) as usize;
                let s: Vec<&str> = (0..len).map(|_| words[rng.below(8) as usize]).collect();
                let t: Vec<&str> = s.iter().rev().copied().collect();
                format!("{}\t{}\n", s.join(" "), t.join(" "))
            })
            .collect()
    };
    for (file, n) in [("train.tsv", 300), ("valid.tsv", 20), ("test.tsv", 20)] {
        std::fs::write(dir.join(file), corpus(n)).unwrap();
    }
    let config = r#"{
  "task": "translate",
  "data": { "train": "train.tsv", "valid": "valid.tsv", "test": "test.tsv" },
  "tokenizer": { "vocab_size": 60 },
  "model": { "preset": "tiny", "d_model": 32, "n_heads": 2, "d_ff": 64, "max_len": 24, "dropout": 0.0 },
  "train": {
    "max_steps": 60, "max_tokens": 256,
    "schedule": { "kind": "cosine", "peak": 0.003, "min": 0.0001, "warmup": 10, "total": 60 },
    "valid_every": 20, "save_every": 20, "best_metric": "bleu", "device": "cuda"
  },
  "decode": { "beam": 2 },
  "out": "run",
  "samples": 1
}"#;
    let path = dir.join("job.json");
    std::fs::write(&path, config).unwrap();
    let mut job = qkv::job::Job::load(&path).unwrap();
    let report = qkv::pipeline::train(&job, false, &mut ()).unwrap();
    assert_eq!(report.outcome, Outcome::Finished);
    match &report.test {
        Some(Report::Translate(r)) => assert!(r.bleu.score.is_finite(), "{r}"),
        other => panic!("no translation report: {other:?}"),
    }
    let last_valid = |run: &str| {
        let rows = read_metrics(&dir.join(run).join("metrics.csv")).unwrap();
        let v = rows.iter().rfind(|r| r.kind == RowKind::Valid).unwrap();
        assert!(v.metric.as_ref().is_some_and(|m| m.0 == "bleu"), "{run}");
        v.loss
    };
    let gpu_loss = last_valid("run");
    let bleu_on = |device| {
        let mut best = qkv::model_dir::ModelDir::load(&dir.join("run/best")).unwrap();
        let test = dir.join("test.tsv");
        match qkv::pipeline::evaluate_on(&mut best, &test, None, 2048, device).unwrap() {
            Report::Translate(r) => r.bleu.score,
            other => panic!("no translation report: {other:?}"),
        }
    };
    let (gpu_bleu, cpu_bleu) = (bleu_on(Device::Cuda), bleu_on(Device::Cpu));
    assert!(
        (gpu_bleu - cpu_bleu).abs() <= 5.0,
        "test BLEU decoded on the GPU {gpu_bleu}, on the CPU {cpu_bleu}"
    );
    job.train.device = Device::Cpu;
    job.out = Some(dir.join("run-cpu"));
    qkv::pipeline::train(&job, false, &mut ()).unwrap();
    let cpu_loss = last_valid("run-cpu");
    assert!(
        (gpu_loss - cpu_loss).abs() <= 0.05 * cpu_loss,
        "validation loss on the GPU {gpu_loss}, on the CPU {cpu_loss}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A language-model job trains on the GPU, and `qkv eval --device cuda` scores its best
/// checkpoint there: the same loss as the CPU's evaluation within TF32's rounding.
#[test]
fn a_language_model_trains_and_evaluates_on_the_gpu() {
    use qkv::backend::Device;
    use qkv::model_dir::ModelDir;
    use qkv::tasks::Report;
    if gpu().is_none() {
        return;
    }
    let dir = common::scratch("cuda-lm");
    let text = "to be or not to be that is the question\n".repeat(80);
    std::fs::write(dir.join("text.txt"), &text).unwrap();
    let config = r#"{
  "task": "lm",
  "data": { "train": "text.txt", "valid": "text.txt" },
  "tokenizer": { "vocab_size": 60 },
  "model": { "preset": "tiny", "d_model": 32, "n_heads": 2, "d_ff": 64, "max_len": 24 },
  "train": { "max_steps": 40, "max_tokens": 256, "device": "cuda" },
  "out": "run"
}"#;
    let path = dir.join("job.json");
    std::fs::write(&path, config).unwrap();
    let job = qkv::job::Job::load(&path).unwrap();
    qkv::pipeline::train(&job, false, &mut ()).unwrap();
    let mut best = ModelDir::load(&dir.join("run").join("best")).unwrap();
    let data = dir.join("text.txt");
    let loss = |r: Report| match r {
        Report::Lm(r) => r.loss,
        other => panic!("not a language-model report: {other:?}"),
    };
    let on_gpu = qkv::pipeline::evaluate_on(&mut best, &data, None, 1024, Device::Cuda).unwrap();
    let on_cpu = qkv::pipeline::evaluate(&mut best, &data, None, 1024).unwrap();
    let (g, c) = (loss(on_gpu), loss(on_cpu));
    assert!(
        (g - c).abs() <= 1e-3 * c,
        "loss on the GPU {g}, on the CPU {c}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Inference on the GPU (`qkv classify|embed --device cuda`): a classifier's twin gives the
/// CPU's class probabilities and unit-length sentence embeddings, over batches of varied
/// lengths with padding.
#[test]
fn classifier_predictions_and_embeddings_on_the_gpu_match_the_cpu() {
    use qkv::backend::Cuda;
    use qkv::model::{Classifier, Family, NormPlacement, ToBackend};
    use qkv::tasks::classify::{embed_ids, predict_ids};
    let Some(g) = gpu() else { return };
    let cfg = common::tiny(Family::Classifier, NormPlacement::Pre, true, false);
    let pad = cfg.pad_id;
    let mut cpu = Classifier::new(cfg, 3).unwrap();
    let mut dev = cpu
        .to_backend(Cuda::new(std::sync::Arc::new(g), false))
        .unwrap();
    let mut rng = Rng::new(8);
    let ids: Vec<Vec<u32>> = (0..11)
        .map(|_| {
            let len = 2 + rng.below(9) as usize;
            (0..len).map(|_| 1 + rng.below(12) as u32).collect()
        })
        .collect();
    let flat = |rows: Vec<Vec<f32>>| rows.concat();
    let (want, got) = (
        flat(predict_ids(&mut cpu, &ids, pad, 40).unwrap()),
        flat(predict_ids(&mut dev, &ids, pad, 40).unwrap()),
    );
    assert_near("class probabilities", &got, &want, 2e-3);
    let (want, got) = (
        flat(embed_ids(&mut cpu, &ids, pad, 40).unwrap()),
        flat(embed_ids(&mut dev, &ids, pad, 40).unwrap()),
    );
    assert_near("embeddings", &got, &want, 2e-3);
}

/// KV-cache decoding on the GPU, teacher-forced through beam search's reorders (rows repeated,
/// dropped and permuted; blocks handed over, copied for repeated parents, grown past the
/// batch): every step's logits equal the GPU's own full forward over the row's history, and
/// the CPU's step on the same weights (both norm placements; a window on the pre-LN model).
#[test]
fn kv_cache_decoding_on_the_gpu_equals_the_full_forward_and_the_cpu() {
    use qkv::backend::{Cpu, Cuda};
    use qkv::model::config::{Family, ModelConfig, NormPlacement};
    use qkv::model::{Incremental, Seq2Seq, ToBackend, Tokens};

    let Some(g) = gpu() else { return };
    let be = Cuda::new(std::sync::Arc::new(g), false);
    for norm in [NormPlacement::Post, NormPlacement::Pre] {
        let mut cfg = ModelConfig::preset("tiny", Family::Seq2seq, 60).unwrap();
        (cfg.norm, cfg.max_len, cfg.dropout) = (norm, 32, 0.0);
        if norm == NormPlacement::Pre {
            cfg.attention_window = Some(3);
        }
        let mut cpu = Seq2Seq::on(Cpu, cfg, 9).unwrap();
        let mut dev = cpu.to_backend(be.clone()).unwrap();
        let mut rng = Rng::new(4);
        let (b, s, t) = (3, 7, 6);
        let src = padded_source(&mut rng, b, s, 60);
        let v = cpu.vocab();
        let tokens = Tokens::new(&src, b, s).unwrap();
        let mut cache = cpu.start_decoding(tokens, t).unwrap();
        let mut dev_cache = dev.start_decoding(tokens, t).unwrap();
        // Per cache row: (source row, tokens fed so far).
        let mut rows: Vec<(usize, Vec<u32>)> = (0..b).map(|i| (i, Vec::new())).collect();
        for (pos, order) in std::iter::once(&[][..]).chain(BEAM_ORDERS).enumerate() {
            if pos > 0 {
                cache.reorder(order);
                dev_cache.reorder(order);
                rows = order.iter().map(|&r| rows[r].clone()).collect();
            }
            let ids: Vec<u32> = (0..rows.len()).map(|_| 3 + rng.below(57) as u32).collect();
            for (row, &id) in rows.iter_mut().zip(&ids) {
                row.1.push(id);
            }
            let want = cpu.step(&mut cache, &ids).unwrap().to_vec();
            let got = dev.step(&mut dev_cache, &ids).unwrap().to_vec();
            let what = format!("{norm:?} step {pos}");
            assert_near(&format!("{what}: GPU step vs CPU step"), &got, &want, 5e-3);
            for (r, (source, history)) in rows.iter().enumerate() {
                let one = Tokens::new(&src[source * s..(source + 1) * s], 1, s).unwrap();
                let full = dev
                    .logits(one, Tokens::new(history, 1, history.len()).unwrap())
                    .unwrap();
                let full = be.gpu().to_host(full).unwrap();
                assert_near(
                    &format!("{what} row {r}: GPU step vs GPU full forward"),
                    &got[r * v..(r + 1) * v],
                    &full[pos * v..(pos + 1) * v],
                    5e-3,
                );
            }
        }
        // The cache is full: one more step is an error, not a launch past the blocks.
        assert!(dev.step(&mut dev_cache, &[3; 5]).is_err());
        // Continuous batching (a cache taking another's rows) is the CPU's: a named error.
        let fresh = dev.start_decoding(tokens, t).unwrap();
        let err = dev_cache.absorb(fresh).unwrap_err().to_string();
        assert!(err.contains("continuous batching"), "{err}");
        // int8 steps are the CPU's kernels: an error on the GPU, not f32 steps in silence.
        dev.int8_steps = true;
        let mut int8_cache = dev.start_decoding(tokens, t).unwrap();
        let err = dev.step(&mut int8_cache, &[1; 3]).unwrap_err().to_string();
        assert!(err.contains("int8"), "{err}");
        dev.int8_steps = false;
    }
}

/// Beam search and greedy decoding on the GPU give the CPU's outputs on the same weights
/// (scaled up so the model is confident: TF32's rounding then decides no choice), and a
/// language model generates the CPU's tokens.
#[test]
fn beam_search_and_generation_on_the_gpu_give_the_cpus_outputs() {
    use qkv::backend::{Cpu, Cuda};
    use qkv::decode::{beam_search, generate, greedy, BeamConfig, Choice};
    use qkv::model::config::{Family, ModelConfig};
    use qkv::model::{LanguageModel, Seq2Seq, ToBackend, Tokens};

    let Some(g) = gpu() else { return };
    let be = Cuda::new(std::sync::Arc::new(g), false);
    let mut cfg = ModelConfig::preset("tiny", Family::Seq2seq, 60).unwrap();
    (cfg.max_len, cfg.dropout) = (32, 0.0);
    let mut cpu = Seq2Seq::on(Cpu, cfg, 11).unwrap();
    qkv::model::Model::params_mut(&mut cpu)
        .data
        .iter_mut()
        .for_each(|w| *w *= 3.0);
    let mut dev = cpu.to_backend(be.clone()).unwrap();
    let mut rng = Rng::new(6);
    let (b, s, max) = (4, 8, 14);
    let src = padded_source(&mut rng, b, s, 60);
    let tokens = Tokens::new(&src, b, s).unwrap();
    let cfg = BeamConfig {
        beam: 4,
        nbest: 2,
        ..BeamConfig::default()
    };
    let mut cache = cpu.start_decoding(tokens, max).unwrap();
    let want = beam_search(&mut cpu, &mut cache, 1, 2, &cfg).unwrap();
    let mut cache = dev.start_decoding(tokens, max).unwrap();
    let got = beam_search(&mut dev, &mut cache, 1, 2, &cfg).unwrap();
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        for (k, (w, g)) in w.iter().zip(g).enumerate() {
            assert_eq!(g.tokens, w.tokens, "input {i} hypothesis {k}");
            assert!(
                (g.log_prob - w.log_prob).abs() <= 1e-3 * (1.0 + w.log_prob.abs()),
                "input {i} hypothesis {k}: log p {} on the GPU, {} on the CPU",
                g.log_prob,
                w.log_prob
            );
        }
    }
    let mut cache = cpu.start_decoding(tokens, max).unwrap();
    let want = greedy(&mut cpu, &mut cache, 1, 2).unwrap();
    let mut cache = dev.start_decoding(tokens, max).unwrap();
    assert_eq!(greedy(&mut dev, &mut cache, 1, 2).unwrap(), want, "greedy");

    let mut cfg = ModelConfig::preset("tiny", Family::Lm, 60).unwrap();
    (cfg.max_len, cfg.dropout) = (32, 0.0);
    let mut cpu = LanguageModel::on(Cpu, cfg, 12).unwrap();
    qkv::model::Model::params_mut(&mut cpu)
        .data
        .iter_mut()
        .for_each(|w| *w *= 3.0);
    let mut dev = cpu.to_backend(be).unwrap();
    let prompts = vec![vec![1, 7, 9], vec![1, 30, 31], vec![1, 5, 5]];
    let mut cache = cpu.start_decoding(3, 24);
    let want = generate(&mut cpu, &mut cache, &prompts, 2, &[Choice::Greedy]).unwrap();
    let mut cache = dev.start_decoding(3, 24);
    let got = generate(&mut dev, &mut cache, &prompts, 2, &[Choice::Greedy]).unwrap();
    assert_eq!(got, want, "language model");
}
