"""The user's documents work as written. Every code block of the README, bench/README.md and docs/
is run where it can run offline in seconds (against a synthetic model and an API over a fake node),
and otherwise checked to name real files, modules, flags and routes."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from exo.main import build_parser
from support.app_harness import REPLY, Served

ROOT = Path(__file__).parent.parent
DOCUMENTS = [
    "README.md",
    "bench/README.md",
    "docs/architecture.md",
    "docs/compatibility.md",
    "docs/configuration.md",
    "docs/models.md",
    "docs/packaging.md",
    "docs/rockchip.md",
    "docs/training.md",
]
# The model directory and the API address the documents use; tests put their own in their place.
MODEL = "/tmp/tiny-llama"
API = "http://localhost:52415"
RUN_LIMIT = 120


@dataclass(frozen=True)
class Block:
    """A fenced code block of a document."""

    document: str
    line: int
    language: str
    code: str

    def __str__(self) -> str:
        return f"{self.document}:{self.line}"


def _blocks() -> list[Block]:
    found = []
    for document in DOCUMENTS:
        text = (ROOT / document).read_text()
        for match in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M):
            line = text.count("\n", 0, match.start()) + 1
            found.append(Block(document, line, match.group(1), match.group(2)))
    return found


def _commands(block: Block) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, split at `&&` and `&`."""
    commands = []
    for line in block.code.replace("\\\n", " ").splitlines():
        current: list[str] = []
        for word in shlex.split(line, comments=True):
            if word in ("&&", "&"):
                commands.append(current)
                current = []
            else:
                current.append(word)
        if current:
            commands.append(current)
    return commands


BLOCKS = _blocks()
SHELL = [
    (f"{block}:{i}", command)
    for block in BLOCKS
    if block.language == "sh"
    for i, command in enumerate(_commands(block))
]
PYTHON = [block for block in BLOCKS if block.language == "python"]


def _target(argv: list[str]) -> tuple[list[str], list[str]]:
    """How to run a `python` command here, and its arguments."""
    assert argv[0] == "python", argv
    if argv[1] == "-m":
        return [sys.executable, "-m", argv[2]], argv[3:]
    assert (ROOT / argv[1]).is_file(), f"{argv[1]} does not exist"
    return [sys.executable, str(ROOT / argv[1])], argv[2:]


@functools.cache
def _help(target: tuple[str, ...]) -> str:
    done = subprocess.run([*target, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=RUN_LIMIT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_documents_have_only_shell_and_python_blocks() -> None:
    assert PYTHON and SHELL
    assert {block.language for block in BLOCKS} == {"sh", "python"}, [str(b) for b in BLOCKS if not b.language]


@pytest.mark.parametrize("command", [command for _, command in SHELL], ids=[name for name, _ in SHELL])
def test_every_command_names_real_things(command: list[str]) -> None:
    if command[0] == "python":
        target, arguments = _target(command)
        usage = _help(tuple(target))
        for flag in (a.split("=")[0] for a in arguments if a.startswith("--")):
            assert re.search(rf"{re.escape(flag)}(?![\w-])", usage), f"{flag} is not a flag of {command[:3]}"
        if target[-1] == "exo.main" and "--help" not in arguments:
            build_parser().parse_args(arguments)
    elif command[0] == "pip" and command[2] == ".":
        assert command == ["pip", "install", "."] and (ROOT / "pyproject.toml").is_file()
    elif command[0] == "pip":
        # The CUDA wheel that scripts/build-cuda writes, with the CUDA libraries it links.
        assert command[:3] == ["pip", "install", "dist-cuda/*.whl"], command
        assert "dist-cuda" in (ROOT / "scripts" / "build-cuda").read_text()
    elif command[0] == "curl":
        assert any(word.startswith("localhost:52415/") for word in command), command
    else:
        # A script of the repository; any flag it is given is one the script names.
        assert os.access(ROOT / command[0], os.X_OK), f"unknown command {command}"
        script = (ROOT / command[0]).read_text()
        for flag in (a for a in command[1:] if a.startswith("-")):
            assert flag in script, f"{command[0]} does not mention {flag}"


@pytest.mark.parametrize(
    "command", [c for _, c in SHELL if c[:3] == ["python", "-m", "exo.testing.synth"]], ids=lambda c: " ".join(c)
)
def test_the_synthetic_model_command_runs(command: list[str], tmp_path: Path) -> None:
    gguf = "--gguf" in command
    out = tmp_path / ("model.gguf" if gguf else "model")
    target = command[command.index("--out") + 1]
    argv = [sys.executable, *(str(out) if word == target else word for word in command[1:])]
    subprocess.run(argv, cwd=ROOT, check=True, timeout=RUN_LIMIT)
    if gguf:
        assert out.read_bytes()[:4] == b"GGUF"
    else:
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] > 0


def _curl(command: list[str], base: str) -> tuple[str, str, dict[str, str], str | None]:
    """(method, url, headers, body) of a curl command, its address replaced by `base`."""
    headers, body, url, words = {}, None, "", iter(command[1:])
    for word in words:
        if word == "-H":
            name, value = next(words).split(":", 1)
            headers[name] = value.strip()
        elif word == "-d":
            body = next(words)
        elif not word.startswith("-"):
            url = base + word.removeprefix("localhost:52415")
    return ("POST" if body is not None else "GET"), url, headers, body


CURLS = [(name, c) for name, c in SHELL if c[0] == "curl"]


@pytest.mark.parametrize("command", [c for _, c in CURLS], ids=[name for name, _ in CURLS])
async def test_every_curl_command_is_answered(command: list[str], served: Served, model_dir: Path) -> None:
    method, url, headers, body = _curl(command, served.url)
    if body is not None:
        body = body.replace(MODEL, str(model_dir))
    async with aiohttp.ClientSession() as session, session.request(method, url, headers=headers, data=body) as reply:
        assert reply.status == 200, await reply.text()
        answer = await reply.json()
    if body is not None:  # the fake node's reply, cut at the command's max_tokens
        content = answer["choices"][0]["message"]["content"]
        assert content and REPLY.startswith(content)


async def _run(code: str, cwd: Path) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), RUN_LIMIT)
    assert process.returncode == 0, err.decode()
    assert out.strip(), "the snippet printed nothing"
    return out.decode()


OFFLINE = [block for block in PYTHON if API not in block.code]
WITH_API = [block for block in PYTHON if API in block.code]


@pytest.mark.parametrize("block", OFFLINE, ids=str)
async def test_every_python_block_runs(block: Block, model_dir: Path, tmp_path: Path) -> None:
    await _run(block.code.replace(MODEL, str(model_dir)), tmp_path)


@pytest.mark.parametrize("block", WITH_API, ids=str)
async def test_every_python_block_with_the_api_runs(
    block: Block, served: Served, model_dir: Path, tmp_path: Path
) -> None:
    code = block.code.replace(API, served.url).replace(MODEL, str(model_dir))
    printed = (await _run(code, tmp_path)).strip()
    assert REPLY.startswith(printed)
