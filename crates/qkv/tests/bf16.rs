//! The bf16 matrix product against its reference twin: the same product of the bf16-rounded
//! operands, summed in f64. Skipped (with a message) on CPUs without avx512_bf16.
mod common;

use common::{random_vec, rel_err};
use half::bf16;
use qkv::kernels::bf16::{
    bf16_bits, linear_bf16, matmul_bf16, matmul_bf16_operands, padded_len, round_bf16, Operand,
};
use qkv::kernels::matmul::{
    matmul, matmul_naive, matmul_precision, set_matmul_precision, Layout, Precision,
};
use qkv::kernels::Acc;
use qkv::rng::Rng;

const LAYOUTS: [Layout; 2] = [Layout::RowMajor, Layout::Transposed];
const R: Layout = Layout::RowMajor;
const T: Layout = Layout::Transposed;

fn skip() -> bool {
    !qkv::kernels::bf16::run_bf16_test("bf16 kernels")
}

#[test]
fn rounding_matches_the_half_crate_bit_for_bit() {
    let mut rng = Rng::new(3);
    let mut xs: Vec<f32> = random_vec(&mut rng, 20_000, 10.0);
    xs.extend((0..20_000).map(|_| f32::from_bits(rng.next_u64() as u32)));
    // Ties (exactly half an ulp of bf16) round to even, both ways; specials survive.
    xs.extend([
        f32::from_bits(0x3F80_8000),
        f32::from_bits(0x3F81_8000),
        f32::from_bits(0x3F80_8001),
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        f32::MIN_POSITIVE / 3.0,
    ]);
    for x in xs {
        let want = bf16::from_f32(x);
        if x.is_nan() {
            assert!(bf16::from_bits(bf16_bits(x) as u16).is_nan(), "{x:?}");
            continue;
        }
        assert_eq!(
            bf16_bits(x) as u16,
            want.to_bits(),
            "x = {x:e} ({:#x})",
            x.to_bits()
        );
        assert_eq!(round_bf16(x), want.to_f32());
    }
}

#[test]
fn bf16_product_matches_the_rounded_reference_in_every_transpose_combination() {
    if skip() {
        return;
    }
    let mut rng = Rng::new(7);
    // Odd K (a zero-padded last pair), edges narrower than a 12 × 32 block, several tasks.
    for (m, k, n) in [
        (1, 1, 1),
        (13, 7, 33),
        (37, 19, 17),
        (130, 257, 90),
        (300, 64, 200),
        (40, 1001, 50), // deep and narrow: packing split along K as well
    ] {
        for ta in LAYOUTS {
            for tb in LAYOUTS {
                for acc in [Acc::Set, Acc::Add] {
                    let a = random_vec(&mut rng, m * k, 1.0);
                    let b = random_vec(&mut rng, k * n, 1.0);
                    let init = random_vec(&mut rng, m * n, 1.0);
                    let (mut got, mut want) = (init.clone(), init.clone());
                    matmul_bf16(&mut got, &a, &b, m, k, n, ta, tb, acc);
                    let ar: Vec<f32> = a.iter().map(|&x| round_bf16(x)).collect();
                    let br: Vec<f32> = b.iter().map(|&x| round_bf16(x)).collect();
                    matmul_naive(&mut want, &ar, &br, m, k, n, ta, tb, acc);
                    let e = rel_err(&got, &want);
                    assert!(e < 1e-5, "m{m} k{k} n{n} {ta:?} {tb:?} {acc:?}: {e}");
                }
            }
        }
    }
}

