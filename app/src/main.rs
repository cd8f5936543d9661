//! `ferry`: run Mixture-of-Experts language models on a wgpu GPU.

mod args;
mod commands;
mod gui;
mod load;
mod train;

use clap::Parser;

fn main() {
    let cli = args::Cli::parse();
    if let Err(err) = commands::run(cli) {
        // One line, naming the file, tensor or flag at fault (the error's own message does).
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
