//! Compiles the C++ bridge to the CUDA side of libtorch — `csrc/cuda_graph.cpp`
//! (CUDA graphs), `csrc/cuda_ipc.cpp` (GPU memory shared between
//! processes), `csrc/kernels.cpp` (kernels compiled at run time),
//! `csrc/host_copy.cpp` (copies that do not wait for the stream) and
//! `csrc/varlen_attention.cpp` (FlashAttention over packed sequences) —
//! when the libtorch we build against has CUDA (`libtorch_cuda.so` and the
//! CUDA runtime headers are found). It then sets `cfg(cuda_bridge)`;
//! without it the engine runs every decode step eagerly, as on a CPU, the
//! prefill's attention runs per group of chunks, and the CUDA IPC transfer
//! backend reports that it is missing.
//!
//! The headers come from libtorch's `include/` and from CUDA's runtime
//! headers: those of the `nvidia-cuda-runtime` and `nvidia-cuda-crt` wheels
//! that pip installs next to torch (scripts/requirements.txt), `$CUDA_HOME/include`,
//! or `/usr/local/cuda/include`.

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(cuda_bridge)");
    println!("cargo::rerun-if-changed=csrc/cuda_graph.cpp");
    println!("cargo::rerun-if-changed=csrc/cuda_ipc.cpp");
    println!("cargo::rerun-if-changed=csrc/kernels.cpp");
    println!("cargo::rerun-if-changed=csrc/host_copy.cpp");
    println!("cargo::rerun-if-changed=csrc/varlen_attention.cpp");
    println!("cargo::rerun-if-changed=csrc/guarded.h");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    println!("cargo::rerun-if-env-changed=SPARK_DISAGG_NO_CUDA_BRIDGE");
    if env::var_os("SPARK_DISAGG_NO_CUDA_BRIDGE").is_some() {
        return;
    }
    // torch-sys tells its direct dependents where it found libtorch.
    let Some(lib) = env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        return;
    };
    if !lib.join("libtorch_cuda.so").exists() {
        return;
    }
    let torch = lib.parent().expect("libtorch's lib dir has a parent");
    let Some(cuda_include) = cuda_runtime_headers(torch) else {
        println!(
            "cargo::warning=libtorch has CUDA but no CUDA runtime headers were found \
             (pip install nvidia-cuda-crt, or set CUDA_HOME); building without CUDA graphs or CUDA IPC"
        );
        return;
    };
    cc::Build::new()
        .cpp(true)
        .file("csrc/cuda_graph.cpp")
        .file("csrc/cuda_ipc.cpp")
        .file("csrc/kernels.cpp")
        .file("csrc/host_copy.cpp")
        .file("csrc/varlen_attention.cpp")
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .include(cuda_include)
        .flag("-std=c++17")
        // PyTorch's wheels use the C++11 string ABI since 2.7.
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .warnings(false)
        .compile("spark_cuda_bridge");
    println!("cargo::rustc-link-search=native={}", lib.display());
    println!("cargo::rustc-link-lib=dylib=torch_cuda");
    println!("cargo::rustc-link-lib=dylib=c10_cuda");
    println!("cargo::rustc-cfg=cuda_bridge");
}

/// A directory holding `cuda_runtime_api.h`.
fn cuda_runtime_headers(torch: &Path) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    // pip: site-packages/torch next to site-packages/nvidia/<cu13|cuda_runtime>/include.
    if let Some(site) = torch.parent() {
        if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
            for entry in entries.flatten() {
                candidates.push(entry.path().join("include"));
            }
        }
    }
    if let Some(home) = env::var_os("CUDA_HOME") {
        candidates.push(PathBuf::from(home).join("include"));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    // Headers installed later (pip install nvidia-cuda-crt) should trigger a rebuild.
    for dir in candidates.iter().filter(|d| d.exists()) {
        println!("cargo::rerun-if-changed={}", dir.display());
    }
    candidates.into_iter().find(|dir| {
        dir.join("cuda_runtime_api.h").exists() && dir.join("crt/host_config.h").exists()
    })
}
