// Copies between host and GPU that do not wait for the stream, for Rust
// (see src/engine/host_copy.rs).
//
// tch's copies wait: a copy to the host waits for the whole stream, and so
// does a copy from ordinary host memory to the device. The engine queues a
// decode step before it reads the tokens of the step before, so it needs
// copies that take their place in the stream's order instead, plus an event
// to wait for one point of that order. Both go through c10 and ATen, so
// this file links against libtorch alone, like the other bridges.
//
// Every function catches C++ exceptions and reports them through `err`
// (see guarded.h).

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstring>
#include <memory>

#include "guarded.h"

extern "C" {

// Copies `count` int64 values from ordinary host memory into `dst`, an
// int64 CUDA tensor of that many elements, without waiting for the
// stream. The values are staged in pinned memory from PyTorch's caching
// host allocator, which keeps that buffer until the copy has run.
int spark_copy_to_device_async(void* dst, const int64_t* values, int64_t count, char* err,
                               size_t err_len) {
  return spark::guarded(err, err_len, [&] {
    auto& target = *static_cast<at::Tensor*>(dst);
    auto staged = at::empty({count}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(staged.data_ptr<int64_t>(), values, static_cast<size_t>(count) * sizeof(int64_t));
    target.copy_(staged, /*non_blocking=*/true);
  });
}

// Records an event on `device`'s current stream: waiting for it waits for
// the work queued before it, not for what is queued after.
int spark_cuda_event_record(int device, void** out, char* err, size_t err_len) {
  return spark::guarded(err, err_len, [&] {
    auto event = std::make_unique<c10::Event>(c10::DeviceType::CUDA);
    event->record(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)));
    *out = event.release();
  });
}

// Blocks the calling thread until the work before the event is done.
int spark_cuda_event_synchronize(void* event, char* err, size_t err_len) {
  return spark::guarded(err, err_len, [&] { static_cast<c10::Event*>(event)->synchronize(); });
}

void spark_cuda_event_free(void* event) {
  try {
    delete static_cast<c10::Event*>(event);
  } catch (...) {
  }
}

}  // extern "C"
