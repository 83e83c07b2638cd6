# Development shell for xotorch-core: Rust toolchain, Python 3.11 with the test
# tools and the package's runtime dependencies, maturin and protoc; call it with pkgs.callPackage.
{
  lib,
  mkShell,
  stdenv,
  rustPlatform,
  cargo,
  rustc,
  clippy,
  rustfmt,
  rust-analyzer,
  python311,
  maturin,
  ruff,
  protobuf,
  pkg-config,
  libiconv,
}:

let
  python = python311.withPackages (ps: [
    ps.pip
    ps.pytest
    ps.pytest-asyncio
    ps.pytest-timeout
    ps.hypothesis
    ps.numpy
    ps.psutil
    ps.aiohttp
    ps.rich
    ps.pillow
    ps.uvloop
  ]);
in
mkShell {
  packages =
    [
      cargo
      rustc
      clippy
      rustfmt
      rust-analyzer
      python
      maturin
      ruff
      protobuf
      pkg-config
    ]
    ++ lib.optionals stdenv.hostPlatform.isDarwin [ libiconv ];

  # build.rs uses $PROTOC when set instead of the protoc-bin-vendored binary.
  PROTOC = lib.getExe' protobuf "protoc";
  # Lets rust-analyzer find the standard library sources.
  RUST_SRC_PATH = "${rustPlatform.rustLibSrc}";
}
