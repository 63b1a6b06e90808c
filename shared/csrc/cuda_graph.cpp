// A C interface to libtorch's at::cuda::CUDAGraph, for Rust.
//
// tch exposes tensors and operators but not CUDA graphs, and a graph must
// cooperate with PyTorch's caching allocator (memory allocated during capture
// comes from a private pool that lives as long as the graph), so it cannot be
// done with the CUDA runtime API alone. These few functions are the whole
// bridge: begin a capture on a side stream, end it, replay, free.
//
// Every function catches C++ exceptions and reports them through `err`
// (a buffer of `err_len` bytes) with a non-zero return: an exception must
// never unwind into Rust.

#include <ATen/Context.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>

#include "guarded.h"

namespace {

struct Graph {
  at::cuda::CUDAGraph graph;
  // The stream that was current before the capture, restored at its end.
  std::optional<c10::cuda::CUDAStream> previous;
};


}  // namespace

extern "C" {

// A fresh memory-pool id: graphs captured with the same id share memory
// (safe when they are replayed one at a time, as the engine does).
int spark_cuda_graph_pool_handle(uint64_t* first, uint64_t* second, char* err, size_t err_len) {
  return spark::guarded(err, err_len, [&] {
    auto id = at::cuda::graph_pool_handle();
    *first = id.first;
    *second = id.second;
  });
}

int spark_cuda_graph_new(void** out, char* err, size_t err_len) {
  return spark::guarded(err, err_len, [&] { *out = new Graph(); });
}

void spark_cuda_graph_free(void* graph) {
  try {
    delete static_cast<Graph*>(graph);
  } catch (...) {
  }
}

// Waits for the device, makes a side stream current (capture is not allowed
// on the default stream) and starts capturing. Capture mode is thread-local:
// other threads may keep using CUDA meanwhile.
int spark_cuda_graph_begin(void* graph, int device, uint64_t pool_first, uint64_t pool_second,
                           char* err, size_t err_len) {
  return spark::guarded(err, err_len, [&] {
    auto* g = static_cast<Graph*>(graph);
    auto index = static_cast<c10::DeviceIndex>(device);
    c10::cuda::device_synchronize();
    g->previous = c10::cuda::getCurrentCUDAStream(index);
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(false, index));
    try {
      g->graph.capture_begin({pool_first, pool_second}, cudaStreamCaptureModeThreadLocal);
    } catch (...) {
      c10::cuda::setCurrentCUDAStream(*g->previous);
      throw;
    }
  });
}

// Ends the capture (instantiating the graph) and restores the stream.
int spark_cuda_graph_end(void* graph, char* err, size_t err_len) {
  return spark::guarded(err, err_len, [&] {
    auto* g = static_cast<Graph*>(graph);
    try {
      g->graph.capture_end();
    } catch (...) {
      c10::cuda::setCurrentCUDAStream(*g->previous);
      throw;
    }
    c10::cuda::setCurrentCUDAStream(*g->previous);
    c10::cuda::device_synchronize();
  });
}

// Launches the whole recorded graph on the current stream.
int spark_cuda_graph_replay(void* graph, char* err, size_t err_len) {
  return spark::guarded(err, err_len, [&] { static_cast<Graph*>(graph)->graph.replay(); });
}

// Turns PyTorch's cuDNN attention backend on or off; returns whether it was
// on. cuDNN builds an execution plan for every new shape it sees (tens of
// milliseconds each): worth it inside a graph, captured once, not for
// shapes that change every step.
int spark_sdp_use_cudnn(int enabled) {
  bool previous = at::globalContext().userEnabledCuDNNSDP();
  at::globalContext().setSDPUseCuDNN(enabled != 0);
  return previous ? 1 : 0;
}

}  // extern "C"
