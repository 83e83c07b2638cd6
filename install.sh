#!/usr/bin/env bash
# Installs xotorch-core from this clone into a virtual environment .venv beside this script:
# checks for Python 3.10+ and a Rust toolchain, then `pip install .` builds the extension.
#
#   ./install.sh                  # uses python3
#   PYTHON=python3.12 ./install.sh
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"
[ "$here" = "${BASH_SOURCE[0]}" ] && here=.
cd "$here"

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
    echo "install.sh: $python not found; install Python 3.10 or newer (or set PYTHON)." >&2
    exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "install.sh: $python is older than 3.10; xotorch-core needs Python 3.10 or newer." >&2
    exit 1
fi

# pip builds the extension from source, so cargo and rustc must be on PATH before anything is created.
if ! command -v cargo >/dev/null 2>&1 || ! command -v rustc >/dev/null 2>&1; then
    # Shell builtins only: on a bare PATH this message is all that must work.
    printf '%s\n' >&2 \
        "install.sh: no Rust toolchain found (cargo and rustc are not on PATH)." \
        "xotorch-core's core is written in Rust and is compiled during the install. Install Rust 1.89 or" \
        "newer with rustup, then open a new shell (or run: . \"\$HOME/.cargo/env\") and run ./install.sh again:" \
        "" \
        "    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh"
    exit 1
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --upgrade pip
.venv/bin/python -m pip install .

cat <<'MSG'

Installed. Start a node with:

    source .venv/bin/activate
    python -m exo.main          # or: exo
MSG
