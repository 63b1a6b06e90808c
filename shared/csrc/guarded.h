// Error handling shared by the C++ bridges (cuda_graph.cpp, cuda_ipc.cpp).
//
// A C++ exception must never unwind into Rust. Every bridge function runs
// its body through `guarded`, which catches whatever is thrown, copies the
// message into the caller's buffer `err` (`err_len` bytes, always
// NUL-terminated) and returns non-zero; 0 means success.

#pragma once

#include <cstddef>
#include <cstring>
#include <exception>

namespace spark {

inline void write_error(const char* what, char* err, size_t err_len) {
  if (err == nullptr || err_len == 0) return;
  std::strncpy(err, what, err_len - 1);
  err[err_len - 1] = '\0';
}

template <typename F>
int guarded(char* err, size_t err_len, F body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
  } catch (...) {
    write_error("unknown C++ exception", err, err_len);
  }
  return 1;
}

}  // namespace spark
