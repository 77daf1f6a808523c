//! Kernel sources to CUBINs with NVRTC, for the architecture of the device at hand.
//!
//! Written on NVRTC's C API (through `cudarc::nvrtc::result`/`sys`) rather than
//! `cudarc::nvrtc::compile_ptx`: that returns PTX, which the driver would compile again at every
//! start; a CUBIN for `sm_XY` is loaded as it is.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{result, sys};

use super::{nvrtc_available, CudaError, Source, COMMON, NVRTC_HINT};

/// NVRTC's version, (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::Unavailable(NVRTC_HINT.into()));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC writes two ints through valid pointers.
    let status = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    status
        .result()
        .map_err(|e| CudaError::Unavailable(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

type Cache = Mutex<HashMap<(&'static str, (i32, i32)), Vec<u8>>>;

/// Compiles `src` (with [`COMMON`] before it) to a CUBIN for compute capability `arch`, through
/// two caches: in memory (once per process) and on disk (`QKV_CUDA_CACHE`, else
/// `$XDG_CACHE_HOME/qkv/cuda` or `~/.cache/qkv/cuda`; an empty `QKV_CUDA_CACHE` turns it off),
/// where a file's name carries a hash of the source, the options and NVRTC's version, so an
/// edited kernel or another NVRTC never meets a stale CUBIN. NVRTC takes seconds on the flash
/// kernels; every process of a benchmark script would pay them again.
pub fn compile(src: &Source, arch: (i32, i32)) -> Result<Vec<u8>, CudaError> {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(cubin) = cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&(src.name, arch))
    {
        return Ok(cubin.clone());
    }
    let file = disk_cache_dir().map(|dir| {
        let version = nvrtc_version().unwrap_or((0, 0));
        let key = fnv1a(&[
            format!("{version:?}").as_bytes(),
            options(arch).join(" ").as_bytes(),
            COMMON.as_bytes(),
            src.text.as_bytes(),
        ]);
        dir.join(format!(
            "{}-sm_{}{}-{key:016x}.cubin",
            src.name, arch.0, arch.1
        ))
    });
    let cached = file
        .as_ref()
        .and_then(|f| std::fs::read(f).ok())
        .filter(|b| b.starts_with(b"\x7fELF"));
    let cubin = match cached {
        Some(b) => b,
        None => {
            let b = compile_fresh(src, arch)?;
            if let Some(f) = &file {
                // A cache: a failure to write it costs the next process a compile, nothing more.
                let _ = write_atomically(f, &b);
            }
            b
        }
    };
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert((src.name, arch), cubin.clone());
    Ok(cubin)
}

fn disk_cache_dir() -> Option<PathBuf> {
    match std::env::var_os("QKV_CUDA_CACHE") {
        Some(d) if d.is_empty() => None,
        Some(d) => Some(PathBuf::from(d)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|d| d.join("qkv").join("cuda")),
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// FNV-1a, 64 bits: a cache key, not a defence (the inputs are qkv's own sources).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &b in part.iter().chain(&[0u8]) {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn options(arch: (i32, i32)) -> Vec<String> {
    vec![
        format!("--gpu-architecture=sm_{}{}", arch.0, arch.1),
        "--std=c++17".to_string(),
    ]
}

/// [`compile`] without its caches: NVRTC runs every time (the compile tests).
pub fn compile_fresh(src: &Source, arch: (i32, i32)) -> Result<Vec<u8>, CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::Unavailable(NVRTC_HINT.into()));
    }
    let arch_name = format!("sm_{}{}", arch.0, arch.1);
    let text = format!("{COMMON}\n#line 1 \"{}.cu\"\n{}", src.name, src.text);
    let fail = |status: String, log: String| CudaError::Compile {
        name: src.name.into(),
        arch: arch_name.clone(),
        status,
        log,
    };
    let c_text = CString::new(text).map_err(|e| fail("NUL in source".into(), e.to_string()))?;
    let c_name = CString::new(format!("{}.cu", src.name)).expect("source names have no NUL");
    let prog = result::create_program(&c_text, Some(&c_name))
        .map_err(|e| fail(format!("{e:?}"), String::new()))?;
    let options = options(arch);
    // SAFETY: `prog` was created above and is destroyed once, at the end of this block.
    unsafe {
        let compiled = result::compile_program(prog, &options);
        let out = match compiled {
            Err(e) => {
                let log = result::get_program_log(prog)
                    .map(|raw| CStr::from_ptr(raw.as_ptr()).to_string_lossy().into_owned())
                    .unwrap_or_default();
                Err(fail(format!("{e:?}"), log))
            }
            Ok(()) => cubin(prog).map_err(|e| fail(format!("{e:?}"), String::new())),
        };
        let _ = result::destroy_program(prog);
        out
    }
}

/// The compiled program's CUBIN.
///
/// # Safety
/// `prog` must be a program that compiled and is not yet destroyed.
unsafe fn cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>, result::NvrtcError> {
    let mut size = 0usize;
    // SAFETY: the caller's `prog`; NVRTC writes the size through a valid pointer.
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result()?;
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds the `size` bytes NVRTC reported for this program.
    unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()) }.result()?;
    Ok(buf)
}
