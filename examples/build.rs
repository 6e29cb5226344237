//! Compiles `proto/greeter.proto` into `OUT_DIR` (never committed) with the protoc named by
//! `PROTOC`: `tools/protoc`, the vendored one (see `.cargo/config.toml`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/greeter.proto"], &["proto"])?;
    Ok(())
}
