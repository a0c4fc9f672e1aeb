use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    gpualloc_cli::main(gpualloc_cli::Cli::parse()).await
}
