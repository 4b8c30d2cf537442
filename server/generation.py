"""What every front end (gRPC, the OpenAI HTTP API, the offline ``LLM``) shares: the one
request dataclass they each build from their wire format, the naming of the model or
adapter, the prompt (text, token ids or chat messages rendered with the chat template),
and the typed failure of a request the engine finished with an error.

    GenerateRequest(...) -> engine_input(tokenizer, base, request, ...) -> (ids, params, adapter)
    Generation(async_engine, metrics).fan_out(requests, n, request_id)
        -> Fanout: (choice index, output)s
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from nolaserve.adapters.errors import (
    AdapterNotFoundError,
    InvalidRequestError,
    RequestFailedError,
    Status,
    check_utf8,
    short,
)
from nolaserve.adapters.store import AdapterStore

from .chat import CHAT_ROLES, ChatMessage, ChatOptions, render_chat
from .engine.async_engine import AsyncEngine
from .engine.engine_types import RequestOutput
from .engine.sequence import FinishReason, SamplingParams
from .fanout import Fanout
from .metrics import Metrics, RequestTimer

MAX_N = 16  # completions of one prompt a request may ask for (OpenAI's n)
# A prompt longer than this many bytes per allowed token is refused before tokenizing:
# real text averages ~4 bytes per token; 32 leaves room for long runs of rare tokens.
PROMPT_BYTES_PER_TOKEN = 32
@dataclass
class GenerateRequest:
    """One generation request as every front end sees it. ``model`` names what serves it:
    ``""`` or the base model's id is the base model, ``<base id>:<adapter id>`` (SGLang's
    form) or a bare adapter id (an RMM task is ``<basis>/<source>``) an adapter. Exactly
    one of ``prompt``, ``prompt_token_ids`` and ``messages`` is set."""

    model: str = ""
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    tools: list[dict] | None = None  # chat: OpenAI's tools, for the chat template
    chat: ChatOptions = field(default_factory=ChatOptions)
    add_special_tokens: bool | None = None  # vLLM's; None: True for a prompt, False for chat

MAX_REQUEST_ID_BYTES = 128


def resolve_adapter(model: str, base_model: str, registered: Callable[[str], bool]
                    ) -> str | None:
    """The adapter id that ``model`` names, or None for the base model. A ``model`` that
    is itself a registered adapter id (``registered(model)``, asked only of the
    ``<base id>:<x>`` form) names that adapter, never ``x``: registering such ids is
    refused now, but ones registered before must not serve another tenant's adapter."""
    if model in ("", base_model):
        return None
    prefix = base_model + ":"
    if model.startswith(prefix) and len(model) > len(prefix) and not registered(model):
        return model[len(prefix):]
    return model


def registered_in(store: AdapterStore | None) -> Callable[[str], bool]:
    """``registered(adapter_id)`` for ``resolve_adapter``: is it in ``store`` (this reads
    the registry: call it off the event loop and the step thread)."""
    def registered(adapter_id: str) -> bool:
        if store is None:
            return False
        try:
            store.get(adapter_id)
        except AdapterNotFoundError:
            return False
        return True

    return registered


def check_prompt_size(request: GenerateRequest, max_prompt_tokens: int) -> None:
    """``InvalidRequestError`` (as a prompt over ``max_prompt_tokens`` tokens gets)
    unless the prompt (or all a chat template may render: messages, tools, documents,
    template kwargs) is at most ``PROMPT_BYTES_PER_TOKEN * max_prompt_tokens`` bytes of
    UTF-8: checked before any tokenizing, which costs memory and CPU in proportion to the
    text."""
    limit = PROMPT_BYTES_PER_TOKEN * max_prompt_tokens
    texts = [request.prompt or ""] if request.messages is None else _rendered_texts(request)
    chars = sum(len(t) for t in texts)
    if chars > limit or (4 * chars > limit and sum(
            len(t.encode(errors="surrogatepass")) for t in texts) > limit):
        what = "the prompt" if request.messages is None else \
            "the chat (its messages, tools, documents and template kwargs)"
        raise InvalidRequestError(
            f"{what} has more than {limit} bytes ({PROMPT_BYTES_PER_TOKEN} per token of "
            f"max_prompt_tokens = {max_prompt_tokens}): shorten it", "prompt")


def _rendered_texts(request: GenerateRequest) -> list[str]:
    """Every string of a chat request that its template may render (walked without
    recursion: a value may nest as deep as its JSON parser allowed)."""
    texts: list[str] = []
    pending: list = [request.tools, request.chat.documents, request.chat.template_kwargs,
                     *(m.tool_calls for m in request.messages)]
    texts += [t for m in request.messages for t in (m.role, m.content, m.tool_call_id or "")]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            pending += [*value, *value.values()]
        elif isinstance(value, list):
            pending += value
    return texts


def prompt_token_ids(tokenizer, request: GenerateRequest) -> list[int]:
    """Tokenize ``prompt``, take ``prompt_token_ids`` as they are, or render ``messages``
    with the chat template (generation prompt added) and tokenize that. Raises
    ``InvalidRequestError`` on a bad input."""
    given = [x is not None for x in (request.prompt, request.prompt_token_ids,
                                     request.messages)]
    if sum(given) != 1:
        raise InvalidRequestError("set exactly one of prompt, prompt token ids or messages")
    if request.prompt_token_ids is not None:
        return list(request.prompt_token_ids)
    if tokenizer is None:
        raise InvalidRequestError("this engine has no tokenizer; it cannot take text input")
    if request.prompt is not None:
        check_utf8(request.prompt, "prompt")
        return list(tokenizer(request.prompt, add_special_tokens=request.add_special_tokens
                              is not False)["input_ids"])
    messages = [m.template_dict() for m in request.messages]
    if not messages:
        raise InvalidRequestError("messages is empty: send at least one chat message")
    for i, m in enumerate(messages):
        check_utf8(m["role"], f"messages[{i}].role")
        check_utf8(m["content"], f"messages[{i}].content")
        if m["role"] not in CHAT_ROLES:
            raise InvalidRequestError(
                f"chat role {short(m['role'])} is not supported: use one of "
                f"{', '.join(CHAT_ROLES)}")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("the model's tokenizer has no chat template: send a "
                                  "plain prompt instead of messages")
    return list(tokenizer(render_chat(tokenizer, messages, request.tools, request.chat),
                          add_special_tokens=bool(request.add_special_tokens))["input_ids"])


