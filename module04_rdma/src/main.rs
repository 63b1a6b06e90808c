//! `module04_rdma`: one-sided KV transfer.
//!
//! ```text
//! cargo run --release -p module04_rdma -- bench                   # one-sided (auto backend) vs module 3's framed path
//! cargo run --release -p module04_rdma -- bench --backend ibverbs # on a machine with an RDMA NIC
//! cargo run --release -p module04_rdma -- bench --backend cuda-ipc # GPU memory, copied by the GPU
//! ```

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use module04_rdma::agent::BackendChoice;
use module04_rdma::bench;

#[derive(Parser)]
#[command(
    version,
    about = "Module 4: one-sided KV transfer with a NIXL-like agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Latency and bandwidth of one-sided writes vs module 3's frames, 4 KiB to 64 MiB.
    Bench {
        /// Message sizes in bytes [default: 4 KiB, 16 KiB, … 64 MiB]
        #[arg(long, value_delimiter = ',')]
        sizes: Option<Vec<u64>>,
        #[arg(long, default_value = "results/module04_bench.json")]
        json: PathBuf,
        /// The one-sided side's backend: auto (ibverbs if an RDMA port is
        /// active, else tcp), tcp, ibverbs, ibverbs:DEVICE or cuda-ipc (GPU 0)
        #[arg(long, default_value = "auto")]
        backend: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Bench {
            sizes,
            json,
            backend,
        } => {
            let sizes = sizes.unwrap_or_else(bench::default_sizes);
            let backend = BackendChoice::parse(&backend, "127.0.0.1:0")?;
            eprintln!("one-sided writes and framed messages (module 3), loopback …");
            let results = bench::run(&sizes, backend)?;
            let table = bench::render(&results);
            print!("{table}");
            shared::results::write(&json, &results, &table)?;
            eprintln!("wrote {} (and .txt)", json.display());
            Ok(())
        }
    }
}
