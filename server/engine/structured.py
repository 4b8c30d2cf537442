"""Structured output: a request's output held to a JSON schema, any JSON object, a regular
expression, a list of choices or a grammar of its own (EBNF or Lark, told apart as vLLM
does), all enforced by xgrammar (as vLLM and SGLang do; docs/operations.md "Structured
output").

A request's ``GrammarState`` lives on the engine's request. It accepts each sampled token
at once (cheap), and fills the request's next-token bitmask on the host (one int32 row of
``ceil(V / 32)`` words, bit ``t`` set when token ``t`` may follow) in the next step, once
that step's forward is queued on the device (``next_mask``: on a GPU the fill runs while
the forward does, as vLLM overlaps it); the step gathers the rows of the requests that
have one and applies them to those rows' logits in one op (disallowed -> -inf). Rows
without a grammar are untouched. When the output is complete, only a stop token may
follow: the model samples one and the request ends on it, as in vLLM (its token counted);
with ``ignore_eos`` it ends with ``FinishReason.STOP`` once its matcher has accepted it.

The matcher runs on the step thread, and some grammars cost far more per token than
others (nested repetition of an optional part, ``(((a?){50}){50}){50}``: 65 ms a token on
this CPU, against 0.01-0.2 ms for usual ones), which would slow every request in the
batch. Each request is charged its matcher's time beyond ``GRAMMAR_S_PER_TOKEN`` a token
so far (the step thread's CPU time, ``thread_time``: a loaded host that makes every
thread wait for a core does not make a grammar costly), and the requests over that share
draw on one ``GRAMMAR_GRACE_S`` together
(``SharedGrace``): the request whose charge takes their total past it ends with
INVALID_ARGUMENT saying so. A costly grammar alone gets the whole grace; N of them at
once mostly end after their first token, not after a grace each. A request within its
share is never charged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from time import thread_time
from typing import Any

import torch
import xgrammar as xgr

from nolaserve.adapters.daemon_pool import DaemonPool
from nolaserve.adapters.errors import InvalidRequestError, QueueFullError, Status, check_utf8

from .sampler import row_tensor
from .schema_checks import enforceable
from .sequence import FinishReason, StructuredSpec

MAX_SCHEMA_CHARS = 64 * 1024
CACHE_BYTES = 64 << 20  # compiled grammars kept (least recently used out) for repeated schemas
ANY_OBJECT = '{"type": "object"}'
GRAMMAR_GRACE_S = 0.25  # matcher time that requests over their per-token share share
GRAMMAR_S_PER_TOKEN = 0.005
COMPILE_WAIT_S = 10.0  # a request's wait for its compile (Grammars)
COMPILE_THREADS = 1
COMPILE_WAITERS = 16  # requests waiting for compiles they started; more get RESOURCE_EXHAUSTED
BUSY = "structured output compiles are queued behind slow ones; retry later"
STRUCTURED = "structured"  # the param of a constraint's errors; front ends name their field


class Grammars:
    """Compiles ``StructuredSpec``s for one tokenizer and vocabulary, cached by schema
    (bounded by ``CACHE_BYTES``); thread-safe, so the front ends compile (``wait``, on
    their event loop; ``compile`` on any thread) before a request reaches the step thread,
    which then hits the cache (``start``). Some small schemas take xgrammar minutes to
    compile (nested counted repetition: ``((a?){20}){20}){20}`` in a ``pattern``, 27 s on
    this CPU), and a compile cannot be stopped: they run on ``COMPILE_THREADS`` threads of
    their own (identical ones once), and the request waits ``COMPILE_WAIT_S`` at most.
    Past that its compile goes on, to the cache, while the request gets INVALID_ARGUMENT
    saying so, or, if its compile never started (queued behind slow ones),
    RESOURCE_EXHAUSTED (retry later), and the compile is dropped. Slow compiles hold those
    threads only: never the step thread, nor (with ``wait``) a front end's thread, and
    their queue empties as their requests give up."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int]) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.stop_ids = sorted(t for t in eos_token_ids if 0 <= t < vocab_size)
        self.non_stop = _non_stop_row(vocab_size, self.stop_ids)
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()
        self._compiles = DaemonPool(COMPILE_THREADS, "grammar-compile")
        self._pending: dict[tuple[str, str], Future] = {}  # (what, text) -> its compile
        self._compiled: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._compiled_bytes = 0  # their ``memory_size_bytes``: over CACHE_BYTES by one at most
        self._waiting = 0  # requests waiting for a compile they started
        self.grace = SharedGrace()

    def compile(self, spec: StructuredSpec) -> xgr.CompiledGrammar:
        """The compiled grammar of ``spec``, within ``COMPILE_WAIT_S``; a typed error
        saying what is wrong. Blocks this thread while it waits (``wait`` holds none)."""
        with self._waiting_for(spec) as (compiling, what, fix):
            with contextlib.suppress(FutureTimeout, CancelledError):
                compiling.exception(timeout=COMPILE_WAIT_S)  # returns once it ends
            return self._outcome(compiling, what, fix)

    async def wait(self, spec: StructuredSpec | None) -> None:
        """``compile`` for an event loop (None: nothing to compile): the wait holds no
        thread, so slow compiles cannot take the front end's worker threads."""
        if spec is None:
            return
        loop = asyncio.get_running_loop()
        with self._waiting_for(spec) as (compiling, what, fix):
            if not compiling.done():
                woken = loop.create_future()
                compiling.add_done_callback(lambda _: _wake(loop, woken))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(woken, COMPILE_WAIT_S)
            self._outcome(compiling, what, fix)

    @contextlib.contextmanager
    def _waiting_for(self, spec: StructuredSpec) -> Iterator[tuple[Future, str, str]]:
        """The compile of ``spec``, with what it is and how to fix it: a done one when it
        is cached; else one pending for an identical spec, joined; else a new one, its
        caller counted among ``COMPILE_WAITERS`` while it waits (``QueueFullError`` when
        they are all taken). Requests sending one new schema together share its compile
        and take no place (eight parallel requests of one new schema got five 429s when
        each waiter took one of 3 places)."""
        what, text, build, fix = self._checked_source(spec)
        compiler, key = self._get_compiler(), (what, text)
        with self._lock:
            compiling = self._pending.get(key)
            starts = compiling is None or compiling.cancelled()
            if (grammar := self._compiled.get(key)) is not None:
                self._compiled.move_to_end(key)
            elif starts and self._waiting >= COMPILE_WAITERS:
                raise QueueFullError(BUSY)
            elif starts:
                self._waiting += 1
                compiling = self._pending[key] = self._compiles.submit(build, compiler, text)
                compiling.add_done_callback(lambda f: self._done(key, f))
        if grammar is not None:
            known: Future = Future()
            known.set_result(grammar)
            yield known, what, fix
            return
        try:
            yield compiling, what, fix
        finally:
            if starts:
                with self._lock:
                    self._waiting -= 1

    @staticmethod
    def _outcome(compiling: Future, what: str, fix: str) -> xgr.CompiledGrammar:
        """The grammar of a compile waited for, or the typed error of one that has not
        ended (dropped if it never started: RESOURCE_EXHAUSTED, retry later), was dropped
        for another waiter, or failed."""
        if not compiling.done():
            if compiling.cancel():
                raise QueueFullError(BUSY)
            raise InvalidRequestError(
                f"the {what} takes more than {COMPILE_WAIT_S:g} s to compile (nested or long "
                "counted repetition, such as ((a?){20}){20}): simplify it", STRUCTURED)
        if compiling.cancelled():  # another request waiting for the same compile gave up
            raise QueueFullError(BUSY)
        try:
            return compiling.result()
        except (RuntimeError, ValueError, RecursionError) as e:
            raise InvalidRequestError(
                f"the {what} cannot be enforced: {_reason(e)[-300:]}; {fix}",
                STRUCTURED) from None

    def start(self, spec: StructuredSpec | None) -> GrammarState | None:
        """A new request's grammar state (None without ``spec``): on the step thread,
        after ``compile`` put it in the cache."""
        if spec is None:
            return None
        what, text, build, _ = self._checked_source(spec)
        grammar = self._compiled.get((what, text)) or build(self._get_compiler(), text)
        return GrammarState(xgr.GrammarMatcher(grammar), self.non_stop, self.grace)

    @staticmethod
    def _checked_source(spec: StructuredSpec) -> tuple[str, str, Any, str]:
        what, text, build, fix = _source(spec)
        if len(text) > MAX_SCHEMA_CHARS:
            raise InvalidRequestError(f"the {what} has {len(text)} characters; at most "
                                      f"{MAX_SCHEMA_CHARS} are allowed: simplify it",
                                      STRUCTURED)
        check_utf8(text, f"the {what}", STRUCTURED)
        return what, text, build, fix

    def _done(self, key: tuple[str, str], done: Future) -> None:
        """A compile ended: keep its grammar, the least recently used ones out past
        ``CACHE_BYTES`` (by size: one grammar of a large schema over a 49k vocabulary is
        9 MiB, and a count bound let 256 of them take 2.4 GB); the newest always stays, as
        its request's ``start`` takes it from here. A schema sent again never waits behind
        a slow compile."""
        with self._lock:
            if self._pending.get(key) is done:
                del self._pending[key]
            if done.cancelled() or done.exception() is not None:
                return
            if (old := self._compiled.pop(key, None)) is not None:
                self._compiled_bytes -= old.memory_size_bytes
            self._compiled[key] = grammar = done.result()
            self._compiled_bytes += grammar.memory_size_bytes
            while self._compiled_bytes > CACHE_BYTES and len(self._compiled) > 1:
                self._compiled_bytes -= self._compiled.popitem(last=False)[1].memory_size_bytes

    def _get_compiler(self) -> xgr.GrammarCompiler:
        if self.tokenizer is None:
            raise InvalidRequestError("structured output needs the model's tokenizer, and "
                                      "this engine has none: leave response_format unset")
        with self._lock:  # building the token table takes ~0.15 s on a 49k vocabulary
            if self._compiler is None:
                info = token_info(self.tokenizer, self.vocab_size, self.stop_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1,
                                                     cache_enabled=False)  # ours: _compiled
            return self._compiler


