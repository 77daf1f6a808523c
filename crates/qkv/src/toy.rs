//! The copy task (the Annotated Transformer's first example): the target is the source.
//! Used by the test suite and by `qkv copy`, the default job until real corpora land.

use crate::rng::Rng;

pub const PAD: u32 = 0;
pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
pub const FIRST_SYMBOL: u32 = 3;

/// One batch of `b` random sequences of `len` symbols from `FIRST_SYMBOL..vocab`:
/// returns (src = seq + EOS, tgt_in = BOS + seq, tgt_out = seq + EOS), each (B, len + 1).
pub fn copy_batch(
    rng: &mut Rng,
    b: usize,
    len: usize,
    vocab: usize,
) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let n_symbols = (vocab as u32).saturating_sub(FIRST_SYMBOL).max(1) as u64;
    let (mut src, mut tin, mut tout) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..b {
        let seq: Vec<u32> = (0..len)
            .map(|_| FIRST_SYMBOL + rng.below(n_symbols) as u32)
            .collect();
        src.extend(&seq);
        src.push(EOS);
        tin.push(BOS);
        tin.extend(&seq);
        tout.extend(&seq);
        tout.push(EOS);
    }
    (src, tin, tout)
}
