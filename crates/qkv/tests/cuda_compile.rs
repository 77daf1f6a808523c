//! The CUDA kernel sources compile with NVRTC, on machines without a GPU (CI): NVRTC is a
//! library (`scripts/fetch_nvrtc.sh` fetches it from PyPI), so a kernel that does not compile
//! fails here, before it ever reaches a GPU. Skips with a message when NVRTC cannot be loaded;
//! `QKV_REQUIRE_NVRTC=1` (set by `.ci/run`) makes that a failure.

use qkv::cuda::{self, CudaError, Source, SOURCES};

/// The architectures compiled for: A100 (sm_80) and H100/H200 (sm_90), the GPUs qkv is
/// measured on.
const ARCHS: [(i32, i32); 2] = [(8, 0), (9, 0)];

fn nvrtc_or_skip() -> bool {
    if cuda::nvrtc_available() {
        return true;
    }
    if std::env::var_os("QKV_REQUIRE_NVRTC").is_some() {
        panic!("QKV_REQUIRE_NVRTC is set but {}", cuda::NVRTC_HINT);
    }
    eprintln!("skipping: {}", cuda::NVRTC_HINT);
    false
}

#[test]
fn every_kernel_source_compiles_to_a_cubin_with_its_functions() {
    if !nvrtc_or_skip() {
        return;
    }
    let (major, minor) = cuda::nvrtc_version().unwrap();
    assert_eq!(
        major, 13,
        "NVRTC {major}.{minor}: the GPU machine's driver is CUDA 13.0"
    );
    for arch in ARCHS {
        for src in SOURCES {
            let cubin = cuda::compile_fresh(src, arch).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(&cubin[..4], b"\x7fELF", "{}: not a CUBIN", src.name);
            for f in src.functions {
                // A CUBIN is an ELF file; each kernel is a symbol named as in the source.
                let name = format!("\0{f}\0");
                assert!(
                    cubin.windows(name.len()).any(|w| w == name.as_bytes()),
                    "{}.cu for sm_{}{} has no kernel {f}",
                    src.name,
                    arch.0,
                    arch.1
                );
            }
        }
    }
}

#[test]
fn a_source_that_does_not_compile_names_its_file_and_line() {
    if !nvrtc_or_skip() {
        return;
    }
    let broken = Source {
        name: "broken",
        text: "extern \"C\" __global__ void f(float* x) {\n    x[0] = not_declared;\n}\n",
        functions: &["f"],
    };
    match cuda::compile_fresh(&broken, (9, 0)) {
        Err(CudaError::Compile {
            name, arch, log, ..
        }) => {
            assert_eq!((name.as_str(), arch.as_str()), ("broken", "sm_90"));
            assert!(log.contains("broken.cu(2)"), "log: {log}");
            assert!(log.contains("not_declared"), "log: {log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}

#[test]
fn compiled_kernels_are_cached_on_disk_under_a_key_of_source_and_options() {
    if !nvrtc_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("qkv-cuda-cache-{}", std::process::id()));
    // This test binary's only use of the variable: the other tests call compile_fresh.
    std::env::set_var("QKV_CUDA_CACHE", &dir);
    let src = SOURCES.iter().find(|s| s.name == "dropout").unwrap();
    let cubin = cuda::compile(src, (8, 0)).unwrap();
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("dropout-sm_80-") && name.ends_with(".cubin"),
        "{name}"
    );
    assert_eq!(std::fs::read(&files[0]).unwrap(), cubin);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn asking_for_a_gpu_without_one_is_an_error_not_a_panic() {
    if cuda::driver_available() {
        eprintln!("skipping: this machine has an NVIDIA driver");
        return;
    }
    match cuda::Gpu::new(0) {
        Err(CudaError::Unavailable(msg)) => assert!(msg.contains("libcuda"), "{msg}"),
        Err(e) => panic!("expected CudaError::Unavailable, got {e}"),
        Ok(_) => panic!("a GPU opened without a driver"),
    }
}

/// The tensor-core kernels keep their fragments in registers: ptxas's report (NVRTC with
/// `--ptxas-options=-v`) shows no spills on sm_90. A change that makes them spill would slow
/// them several times over without failing any other test here.
#[test]
fn tensor_core_kernels_do_not_spill_registers() {
    use cudarc::nvrtc::result;
    use std::ffi::{CStr, CString};
    if !nvrtc_or_skip() {
        return;
    }
    let src = SOURCES.iter().find(|s| s.name == "flash_tc").unwrap();
    let text = format!("{}\n{}", cuda::COMMON, src.text);
    let text = CString::new(text).unwrap();
    let prog = result::create_program(&text, None).unwrap();
    let opts = [
        "--gpu-architecture=sm_90".to_string(),
        "--std=c++17".into(),
        "--ptxas-options=-v".into(),
    ];
    // SAFETY: `prog` was just created; it is compiled, its log read, and destroyed once.
    let log = unsafe {
        let compiled = result::compile_program(prog, &opts);
        let log = result::get_program_log(prog).unwrap();
        let log = CStr::from_ptr(log.as_ptr()).to_string_lossy().into_owned();
        result::destroy_program(prog).unwrap();
        compiled.unwrap_or_else(|e| panic!("{e:?}\n{log}"));
        log
    };
    for f in src.functions {
        let at = log
            .find(&format!("Function properties for {f}"))
            .unwrap_or_else(|| panic!("no ptxas report for {f}:\n{log}"));
        let report = log[at..].lines().nth(1).unwrap_or_default();
        assert!(
            report.contains(" 0 bytes spill stores"),
            "{f} spills: {report}"
        );
    }
}
