"""Portable NOLA basis values: Philox4x32-10, bit-identical to ``nola_triton`` on the GPU.

Element ``e`` of stream ``s`` for ``seed`` is ``2*u - 1`` where ``u`` is Triton's
``uint_to_uniform_float`` of lane ``e % 4`` of
``Philox4x32-10(counter=(c lo, c hi, 0, 0), key=(seed lo, seed hi))``, ``c = s*2^40 + e//4``.

Two implementations with one meaning: the torch code below (any device, int64 arithmetic)
and the C loop in ``_philox.c`` (CPU fast path, used when it was built).
"""

from __future__ import annotations

import functools

import torch

from .philox_layout import STREAM_BITS

try:
    from . import _philox as _native
except ImportError:  # built without a C compiler: the torch path gives the same values
    _native = None

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_SCALE = 4.6566127342e-10
CHUNK = 1 << 19  # basis values per torch step: ~30 MiB of int64 temporaries at most


def _philox4x32(seed: int, c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of counters ``(c0, c1, 0, 0)`` (int64 [n], each word < 2^32) -> the 4
    output words as int64 [n, 4]."""
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, seed >> 32
    for _ in range(10):
        p0 = c0 * _ROUND_A  # exact: both factors < 2^32, product wraps only past 2^63
        p2 = c2 * _ROUND_B
        c0, c2 = ((p2 >> 32) & _M32) ^ c1 ^ k0, ((p0 >> 32) & _M32) ^ c3 ^ k1
        c1, c3 = p2 & _M32, p0 & _M32
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def _to_symmetric_uniform(words: torch.Tensor) -> torch.Tensor:
    x = words.to(torch.int32)  # keeps the low 32 bits: a bitcast of the uint32 word
    x = torch.where(x < 0, ~x, x)
    u = x.to(torch.float32) * torch.tensor(_SCALE, dtype=torch.float32)
    return 2.0 * u - 1.0


def basis_values(seed: int, stream: int, start: int, count: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Basis values ``start .. start+count-1`` of ``(seed, stream)`` as float32 [count]."""
    device = torch.device(device)
    if _native is not None and device.type == "cpu":
        out = torch.empty(count, dtype=torch.float32)
        _native.values(seed, stream, start, out.numpy())
        return out
    return _torch_values(seed, stream, start, count, device)


def _torch_values(seed: int, stream: int, start: int, count: int,
                  device: torch.device) -> torch.Tensor:
    first, last = start // 4, (start + count + 3) // 4
    offsets = torch.arange(first, last, dtype=torch.int64, device=device)  # < 2^40
    # counter = stream * 2^40 + offset, split in words without forming it (it can pass 2^63)
    hi = (offsets >> 32) + (stream << (STREAM_BITS - 32))
    words = _philox4x32(seed, offsets & _M32, hi).reshape(-1)
    return _to_symmetric_uniform(words[start - 4 * first : start - 4 * first + count])


def contract(seed: int, stream: int, coeffs: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``coeffs @ basis`` where basis is the [k, n_cols] row-major block of the stream.

    Equal to ``coeffs @ basis_values(seed, stream, 0, k * n_cols).view(k, n_cols)``, float32,
    without ever holding more than ``CHUNK`` basis values.
    """
    coeffs = coeffs.to(torch.float32)
    if coeffs.device.type == "cuda" and (kernel := _cuda_contract()) is not None:
        return kernel(seed, stream, coeffs, n_cols)
    if _native is not None and coeffs.device.type == "cpu":
        out = torch.zeros(n_cols, dtype=torch.float32)
        _native.contract(seed, stream, coeffs.contiguous().numpy().tobytes(), n_cols, out.numpy())
        return out
    out = torch.zeros(n_cols, dtype=torch.float32, device=coeffs.device)
    k = coeffs.shape[0]
    if n_cols <= CHUNK:
        rows = max(1, CHUNK // n_cols)
        for j0 in range(0, k, rows):
            j1 = min(k, j0 + rows)
            vals = _torch_values(seed, stream, j0 * n_cols, (j1 - j0) * n_cols, coeffs.device)
            out += coeffs[j0:j1] @ vals.view(j1 - j0, n_cols)
        return out
    for j in range(k):
        for n0 in range(0, n_cols, CHUNK):
            n1 = min(n_cols, n0 + CHUNK)
            out[n0:n1] += coeffs[j] * _torch_values(seed, stream, j * n_cols + n0, n1 - n0,
                                                    coeffs.device)
    return out


@functools.cache
def _cuda_contract():
    """``nola_triton.contract`` (same values, Philox in GPU registers), or None without
    triton; imported on first use so CPU-only processes never import triton."""
    try:
        from .nola_triton import contract as kernel
    except ImportError:
        return None
    return kernel


def native_available() -> bool:
    return _native is not None
