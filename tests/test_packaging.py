"""The ways to install the package stay whole: the Nix package and shell carry every runtime
dependency pyproject.toml declares, and install.sh stops with rustup's command when no Rust
toolchain is on PATH, before it creates anything."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).parent.parent


def runtime_dependencies() -> list[str]:
    """pyproject.toml's [project].dependencies as normalized names (PEP 503), which nixpkgs also uses."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = []
    for requirement in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
        assert name, f"unparsable requirement {requirement!r}"
        names.append(re.sub(r"[-_.]+", "-", name.group(0)).lower())
    return names


def nix_list(text: str, attribute: str) -> set[str]:
    """The words inside `attribute = [ ... ];` of a Nix file."""
    found = re.search(rf"\b{attribute}\s*=\s*\[(.*?)\];", text, re.S)
    assert found, f"no `{attribute} = [ ... ];` list"
    return set(found.group(1).split())


def nix_arguments(text: str) -> set[str]:
    """The names a callPackage-style Nix file takes in its leading `{ a, b, ... }:`."""
    body = re.sub(r"#[^\n]*", "", text)
    found = re.match(r"\s*\{(.*?)\}:", body, re.S)
    assert found, "no argument set at the top"
    return {name.strip() for name in found.group(1).split(",") if name.strip()}


def test_runtime_dependencies_are_the_ones_the_app_imports() -> None:
    # Guards the parser below: an empty or misread list would make the Nix checks pass vacuously.
    assert {"numpy", "psutil", "aiohttp", "rich"} <= set(runtime_dependencies())


def test_nix_package_propagates_every_runtime_dependency() -> None:
    text = (ROOT / "nix" / "package.nix").read_text()
    arguments, dependencies = nix_arguments(text), nix_list(text, "dependencies")
    for name in runtime_dependencies():
        assert name in arguments, f"nix/package.nix does not take {name} as an argument"
        assert name in dependencies, f"nix/package.nix's dependencies lack {name}"


def test_nix_shell_python_has_every_runtime_dependency() -> None:
    text = (ROOT / "nix" / "shell.nix").read_text()
    in_shell = set(re.findall(r"\bps\.([A-Za-z0-9_-]+)", text))
    missing = [name for name in runtime_dependencies() if name not in in_shell]
    assert not missing, f"nix/shell.nix's Python lacks {missing}"


def test_install_script_without_rust_prints_rustup_and_creates_nothing(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(ROOT / "install.sh", clone / "install.sh")
    # A PATH holding only bash and this Python: no cargo, no rustc, whatever the machine has.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    bash = shutil.which("bash")
    assert bash
    (bin_dir / "bash").symlink_to(bash)
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    done = subprocess.run(
        [str(bin_dir / "bash"), "install.sh"], cwd=clone, env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no Rust toolchain found" in done.stderr
    assert "curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh" in done.stderr
    assert not (clone / ".venv").exists()


def test_install_script_names_an_old_python(tmp_path: Path) -> None:
    old = tmp_path / "python-old"
    old.write_text("#!/bin/sh\nexit 1\n")
    old.chmod(0o755)
    env = {**os.environ, "PYTHON": str(old)}
    done = subprocess.run(
        ["bash", str(ROOT / "install.sh")], env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path
    )
    assert done.returncode == 1
    assert "older than 3.10" in done.stderr
