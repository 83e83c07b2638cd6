"""exo on a Rust core: a peer-to-peer LLM inference cluster (xotorch-core)."""

from exo.helpers import DEBUG as DEBUG
from exo.helpers import DEBUG_DISCOVERY as DEBUG_DISCOVERY
from exo.helpers import VERSION as VERSION