#[test]
fn operands_already_in_bf16_give_the_same_product_bit_for_bit() {
    if skip() {
        return;
    }
    let mut rng = Rng::new(9);
    // Even K with a padded buffer: the left operand is read as it is (no packing); odd K, or a
    // buffer without the padding rows: it is packed from bf16.
    for (m, k, n, padded) in [
        (37, 64, 50, true),
        (37, 64, 50, false),
        (25, 33, 40, true),
        (300, 128, 70, true),
    ] {
        for ta in LAYOUTS {
            for tb in LAYOUTS {
                let a = random_vec(&mut rng, m * k, 1.0);
                let b = random_vec(&mut rng, k * n, 1.0);
                let bits = |x: &[f32], len: usize| {
                    let mut v: Vec<u16> = x.iter().map(|&y| bf16_bits(y) as u16).collect();
                    // Padding rows hold garbage on purpose: only real rows may reach the output.
                    v.resize(len.max(x.len()), 0x7FC0);
                    v
                };
                let a16 = bits(&a, if padded { padded_len(m, k) } else { 0 });
                let b16 = bits(&b, 0);
                let mut want = vec![0.0; m * n];
                matmul_bf16(&mut want, &a, &b, m, k, n, ta, tb, Acc::Set);
                for (name, x, y) in [
                    ("a", Operand::Bf16(&a16), Operand::F32(&b)),
                    ("b", Operand::F32(&a), Operand::Bf16(&b16)),
                    ("both", Operand::Bf16(&a16), Operand::Bf16(&b16)),
                ] {
                    let mut got = vec![0.0; m * n];
                    matmul_bf16_operands(&mut got, x, y, m, k, n, ta, tb, Acc::Set);
                    assert!(
                        got == want,
                        "m{m} k{k} n{n} {ta:?} {tb:?} padded{padded}: bf16 {name} differs"
                    );
                }
            }
        }
    }
}

#[test]
fn linear_with_the_bias_in_the_kernel_equals_product_then_bias() {
    if skip() {
        return;
    }
    let mut rng = Rng::new(10);
    // Widths that end inside a 32-column panel, so the bias loads are masked too.
    for (n, i, o) in [(37, 64, 50), (5, 33, 7), (130, 256, 96)] {
        let x = random_vec(&mut rng, n * i, 1.0);
        let w = random_vec(&mut rng, o * i, 1.0);
        let bias = random_vec(&mut rng, o, 1.0);
        let mut want = vec![0.0; n * o];
        matmul_bf16(&mut want, &x, &w, n, i, o, R, T, Acc::Set);
        want.chunks_exact_mut(o)
            .for_each(|r| r.iter_mut().zip(&bias).for_each(|(v, b)| *v += b));
        let mut got = vec![f32::NAN; n * o];
        linear_bf16(&mut got, Operand::F32(&x), &w, Some(&bias), n, i, o);
        assert!(got == want, "n{n} i{i} o{o}");
    }
}

#[test]
fn precision_switch_routes_matmul_and_reverts() {
    if skip() {
        return;
    }
    let mut rng = Rng::new(11);
    let (m, k, n) = (40, 96, 50);
    let a = random_vec(&mut rng, m * k, 1.0);
    let b = random_vec(&mut rng, n * k, 1.0);
    let mut f32_out = vec![0.0; m * n];
    let mut bf16_out = vec![0.0; m * n];
    let mut direct = vec![0.0; m * n];
    assert_eq!(matmul_precision(), Precision::F32);
    matmul(&mut f32_out, &a, &b, m, k, n, R, T, Acc::Set);
    {
        let _g = set_matmul_precision(Precision::Bf16);
        assert_eq!(matmul_precision(), Precision::Bf16);
        matmul(&mut bf16_out, &a, &b, m, k, n, R, T, Acc::Set);
    }
    assert_eq!(matmul_precision(), Precision::F32);
    matmul_bf16(&mut direct, &a, &b, m, k, n, R, T, Acc::Set);
    assert_eq!(bf16_out, direct);
    // bf16 operands carry 8 bits of mantissa: close to f32, but not equal.
    let e = rel_err(&bf16_out, &f32_out);
    assert!(e > 1e-6 && e < 2e-2, "bf16 vs f32: {e}");
}
