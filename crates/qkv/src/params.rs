//! One flat parameter buffer and one flat gradient buffer with the same layout (as llm.c).
//! Layers hold [`Param`] handles (offset, length) into them; names follow the checkpoint
//! layout, so initialisation, saving and loading share one table.

use crate::backend::{Backend, Cpu};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// A parameter's place in the flat buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param {
    pub offset: usize,
    pub len: usize,
}

impl Param {
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len
    }
    pub fn of<'a>(&self, buf: &'a [f32]) -> &'a [f32] {
        &buf[self.range()]
    }
    pub fn of_mut<'a>(&self, buf: &'a mut [f32]) -> &'a mut [f32] {
        &mut buf[self.range()]
    }
}

/// Two disjoint parameters' gradient slices at once (e.g. a weight and its bias).
pub fn two_mut(buf: &mut [f32], a: Param, b: Param) -> (&mut [f32], &mut [f32]) {
    assert!(
        a.offset + a.len <= b.offset,
        "parameters must be registered in order"
    );
    let (lo, hi) = buf.split_at_mut(b.offset);
    (&mut lo[a.range()], &mut hi[..b.len])
}

#[derive(Clone, Copy, Debug)]
pub enum Init {
    Zeros,
    Ones,
    /// U(−a, a)
    Uniform(f32),
    /// N(0, σ²)
    Normal(f32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
}

/// Collects parameter specs while a model is constructed.
#[derive(Default)]
pub struct ParamBuilder {
    specs: Vec<ParamSpec>,
    inits: Vec<Init>,
    len: usize,
    /// The first parameter whose size overflowed; `build` reports it.
    overflow: Option<String>,
}

impl ParamBuilder {
    /// Elements registered so far: the offset of the next parameter.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn add(&mut self, name: impl Into<String>, shape: &[usize], init: Init) -> Param {
        let name = name.into();
        let size = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let len = match size.and_then(|n| self.len.checked_add(n).map(|_| n)) {
            Some(n) => n,
            None => {
                self.overflow
                    .get_or_insert_with(|| format!("{name} {shape:?}"));
                0
            }
        };
        let p = Param {
            offset: self.len,
            len,
        };
        self.specs.push(ParamSpec {
            name,
            shape: shape.to_vec(),
            offset: self.len,
            len,
        });
        self.inits.push(init);
        self.len += len;
        p
    }

    /// Allocate and initialise the buffers. A size that overflows or cannot be allocated is
    /// an error (a config's sizes come from users' files), never an abort.
    pub fn build(self, seed: u64) -> Result<Params> {
        if let Some(what) = self.overflow {
            return Err(Error::Config(format!(
                "parameter {what} has more elements than this machine can address"
            )));
        }
        let mut data = zeros(self.len, "parameters")?;
        let grad = zeros(self.len, "gradients")?;
        let mut rng = Rng::new(seed);
        for (spec, init) in self.specs.iter().zip(&self.inits) {
            let d = &mut data[spec.offset..spec.offset + spec.len];
            match *init {
                Init::Zeros => {}
                Init::Ones => d.iter_mut().for_each(|v| *v = 1.0),
                Init::Uniform(a) => d
                    .iter_mut()
                    .for_each(|v| *v = (2.0 * rng.uniform() - 1.0) * a),
                Init::Normal(s) => d.iter_mut().for_each(|v| *v = rng.normal() * s),
            }
        }
        Ok(Params {
            grad,
            data,
            specs: self.specs,
        })
    }
}

/// `n` zeros, or an error naming `what` and its size when the allocation fails.
pub(crate) fn zeros(n: usize, what: &str) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Error::Config(format!(
            "cannot allocate {:.1} GiB for the model's {what} ({n} floats)",
            n as f64 * 4.0 / (1u64 << 30) as f64
        ))
    })?;
    v.resize(n, 0.0);
    Ok(v)
}

/// The model's parameters and gradients, in `B`'s buffers (host `Vec`s on the CPU).
#[derive(Clone, Debug)]
pub struct Params<B: Backend = Cpu> {
    pub specs: Vec<ParamSpec>,
    pub data: B::Buf,
    pub grad: B::Buf,
}

impl<B: Backend> Params<B> {
    /// `host`'s values and gradients on `be` (moved on the CPU).
    pub fn upload(be: &B, host: Params) -> Self {
        Params {
            specs: host.specs,
            data: be.upload(host.data),
            grad: be.upload(host.grad),
        }
    }

    /// The number of parameters: the flat buffers' length (specs are laid end to end).
    pub fn len(&self) -> usize {
        self.specs
            .iter()
            .map(|s| s.offset + s.len)
            .max()
            .unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Zero the gradients on `be` (the trainer's job before each update).
    pub fn zero_grad_on(&mut self, be: &B) {
        let _p = crate::profile::scope("zero grad");
        let n = self.len();
        be.zero(be.grow(&mut self.grad, n));
    }
}

impl Params {
    pub fn spec(&self, name: &str) -> Option<&ParamSpec> {
        self.specs.iter().find(|s| s.name == name)
    }
    pub fn zero_grad(&mut self) {
        self.zero_grad_on(&Cpu);
    }
    /// Slice of a named parameter (tests, checkpoints).
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.spec(name)
            .map(|s| &self.data[s.offset..s.offset + s.len])
    }
    pub fn grad_of(&self, name: &str) -> Option<&[f32]> {
        self.spec(name)
            .map(|s| &self.grad[s.offset..s.offset + s.len])
    }
}