def token_info(tokenizer, vocab_size: int, stop_ids: list[int]) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary, each special added token but the stop ones as
    text-less, which xgrammar never allows: a grammar's literal ``<|im_end|>`` or
    ``<filename>`` is then written in plain tokens, which the output text keeps, not as the
    special token, which it drops (a choice came back as an empty text)."""
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                              stop_token_ids=stop_ids)
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    vocab = [""] * info.vocab_size
    for text, i in tokenizer.get_vocab().items():
        if i < info.vocab_size:
            vocab[i] = "" if i in special and i not in stop_ids else text
    return xgr.TokenizerInfo(vocab, info.vocab_type, vocab_size=info.vocab_size,
                             stop_token_ids=info.stop_token_ids,
                             add_prefix_space=info.add_prefix_space)


def _wake(loop: asyncio.AbstractEventLoop, woken: asyncio.Future) -> None:
    """From a compile thread: end ``woken``'s wait (unless it gave up, or its loop
    ended)."""
    def wake() -> None:
        if not woken.done():
            woken.set_result(None)
    with contextlib.suppress(RuntimeError):  # the loop closed
        loop.call_soon_threadsafe(wake)


def _source(spec: StructuredSpec) -> tuple[str, str, Any, str]:
    """What ``spec`` asks for, its text, how to compile the text, and what to send instead."""
    if spec.regex is not None:
        return ("regex", spec.regex, lambda c, text: c.compile_regex(text),
                "send a regular expression (the output matches it whole)")
    if spec.grammar is not None:
        if is_lark(spec.grammar):
            return ("Lark grammar", spec.grammar, lambda c, text: c.compile_lark(text),
                    'send a Lark grammar with a start rule (start: "yes" | "no"), or EBNF '
                    "with a root rule")
        return ("grammar", spec.grammar, lambda c, text: c.compile_grammar(text),
                "send an EBNF grammar in xgrammar's (GBNF) syntax with a root rule, e.g. "
                'root ::= "yes" | "no"')
    if spec.choice is not None:
        if not spec.choice or not all(spec.choice):
            raise InvalidRequestError("choice must be a list of non-empty strings, got "
                                      f"{list(spec.choice)!r}", STRUCTURED)
        rule = "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
        return ("choice list", rule, lambda c, text: c.compile_grammar(text),
                "send a list of non-empty strings")
    return ("JSON schema", ANY_OBJECT if spec.json_schema is None else spec.json_schema,
            lambda c, text: c.compile_json_schema(enforceable(text),
                                                  any_whitespace=False),
            "send a valid JSON schema (types, properties, required, enum, items, anyOf)")


def is_lark(grammar: str) -> bool:
    """vLLM's test of a grammar's syntax: Lark (``start: ...``) unless a rule, comments
    aside, is defined with ``::=`` (EBNF)."""
    return not any("::=" in re.sub(r"(#|//).*$", "", line) for line in grammar.split("\n"))


def _reason(error: Exception) -> str:
    """xgrammar's message without its ``[time] file.cc:line: Check failed: ...:`` prefix
    or the copy of the schema it may end with (Python's own message for a schema nested
    past its recursion limit)."""
    if isinstance(error, RecursionError):
        return "it nests too deep to parse"
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    reason = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*(Check failed: .*? is false: )?", "", lines[0])
    return reason.split(". The JSON string is:")[0]


def _non_stop_row(vocab_size: int, stop_ids: list[int]) -> torch.Tensor:
    """``[1, W]`` int32: every bit set but the stop tokens'."""
    row = xgr.allocate_token_bitmask(1, vocab_size)  # all bits set
    for t in stop_ids:
        row[0, t // 32] &= ~(1 << (t % 32))
    return row


class SharedGrace:
    """The matcher seconds over their per-token share of the live requests that have any
    (the module docstring). Pure bookkeeping on the step thread; a request's entry goes
    when it ends by the guard, or with its ``GrammarState`` (weakly held)."""

    def __init__(self) -> None:
        self._over: weakref.WeakKeyDictionary[GrammarState, float] = \
            weakref.WeakKeyDictionary()

    def charge(self, state: GrammarState, over: float) -> bool:
        """Record ``state``'s seconds over its share; True when the total of every live
        request's is past ``GRAMMAR_GRACE_S`` (``state`` then leaves the account)."""
        if over <= 0:
            self._over.pop(state, None)
            return False
        self._over[state] = over
        if sum(self._over.values()) <= GRAMMAR_GRACE_S:
            return False
        del self._over[state]
        return True


class GrammarState:
    """One request's matcher and its next-token bitmask (``[1, W]`` int32, on the host)."""

    def __init__(self, matcher: xgr.GrammarMatcher, non_stop: torch.Tensor,
                 grace: SharedGrace) -> None:
        self.matcher, self.non_stop, self.grace = matcher, non_stop, grace
        self.bitmask = torch.empty_like(non_stop)
        self.spent, self.tokens = 0.0, 0  # matcher seconds on the step thread, tokens
        self.stale = False  # a token was accepted since the bitmask was filled
        self.complete = False  # only a stop token may follow
        matcher.fill_next_token_bitmask(self.bitmask)

    def accept(self, token: int) -> dict[str, Any] | None:
        """Advance by the sampled ``token``; None while the output goes on, else how the
        request finishes (``Engine._finish``'s keywords): STOP once the matcher terminated,
        an internal error if the token breaks the grammar (masked logits never draw one),
        INVALID_ARGUMENT once the grammar costs too much (the module docstring)."""
        self.tokens += 1
        return self._charged(self._advance, token)

    def next_mask(self) -> dict[str, Any] | None:
        """Fill the bitmask for the token after the last accepted one (nothing to do if it
        is filled); None, or how the request finishes, as ``accept``: INVALID_ARGUMENT
        once the grammar costs too much."""
        if not self.stale:
            return None
        return self._charged(self._fill)

    def _charged(self, work, *args) -> dict[str, Any] | None:
        start = thread_time()
        ended = work(*args)
        self.spent += thread_time() - start
        over = self.spent - GRAMMAR_S_PER_TOKEN * self.tokens
        if ended is None and self.grace.charge(self, over):
            return {"reason": FinishReason.ERROR, "code": Status.INVALID_ARGUMENT, "error":
                    f"the output's grammar costs {1000 * self.spent / self.tokens:.1f} ms a "
                    f"token to enforce (at most {1000 * GRAMMAR_S_PER_TOKEN:g}): simplify the "
                    "regex or schema, e.g. no nested repetition of optional parts"}
        return ended

    def _advance(self, token: int) -> dict[str, Any] | None:
        if not self.matcher.accept_token(token):
            return {"reason": FinishReason.ERROR, "code": Status.INTERNAL,
                    "error": f"internal error: token {token} breaks the output's grammar"}
        if self.matcher.is_terminated():
            return {"reason": FinishReason.STOP}
        self.stale = True
        return None

    def _fill(self) -> dict[str, Any] | None:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self.stale = False
        self.complete = not bool((self.bitmask & self.non_stop).any())
        return None


def fill_masks(grammars: list[GrammarState | None]) -> dict[int, dict[str, Any]]:
    """Each grammar's ``next_mask``, in order: the rows whose request ends, with how
    (``Engine._finish``'s keywords); the step calls it once its forward is queued."""
    return {i: ended for i, g in enumerate(grammars)
            if g is not None and (ended := g.next_mask()) is not None}


def apply_masks(logits: torch.Tensor, grammars: list[GrammarState | None]) -> torch.Tensor:
    """``logits`` ``[N, V]`` with each row that has a grammar masked to the tokens its
    grammar allows (-inf elsewhere): a new tensor if some row has one, else ``logits``
    itself (never modified in place: the raw logits give the logprobs)."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return logits
    bitmask = torch.cat([grammars[i].bitmask for i in rows])  # [R, W]
    bitmask = bitmask.to(logits.device, non_blocking=True)
    index = row_tensor(rows, torch.int64, logits)
    sub = logits.index_select(0, index)  # [R, V], a copy
    xgr.apply_token_bitmask_inplace(sub, bitmask, vocab_size=logits.shape[1])
    return logits.index_copy(0, index, sub)
