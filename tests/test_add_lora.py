"""add_lora: every backend held to the fp32 reference across adapter spreads
(punica's test_sgmv.py axes), odd token counts, padded ranks, fp32 and bf16;
the meaning of -1, in-place updates, and the error messages."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nolaserve.adapters.ops import (
    BACKENDS,
    LoraBatch,
    add_lora,
    add_lora_multi,
    add_lora_rows,
    choose_backend,
    choose_multi_backend,
    gather_bmm,
    loop_modules,
    reference,
    segment,
)

RANKS = (8, 4, 1, 0, 8, 3)  # per slot; r_max = 8, the rest zero-padded (rank 0: all zeros)
S, R_MAX = len(RANKS), max(RANKS)
SPREADS = ("distinct", "uniform", "zipf", "identical", "skewed", "none", "mixed", "sorted",
           "sorted_mixed", "consecutive")
# sorted: already grouped by slot; sorted_mixed: -1 rows first; consecutive: one token per
# slot over a run of consecutive slots in shuffled order (gather_bmm takes views)
NUM_TOKENS = (1, 3, 7, 133)
SHAPES = ((32, 48), (48, 16))  # (in, out)
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
FAST = [b for b in BACKENDS if b is not reference] + [None]  # None: add_lora's own choice


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add wake-up latency (10x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def backend_id(b) -> str:
    return "auto" if b is None else b.__name__


def token_slots(spread: str, n: int, gen: torch.Generator) -> torch.Tensor:  # [n] int64
    if spread == "distinct":
        return torch.arange(n) % S
    if spread in ("uniform", "mixed", "sorted", "sorted_mixed"):
        slots = torch.randint(0, S, (n,), generator=gen)
        if spread.endswith("mixed"):
            slots[torch.rand(n, generator=gen) < 0.4] = -1
        return slots.sort().values if spread.startswith("sorted") else slots
    if spread == "zipf":
        p = 1.0 / torch.arange(1, S + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(p, n, replacement=True, generator=gen)
    if spread == "identical":
        return torch.full((n,), S - 2, dtype=torch.long)
    if spread == "skewed":  # one hot adapter, the rest spread thinly
        slots = torch.randint(0, S, (n,), generator=gen)
        slots[torch.rand(n, generator=gen) < 0.9] = 1
        return slots
    if spread == "none":
        return torch.full((n,), -1, dtype=torch.long)
    if spread == "consecutive":
        k = min(n, S - 1)
        slots = torch.full((n,), -1, dtype=torch.long)
        slots[torch.randperm(n, generator=gen)[:k]] = 1 + torch.randperm(k, generator=gen)
        return slots
    raise ValueError(spread)


def make_case(n: int, d_in: int, d_out: int, dtype: torch.dtype, seed: int = 0):
    """Padded [S, r_max, ...] weights, the unpadded factors, scale, x and y."""
    gen = torch.Generator().manual_seed(seed)
    factors = [
        (torch.randn(r, d_in, generator=gen) / d_in**0.5, torch.randn(d_out, r, generator=gen))
        for r in RANKS
    ]
    A = torch.zeros(S, R_MAX, d_in)  # [S, r_max, in]
    B = torch.zeros(S, d_out, R_MAX)  # [S, out, r_max]
    for s, (a, b) in enumerate(factors):
        A[s, : a.shape[0]], B[s, :, : b.shape[1]] = a, b
    scale = torch.rand(S, generator=gen) + 0.5
    x = torch.randn(n, d_in, generator=gen)
    y = torch.randn(n, d_out, generator=gen)
    return A.to(dtype), B.to(dtype), factors, scale, x.to(dtype), y.to(dtype), gen


@pytest.mark.parametrize("d_in,d_out", SHAPES)
@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
@pytest.mark.parametrize("n", NUM_TOKENS)
@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("backend", FAST, ids=backend_id)
def test_backend_matches_reference(backend, spread, n, dtype, d_in, d_out):
    A, B, _, scale, x, y, gen = make_case(n, d_in, d_out, dtype, seed=n)
    slots = token_slots(spread, n, gen)
    expected = reference(y.clone(), x, A, B, scale, LoraBatch.from_token_slot(slots))
    out = add_lora(y, x, A, B, scale, slots, backend=backend)
    assert out is y and out.dtype == dtype
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("spread", SPREADS)
def test_reference_matches_unpadded_fp64(spread):
    """The reference itself, against the op written out with each slot's true rank."""
    n = 133
    A, B, factors, scale, x, y, gen = make_case(n, 32, 48, torch.float32)
    slots = token_slots(spread, n, gen)
    expected = y.double()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            a, b = factors[s]
            expected[t] += (x[t].double() @ a.double().T) @ b.double().T * float(scale[s])
    out = reference(y, x, A, B, scale, LoraBatch.from_token_slot(slots))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [*BACKENDS, None], ids=backend_id)
