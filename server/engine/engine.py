"""The synchronous engine: validate and queue requests, then ``step()``: schedule, run,
postprocess, collect. ``AsyncEngine`` (async_engine.py) drives it from a thread."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from nolaserve.adapters.errors import (
    InvalidRequestError,
    QueueFullError,
    ServingError,
    Status,
    short,
)
from nolaserve.adapters.spec import BaseModelSpec
from nolaserve.adapters.store import AdapterStore

from .admission import AdapterAdmission
from .detokenizer import IncrementalDetokenizer
from .engine_types import (
    EngineLimits,
    EngineStats,
    RequestOutput,
    StepStats,
    TokenLogprob,
)
from .logits_process import process_logits
from .logprobs import StepRows, extend_prompt_logprobs, wants_prompt_logits
from .model_runner import ModelRunner, StepBatch
from .penalty_counts import PenaltyCounts
from .request_checks import RequestChecks
from .row_sampling import RowFailure, RowSampler
from .sampler import make_generator
from .scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from .sequence import FinishReason, SamplingParams, Sequence, adapter_ids_of
from .structured import Grammars, GrammarState, apply_masks, fill_masks
from .token_masks import TokenMasks, bad_word_ids

log = logging.getLogger("nolaserve.engine")


@dataclass(eq=False)
class _Request:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # until the first output
    grammar: GrammarState | None = None  # structured output: the JSON so far


class Engine:
    """Continuous batching over one model: requests for many adapters share each step."""

    def __init__(self, runner: ModelRunner, tokenizer, scheduler: Scheduler,
                 admission: AdapterAdmission, limits: EngineLimits, eos_token_ids: set[int],
                 batch_invariant: bool = False):
        """``batch_invariant``: run every sequence of a step in its own forward pass and
        sampling (and let the scheduler cut prefill chunks at fixed boundaries), so that a
        request's logits and logprobs never depend on its batch-mates; costs throughput
        (docs/operations.md)."""
        self.runner, self.tokenizer, self.scheduler = runner, tokenizer, scheduler
        self.admission, self.limits, self.eos_token_ids = admission, limits, eos_token_ids
        self.batch_invariant = batch_invariant
        self.sampler = RowSampler()
        self.penalty_counts, self.token_masks = PenaltyCounts(), TokenMasks()
        self.grammars = Grammars(tokenizer, runner.vocab_size, eos_token_ids)
        self.checks = RequestChecks(limits, scheduler, lambda: self.store)
        self.requests: dict[str, _Request] = {}
        self._step_observers: list[Callable[[StepStats], None]] = []

    def observe(self, on_step: Callable[[StepStats], None],
                on_load: Callable[[float], None] | None = None) -> None:
        """Call ``on_step(stats)`` after each step that ran something (on the step thread)
        and ``on_load(seconds)`` after each adapter load into a device slot."""
        self._step_observers.append(on_step)
        if on_load is not None and self.store is not None:
            self.store.observe_loads(on_load)

    @property
    def stats(self) -> EngineStats:
        """Queues and KV blocks now, and the adapter store's counters."""
        sched, bm = self.scheduler, self.scheduler.block_manager
        return EngineStats(sched.num_running, sched.num_waiting,
                           bm.num_blocks - bm.num_free_blocks, bm.num_blocks,
                           self.store.stats if self.store is not None else None,
                           adapter_ids_of(lambda: sched.running, in_slot=True),
                           adapter_ids_of(lambda: sched.running, in_slot=False)  # parked
                           + adapter_ids_of(lambda: sched.waiting), self.admission.parked,
                           bm.cache_stats, sched.preemptions)

    @property
    def model_name(self) -> str:
        """The base model's id (what ``/v1/models`` lists and ``model`` may name)."""
        return self.runner.spec.name

    @property
    def spec(self) -> BaseModelSpec:
        """The base model's adaptable linears and limits."""
        return self.runner.spec

    @property
    def placement(self) -> tuple[str, str]:
        """``(dtype, device)`` the model serves in, e.g. ``("float32", "cpu")``."""
        return (str(self.runner.kv_cache.k.dtype).removeprefix("torch."),
                str(self.runner.device))

    def extra_metrics(self, emitted: set[str]) -> Iterator:
        """Series of the backend's own beyond ``Engine.stats``: none here (vLLM has some)."""
        return iter(())

    def close(self) -> None:
        """Stop the admission worker and close the adapter store (its registry)."""
        self.admission.close()
        if self.store is not None:
            self.store.close()

    @property
    def store(self) -> AdapterStore | None:
        return self.admission.store

    # -- requests -------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    adapter_id: str | None = None, *, checked_at: int | None = None) -> None:
        """Validate and queue a request; raises a typed error before it reaches the model.
        ``checked_at``: the caller ran ``check_request`` already (``AsyncEngine`` does, on
        a worker thread), at this ``delete_moment``, so the adapter is not looked up again
        here. If its adapter is deleted after that moment, the request fails NOT_FOUND at
        admission, even if the id is registered again meanwhile."""
        params = self.with_default_max_tokens(prompt_token_ids, params)
        moment = self.delete_moment() if checked_at is None else checked_at
        self.check_request(prompt_token_ids, params,
                           adapter_id if checked_at is None else None)
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {short(request_id)} is already in flight")
        if len(self.requests) >= self.limits.max_queued_requests:
            raise QueueFullError(f"{len(self.requests)} requests in flight, the server's "
                                 "max_queued_requests: retry later")
        seq = Sequence(request_id, list(prompt_token_ids), params, adapter_id or None,
                       bad_word_ids=bad_word_ids(self.tokenizer, params.bad_words),
                       checked_at=moment)
        detok = IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens,
                                       params.min_tokens, params.include_stop_str_in_output,
                                       params.spaces_between_special_tokens)
        self.requests[request_id] = _Request(seq, detok,
                                            make_generator(params.seed, self.runner.device),
                                            None if params.prompt_logprobs is None else [None],
                                            self.grammars.start(params.structured))
        self.scheduler.add(seq)
        self.admission.accepted(seq)  # a cold adapter starts loading now (a prefetch)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request: its KV blocks and adapter slot are freed now."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        return self._finish(req, FinishReason.CANCELLED)

    def fail_all(self, error: str) -> list[RequestOutput]:
        """Finish every request with an error (a step raised): nothing stays wedged."""
        return [self._finish(r, FinishReason.ERROR, error, code=Status.INTERNAL)
                for r in list(self.requests.values())]

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def delete_moment(self) -> int:
        """Now, in the store's log of deletes (``DeleteLog``): read before checking a
        request's adapter, and handed to ``add_request`` as ``checked_at``."""
        return 0 if self.store is None else self.store.deletes.now()

    def with_default_max_tokens(self, prompt: list[int], params: SamplingParams
                                ) -> SamplingParams:
        """``params`` with an unset ``max_tokens`` filled in: as many as fit."""
        return self.checks.with_default_max_tokens(prompt, params)

    def check_request(self, prompt: list[int], params: SamplingParams,
                      adapter_id: str | None) -> None:
        """Every check of a request that needs no engine state (``RequestChecks``, then
        its grammar's compile); safe on any thread, but with an ``adapter_id`` it reads the
        registry: callers on the step thread pass ``adapter_id=None``. ``AsyncEngine.check``
        makes the same checks before ``add_request`` (the registry read on a worker thread,
        the compile awaited holding no thread), so that its compile is a cache hit."""
        self.checks.check(prompt, params, adapter_id)
        if params.structured is not None:
            self.grammars.compile(params.structured)

    # -- the step -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass over every scheduled request; returns what each produced."""
        failed = self._fail_admissions()
        self.admission.time_slice(self.scheduler.running, self.scheduler.admissible)
        sched = self.scheduler.schedule()
        self.admission.settle(self.scheduler.waiting, sched.preempted)
        self._observe(sched)
        if not sched.scheduled:
            self.admission.wait(timeout=0.05)  # only cold adapters pending: do not spin
        return failed + self._run(sched)

    def _run(self, sched: SchedulerOutput) -> list[RequestOutput]:
        """The step's forward and sampling: over the whole batch, or in batch-invariant mode
        over each sequence alone, sampling included: a row's ``logsumexp`` (its logprobs),
        ``softmax`` and top-p ``cumsum`` are reduced in an order set by how many rows
        share the tensor (on CPU a lone row of a large vocabulary is split across threads,
        a row among several need not be), so each runs as the batch of one of its solo run."""
        if not self.batch_invariant:
            logits, errored = self._execute(sched)
            return errored + self._postprocess(sched, logits)
        outputs = self._postprocess(SchedulerOutput(errored=sched.errored), None)
        for s in sched.scheduled:
            alone = SchedulerOutput(scheduled=[s])
            logits, errored = self._execute(alone)
            outputs += errored + self._postprocess(alone, logits)
        return outputs

    def _execute(self, sched: SchedulerOutput) -> tuple[torch.Tensor | None, list[RequestOutput]]:
        """The step's logits. If the batch raises, each sequence is rerun alone: those that
        raise alone fail (INTERNAL), the rest go on; ``sched.scheduled`` loses the failed.
        In batch-invariant mode every sequence runs alone from the start."""
        if not sched.scheduled:
            return None, []
        if not self.batch_invariant:
            try:
                return self.runner.execute(self._step_batch(sched.scheduled)), []
            except Exception:
                log.exception("engine step failed; retrying its %d requests one at a time",
                              len(sched.scheduled))
        kept, rows, failed = [], [], []
        for s in sched.scheduled:
            try:
                rows.append(self.runner.execute(self._step_batch([s])))
                kept.append(s)
            except Exception as e:
                failed.append(self._finish(self.requests[s.seq.request_id], FinishReason.ERROR,
                                           f"internal error in engine step: {e!r:.200}",
                                           code=Status.INTERNAL))
        sched.scheduled = kept
        return (torch.cat(rows) if rows else None), failed

    def _observe(self, sched: SchedulerOutput) -> None:
        if self._step_observers and sched.scheduled:
            adapters = {s.seq.adapter_id for s in sched.scheduled} - {None}
            stats = StepStats(len(sched.scheduled), sched.num_batched_tokens, len(adapters))
            for observe in self._step_observers:
                observe(stats)

    def _step_batch(self, scheduled: list[ScheduledSeq]) -> StepBatch:
        batch = StepBatch()
        for s in scheduled:
            start = s.seq.num_computed_tokens
            batch.add(s.seq.token_ids[start:start + s.num_new_tokens], start,
                      s.seq.block_table, s.seq.adapter_slot, s.samples, wants_prompt_logits(s))
        return batch

    def _postprocess(self, sched: SchedulerOutput, logits: torch.Tensor | None
                     ) -> list[RequestOutput]:
        outputs = [self._finish(self.requests[seq.request_id], FinishReason.ERROR, seq.error)
                   for seq in sched.errored]
        sampling, rows = [], StepRows.of(sched.scheduled)
        for s in sched.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            if s.seq.num_computed_tokens == s.seq.num_tokens:
                sampling.append(self.requests[s.seq.request_id])
        outputs += self._fill_masks(sampling, rows)
        if not sampling and not rows.prompt:
            return outputs
        seqs = [r.seq for r in sampling]
        raw = rows.sampled_logits(logits)
        processed = process_logits(raw, seqs, self.eos_token_ids, self.penalty_counts,
                                   self.token_masks)
        processed = apply_masks(processed, [r.grammar for r in sampling])
        got = self.sampler.sample_rows(raw, seqs, [r.generator for r in sampling], processed,
                                       rows, logits)
        for request_id, first, chunk in got.prompt_logprobs:
            extend_prompt_logprobs(self.requests[request_id].prompt_logprobs, first, chunk)
        for req, tok, lp in zip(sampling, got.tokens, got.logprobs):
            out = self._append(req, tok) if isinstance(tok, int) else self._unsampled(req, tok)
            out.logprobs, out.prompt_logprobs = [lp] if lp else None, req.prompt_logprobs
            req.prompt_logprobs = None
            outputs.append(out)
        return outputs

    def _unsampled(self, req: _Request, failure: RowFailure) -> RequestOutput:
        """A request whose row got no token: failed, unless its output is complete and its
        own masks (min_tokens, allowed_token_ids) forbid the stop token that would end it."""
        if failure.masked and req.grammar is not None and req.grammar.complete:
            return self._finish(req, FinishReason.STOP)
        return self._finish(req, FinishReason.ERROR, failure.message, code=failure.code)

    def _fill_masks(self, sampling: list[_Request], rows: StepRows) -> list[RequestOutput]:
        """``fill_masks`` of this step's sampling rows, while its forward runs; a request
        that ends there leaves ``sampling`` and ``rows`` unsampled."""
        ended = fill_masks([r.grammar for r in sampling])
        rows.sampled = [row for i, row in enumerate(rows.sampled) if i not in ended]
        done = [self._finish(sampling[i], **how) for i, how in ended.items()]
        sampling[:] = [r for i, r in enumerate(sampling) if i not in ended]
        return done

    def _append(self, req: _Request, token: int) -> RequestOutput:
        seq, params = req.seq, req.seq.params
        seq.output_token_ids.append(token)
        eos = token in self.eos_token_ids and not params.ignore_eos
        if eos or token in params.stop_token_ids:  # as vLLM: the token's text is not output
            text = req.detokenizer.add([token]) if params.include_stop_str_in_output else ""
            return self._finish(req, FinishReason.EOS if eos else FinishReason.STOP,
                                text=text, token_ids=[token], stop_reason=None if eos else token)
        text = req.detokenizer.add([token])
        if req.detokenizer.stopped:
            return self._finish(req, FinishReason.STOP, text=text, token_ids=[token],
                                stop_reason=req.detokenizer.stop_hit)
        if req.grammar is not None and (ended := req.grammar.accept(token)) is not None:
            return self._finish(req, text=text, token_ids=[token], **ended)
        if len(seq.output_token_ids) >= seq.params.max_tokens:
            return self._finish(req, FinishReason.LENGTH, text=text, token_ids=[token])
        return RequestOutput(seq.request_id, text, [token])

    def _finish(self, req: _Request, reason: FinishReason, error: str | None = None,
                text: str = "", token_ids: list[int] | None = None,
                code: Status = Status.FAILED_PRECONDITION,
                stop_reason: str | int | None = None) -> RequestOutput:
        seq = req.seq
        if not req.detokenizer.stopped:
            text += req.detokenizer.flush()
        self.scheduler.finish(seq, reason, error)
        self.admission.release(seq)
        self.penalty_counts.release(seq)
        del self.requests[seq.request_id]
        return RequestOutput(seq.request_id, text, token_ids or [], True, reason,
                             seq.num_prompt_tokens, len(seq.output_token_ids), error, code,
                             stop_reason=stop_reason,
                             cached_tokens=max(seq.num_cached_tokens, 0))

    def _fail_admissions(self) -> list[RequestOutput]:
        failed, self.admission.failed = self.admission.failed, []
        outputs = []
        for seq, error in failed:
            req = self.requests.get(seq.request_id)
            if req is not None and req.seq is seq:  # not a new request reusing a gone one's id
                message, code = _load_failure(error)
                outputs.append(self._finish(req, FinishReason.ERROR, message, code=code))
        return outputs


def _load_failure(error: Exception) -> tuple[str, Status]:
    """The message and status of a failed adapter load: a typed error's own
    message and status; anything else is the server's fault, INTERNAL, logged with its
    traceback (as ``rpc.status_of`` answers an RPC)."""
    if isinstance(error, ServingError):
        return str(error), error.status
    log.error("adapter load failed", exc_info=error)
    return (f"internal server error loading the adapter ({type(error).__name__}: {error}); "
            "the server log has the traceback"), Status.INTERNAL
