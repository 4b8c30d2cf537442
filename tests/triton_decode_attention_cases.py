"""``paged_attention`` with its context split across programs (flash-decoding) held to
torch SDPA over the same keys and values laid out contiguously; run by
``test_triton_kernels.py`` in a child process, like ``triton_cases.py``."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from triton_attention_cases import cache_case

from nolaserve.server.engine.paged_triton import num_splits, paged_attention

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def sdpa(q, k_cache, v_cache, block_tables, token_seq, positions, scale) -> torch.Tensor:
    """Each decode token's attention by ``F.scaled_dot_product_attention`` on its context
    gathered into contiguous ``[1, Hkv, n, D]`` K/V (GQA), fp32, rounded to ``q``'s dtype."""
    bs, hkv, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    out = torch.empty_like(q)
    for t in range(q.shape[0]):
        n = int(positions[t]) + 1
        table = block_tables[int(token_seq[t])]
        kv = (table[torch.arange(n) // bs] * bs + torch.arange(n) % bs).cpu()
        k = k_cache.cpu().reshape(-1, hkv, d)[kv].float().transpose(0, 1)[None]  # [1,Hkv,n,D]
        v = v_cache.cpu().reshape(-1, hkv, d)[kv].float().transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(q[t].cpu().float()[None, :, None], k, v,
                                           scale=scale, enable_gqa=True)  # [1, H, 1, D]
        out[t] = o[0, :, 0].to(q.dtype)
    return out


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_splits_across_block_edges_match_sdpa(group, splits):
    """Contexts 1, 15, 16, 17 and 99 over 16-token blocks (table width 7): every split
    count gives SDPA's answer, splits past a short context included."""
    args = cache_case([1, 15, 16, 17, 99], 16, 2, group, torch.float32, seed=group + splits)
    out = paged_attention(*args, scale=0.125, splits=splits)
    assert not out.isnan().any()  # NaN in unused blocks and past the context: never read
    torch.testing.assert_close(out.cpu(), sdpa(*args, scale=0.125), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_a_long_context_is_split_and_matches_sdpa(dtype):
    """4,100 tokens of context over 32-token blocks, GQA 4: the shapes alone pick several
    splits, and a short neighbour in the same launch is unaffected."""
    args = cache_case([4100, 3], 32, 2, 4, dtype, head_dim=64, seed=9)
    assert num_splits(2, 2, args[3].shape[1], args[0].device) > 1
    out = paged_attention(*args, scale=64 ** -0.5)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.cpu(), sdpa(*args, scale=64 ** -0.5), **TOL[dtype])


def test_split_count_changes_only_rounding():
    args = cache_case([300, 77, 1], 16, 1, 8, torch.float32, seed=4)
    one = paged_attention(*args, scale=0.1, splits=1)
    for splits in (2, 5, 19):
        torch.testing.assert_close(paged_attention(*args, scale=0.1, splits=splits), one,
                                   atol=1e-6, rtol=1e-6)


def test_splits_follow_each_context_not_the_table_width():
    """The same contexts in a table 40 blocks wider (a graphed decode step's full-width
    table): the same bits for the same split count, since each context is cut into
    ``splits`` runs of its own blocks; so a short context does not leave all its work to
    split 0."""
    args = cache_case([300, 77, 1], 16, 2, 4, torch.float32, seed=6)
    tables = args[3]
    wide = torch.cat([tables, tables[:, :1].expand(-1, 40)], dim=1)  # never read
    for splits in (1, 4, 19):
        narrow = paged_attention(*args, scale=0.1, splits=splits)
        padded = paged_attention(*args[:3], wide, *args[4:], scale=0.1, splits=splits)
        assert torch.equal(padded, narrow), splits


def test_split_count_depends_on_shapes_only_and_bad_counts_are_refused():
    cpu = torch.device("cpu")
    assert num_splits(1, 8, 1024, cpu) > 1  # one long decode: fill the device
    assert num_splits(512, 8, 1024, cpu) == 1  # a full batch already fills it
    assert num_splits(1, 8, 3, cpu) == 1  # too short to split
    args = cache_case([40], 16, 2, 2, torch.float32)
    for bad in (0, 4):  # the table is 3 blocks wide
        with pytest.raises(ValueError, match="splits must be in \\[1, 3\\]"):
            paged_attention(*args, scale=1.0, splits=bad)