def test_minus_one_rows_untouched_bit_for_bit(backend):
    """-1 adds nothing: not even +0.0 (which turns -0.0 into 0.0) nor 0 * NaN."""
    n = 7
    A, B, _, scale, x, y, _ = make_case(n, 32, 48, torch.float32)
    slots = torch.tensor([-1, 2, -1, -1, 0, 2, -1])
    none = slots < 0
    specials = torch.tensor([-0.0, float("nan"), float("inf"), -0.0])
    y[none] = specials.repeat(48).view(4, 48)  # every row mixes -0.0, NaN and inf
    x[none] = float("nan")
    before = y.clone()
    add_lora(y, x, A, B, scale, slots, backend=backend)
    assert torch.equal(y[none].view(torch.int32), before[none].view(torch.int32))
    assert torch.isfinite(y[~none]).all() and not torch.equal(y[~none], before[~none])


@pytest.mark.parametrize("backend", [*BACKENDS, None], ids=backend_id)
def test_updates_a_strided_view_in_place(backend):
    """y may be a column slice of a fused output (e.g. the q part of qkv)."""
    n = 7
    A, B, _, scale, x, y, gen = make_case(n, 32, 16, torch.float32)
    fused = torch.randn(n, 48, generator=gen)
    fused[:, 16:32] = y
    y_view = fused[:, 16:32]  # [n, 16], not contiguous
    others = fused[:, [*range(16), *range(32, 48)]].clone()
    slots = torch.tensor([3, 0, -1, 3, 5, 0, 4])
    expected = reference(y.clone(), x, A, B, scale, LoraBatch.from_token_slot(slots))
    out = add_lora(y_view, x, A, B, scale, slots, backend=backend)
    assert out is y_view and out.data_ptr() == fused.data_ptr() + 16 * fused.element_size()
    torch.testing.assert_close(fused[:, 16:32], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(fused[:, [*range(16), *range(32, 48)]], others)


@pytest.mark.parametrize("backend", BACKENDS, ids=backend_id)
def test_no_adapter_at_all(backend):
    A, B, _, scale, x, y, _ = make_case(5, 32, 48, torch.float32)
    x[:] = float("nan")
    before = y.clone()
    batch = LoraBatch.from_token_slot(torch.full((5,), -1))
    assert not batch.has_adapters and batch.num_active == 0 and batch.num_segments == 0
    assert add_lora(y, x, A, B, scale, batch) is y
    assert backend(y, x, A, B, scale, batch) is y  # backends are safe on it too
    assert torch.equal(y, before)


def test_zero_tokens_and_zero_slots():
    x, y = torch.zeros(0, 32), torch.zeros(0, 48)
    A, B, scale = torch.zeros(0, 8, 32), torch.zeros(0, 48, 8), torch.zeros(0)
    assert add_lora(y, x, A, B, scale, torch.zeros(0, dtype=torch.long)) is y


def test_one_batch_serves_every_layer():
    """One LoraBatch per step, reused by linears of different shapes, int32 slots."""
    slots = torch.tensor([4, -1, 0, 0, 5, 4, 1, -1, 2], dtype=torch.int32)
    batch = LoraBatch.from_token_slot(slots)
    for d_in, d_out in SHAPES:
        A, B, _, scale, x, y, _ = make_case(len(slots), d_in, d_out, torch.float32)
        expected = add_lora(y.clone(), x, A, B, scale, slots, backend=reference)
        torch.testing.assert_close(add_lora(y, x, A, B, scale, batch), expected)


def test_batch_fields():
    b = LoraBatch.from_token_slot(torch.tensor([2, -1, 0, 2, -1, 0, 5]))
    assert b.sorted_tokens.tolist() == [2, 5, 0, 3, 6]
    assert b.sorted_slots.tolist() == [0, 0, 2, 2, 5]
    assert b.seg_slots == (0, 2, 5) and b.seg_slot_index.tolist() == [0, 2, 5]
    assert b.seg_starts == (0, 2, 4, 5)
    assert (b.num_tokens, b.num_active, b.num_segments, b.max_slot) == (7, 5, 3, 5)
    assert not b.identity_order
    assert LoraBatch.from_token_slot(torch.tensor([0, 0, 3, 4, 4])).identity_order
    assert not LoraBatch.from_token_slot(torch.tensor([0, 0, 3, 4, -1])).identity_order
    assert not LoraBatch.from_token_slot(torch.tensor([-1, 0, 0, 3])).identity_order


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-1, 9), max_size=40))
def test_batch_segments_cover_the_tokens(values):
    b = LoraBatch.from_token_slot(torch.tensor(values, dtype=torch.long))
    seen = []
    for i, s in enumerate(b.seg_slots):
        tokens = b.sorted_tokens[b.seg_starts[i] : b.seg_starts[i + 1]].tolist()
        assert tokens == sorted(tokens) and tokens  # stable, non-empty
        assert all(values[t] == s for t in tokens)
        seen += tokens
    assert sorted(seen) == [t for t, v in enumerate(values) if v >= 0]
    assert list(b.seg_slots) == sorted({v for v in values if v >= 0})


