//! Checkpoints: a directory holding `model.safetensors` (every parameter under its stable
//! name), `config.json` (the model config) and, for training, `optimizer.safetensors` (AdamW
//! moments as `m.<name>`/`v.<name>`, step and settings in the metadata).
//!
//! Files are written to a temporary name and renamed, so a crash never leaves a half-written
//! checkpoint under the real name. Loading checks every name, dtype and shape and reports the
//! first mismatch; a truncated or corrupt file is an error, never a panic.

use crate::backend::{Backend, Cpu};
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::optim::{AdamW, AdamWConfig};
use crate::params::{ParamSpec, Params};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const MODEL_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

pub(crate) fn ck_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn json_err(path: &Path, e: serde_json::Error) -> Error {
    ck_err(path, e.to_string())
}

/// Write `bytes` to `path` via a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Serialize named f32 tensors with string metadata.
pub fn save_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), f32_bytes(d)))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| ck_err(path, e.to_string()))?;
    let out =
        safetensors::serialize(views, Some(metadata)).map_err(|e| ck_err(path, e.to_string()))?;
    write_atomic(path, &out)
}

/// A safetensors file read fully into memory.
pub struct TensorFile {
    pub path: PathBuf,
    bytes: Vec<u8>,
}

/// A tensor's data, converted to host types.
#[derive(Clone, Debug)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        SafeTensors::deserialize(&bytes)
            .map_err(|e| ck_err(path, format!("not a valid safetensors file ({e})")))?;
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
        })
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated in open")
    }

    pub fn metadata(&self) -> HashMap<String, String> {
        SafeTensors::read_metadata(&self.bytes)
            .ok()
            .and_then(|(_, m)| m.metadata().clone())
            .unwrap_or_default()
    }

    pub fn names(&self) -> Vec<String> {
        self.st().names().into_iter().map(String::from).collect()
    }

    /// Shape and data of `name`, converted from F32 or I64.
    pub fn get(&self, name: &str) -> Result<(Vec<usize>, TensorData)> {
        let st = self.st();
        let t = st
            .tensor(name)
            .map_err(|_| ck_err(&self.path, format!("missing tensor '{name}'")))?;
        let data = t.data();
        let d = match t.dtype() {
            Dtype::F32 => TensorData::F32(
                data.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            Dtype::I64 => TensorData::I64(
                data.chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect(),
            ),
            other => {
                return Err(ck_err(
                    &self.path,
                    format!("tensor '{name}' has dtype {other}, expected F32 or I64"),
                ))
            }
        };
        Ok((t.shape().to_vec(), d))
    }

    /// An f32 tensor whose shape must be `shape`.
    pub fn f32_exact(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        match self.get(name)? {
            (s, TensorData::F32(v)) if s == shape => Ok(v),
            (s, TensorData::F32(_)) => Err(ck_err(
                &self.path,
                format!("tensor '{name}' has shape {s:?}, the model expects {shape:?}"),
            )),
            _ => Err(ck_err(&self.path, format!("tensor '{name}' is not F32"))),
        }
    }
}

/// Save the model's parameters under their names (the config lives in `config.json` alone).
pub fn save_params(path: &Path, params: &Params) -> Result<()> {
    save_named(path, &params.specs, &params.data)
}

/// `data`'s parameters, laid out as `specs` say, under their names.
fn save_named(path: &Path, specs: &[ParamSpec], data: &[f32]) -> Result<()> {
    let tensors: Vec<_> = specs
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.shape.clone(),
                &data[s.offset..s.offset + s.len],
            )
        })
        .collect();
    save_tensors(path, &tensors, HashMap::new())
}

/// Load every parameter of `params` from `path`: names must match exactly (no missing, no extra).
pub fn load_params(path: &Path, params: &mut Params) -> Result<()> {
    load_named(path, &params.specs, &mut params.data)
}

/// [`load_params`] into `data`, laid out as `specs` say.
pub(crate) fn load_named(path: &Path, specs: &[ParamSpec], data: &mut [f32]) -> Result<()> {
    let file = TensorFile::open(path)?;
    let names = file.names();
    if let Some(extra) = names.iter().find(|n| !specs.iter().any(|s| &s.name == *n)) {
        return Err(ck_err(
            path,
            format!("unexpected tensor '{extra}' (not a parameter of this model)"),
        ));
    }
    for spec in specs {
        let v = file.f32_exact(&spec.name, &spec.shape)?;
        data[spec.offset..spec.offset + spec.len].copy_from_slice(&v);
    }
    Ok(())
}

/// [`load_params`] into a model's parameters on backend `be` (a device's are written from a
/// host copy).
pub fn load_params_on<B: Backend>(be: &B, path: &Path, params: &mut Params<B>) -> Result<()> {
    let n = params.len();
    let Params { specs, data, .. } = params;
    be.host_mut(be.grow(data, n), &mut |d| load_named(path, specs, d))
}

