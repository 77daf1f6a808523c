//! Input embedding: token table × √C (optional) + positional encoding, then dropout (§3.4, §3.5, §5.4).
//! BERT-family encoders add a token-type row and a LayerNorm before the dropout
//! (`with_token_types`, `with_norm`).

use super::{config::Positional, norm::LayerNorm, Mode, Tokens};
use crate::backend::{Backend, Cpu};
use crate::error::{shape_err, Error, Result};
use crate::kernels::dropout::Dropout;
use crate::kernels::embedding::sinusoidal_table;
use crate::kernels::Acc;
use crate::params::{Init, Param, ParamBuilder};

#[derive(Clone, Debug)]
pub enum PositionTable<B: Backend = Cpu> {
    /// §3.5's fixed (max_len, C) table: computed on the host, on the backend from the first
    /// forward on.
    Sinusoidal(Staged<B>),
    Learned(Param),
}

/// A constant built on the host, moved to the backend when a forward first has one.
#[derive(Clone, Debug)]
pub enum Staged<B: Backend = Cpu> {
    Host(Vec<f32>),
    Ready(B::Buf),
}

impl<B: Backend> Staged<B> {
    fn ready(&mut self, be: &B) -> &B::Buf {
        if let Staged::Host(host) = self {
            *self = Staged::Ready(be.upload(std::mem::take(host)));
        }
        match self {
            Staged::Ready(buf) => buf,
            Staged::Host(_) => unreachable!("moved to the backend above"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Embedding<B: Backend = Cpu> {
    /// (V, C); may be shared with another embedding or the output projection.
    pub table: Param,
    pub positions: PositionTable<B>,
    pub scale: f32,
    pub c: usize,
    pub max_len: usize,
    input: &'static str,
    site: u64,
    drop: Option<Dropout>,
    /// (types, C) token-type table; every token uses row 0.
    types: Option<Param>,
    norm: Option<LayerNorm<B>>,
    tokens: Vec<u32>,
    t_len: usize,
    /// The summed embeddings before `norm` (kept for its backward).
    pre: B::Buf,
    out: B::Buf,
    dout: B::Buf,
    dpre: B::Buf,
}

impl<B: Backend> Embedding<B> {
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
            Positional::Sinusoidal => {
                PositionTable::Sinusoidal(Staged::Host(sinusoidal_table(max_len, c)))
            }
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
            pre: B::Buf::default(),
            out: B::Buf::default(),
            dout: B::Buf::default(),
            dpre: B::Buf::default(),
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
    fn finish(&mut self, be: &B, p: B::Ref<'_>, n: usize) {
        if let Some(tp) = self.types {
            let row = B::sub(B::param(p, tp), 0..self.c);
            be.add_rows(be.grow(&mut self.out, n), row);
        }
        if let Some(norm) = &mut self.norm {
            be.copy(be.grow(&mut self.pre, n), B::view(&self.out, n));
            norm.forward(be, p, B::view(&self.pre, n), be.grow(&mut self.out, n));
            be.dropout_apply(be.grow(&mut self.out, n), self.drop);
        }
    }

    pub fn vocab(&self) -> usize {
        self.table.len / self.c
    }

    /// tokens: (B, T) → (B, T, C). Rejects unknown ids and sequences longer than the table.
    pub fn forward(
        &mut self,
        be: &B,
        p: B::Ref<'_>,
        tokens: Tokens,
        mode: Mode,
    ) -> Result<B::Ref<'_>> {
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
        let pos = match &mut self.positions {
            PositionTable::Sinusoidal(t) => {
                let t = t.ready(be);
                B::view(t, self.max_len * self.c)
            }
            PositionTable::Learned(pp) => B::param(B::shorten(p), *pp),
        };
        let fused_drop = if self.norm.is_some() { None } else { self.drop };
        let out = be.grow(&mut self.out, n);
        let table = B::param(p, self.table);
        let shape = (tokens.len, self.c);
        be.embedding_forward(out, tokens.ids, table, pos, self.scale, shape, fused_drop);
        self.finish(be, p, n);
        Ok(B::view(&self.out, n))
    }

    /// dy: (B, T, C); accumulates into the table (and learned positions, token types, norm).
    pub fn backward(&mut self, be: &B, p: B::Ref<'_>, mut g: B::Mut<'_>, dy: B::Ref<'_>) {
        let n = self.tokens.len() * self.c;
        be.dropout_backward(be.grow(&mut self.dout, n), B::sub(dy, 0..n), self.drop);
        if let Some(norm) = &self.norm {
            let dpre = be.grow(&mut self.dpre, n);
            let (pre, dout) = (B::view(&self.pre, n), B::view(&self.dout, n));
            norm.backward(be, p, B::reborrow(&mut g), pre, dout, dpre, Acc::Set);
            std::mem::swap(&mut self.dout, &mut self.dpre);
        }
        let dout = B::view(&self.dout, n);
        if let Some(tp) = self.types {
            let drow = B::prefix_mut(B::param_mut(B::reborrow(&mut g), tp), self.c);
            be.column_sum(drow, dout, self.c);
        }
        let (table, tokens) = (self.table, &self.tokens);
        let (scale, shape) = (self.scale, (self.t_len, self.c));
        let (dtable, dpos) = match self.positions {
            PositionTable::Learned(pp) if pp.offset > table.offset => {
                let (dtable, dpos) = B::params_mut(g, table, pp);
                (dtable, Some(dpos))
            }
            PositionTable::Learned(pp) => {
                let (dpos, dtable) = B::params_mut(g, pp, table);
                (dtable, Some(dpos))
            }
            PositionTable::Sinusoidal(_) => (B::param_mut(g, table), None),
        };
        be.embedding_backward(dtable, dpos, dout, tokens, scale, shape);
    }
}

impl<B: Backend> Embedding<B> {
    /// Incremental decoding: ids (R) at position `pos` → (R, C), no dropout.
    pub fn step(
        &mut self,
        be: &B,
        p: B::Ref<'_>,
        ids: &[u32],
        pos: &[usize],
    ) -> Result<B::Ref<'_>> {
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
        let (c, rows) = (self.c, self.max_len * self.c);
        let pos_rows = match &mut self.positions {
            PositionTable::Sinusoidal(t) => B::view(t.ready(be), rows),
            PositionTable::Learned(pp) => B::param(B::shorten(p), *pp),
        };
        let (table, scale) = (B::param(p, self.table), self.scale);
        let out = be.grow(&mut self.out, ids.len() * c);
        // T = 1: a table of one position, starting at the rows' position.
        if pos.windows(2).all(|w| w[0] == w[1]) {
            let at = pos.first().copied().unwrap_or(0);
            let pos = B::sub(pos_rows, at * c..rows);
            be.embedding_forward(out, ids, table, pos, scale, (1, c), None);
        } else {
            // An absorbing cache's rows are at different positions.
            let mut out = out;
            for (r, &at) in pos.iter().enumerate() {
                let row = B::sub_mut(B::reborrow(&mut out), r * c..(r + 1) * c);
                let pos = B::sub(pos_rows, at * c..rows);
                be.embedding_forward(row, &ids[r..r + 1], table, pos, scale, (1, c), None);
            }
        }
        self.drop = None;
        self.finish(be, p, ids.len() * c);
        Ok(B::view(&self.out, ids.len() * c))
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
        let mut e = Embedding::<Cpu>::new(
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
        let rows = e.step(&Cpu, p, &[4, 7, 9], &[0, 5, 2]).unwrap().to_vec();
        for (r, (&id, &at)) in [4u32, 7, 9].iter().zip(&[0usize, 5, 2]).enumerate() {
            let alone = e.step(&Cpu, p, &[id], &[at]).unwrap();
            assert_eq!(&rows[r * c..(r + 1) * c], alone, "row {r}");
        }
        let err = e.step(&Cpu, p, &[4, 7], &[0]).unwrap_err().to_string();
        assert!(err.contains("decoding step positions"), "{err}");
        let err = e
            .step(&Cpu, p, &[4, 7], &[0, max_len])
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("{}", max_len + 1)), "{err}");
    }
}
