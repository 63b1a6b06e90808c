//! `module06_dynamo`: the full system behind an OpenAI-compatible API
//!
//! Not built yet: this module arrives with issue #9 (book chapter 6).
//! Until then the binary says so and exits with an error, rather than print
//! anything that looks like a result.

fn main() {
    eprintln!(
        "module06_dynamo (the full system behind an OpenAI-compatible API) is not implemented yet: it arrives with issue #9, \
         book chapter 6. See README.md for the modules that run today."
    );
    std::process::exit(2);
}