/// Warm start: copy every parameter of `dir`'s weights whose name `params` has (the shapes
/// must agree). Returns (tensors copied, tensors of `params`, tensors of `dir` unused).
pub fn init_from(dir: &Path, params: &mut Params) -> Result<(usize, usize, usize)> {
    let path = dir.join(MODEL_FILE);
    let file = TensorFile::open(&path)?;
    let names = file.names();
    let mut copied = 0;
    for spec in params.specs.clone() {
        if names.contains(&spec.name) {
            let v = file.f32_exact(&spec.name, &spec.shape)?;
            params.data[spec.offset..spec.offset + spec.len].copy_from_slice(&v);
            copied += 1;
        }
    }
    let unused = names.iter().filter(|n| params.spec(n).is_none()).count();
    Ok((copied, params.specs.len(), unused))
}

/// Write a checkpoint directory: config, parameters and (optionally) optimizer state.
pub fn save(
    dir: &Path,
    config: &ModelConfig,
    params: &Params,
    optimizer: Option<&AdamW>,
) -> Result<()> {
    save_on(&Cpu, dir, config, params, optimizer)
}

/// [`save`] for a model and optimizer on backend `be` (a device's buffers are copied to the
/// host first).
pub fn save_on<B: Backend>(
    be: &B,
    dir: &Path,
    config: &ModelConfig,
    params: &Params<B>,
    optimizer: Option<&AdamW<B>>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cfg = serde_json::to_string_pretty(config).map_err(|e| ck_err(dir, e.to_string()))?;
    write_atomic(&dir.join(CONFIG_FILE), cfg.as_bytes())?;
    let n = params.len();
    let data = be.to_host(B::view(&params.data, n))?;
    save_named(&dir.join(MODEL_FILE), &params.specs, &data)?;
    if let Some(opt) = optimizer {
        let path = dir.join(OPTIMIZER_FILE);
        let m = be.to_host(B::view(&opt.m, n))?;
        let v = be.to_host(B::view(&opt.v, n))?;
        let mut tensors = Vec::new();
        for s in &params.specs {
            tensors.push((
                format!("m.{}", s.name),
                s.shape.clone(),
                &m[s.offset..s.offset + s.len],
            ));
            tensors.push((
                format!("v.{}", s.name),
                s.shape.clone(),
                &v[s.offset..s.offset + s.len],
            ));
        }
        let meta = HashMap::from([
            ("step".to_string(), opt.step.to_string()),
            (
                "adamw".to_string(),
                serde_json::to_string(&opt.config).map_err(|e| ck_err(&path, e.to_string()))?,
            ),
        ]);
        save_tensors(&path, &tensors, meta)?;
    }
    Ok(())
}

/// Read `config.json` of a checkpoint directory.
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let cfg: ModelConfig =
        serde_json::from_str(&text).map_err(|e| ck_err(&path, format!("invalid config: {e}")))?;
    cfg.validate().map_err(|e| ck_err(&path, e.to_string()))?;
    Ok(cfg)
}

/// Load parameters into a model built from `expected` config; the saved config must equal it.
pub fn load(dir: &Path, expected: &ModelConfig, params: &mut Params) -> Result<()> {
    load_on(&Cpu, dir, expected, params)
}

/// [`load`] into a model on backend `be`.
pub fn load_on<B: Backend>(
    be: &B,
    dir: &Path,
    expected: &ModelConfig,
    params: &mut Params<B>,
) -> Result<()> {
    let saved = load_config(dir)?;
    if &saved != expected {
        return Err(ck_err(
            &dir.join(CONFIG_FILE),
            format!("config does not match the model: saved {saved:?}, model {expected:?}"),
        ));
    }
    load_params_on(be, &dir.join(MODEL_FILE), params)
}

/// Load optimizer state saved by [`save`].
/// The moments are read to the host, whatever backend `params` are on.
pub fn load_optimizer<B: Backend>(dir: &Path, params: &Params<B>) -> Result<AdamW> {
    let path = dir.join(OPTIMIZER_FILE);
    let file = TensorFile::open(&path)?;
    let meta = file.metadata();
    let step = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ck_err(&path, "missing or invalid 'step' metadata"))?;
    let config: AdamWConfig = meta
        .get("adamw")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| ck_err(&path, "missing or invalid 'adamw' metadata"))?;
    let mut opt = AdamW::new(config, params.len());
    opt.step = step;
    for s in &params.specs {
        opt.m[s.offset..s.offset + s.len]
            .copy_from_slice(&file.f32_exact(&format!("m.{}", s.name), &s.shape)?);
        opt.v[s.offset..s.offset + s.len]
            .copy_from_slice(&file.f32_exact(&format!("v.{}", s.name), &s.shape)?);
    }
    Ok(opt)
}
