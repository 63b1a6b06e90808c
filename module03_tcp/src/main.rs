//! `module03_tcp`: prefill and decode servers with KV transfer over TCP
//!
//! Not built yet: this module arrives with issue #6 (book chapter 3).
//! Until then the binary says so and exits with an error, rather than print
//! anything that looks like a result.

fn main() {
    eprintln!(
        "module03_tcp (prefill and decode servers with KV transfer over TCP) is not implemented yet: it arrives with issue #6, \
         book chapter 3. See README.md for the modules that run today."
    );
    std::process::exit(2);
}
