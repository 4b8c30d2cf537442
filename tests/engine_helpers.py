"""Helpers for engine tests: build an engine over a tiny model and run requests to the end,
and the greedy reference from transformers ``generate`` with the tie rule."""

from __future__ import annotations

import copy
import threading
import time

import torch

from nolaserve.server.build import build_engine
from nolaserve.server.config import Config
from nolaserve.server.engine.engine import Engine
from nolaserve.server.engine.engine_types import RequestOutput
from nolaserve.server.engine.sequence import SamplingParams
from nolaserve.server.engine.token_masks import bad_word_ids

TIE_GAP = 1e-3


def make_engine(model, tokenizer, **overrides) -> Engine:
    cfg = dict(device="cpu", dtype="float32", registry_path=":memory:", num_slots=4,
               max_rank=8, block_size=4, kv_cache_bytes=4 << 20, max_num_batched_tokens=48,
               max_num_seqs=16, max_tokens_limit=256)
    return build_engine(Config(**{**cfg, **overrides}), model=copy.deepcopy(model),
                        tokenizer=tokenizer)


class StepProbe:
    """Wraps ``engine.step``: records, for every step, the request ids the engine held when
    the step began. Tests count steps, never seconds: "the request was gone within two
    steps of the cancel" holds on any machine. ``delay`` makes each step slower, so that a
    long request is still running when the test acts on it."""

    def __init__(self, engine: Engine, delay: float = 0.0) -> None:
        self.engine = engine
        self.held: list[frozenset[str]] = []
        self.delay = delay
        self._step = engine.step
        engine.step = self._probed

    def _probed(self):
        self.held.append(frozenset(self.engine.requests))
        if self.delay:
            time.sleep(self.delay)
        return self._step()

    def mark(self) -> int:
        """The number of steps begun so far."""
        return len(self.held)

    def steps_holding(self, request_id: str, since: int = 0) -> int:
        """How many steps begun after ``since`` still held ``request_id``: the engine's own
        id, or the front end's, which the engine id carries as its label (``req-<n>/<id>``)."""
        def held(ids: frozenset[str]) -> bool:
            return any(i == request_id or i.endswith("/" + request_id) for i in ids)

        return sum(held(ids) for ids in self.held[since:])


class BlockingLoad:
    """Makes the store's cold loads of ``adapter_id`` wait until ``release()``: the loader
    is stuck while the test watches the rest of the engine. ``guard`` seconds only turn a
    wedged test into a failure (``timed_out``); a passing run never waits for it."""

    def __init__(self, store, adapter_id: str, guard: float = 120.0) -> None:
        self.started, self._go = threading.Event(), threading.Event()
        self.timed_out = False

        def blocking(load):
            def blocked(name: str, *args, **kwargs):
                if name == adapter_id:
                    self.started.set()
                    self.timed_out = not self._go.wait(guard)
                return load(name, *args, **kwargs)
            return blocked

        store.acquire = blocking(store.acquire)  # the admission's load ...
        store.prefetch = blocking(store.prefetch)  # ... and the prefetch at acceptance

    def release(self) -> None:
        self._go.set()


def greedy(max_tokens: int, **fields) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **fields)


def run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams, str | None]],
        max_steps: int = 10_000) -> dict[str, list[int]]:
    """Submit every request, step until all finish; returns the output token ids."""
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    for rid, (prompt, params, adapter) in requests.items():
        engine.add_request(rid, prompt, params, adapter)
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return tokens
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    raise AssertionError("engine did not finish")


def step_all(engine: Engine, max_steps: int = 10_000) -> dict[str, list[RequestOutput]]:
    """Step until every queued request finishes; each request's outputs."""
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def word_of(tokenizer, output: list[int], length: int) -> str:
    """A bad word: the text of the first ``length`` tokens of ``output`` that tokenize
    back to them."""
    for i in range(len(output) - length + 1):
        word = tokenizer.decode(output[i:i + length])
        if tuple(output[i:i + length]) in bad_word_ids(tokenizer, [word]):
            return word
    raise AssertionError(f"no {length} tokens of {output} tokenize back to themselves")


def hf_greedy(model, prompt: list[int], max_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers ``generate`` greedy, EOS off: tokens and per-step logits."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), [s[0] for s in out.logits]


def assert_same_or_tie(got: list[int], want: list[int], logits: list[torch.Tensor]) -> None:
    """Equal tokens, or the first difference is a numerical tie in the reference (its top-2
    logit gap at that step is below ``TIE_GAP``); anything else fails."""
    for step, (g, w) in enumerate(zip(got, want)):
        if g != w:
            top2 = logits[step].float().topk(2).values
            gap = float(top2[0] - top2[1])
            assert gap < TIE_GAP, (
                f"token {step} differs ({g} vs reference {w}) with a top-2 gap of {gap:.2e}")
            return
    assert len(got) == len(want), f"{len(got)} tokens, reference has {len(want)}"


class RegistrySpy:
    """Stands in for the registry: records the thread of every method call."""

    def __init__(self, real) -> None:
        self.real, self.threads = real, []

    def __getattr__(self, name: str):
        attr = getattr(self.real, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.threads.append(threading.current_thread().name)
            return attr(*args, **kwargs)

        return call


class Kill(BaseException):
    """Escapes every ``except Exception``: ends the step thread like a bug would."""
