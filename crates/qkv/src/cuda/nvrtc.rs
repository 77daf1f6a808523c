//! Kernel sources to CUBINs with NVRTC, for the architecture of the device at hand.
//!
//! Written on NVRTC's C API (through `cudarc::nvrtc::result`/`sys`) rather than
//! `cudarc::nvrtc::compile_ptx`: that returns PTX, which the driver would compile again at every
//! start; a CUBIN for `sm_XY` is loaded as it is.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
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

/// Compiles `src` (with [`COMMON`] before it) to a CUBIN for compute capability `arch`; each
/// (source, architecture) is compiled once per process. A compile error carries NVRTC's log,
/// whose line numbers are the source file's own (a `#line` directive follows the prelude).
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
    let options = [
        format!("--gpu-architecture={arch_name}"),
        "--std=c++17".to_string(),
    ];
    // SAFETY: `prog` was created above and is destroyed once, at the end of this function.
    let out = unsafe {
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
    }?;
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert((src.name, arch), out.clone());
    Ok(out)
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
