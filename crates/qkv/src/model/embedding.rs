//! Input embedding: token table × √C (optional) + positional encoding, then dropout (§3.4, §3.5, §5.4).
//! BERT-family encoders add a token-type row and a LayerNorm before the dropout
//! (`with_token_types`, `with_norm`).

use super::{buf, config::Positional, norm::LayerNorm, Mode, Tokens};
use crate::backend::Cpu;
use crate::error::{shape_err, Error, Result};
use crate::kernels::dropout::{self, Dropout};
use crate::kernels::embedding::{embedding_backward, embedding_forward, sinusoidal_table};
use crate::kernels::Acc;
use crate::params::{Init, Param, ParamBuilder};

#[derive(Clone, Debug)]
pub enum PositionTable {
    Sinusoidal(Vec<f32>),
    Learned(Param),
}

#[derive(Clone, Debug)]
pub struct Embedding {
    /// (V, C); may be shared with another embedding or the output projection.
    pub table: Param,
    pub positions: PositionTable,
    pub scale: f32,
    pub c: usize,
    pub max_len: usize,
    input: &'static str,
    site: u64,
    drop: Option<Dropout>,
    /// (types, C) token-type table; every token uses row 0.
    types: Option<Param>,
    norm: Option<LayerNorm>,
    tokens: Vec<u32>,
    t_len: usize,
    /// The summed embeddings before `norm` (kept for its backward).
    pre: Vec<f32>,
    out: Vec<f32>,
    dout: Vec<f32>,
    dpre: Vec<f32>,
}

impl Embedding {
    /// A new token table named `table_name`, or an existing one (`shared`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pb: &mut ParamBuilder,
        table_name: &str,
        shared: Option<Param>,
        pos_name: &str,
        vocab: usize,
        c: usize,
        max_len: usize,
        positional: Positional,
        scale: bool,
        input: &'static str,
        site: u64,
    ) -> Self {
        // N(0, C^-1/2) as fairseq, so table·√C starts at unit scale.
        let table = shared.unwrap_or_else(|| {
            pb.add(
                format!("{table_name}.weight"),
                &[vocab, c],
                Init::Normal((c as f32).powf(-0.5)),
            )
        });
        let positions = match positional {
            Positional::Sinusoidal => PositionTable::Sinusoidal(sinusoidal_table(max_len, c)),
            Positional::Learned => PositionTable::Learned(pb.add(
                format!("{pos_name}.weight"),
                &[max_len, c],
                Init::Normal(0.02),
            )),
        };
        let scale = if scale { (c as f32).sqrt() } else { 1.0 };
        Self {
            table,
            positions,
            scale,
            c,
            max_len,
            input,
            site,
            drop: None,
            types: None,
            norm: None,
            tokens: Vec::new(),
            t_len: 0,
            pre: Vec::new(),
            out: Vec::new(),
            dout: Vec::new(),
            dpre: Vec::new(),
        }
    }

    /// Add a (types, C) token-type table named `{name}.weight` (BERT's segment embeddings).
    pub fn with_token_types(mut self, pb: &mut ParamBuilder, name: &str, types: usize) -> Self {
        if types > 0 {
            let shape = [types, self.c];
            self.types = Some(pb.add(format!("{name}.weight"), &shape, Init::Normal(0.02)));
        }
        self
    }

    /// LayerNorm the summed embeddings before dropout (BERT's `embeddings.LayerNorm`).
    pub fn with_norm(mut self, pb: &mut ParamBuilder, name: &str, enabled: bool, eps: f32) -> Self {
        if enabled {
            self.norm = Some(LayerNorm::new(pb, name, self.c, eps));
        }
        self
    }

    /// Token-type row and LayerNorm over `self.out[..n]` (the plain sums), then dropout when
    /// there is a norm (without one, dropout was already fused into the sum).
    fn finish(&mut self, p: &[f32], n: usize) {
        if let Some(tp) = self.types {
            let row = &tp.of(p)[..self.c];
            self.out[..n]
                .chunks_mut(self.c)
                .for_each(|o| o.iter_mut().zip(row).for_each(|(o, t)| *o += t));
        }
        if let Some(norm) = &mut self.norm {
            let pre = buf(&mut self.pre, n);
            pre.copy_from_slice(&self.out[..n]);
            norm.forward(&Cpu, p, &self.pre[..n], &mut self.out[..n]);
            dropout::apply(&mut self.out[..n], self.drop);
        }
    }

    pub fn vocab(&self) -> usize {
        self.table.len / self.c
    }

    /// tokens: (B, T) → (B, T, C). Rejects unknown ids and sequences longer than the table.
    pub fn forward(&mut self, p: &[f32], tokens: Tokens, mode: Mode) -> Result<&[f32]> {
        tokens.check_vocab(self.input, self.vocab())?;
        if tokens.len > self.max_len {
            return Err(Error::SequenceTooLong {
                input: self.input,
                len: tokens.len,
                max_len: self.max_len,
            });
        }
        self.drop = mode.site(self.site, tokens.ids.len() * self.c);
        self.tokens.clear();
        self.tokens.extend_from_slice(tokens.ids);
        self.t_len = tokens.len;
        let n = tokens.ids.len() * self.c;
        let pos: &[f32] = match &self.positions {
            PositionTable::Sinusoidal(t) => t,
            PositionTable::Learned(pp) => pp.of(p),
        };
        let fused_drop = if self.norm.is_some() { None } else { self.drop };
        embedding_forward(
            buf(&mut self.out, n),
            tokens.ids,
            self.table.of(p),
            pos,
            self.scale,
            tokens.len,
            self.c,
            fused_drop,
        );
        self.finish(p, n);
        Ok(&self.out[..n])
    }

    /// dy: (B, T, C); accumulates into the table (and learned positions, token types, norm).
    pub fn backward(&mut self, p: &[f32], g: &mut [f32], dy: &[f32]) {
        let n = self.tokens.len() * self.c;
        let d = buf(&mut self.dout, n);
        dropout::backward_into(d, &dy[..n], self.drop);
        if let Some(norm) = &self.norm {
            let dpre = buf(&mut self.dpre, n);
            norm.backward(&Cpu, p, g, &self.pre[..n], &self.dout[..n], dpre, Acc::Set);
            std::mem::swap(&mut self.dout, &mut self.dpre);
        }
        if let Some(tp) = self.types {
            let drow = &mut tp.of_mut(g)[..self.c];
            for d in self.dout[..n].chunks(self.c) {
                drow.iter_mut().zip(d).for_each(|(a, b)| *a += b);
            }
        }
        let (table, c, scale, t_len) = (self.table, self.c, self.scale, self.t_len);
        match self.positions {
            PositionTable::Learned(pp) if pp.offset > table.offset => {
                let (lo, hi) = g.split_at_mut(pp.offset);
                embedding_backward(
                    table.of_mut(lo),
                    Some(&mut hi[..pp.len]),
                    &self.dout[..n],
                    &self.tokens,
                    scale,
                    t_len,
                    c,
                );
            }
            PositionTable::Learned(pp) => {
                let (lo, hi) = g.split_at_mut(table.offset);
                embedding_backward(
                    &mut hi[..table.len],
                    Some(pp.of_mut(lo)),
                    &self.dout[..n],
                    &self.tokens,
                    scale,
                    t_len,
                    c,
                );
            }
            PositionTable::Sinusoidal(_) => embedding_backward(
                table.of_mut(g),
                None,
                &self.dout[..n],
                &self.tokens,
                scale,
                t_len,
                c,
            ),
        }
    }
}

