//! `module04_rdma`: one-sided KV transfer with a NIXL-like agent
//!
//! Not built yet: this module arrives with issue #7 (book chapter 4).
//! Until then the binary says so and exits with an error, rather than print
//! anything that looks like a result.

fn main() {
    eprintln!(
        "module04_rdma (one-sided KV transfer with a NIXL-like agent) is not implemented yet: it arrives with issue #7, \
         book chapter 4. See README.md for the modules that run today."
    );
    std::process::exit(2);
}
