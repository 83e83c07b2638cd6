"""exo on a Rust core: a peer-to-peer LLM inference cluster (xotorch-core)."""

from exo.settings import DEBUG as DEBUG
from exo.settings import DEBUG_DISCOVERY as DEBUG_DISCOVERY
from exo.settings import VERSION as VERSION
