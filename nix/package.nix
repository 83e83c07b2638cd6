# Builds the xotorch-core Python package (the `exo` sources plus the `exo._core`
# Rust extension) with maturin; call it with python3xxPackages.callPackage.
{
  lib,
  buildPythonPackage,
  rustPlatform,
  protobuf,
  libiconv,
  stdenv,
  numpy,
  psutil,
  aiohttp,
  rich,
  pillow,
  uvloop,
}:

let
  cargoToml = lib.importTOML ../Cargo.toml;
  root = ../.;
in
buildPythonPackage {
  pname = "xotorch-core";
  # pyproject.toml declares the version dynamic; maturin takes it from Cargo.toml.
  inherit (cargoToml.package) version;
  pyproject = true;

  # Only what the build reads, so edits to tests/, bench/ or docs do not force a rebuild.
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../build.rs
      ../pyproject.toml
      ../src
      ../proto
      ../python
      (lib.fileset.maybeMissing ../README.md)
    ];
  };

  cargoDeps = rustPlatform.importCargoLock { lockFile = ../Cargo.lock; };

  nativeBuildInputs = [
    rustPlatform.cargoSetupHook
    rustPlatform.maturinBuildHook
    protobuf
  ];

  buildInputs = lib.optionals stdenv.hostPlatform.isDarwin [ libiconv ];

  # build.rs uses $PROTOC when set instead of the protoc-bin-vendored binary.
  env.PROTOC = lib.getExe' protobuf "protoc";

  # Mirrors [project].dependencies in pyproject.toml; tests/test_packaging.py checks the two agree.
  dependencies = [
    numpy
    psutil
    aiohttp
    rich
    pillow
    uvloop
  ];

  pythonImportsCheck = [
    "exo"
    "exo._core"
  ];

  meta = {
    description = cargoToml.package.description;
    license = lib.licenses.gpl3Only;
    platforms = lib.platforms.linux ++ lib.platforms.darwin;
  };
}