impl Embedding {
    /// Incremental decoding: ids (R) at position `pos` → (R, C), no dropout.
    pub fn step(&mut self, p: &[f32], ids: &[u32], pos: &[usize]) -> Result<&[f32]> {
        let one = Tokens::new(ids, ids.len(), 1)?;
        one.check_vocab(self.input, self.vocab())?;
        if pos.len() != ids.len() {
            return Err(shape_err(
                "decoding step positions",
                format!("{} (one per token)", ids.len()),
                pos.len(),
            ));
        }
        let last = pos.iter().copied().max().unwrap_or(0);
        if last >= self.max_len {
            return Err(Error::SequenceTooLong {
                input: self.input,
                len: last + 1,
                max_len: self.max_len,
            });
        }
        let c = self.c;
        let pos_rows: &[f32] = match &self.positions {
            PositionTable::Sinusoidal(t) => t,
            PositionTable::Learned(pp) => pp.of(p),
        };
        let out = buf(&mut self.out, ids.len() * c);
        let (table, scale) = (self.table.of(p), self.scale);
        // T = 1: a table of one position, starting at the rows' position.
        let embed = |out: &mut [f32], ids: &[u32], at: usize| {
            embedding_forward(out, ids, table, &pos_rows[at * c..], scale, 1, c, None)
        };
        if pos.windows(2).all(|w| w[0] == w[1]) {
            embed(out, ids, pos.first().copied().unwrap_or(0));
        } else {
            // An absorbing cache's rows are at different positions.
            for (r, &at) in pos.iter().enumerate() {
                embed(&mut out[r * c..(r + 1) * c], &ids[r..r + 1], at);
            }
        }
        self.drop = None;
        self.finish(p, ids.len() * c);
        Ok(&self.out[..ids.len() * c])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamBuilder;

    /// A step's rows at different positions embed as each would alone; a position list that
    /// does not match the tokens, or a position past the table, is an error.
    #[test]
    fn step_takes_a_position_per_row() {
        let mut pb = ParamBuilder::default();
        let (c, max_len) = (8, 6);
        let mut e = Embedding::new(
            &mut pb,
            "embed",
            None,
            "pos",
            11,
            c,
            max_len,
            Positional::Learned,
            true,
            "tokens",
            0,
        );
        let params = pb.build(3).unwrap();
        let p = &params.data;
        let rows = e.step(p, &[4, 7, 9], &[0, 5, 2]).unwrap().to_vec();
        for (r, (&id, &at)) in [4u32, 7, 9].iter().zip(&[0usize, 5, 2]).enumerate() {
            let alone = e.step(p, &[id], &[at]).unwrap();
            assert_eq!(&rows[r * c..(r + 1) * c], alone, "row {r}");
        }
        let err = e.step(p, &[4, 7], &[0]).unwrap_err().to_string();
        assert!(err.contains("decoding step positions"), "{err}");
        let err = e.step(p, &[4, 7], &[0, max_len]).unwrap_err().to_string();
        assert!(err.contains(&format!("{}", max_len + 1)), "{err}");
    }
}
