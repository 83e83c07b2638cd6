//! Compiles `proto/node_service.proto` into Rust types and tonic stubs.
//! protoc comes from the `protoc-bin-vendored` crate unless `PROTOC` names one.

#[allow(clippy::print_stdout, reason = "a build script talks to cargo on stdout")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    println!("cargo:rerun-if-changed=proto/node_service.proto");
    tonic_prost_build::configure()
        .protoc_arg("--experimental_allow_proto3_optional")
        .compile_protos(&["proto/node_service.proto"], &["proto"])?;
    Ok(())
}
