//! Generates the gRPC client and server from `proto/identity.proto`.
//!
//! protoc comes from the system (`protobuf-compiler`, installed by
//! `cargo xtask setup`); set `PROTOC` to use another one.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/identity.proto");
    tonic_prost_build::configure().compile_protos(&["proto/identity.proto"], &["proto"])?;
    Ok(())
}
