// A C interface to CUDA IPC through PyTorch's caching allocator, for Rust.
//
// CUDA IPC lets one process map another process's GPU memory: the owner
// asks the driver for a *handle* to an allocation (cudaIpcGetMemHandle),
// sends those 64 bytes to a peer by any means, and the peer opens the
// handle (cudaIpcOpenMemHandle) to get a pointer it can copy into — from a
// kernel or a memcpy on its own GPU, over NVLink or PCIe. It is how
// torch.multiprocessing shares CUDA tensors, and what NIXL and UCX use
// between GPUs of one host.
//
// Tensors live inside larger cudaMalloc segments owned by PyTorch's
// caching allocator, and a handle names a whole segment, so the allocator
// does the bookkeeping: shareIpcHandle gives the segment's handle and the
// tensor's offset in it; getIpcDevPtr opens a handle once per process and
// closes it when the last user lets go.
//
// Every function runs through spark::guarded (guarded.h): C++ exceptions
// come back as a message in `err` and a non-zero return.

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include "guarded.h"

extern "C" {

// The IPC handle of the allocation holding `ptr` (memory from PyTorch's
// caching allocator) into `handle` (capacity `handle_cap`; its length in
// `handle_len`), and where `ptr` lies in that allocation.
int spark_cuda_ipc_export(void* ptr, uint8_t* handle, size_t handle_cap, size_t* handle_len,
                          int64_t* offset, char* err, size_t err_len) {
  return spark::guarded(err, err_len, [&] {
    auto shared = c10::cuda::CUDACachingAllocator::shareIpcHandle(ptr);
    if (shared.handle.size() > handle_cap) {
      throw std::runtime_error("the IPC handle is larger than the buffer given for it");
    }
    std::memcpy(handle, shared.handle.data(), shared.handle.size());
    *handle_len = shared.handle.size();
    *offset = static_cast<int64_t>(shared.offset);
  });
}

// Maps a peer's allocation into this process, for kernels on `device`
// (peer access to the allocation's GPU is enabled if it is another one).
// `*mapping` keeps the mapping open until spark_cuda_ipc_close.
int spark_cuda_ipc_open(const uint8_t* handle, size_t handle_len, int device, void** base,
                        void** mapping, char* err, size_t err_len) {
  return spark::guarded(err, err_len, [&] {
    // The handle is opened for the current device; restore it afterwards.
    // (c10::cuda::CUDAGuard would do this, but its header calls the CUDA
    // runtime directly, which this bridge does not link.)
    auto previous = c10::cuda::current_device();
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    try {
      std::string bytes(reinterpret_cast<const char*>(handle), handle_len);
      auto opened =
          new std::shared_ptr<void>(c10::cuda::CUDACachingAllocator::getIpcDevPtr(bytes));
      *base = opened->get();
      *mapping = opened;
    } catch (...) {
      c10::cuda::set_device(previous);
      throw;
    }
    c10::cuda::set_device(previous);
  });
}

void spark_cuda_ipc_close(void* mapping) {
  try {
    delete static_cast<std::shared_ptr<void>*>(mapping);
  } catch (...) {
  }
}

}  // extern "C"
