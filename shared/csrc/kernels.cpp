// Run-time compiled CUDA kernels, for Rust: NVRTC turns CUDA C++ source
// into machine code for the GPU at hand, the CUDA driver loads it, and
// kernels are launched on PyTorch's current stream (so that they take part
// in CUDA-graph captures like any PyTorch operation).
//
// This is how PyTorch's own "jiterator" kernels are built, and it needs no
// CUDA compiler when this crate is built: only NVRTC, which the PyTorch
// wheel brings along, and the driver at run time. Both libraries are opened
// with dlopen and the few entry points used are declared here, with opaque
// handle types, so building needs neither cuda.h nor nvrtc.h.
//
// Every function catches C++ exceptions and reports them through `err`
// (see guarded.h).

#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "guarded.h"

namespace {

using CUresult = int;
using CUmodule = void*;
using CUfunction = void*;
using CUcontext = void*;
using nvrtcResult = int;
using nvrtcProgram = void*;

// cuLaunchKernelEx's configuration, as cuda.h lays it out (CUlaunchConfig
// and CUlaunchAttribute): the launch's shape, then a list of attributes,
// each an id and a 64-byte value of which only the first int is used here.
struct LaunchAttribute {
  unsigned id;
  char pad[4];
  union {
    int flag;
    char bytes[64];
  } value;
};
struct LaunchConfig {
  unsigned grid_x, grid_y, grid_z;
  unsigned block_x, block_y, block_z;
  unsigned shared_bytes;
  cudaStream_t stream;
  LaunchAttribute* attributes;
  unsigned attribute_count;
};
constexpr unsigned LAUNCH_ATTRIBUTE_COOPERATIVE = 2;
constexpr unsigned LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6;

// The CUDA driver's entry points (libcuda, installed with the GPU driver).
struct Driver {
  CUresult (*device_get)(int*, int);
  CUresult (*device_get_attribute)(int*, int, int);
  CUresult (*ctx_get_current)(CUcontext*);
  CUresult (*ctx_set_current)(CUcontext);
  CUresult (*primary_ctx_retain)(CUcontext*, int);
  CUresult (*module_load_data)(CUmodule*, const void*);
  CUresult (*module_unload)(CUmodule);
  CUresult (*module_get_global)(unsigned long long*, size_t*, CUmodule, const char*);
  CUresult (*memcpy_dtoh)(void*, unsigned long long, size_t);
  CUresult (*module_get_function)(CUfunction*, CUmodule, const char*);
  CUresult (*launch_kernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                            unsigned, cudaStream_t, void**, void**);
  CUresult (*launch_cooperative_kernel)(CUfunction, unsigned, unsigned, unsigned, unsigned,
                                        unsigned, unsigned, unsigned, cudaStream_t, void**);
  // CUDA 12's launch with attributes; null with an older driver.
  CUresult (*launch_kernel_ex)(const LaunchConfig*, CUfunction, void**, void**);
  CUresult (*occupancy_max_active_blocks)(int*, CUfunction, int, size_t);
  CUresult (*func_get_attribute)(int*, int, CUfunction);
  CUresult (*func_set_attribute)(CUfunction, int, int);
  CUresult (*get_error_string)(CUresult, const char**);
};

// NVRTC's entry points.
struct Nvrtc {
  nvrtcResult (*create_program)(nvrtcProgram*, const char*, const char*, int, const char* const*,
                                const char* const*);
  nvrtcResult (*compile_program)(nvrtcProgram, int, const char* const*);
  nvrtcResult (*get_program_log_size)(nvrtcProgram, size_t*);
  nvrtcResult (*get_program_log)(nvrtcProgram, char*);
  nvrtcResult (*get_cubin_size)(nvrtcProgram, size_t*);
  nvrtcResult (*get_cubin)(nvrtcProgram, char*);
  nvrtcResult (*destroy_program)(nvrtcProgram*);
  const char* (*get_error_string)(nvrtcResult);
};

template <typename T>
void bind(void* library, const char* name, T& slot) {
  void* symbol = dlsym(library, name);
  if (symbol == nullptr) throw std::runtime_error(std::string("missing symbol ") + name);
  slot = reinterpret_cast<T>(symbol);
}

const Driver& driver() {
  static const Driver d = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (lib == nullptr)
      throw std::runtime_error("could not open libcuda.so.1 (the NVIDIA driver's library)");
    Driver d{};
    bind(lib, "cuDeviceGet", d.device_get);
    bind(lib, "cuDeviceGetAttribute", d.device_get_attribute);
    bind(lib, "cuCtxGetCurrent", d.ctx_get_current);
    bind(lib, "cuCtxSetCurrent", d.ctx_set_current);
    bind(lib, "cuDevicePrimaryCtxRetain", d.primary_ctx_retain);
    bind(lib, "cuModuleLoadData", d.module_load_data);
    bind(lib, "cuModuleUnload", d.module_unload);
    bind(lib, "cuModuleGetGlobal_v2", d.module_get_global);
    bind(lib, "cuMemcpyDtoH_v2", d.memcpy_dtoh);
    bind(lib, "cuModuleGetFunction", d.module_get_function);
    bind(lib, "cuLaunchKernel", d.launch_kernel);
    bind(lib, "cuLaunchCooperativeKernel", d.launch_cooperative_kernel);
    d.launch_kernel_ex =
        reinterpret_cast<decltype(d.launch_kernel_ex)>(dlsym(lib, "cuLaunchKernelEx"));
    bind(lib, "cuOccupancyMaxActiveBlocksPerMultiprocessor", d.occupancy_max_active_blocks);
    bind(lib, "cuFuncGetAttribute", d.func_get_attribute);
    bind(lib, "cuFuncSetAttribute", d.func_set_attribute);
    bind(lib, "cuGetErrorString", d.get_error_string);
    return d;
  }();
  return d;
}

