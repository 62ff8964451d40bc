//! Compiles `proto/hubbub.v1.proto` with a pure-Rust protobuf compiler (no `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/hubbub.v1.proto");
    let fds = protox::compile(["proto/hubbub.v1.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
