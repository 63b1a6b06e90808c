//! `module00_env`: environment check: GPU, RDMA, libtorch/CUDA, network
//!
//! Not built yet: this module arrives with issue #4 (book chapter 0).
//! Until then the binary says so and exits with an error, rather than print
//! anything that looks like a result.

fn main() {
    eprintln!(
        "module00_env (environment check: GPU, RDMA, libtorch/CUDA, network) is not implemented yet: it arrives with issue #4, \
         book chapter 0. See README.md for the modules that run today."
    );
    std::process::exit(2);
}
