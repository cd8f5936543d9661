//! Ferry's integration tests, built as one binary (one link of the burn/wgpu stack instead of
//! twelve). The target belongs to the `app` package (`app/Cargo.toml`) so the CLI and GUI tests
//! can run the `ferry` binary; run one part with e.g. `cargo test -p ferry --test ferry-tests golden::`.

mod support;

mod arrows;
mod bad_input;
mod big_little;
mod cli;
mod families;
mod fuzz;
mod golden;
mod gui;
mod hub;
mod long_context;
mod mole;
mod offload;
mod pregate;
mod quant;
mod roofline;
mod serve;
mod tokenizer;
mod trace;
