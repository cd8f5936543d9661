//! `ferry`: run Mixture-of-Experts language models on a wgpu GPU.

mod args;
mod commands;
mod gui;
mod load;
mod serve;
mod train;

use clap::Parser;

fn main() {
    quiet_vulkan_device_select();
    let cli = args::Cli::parse();
    if let Err(err) = commands::run(cli) {
        // One line, naming the file, tensor or flag at fault (the error's own message does).
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// Mesa's implicit Vulkan layer that orders devices by the display they drive connects to
/// Wayland on every Vulkan instance, and without a session (`XDG_RUNTIME_DIR` unset: a terminal
/// over ssh, CI, a container) it prints "error: XDG_RUNTIME_DIR is invalid or not set" each
/// time. With no session there is no display to order by, so the layer is turned off
/// (`NODEVICE_SELECT`, Mesa's switch) unless the user set it; adapters are chosen as before.
fn quiet_vulkan_device_select() {
    let no_session = std::env::var_os("XDG_RUNTIME_DIR").is_none_or(|d| d.is_empty());
    if no_session && std::env::var_os("NODEVICE_SELECT").is_none() {
        // SAFETY: the first thing main does, before any other thread exists.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
}
