//! `module05_routing`: KV-aware routing with a registry in etcd
//!
//! Not built yet: this module arrives with issue #8 (book chapter 5).
//! Until then the binary says so and exits with an error, rather than print
//! anything that looks like a result.

fn main() {
    eprintln!(
        "module05_routing (KV-aware routing with a registry in etcd) is not implemented yet: it arrives with issue #8, \
         book chapter 5. See README.md for the modules that run today."
    );
    std::process::exit(2);
}
