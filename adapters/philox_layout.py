"""Where NOLA basis values sit in Philox's counter space, shared by the CPU generator
(``philox``: torch and the C loop) and the GPU one (``nola_triton``). A leaf module, so
neither generator imports the other.

Element ``e`` of stream ``s`` draws lane ``e % 4`` of counter ``s * 2^STREAM_BITS + e // 4``
(docs/adapter-format.md).
"""

from __future__ import annotations

STREAM_BITS = 40  # counter = stream * 2^40 + e // 4
STREAM_LIMIT_BITS = 24  # streams are < 2^24, as the C loop checks
SEED_LIMIT_BITS = 63  # seeds are < 2^63: Triton types them int64


def counter_base(seed: int, stream: int) -> int:
    """The first counter of ``stream``, ``stream << STREAM_BITS``; raises ``ValueError``
    for a seed or stream out of range."""
    if not 0 <= seed < 1 << SEED_LIMIT_BITS:
        raise ValueError(f"seed must be in [0, 2^{SEED_LIMIT_BITS}), got {seed}")
    if not 0 <= stream < 1 << STREAM_LIMIT_BITS:
        raise ValueError(f"stream must be in [0, 2^{STREAM_LIMIT_BITS}), got {stream}")
    return stream << STREAM_BITS
