//! Compiles `istio/**.proto` and `trellis/**.proto` with protox (a pure-Rust protobuf compiler: no protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "istio/v1/auth/ca.proto",
        "trellis/relay/v1/registration.proto",
        "trellis/relay/v1/state.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