def test_choice_follows_tokens_per_slot():
    many = LoraBatch.from_token_slot(torch.arange(16))  # decode over 16 adapters
    few = LoraBatch.from_token_slot(torch.arange(256) % 4)  # 64 tokens per adapter
    one = LoraBatch.from_token_slot(torch.tensor([-1, 3, -1]))  # a single adapted token
    x = torch.zeros(1, 1)
    assert choose_backend(x, many) is gather_bmm
    assert choose_backend(x, few) is segment
    assert choose_backend(x, one) is segment


def _args(n=4, d_in=32, d_out=48):
    A, B, _, scale, x, y, _ = make_case(n, d_in, d_out, torch.float32)
    return dict(y=y, x=x, A=A, B=B, scale=scale, token_slot=torch.tensor([0, -1, 5, 1][:n]))


BAD_INPUTS = {
    "x 1-D": (dict(x=torch.zeros(32)), r"x and y must be 2-D"),
    "A 2-D": (dict(A=torch.zeros(8, 32)), r"A must be \[S, r_max, in\]"),
    "y rows": (dict(y=torch.zeros(3, 48)), r"x has 4 tokens but y has 3"),
    "slot count": (dict(token_slot=torch.tensor([0, 1, 2])), r"token_slot has 3 entries but x"),
    "A in": (dict(A=torch.zeros(S, 8, 31)), r"x has in = 32; expected \[S, r_max, 32\]"),
    "B out": (dict(B=torch.zeros(S, 47, 8)), r"it must be \[6, 48, 8\]"),
    "B rank": (dict(B=torch.zeros(S, 48, 7)), r"it must be \[6, 48, 8\]"),
    "scale": (dict(scale=torch.ones(S + 1)), r"scale has 7 entries but A has S = 6"),
    "dtype": (dict(A=torch.zeros(S, 8, 32, dtype=torch.float64)), r"share one floating dtype"),
    "int scale": (dict(scale=torch.ones(S, dtype=torch.long)), r"scale must be floating"),
    "slot = S": (
        dict(token_slot=torch.tensor([0, 6, -1, 1])),
        r"slot 6 but there are only S = 6 slots \(valid: -1 for none, or 0\.\.5\)",
    ),
    "slot < -1": (
        dict(token_slot=torch.tensor([0, -2, 1, 1])),
        r"must be >= -1 \(-1 = no adapter\), got -2 at token 1",
    ),
    "float slots": (dict(token_slot=torch.zeros(4)), r"token_slot must have an integer dtype"),
    "2-D slots": (dict(token_slot=torch.zeros(4, 1, dtype=torch.long)), r"token_slot must be 1-D"),
    "list slots": (dict(token_slot=[0, 1, 2, 3]), r"token_slot must be a torch.Tensor, got list"),
    "bad shape, no adapter": (
        dict(token_slot=torch.full((4,), -1), B=torch.zeros(S, 47, 8)),
        r"it must be \[6, 48, 8\]",
    ),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_inputs_raise_value_error(name):
    override, message = BAD_INPUTS[name]
    args = {**_args(), **override}
    with pytest.raises(ValueError, match=message):
        add_lora(**args)


@pytest.mark.parametrize("n", (1, 7, 133))
@pytest.mark.parametrize("spread", ("distinct", "uniform", "mixed", "identical", "none"))
@pytest.mark.parametrize("modules", (1, 2, 3))
def test_add_lora_multi_is_the_loop(modules, spread, n):
    """Modules with their own out size and r_max (module 1: r_max 5, B a strided view),
    one x and one slot vector; each module equal to the fp32 reference op (not to
    add_lora, which the CPU backend itself calls), -1 rows untouched."""
    cases = [make_case(n, 32, out, torch.float32, seed=n + m)
             for m, out in enumerate((48, 16, 40)[:modules])]
    x, gen = cases[0][4], cases[0][6]
    As = [c[0][:, :5] if m == 1 else c[0] for m, c in enumerate(cases)]
    Bs = [c[1][:, :, :5] if m == 1 else c[1] for m, c in enumerate(cases)]
    scales, ys = [c[3] for c in cases], [c[5] for c in cases]
    slots = token_slots(spread, n, gen)
    batch = LoraBatch.from_token_slot(slots)
    expected = [reference(y.clone(), x, A, B, s, batch) for y, A, B, s in zip(ys, As, Bs, scales)]
    before = [y.clone() for y in ys]
    assert choose_multi_backend(x) is loop_modules
    out = add_lora_multi(ys, x, As, Bs, scales, slots)
    assert out is ys
    none = slots < 0
    for got, want, old in zip(out, expected, before, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])
        assert torch.equal(got[none], old[none])


