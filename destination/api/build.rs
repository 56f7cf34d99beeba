//! Generates the gRPC code from `proto/destination.proto`.
//!
//! protoc comes from the system (Debian's `protobuf-compiler`, installed by
//! `cargo xtask setup`) rather than a vendored binary crate: one less large
//! download, and the same compiler the identity API uses. `PROTOC` overrides.

fn main() {
    println!("cargo:rerun-if-changed=proto/destination.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    if std::env::var_os("PROTOC").is_none() && which("protoc").is_none() {
        panic!(
            "protoc not found: run `cargo xtask setup` (installs Debian's protobuf-compiler) \
             or set PROTOC to a protoc binary"
        );
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Ordered maps: identical views encode to identical bytes.
        .btree_map(".")
        .compile_protos(&["proto/destination.proto"], &["proto"])
        .unwrap_or_else(|e| panic!("compiling proto/destination.proto: {e}"));
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