def engine_input(tokenizer, base_model: str, request: GenerateRequest,
                 registered: Callable[[str], bool], longest_prompt: int
                 ) -> tuple[list[int], SamplingParams, str | None]:
    """What ``Engine.add_request`` takes for ``request`` (tokenizing and ``registered``
    block: call it from a worker thread in async code)."""
    adapter = resolve_adapter(request.model, base_model, registered)
    ids = truncated(prompt_token_ids(tokenizer, request), request.params, longest_prompt)
    return ids, request.params, adapter


def truncated(ids: list[int], params: SamplingParams, longest_prompt: int) -> list[int]:
    """vLLM's ``truncate_prompt_tokens``: the prompt's last ``keep`` tokens (``-1``: as many
    as a prompt may have, ``longest_prompt``), its first with ``truncation_side: right``;
    None keeps them all."""
    keep = params.truncate_prompt_tokens
    if keep is None:
        return ids
    if keep == -1:
        keep = longest_prompt
    return ids[:keep] if params.truncation_side == "right" else ids[-keep:]


def failure(out: RequestOutput) -> RequestFailedError:
    """The typed error of a request the engine finished with ``FinishReason.ERROR``."""
    error = out.error or "unknown engine error"
    if out.error_code is Status.INTERNAL:
        return RequestFailedError(f"{error}; retry, and report it if it persists",
                                  Status.INTERNAL)
    return RequestFailedError(f"the request failed: {error}", out.error_code)


class Generation:
    """Runs ``GenerateRequest``s on the ``AsyncEngine`` for the async front ends."""

    def __init__(self, engine: AsyncEngine, metrics: Metrics) -> None:
        self.engine, self.metrics = engine, metrics

    @property
    def base_model(self) -> str:
        return self.engine.model_name

    @property
    def tokenizer(self):
        """The engine's tokenizer (None: it takes token ids only)."""
        return self.engine.tokenizer

    async def fan_out(self, requests: list[GenerateRequest], n: int, request_id: str
                      ) -> Fanout:
        """``n`` engine requests per request (choice ``i * n + j`` is request ``i``'s
        ``j``-th, seeded ``seed + j`` when a seed is given, as vLLM seeds them), started:
        typed errors raise here, with nothing left running: with several children, each
        input is checked before any starts, so a bad one leaves nothing to abort or count."""
        timers = [self.metrics.request_timer() for _ in range(len(requests) * n)]
        inputs = await self._inputs(requests)
        single = len(inputs) * n == 1
        if not single:
            for prompt, params, adapter in inputs:
                await self.engine.check(prompt, params, adapter)
        children = [
            self._run(prompt, child_params(params, j), adapter,
                      request_id if single else f"{request_id}-{i * n + j}",
                      timers[i * n + j])
            for i, (prompt, params, adapter) in enumerate(inputs) for j in range(n)]
        fan = Fanout(children, [prompt for prompt, _, _ in inputs])
        await fan.start()
        return fan

    async def _inputs(self, requests: list[GenerateRequest]
                      ) -> list[tuple[list[int], SamplingParams, str | None]]:
        for request in requests:
            check_prompt_size(request, self.engine.max_prompt_tokens)
        engine, registered = self.engine, registered_in(self.engine.store)
        return await asyncio.to_thread(lambda: [
            engine_input(engine.tokenizer, engine.model_name, r, registered,
                         engine.max_prompt_tokens)
            for r in requests])

    async def _run(self, prompt: list[int], params: SamplingParams, adapter: str | None,
                   request_id: str, timer: RequestTimer) -> AsyncGenerator[RequestOutput, None]:
        # The engine's id is its own: the front end's request_id is only a label, so two
        # clients choosing the same id never meet.
        outputs = self.engine.generate(prompt, params, adapter, label=request_id)
        async with aclosing(outputs):
            try:
                async for out in outputs:
                    timer.observe(out)
                    if out.finish_reason is FinishReason.ERROR:
                        raise failure(out)
                    yield out
            except (GeneratorExit, asyncio.CancelledError):
                timer.aborted(len(prompt))
                raise


def checked_request_id(given: str, name: str) -> str:
    """The id echoed in every response: the client's (``name`` says where it sent it; at
    most ``MAX_REQUEST_ID_BYTES``) or a fresh uuid."""
    if len(given.encode()) > MAX_REQUEST_ID_BYTES:
        raise InvalidRequestError(f"{name} is {len(given.encode())} bytes; the limit is "
                                  f"{MAX_REQUEST_ID_BYTES}", name)
    return given or uuid.uuid4().hex


def child_params(params: SamplingParams, j: int) -> SamplingParams:
    """The parameters of a request's ``j``-th choice (a copy: each engine request owns
    its own, of one sequence): its seed is ``seed + j``, wrapped into int64 (the seeds'
    range: ``seed`` 2**63 - 1 is valid with any n)."""
    seed = None if params.seed is None else (params.seed + j + 2**63) % 2**64 - 2**63
    return replace(params, n=1, seed=seed)