def test_add_lora_multi_checks_every_module():
    A, B, _, scale, x, y, _ = make_case(4, 32, 48, torch.float32)
    slots = torch.tensor([0, -1, 5, 1])
    with pytest.raises(ValueError, match="one entry per module"):
        add_lora_multi([y, y], x, [A], [B], [scale], slots)
    with pytest.raises(ValueError, match=r"it must be \[6, 48, 8\]"):
        add_lora_multi([y, y.clone()], x, [A, A], [B, B[:, :47]], [scale, scale], slots)
    assert add_lora_multi([], x, [], [], [], slots) == []


@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
@pytest.mark.parametrize("n", NUM_TOKENS)
@pytest.mark.parametrize("spread", SPREADS)
def test_rows_backend_matches_reference(spread, n, dtype):
    """``add_lora_rows`` (CPU: ``gather_rows``) reads the token -> slot tensor alone: same
    values as the reference, ``-1`` rows (NaN and -0.0 included) left bit for bit."""
    A, B, _, scale, x, y, gen = make_case(n, 32, 48, dtype, seed=n)
    slots = token_slots(spread, n, gen)
    none = slots < 0
    y[none] = -0.0
    x[none] = float("nan")
    expected = reference(y.clone(), x, A, B, scale, LoraBatch.from_token_slot(slots))
    out = add_lora_rows(y, x, A, B, scale, slots)
    assert out is y
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    assert torch.equal(out[none].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       expected[none].view(torch.int16 if dtype == torch.bfloat16
                                           else torch.int32))
