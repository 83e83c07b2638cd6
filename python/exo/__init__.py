"""exo on a Rust core: a peer-to-peer LLM inference cluster (xotorch-core)."""

import os as _os
import sys as _sys

# The core binds CUDA's driver functions on first call: a CUDA build loads the driver itself
# when the engine starts and computes on the CPU where there is none. Python loads extensions
# binding every symbol at once, so the core is loaded here, lazily, before anything imports it.
_flags = _sys.getdlopenflags()
_sys.setdlopenflags((_flags & ~_os.RTLD_NOW) | _os.RTLD_LAZY)
try:
    import exo._core  # noqa: F401  (loaded for its side effect: the lazily bound core)
finally:
    _sys.setdlopenflags(_flags)

from exo.settings import DEBUG as DEBUG  # noqa: E402
from exo.settings import DEBUG_DISCOVERY as DEBUG_DISCOVERY  # noqa: E402
from exo.settings import VERSION as VERSION  # noqa: E402
