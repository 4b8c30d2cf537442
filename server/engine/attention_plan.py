"""The host side of a packed step's attention, pure Python: the KV slot of every new
token, the block-table row of its sequence, and the decode length groups and prefill
chunks that the torch path gathers one by one (``attention.torch_units``).
"""

from __future__ import annotations

from dataclasses import dataclass

# decode sequences of up to this many blocks share a group whatever their lengths
GROUP_MIN_BLOCKS = 8


def length_groups(num_blocks: list[int]) -> list[int]:
    """A group id per sequence, by length: shortest first, a new group starts when a
    sequence needs more than twice the blocks of its group's shortest (and more than
    ``GROUP_MIN_BLOCKS``). Gathering a group pads it to its longest: at most 2x its size."""
    out = [0] * len(num_blocks)
    gid, first = -1, 0
    for i in sorted(range(len(num_blocks)), key=num_blocks.__getitem__):
        if gid < 0 or num_blocks[i] > max(2 * first, GROUP_MIN_BLOCKS):
            gid, first = gid + 1, num_blocks[i]
        out[i] = gid
    return out


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """The host side of a packed step's attention: int lists to copy (``lists``) and the
    layout that the torch path gathers by."""

    lists: dict[str, list[int]]  # kv_slot [T], token_rows [T], seq_lens [N], seq_rows [N]
    groups: list[tuple[int, int, int]]  # decode (first row, rows, blocks), rows contiguous
    prefills: list[tuple[int, int, int, int, int]]  # (first row, q_len, start, blocks, seq)
    max_ctx_len: int


def check_tables(block_size: int, num_blocks: int, ctx_lens: list[int],
                 block_tables: list[list[int]]) -> None:
    """``ValueError`` unless each table covers its context with blocks in
    ``[0, num_blocks)``."""
    for table, ctx in zip(block_tables, ctx_lens):
        needed = table[: -(-ctx // block_size)]
        if len(needed) * block_size < ctx:
            raise ValueError(f"block table of {len(table)} blocks of {block_size} cannot hold "
                             f"{ctx} positions")
        if needed and not (min(needed) >= 0 and max(needed) < num_blocks):
            raise ValueError(f"block ids must be in [0, {num_blocks}), got {needed}")


def plan_attention(block_size: int, q_lens: list[int], start_pos: list[int],
                   block_tables: list[list[int]], table_rows: list[int]) -> AttentionPlan:
    """From per-sequence lists in packed order, decode sequences (``q_len == 1``) first;
    ``table_rows``: the block-table row of each sequence on the device. The tables were
    checked (``check_tables``)."""
    bs = block_size
    n_dec = 0
    while n_dec < len(q_lens) and q_lens[n_dec] == 1:
        n_dec += 1
    if any(q < 1 for q in q_lens) or any(q == 1 for q in q_lens[n_dec:]):
        raise ValueError("every sequence needs >= 1 new token, decode (1 token) ones first")
    ctx_lens = [s + q for s, q in zip(start_pos, q_lens)]
    nb = [-(-c // bs) for c in ctx_lens]
    kv_slot: list[int] = []
    token_rows: list[int] = []
    for s, bt, ctx, row in zip(start_pos, block_tables, ctx_lens, table_rows):
        kv_slot += [bt[p // bs] * bs + p % bs for p in range(s, ctx)]
        token_rows += [row] * (ctx - s)
    gid = length_groups(nb[:n_dec])
    groups, row = [], 0
    while row < n_dec:
        end = row
        while end < n_dec and gid[end] == gid[row]:
            end += 1
        groups.append((row, end - row, max(nb[row:end])))
        row = end
    prefills = []
    for i in range(n_dec, len(q_lens)):
        prefills.append((row, q_lens[i], start_pos[i], nb[i], i))
        row += q_lens[i]
    lists = dict(kv_slot=kv_slot, token_rows=token_rows, seq_lens=ctx_lens,
                 seq_rows=list(table_rows))
    return AttentionPlan(lists, groups, prefills, max(ctx_lens, default=0))
