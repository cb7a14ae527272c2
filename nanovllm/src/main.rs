//! The `nanovllm` command: generate, chat, bench.

fn main() {
    eprintln!("nanovllm: the engine is not built yet");
    std::process::exit(2);
}
