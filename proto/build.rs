//! Compiles `taskfactory/v1/*.proto` with protox (pure Rust, no system `protoc`) and writes the
//! file descriptor set next to the generated code; gRPC reflection and the proto3 JSON mapping
//! both read it.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=taskfactory");
    let files = ["taskfactory/v1/taskfactory.proto"];
    let fds = protox::compile(files, ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("taskfactory_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