void check(CUresult result, const char* what) {
  if (result == 0) return;
  const char* message = nullptr;
  driver().get_error_string(result, &message);
  throw std::runtime_error(std::string(what) + ": " + (message ? message : "unknown CUDA error"));
}

// Makes `device` current for the lifetime of the guard. The driver API acts
// on the calling thread's current context, which the runtime (and so
// PyTorch) only creates on the first real CUDA call of a thread: if there
// is none yet, the device's primary context — the one PyTorch uses — is
// made current, as PyTorch's own run-time compiled kernels do.
struct CurrentDevice {
  c10::DeviceIndex previous;
  explicit CurrentDevice(int device) : previous(c10::cuda::current_device()) {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    CUcontext context = nullptr;
    check(driver().ctx_get_current(&context), "cuCtxGetCurrent");
    if (context == nullptr) {
      int handle = 0;
      check(driver().device_get(&handle, device), "cuDeviceGet");
      check(driver().primary_ctx_retain(&context, handle), "cuDevicePrimaryCtxRetain");
      check(driver().ctx_set_current(context), "cuCtxSetCurrent");
    }
  }
  ~CurrentDevice() { c10::cuda::set_device(previous); }
};

}  // namespace

extern "C" {

// Opens NVRTC from `library` (a path or a file name); `builtins`, when not
// empty, is its companion libnvrtc-builtins, opened first so that NVRTC
// finds it wherever it lives. Must be called before spark_kernels_compile.
int spark_nvrtc_open(const char* library, const char* builtins, void** out, char* err,
                     size_t err_len) {
  return spark::guarded(err, err_len, [&] {
    if (builtins != nullptr && builtins[0] != '\0' &&
        dlopen(builtins, RTLD_NOW | RTLD_GLOBAL) == nullptr)
      throw std::runtime_error(std::string("could not open ") + builtins + ": " + dlerror());
    void* lib = dlopen(library, RTLD_NOW | RTLD_GLOBAL);
    if (lib == nullptr)
      throw std::runtime_error(std::string("could not open ") + library + ": " + dlerror());
    auto* n = new Nvrtc{};
    bind(lib, "nvrtcCreateProgram", n->create_program);
    bind(lib, "nvrtcCompileProgram", n->compile_program);
    bind(lib, "nvrtcGetProgramLogSize", n->get_program_log_size);
    bind(lib, "nvrtcGetProgramLog", n->get_program_log);
    bind(lib, "nvrtcGetCUBINSize", n->get_cubin_size);
    bind(lib, "nvrtcGetCUBIN", n->get_cubin);
    bind(lib, "nvrtcDestroyProgram", n->destroy_program);
    bind(lib, "nvrtcGetErrorString", n->get_error_string);
    *out = n;
  });
}

// Compiles `source` with `options` (plus the architecture of `device`) and
// loads the result on `device`: `*module` is the loaded module, and
// `*multiprocessors` the device's SM count (kernels size their grids by it).
// On a compilation error the message holds NVRTC's log.
int spark_kernels_compile(void* nvrtc, int device, const char* source, const char* const* options,
                          int num_options, void** module, int* multiprocessors, char* err,
                          size_t err_len) {
  return spark::guarded(err, err_len, [&] {
    const Nvrtc& n = *static_cast<Nvrtc*>(nvrtc);
    CurrentDevice current(device);
    // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR and _MINOR, _MULTIPROCESSOR_COUNT.
    const int capability_major = 75, capability_minor = 76, sm_count = 16;
    int handle = 0, major = 0, minor = 0;
    check(driver().device_get(&handle, device), "cuDeviceGet");
    check(driver().device_get_attribute(&major, capability_major, handle), "cuDeviceGetAttribute");
    check(driver().device_get_attribute(&minor, capability_minor, handle), "cuDeviceGetAttribute");
    check(driver().device_get_attribute(multiprocessors, sm_count, handle), "cuDeviceGetAttribute");
    std::string arch = "--gpu-architecture=sm_" + std::to_string(major * 10 + minor);
    std::vector<const char*> all(options, options + num_options);
    all.push_back(arch.c_str());

    nvrtcProgram program = nullptr;
    nvrtcResult made = n.create_program(&program, source, "decode.cu", 0, nullptr, nullptr);
    if (made != 0) throw std::runtime_error(std::string("nvrtcCreateProgram: ") + n.get_error_string(made));
    nvrtcResult compiled = n.compile_program(program, static_cast<int>(all.size()), all.data());
    std::string log;
    size_t log_size = 0;
    if (n.get_program_log_size(program, &log_size) == 0 && log_size > 1) {
      log.resize(log_size);
      n.get_program_log(program, log.data());
    }
    if (compiled != 0) {
      n.destroy_program(&program);
      throw std::runtime_error(std::string("NVRTC could not compile the kernels (") + arch + "): " +
                               n.get_error_string(compiled) + "\n" + log);
    }
    size_t size = 0;
    n.get_cubin_size(program, &size);
    std::vector<char> cubin(size);
    n.get_cubin(program, cubin.data());
    n.destroy_program(&program);
    check(driver().module_load_data(module, cubin.data()), "cuModuleLoadData");
  });
}

// Unloads a module from `device`: its kernels may no longer be launched.
int spark_kernels_unload(void* module, int device, char* err, size_t err_len) {
  return spark::guarded(err, err_len, [&] {
    CurrentDevice current(device);
    check(driver().module_unload(module), "cuModuleUnload");
  });
}

// Copies up to `bytes` of the module's __device__ variable `name` into
// `dst` on the host; `*copied` is how many it copied (the variable's size,
// if smaller). The copy waits for the device's earlier work on the legacy
// stream only: the caller synchronises first.
int spark_kernels_read_global(void* module, int device, const char* name, void* dst, size_t bytes,
                              size_t* copied, char* err, size_t err_len) {
  return spark::guarded(err, err_len, [&] {
    CurrentDevice current(device);
    unsigned long long address = 0;
    size_t size = 0;
    check(driver().module_get_global(&address, &size, module, name),
          (std::string("cuModuleGetGlobal ") + name).c_str());
    *copied = size < bytes ? size : bytes;
    check(driver().memcpy_dtoh(dst, address, *copied), "cuMemcpyDtoH");
  });
}

// Looks a kernel (an extern "C" name) up in a loaded module.
int spark_kernels_function(void* module, const char* name, void** function, char* err,
                           size_t err_len) {
  return spark::guarded(err, err_len, [&] {
    check(driver().module_get_function(function, module, name),
          (std::string("cuModuleGetFunction ") + name).c_str());
  });
}

// How many blocks of `block` threads of `function`, each with
// `dynamic_shared` bytes of dynamic shared memory, fit on one
// multiprocessor at once (registers and shared memory permitting).
int spark_kernels_occupancy(void* function, int device, int block, int dynamic_shared, int* blocks,
                            char* err, size_t err_len) {
  return spark::guarded(err, err_len, [&] {
    CurrentDevice current(device);
    check(driver().occupancy_max_active_blocks(blocks, function, block,
                                               static_cast<size_t>(dynamic_shared)),
          "cuOccupancyMaxActiveBlocksPerMultiprocessor");
  });
}

// What `function` may have of shared memory on `device`: the bytes its
// own arrays take (`static_bytes`), the most one block may have in all
// once it asks for more than the default 48 KiB (`optin_bytes`), and the
// device's compute capability (major · 10 + minor).
int spark_kernels_shared_memory(void* function, int device, int* static_bytes, int* optin_bytes,
                                int* capability, char* err, size_t err_len) {
  return spark::guarded(err, err_len, [&] {
    CurrentDevice current(device);
    // CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES; CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
    // _COMPUTE_CAPABILITY_MAJOR and _MINOR.
    const int shared_size = 1, optin = 97, capability_major = 75, capability_minor = 76;
    int handle = 0, major = 0, minor = 0;
    check(driver().func_get_attribute(static_bytes, shared_size, function), "cuFuncGetAttribute");
    check(driver().device_get(&handle, device), "cuDeviceGet");
    check(driver().device_get_attribute(optin_bytes, optin, handle), "cuDeviceGetAttribute");
    check(driver().device_get_attribute(&major, capability_major, handle), "cuDeviceGetAttribute");
    check(driver().device_get_attribute(&minor, capability_minor, handle), "cuDeviceGetAttribute");
    *capability = major * 10 + minor;
  });
}

// Lets `function` be launched with up to `bytes` of dynamic shared memory
// (beyond 48 KiB a kernel must ask for it first).
int spark_kernels_reserve_shared(void* function, int device, int bytes, char* err, size_t err_len) {
  return spark::guarded(err, err_len, [&] {
    CurrentDevice current(device);
    const int max_dynamic_shared = 8;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    check(driver().func_set_attribute(function, max_dynamic_shared, bytes), "cuFuncSetAttribute");
  });
}

// Launches `function` on `device`'s current PyTorch stream. `args` points
// to the kernel's arguments, one pointer per argument, as cuLaunchKernel
// takes them; `shared_bytes` is the block's dynamic shared memory. A
// cooperative launch is one whose blocks are all resident at once (the
// driver refuses a grid that does not fit), which a kernel that waits at
// grid-wide barriers needs.
//
// `overlap_previous` asks for Hopper's programmatic dependent launch: the
// kernel may be launched while the one before it on the stream is still
// running, once every block of that one has said so
// (griddepcontrol.launch_dependents) or exited, and its blocks may start
// as soon as they fit (for a cooperative kernel: all of them at once). The
// kernel itself must then wait (griddepcontrol.wait) before it touches
// anything the earlier kernel writes or reads. Where the driver has no
// cuLaunchKernelEx the launch is an ordinary one, which is always correct,
// only without the overlap.
int spark_kernels_launch(void* function, int device, unsigned grid_x, unsigned grid_y,
                         unsigned grid_z, unsigned block_x, unsigned shared_bytes, int cooperative,
                         int overlap_previous, void** args, char* err, size_t err_len) {
  return spark::guarded(err, err_len, [&] {
    CurrentDevice current(device);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device));
    if (overlap_previous && driver().launch_kernel_ex != nullptr) {
      LaunchAttribute attributes[2] = {};
      attributes[0].id = LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
      attributes[0].value.flag = 1;
      attributes[1].id = LAUNCH_ATTRIBUTE_COOPERATIVE;
      attributes[1].value.flag = cooperative ? 1 : 0;
      LaunchConfig config{grid_x, grid_y, grid_z, block_x, 1, 1, shared_bytes,
                          stream, attributes, 2};
      check(driver().launch_kernel_ex(&config, function, args, nullptr), "cuLaunchKernelEx");
    } else if (cooperative) {
      check(driver().launch_cooperative_kernel(function, grid_x, grid_y, grid_z, block_x, 1, 1,
                                               shared_bytes, stream, args),
            "cuLaunchCooperativeKernel");
    } else {
      check(driver().launch_kernel(function, grid_x, grid_y, grid_z, block_x, 1, 1, shared_bytes,
                                   stream, args, nullptr),
            "cuLaunchKernel");
    }
  });
}

}  // extern "C"
