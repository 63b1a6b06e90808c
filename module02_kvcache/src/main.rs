//! `module02_kvcache`: the KV cache: anatomy, scaling, transfer cost, compression
//!
//! Not built yet: this module arrives with issue #5 (book chapter 2).
//! Until then the binary says so and exits with an error, rather than print
//! anything that looks like a result.

fn main() {
    eprintln!(
        "module02_kvcache (the KV cache: anatomy, scaling, transfer cost, compression) is not implemented yet: it arrives with issue #5, \
         book chapter 2. See README.md for the modules that run today."
    );
    std::process::exit(2);
}
