"""nolaserve: one base LLM, thousands of NOLA, LoRA and RMM adapters.

This is the top-level package (pyproject maps ``nolaserve`` to ``server/toplevel``; every
subpackage lives in its own folder). Its names load lazily, so that importing the
torch-free client package through it imports no torch:

    from nolaserve import LLM, SamplingParams     # the offline API (server/offline.py)
"""

from __future__ import annotations

import importlib
from typing import Any

# This folder sits inside server/, so an editable install could also import it as
# ``nolaserve.server.toplevel``: a second copy of the top package. Only one name is its own.
if __name__ != "nolaserve":
    raise ImportError(f"{__name__} is the top-level package nolaserve: import nolaserve")

_LAZY = {
    "LLM": "nolaserve.server.offline",
    "RequestOutput": "nolaserve.server.offline",
    "CompletionOutput": "nolaserve.server.offline",
    "LoRARequest": "nolaserve.server.offline",
    "Logprob": "nolaserve.server.offline",
    "SamplingParams": "nolaserve.server.engine.sequence",
    "StructuredOutputsParams": "nolaserve.server.engine.sequence",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'nolaserve' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
