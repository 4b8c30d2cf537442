"""The offline Python API, as vLLM users have it: the same engine and adapter store as the
server, in-process, for batch jobs and benchmarks. No server, no event loop.

    from nolaserve import LLM, SamplingParams

    llm = LLM(device="cpu")                      # the embedded SmolLM2 unless model=...
    llm.register_adapter("demo", "demo.safetensors")   # a file, a PEFT dir or bytes
    outs = llm.generate(["Hello", "Hi"], SamplingParams(max_tokens=8, temperature=0),
                        adapter_ids=["demo", None])
    print(outs[0].text)
"""

from __future__ import annotations

import itertools
import logging
import numbers
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from nolaserve.adapters.errors import (
    AdapterExistsError,
    EngineStoppedError,
    InvalidRequestError,
    ServingError,
    short,
)
from nolaserve.adapters.registry import AdapterRecord
from nolaserve.adapters.sources import read_adapter_source

from .build import build_engine
from .chat import ChatMessage, ChatOptions
from .config import Config
from .engine.engine import Engine
from .engine.engine_types import TokenLogprob
from .engine.sequence import MAX_N, FinishReason, SamplingParams
from .generation import (
    GenerateRequest,
    check_prompt_size,
    child_params,
    engine_input,
    failure,
    registered_in,
)

T = TypeVar("T")
log = logging.getLogger("nolaserve.offline")
Prompt = str | list[int] | dict[str, Any]  # vLLM's TextPrompt / TokensPrompt dicts too
Conversation = list[dict[str, str]]
# vLLM's LLM(...) arguments that ask for nothing to do here: accepted, and logged as such.
VLLM_ONLY = {"enable_lora": "LoRA (and NOLA) adapters are always on",
             "trust_remote_code": "the model loads with transformers' own classes",
             "swap_space": "no CPU swap space is used",
             "disable_log_stats": "no stats are logged offline"}


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's: the adapter at ``lora_path`` (a PEFT LoRA directory or a nolaserve adapter
    file), registered under ``lora_name`` the first time a request names it."""

    lora_name: str
    lora_int_id: int = 0
    lora_path: str = ""


@dataclass(frozen=True)
class Logprob:
    """vLLM's: a token's logprob, its rank at its position (1 = the likeliest) and its
    text (the tokenizer's decoding of it alone)."""

    logprob: float
    rank: int | None
    decoded_token: str


Position = dict[int, Logprob]  # vLLM's: the chosen token's and the k most likely's, by id


@dataclass
class CompletionOutput:
    """One completion, as vLLM's: text, token ids, ``finish_reason`` ``stop`` (EOS, a stop
    string or a stop token) or ``length`` and ``stop_reason`` (the stop string or token id
    that ended it, else None); when ``SamplingParams.logprobs`` asks, ``logprobs`` (a
    ``Position`` per token) and the sampled tokens' sum ``cumulative_logprob``."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[Position] | None = None
    stop_reason: str | int | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    """What ``LLM.generate`` returns per prompt, in input order (``outputs[0]`` is the one
    completion; ``text`` and ``token_ids`` are its shortcuts)."""

    request_id: str
    prompt_token_ids: list[int]
    adapter_id: str | None
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[Position | None] | None = None  # when asked; the first is None
    prompt: str | None = None  # the prompt's text (chat: as rendered); None for token ids
    finished: bool = True  # vLLM's: LLM returns finished requests only
    num_cached_tokens: int = 0  # vLLM's: prompt tokens served from the prefix cache
    lora_request: LoRARequest | None = None  # the one it was asked with

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids


class LLM:
    """An engine built from ``Config(model=model, **config)``: the same keys as the
    server's YAML (docs/configuration.md); ``registry_path`` defaults to ``:memory:``
    here (pass a path to use a server's durable registry). Calls from several threads
    are safe: one ``generate`` or ``chat`` runs at a time, the others wait their turn."""

    def __init__(self, model: str = "", *, seed: int | None = None,
                 tokenizer: str | None = None, **config: object) -> None:
        """``seed`` (vLLM's): a request without its own seed draws as if seeded ``seed +
        k``, k counting this LLM's requests, so a rerun samples the same; ``tokenizer``:
        only the model's own (None or ``model``)."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise InvalidRequestError(f"seed must be a whole number or None, got {short(seed)}",
                                      "seed")
        if tokenizer not in (None, model):
            raise InvalidRequestError("the tokenizer is the model's own (its directory, GGUF "
                                      "file or hub id): leave tokenizer unset", "tokenizer")
        for name in VLLM_ONLY.keys() & config.keys():
            log.info("LLM(%s=...): %s", name, VLLM_ONLY[name])
            del config[name]
        if not config.get("registry_url"):
            config.setdefault("registry_path", ":memory:")
        self.config = Config.load(None, model=model, **config)
        if self.config.engine != "native":
            raise InvalidRequestError("the offline LLM runs the native engine; serve vLLM "
                                      "with `nolaserve serve --engine vllm` (docs/vllm.md)",
                                      "engine")
        self.engine: Engine = build_engine(self.config)
        self._ids = itertools.count()
        self._seeds = None if seed is None else itertools.count(seed)
        self._loras: dict[str, str] = {}  # LoRARequest names registered here, and paths
        self._turn = threading.Lock()  # generate/chat step the one engine: one at a time
        self._admin = threading.Lock()  # adapter changes: close() waits for the one running
        self._closed = False

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def register_adapter(self, adapter_id: str, source: bytes | str | os.PathLike,
                         replace: bool = False) -> AdapterRecord:
        """Register an adapter file's bytes, an adapter file or a PEFT LoRA directory."""
        self._check_open()
        if not isinstance(source, bytes | bytearray | memoryview | str | os.PathLike):
            raise InvalidRequestError(f"an adapter source is its file's bytes, a path to it "
                                      f"or a PEFT LoRA directory, got {short(source)}",
                                      "source")
        data = bytes(source) if isinstance(source, bytearray | memoryview) else source \
            if isinstance(source, bytes) else read_adapter_source(
                source, None, self.config.max_message_bytes)
        with self._admin:
            self._check_open()
            return self.engine.store.register(adapter_id, data, replace)

    def delete_adapter(self, adapter_id: str) -> None:
        with self._admin:
            self._check_open()
            self.engine.store.delete(adapter_id)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 adapter_ids: str | None | Sequence[str | None] = None,
                 use_tqdm: bool | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None
                 ) -> list[RequestOutput]:
        """Complete each prompt (text, token ids, or vLLM's ``{"prompt": ...}`` /
        ``{"prompt_token_ids": [...]}``) with the base model or the adapter at the same
        index (``adapter_ids``, or vLLM's ``lora_request``); outputs come back in input
        order. A progress bar shows for more than 8 prompts unless ``use_tqdm`` says
        otherwise."""
        if not isinstance(prompts, list | tuple) or (
                prompts and isinstance(prompts[0], numbers.Integral)):
            prompts = [prompts]
        requests = [_numbered(i, _request, p) for i, p in enumerate(prompts)]
        return self._run(requests, sampling_params, adapter_ids, use_tqdm, lora_request)

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             adapter_ids: str | None | Sequence[str | None] = None,
             use_tqdm: bool | None = None, *, add_generation_prompt: bool = True,
             continue_final_message: bool = False,
             chat_template_kwargs: dict[str, Any] | None = None,
             documents: list[dict[str, str]] | None = None,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None
             ) -> list[RequestOutput]:
        """Answer each conversation (a list of ``{"role", "content"}``), rendered with the
        model's chat template as vLLM's ``LLM.chat`` options say (``chat.ChatOptions``);
        ``sampling_params`` default to ``SamplingParams()``, as vLLM's."""
        if not isinstance(messages, list | tuple):
            raise InvalidRequestError("messages is a conversation (a list of {'role', "
                                      "'content'} dicts) or a list of them, got "
                                      f"{short(messages)}", "messages")
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        if not isinstance(chat_template_kwargs, dict | None):
            raise InvalidRequestError(f"chat_template_kwargs must be a dict, got "
                                      f"{short(chat_template_kwargs)}", "chat_template_kwargs")
        chat = ChatOptions(add_generation_prompt, continue_final_message,
                           dict(chat_template_kwargs or {}), documents)
        requests = [GenerateRequest(messages=_numbered(i, _messages, conv), chat=chat)
                    for i, conv in enumerate(messages)]
        return self._run(requests, sampling_params, adapter_ids, use_tqdm, lora_request)

    def _run(self, requests: list[GenerateRequest], sampling, adapters, use_tqdm,
             loras) -> list[RequestOutput]:
        with self._turn:
            self._check_open()
            return self._run_turn(requests, sampling, adapters, use_tqdm, loras)

    def _run_turn(self, requests: list[GenerateRequest], sampling, adapters, use_tqdm,
                  loras) -> list[RequestOutput]:
        n = len(requests)
        if loras is not None:
            if adapters is not None:
                raise InvalidRequestError("give adapter_ids or lora_request, not both")
            adapters = [None if r is None else self._lora(r) for r in _each(loras, n, None)]
        for i, (req, params, adapter) in enumerate(zip(
                requests, _each(sampling, n, SamplingParams()), _each(adapters, n, None))):
            if not isinstance(params, SamplingParams):
                raise InvalidRequestError(f"sampling_params must be SamplingParams (from "
                                          f"nolaserve import SamplingParams), got "
                                          f"{short(params)}", "sampling_params")
            if adapter is not None and not isinstance(adapter, str):
                raise InvalidRequestError(f"an adapter id is a string or None (the base "
                                          f"model), got {short(adapter)}", "adapter_ids")
            req.params, req.model = self._seeded(params), adapter or ""
            try:
                check_prompt_size(req, self.engine.limits.max_prompt_tokens)
            except ServingError as e:
                raise _about(e, i) from None
        bar = _progress(n, use_tqdm)
        try:
            outs = _Batch(self.engine, requests, self._ids, bar).run()
        finally:
            if bar is not None:
                bar.close()
        for out, lora in zip(outs, _each(loras, n, None)):
            out.lora_request = lora
        return outs

    def _lora(self, request: LoRARequest) -> str:
        """The adapter id of ``request``: its name, registered from its path once."""
        name = request.lora_name
        if self._loras.get(name) != request.lora_path:
            try:
                self.register_adapter(name, request.lora_path)
            except AdapterExistsError:
                raise AdapterExistsError(
                    f"LoRARequest {short(name)}: another adapter is registered under that "
                    f"name; give this one another lora_name, or call llm.register_adapter("
                    f"{short(name)}, path, replace=True) first") from None
            self._loras[name] = request.lora_path
        return name

    def _seeded(self, params: SamplingParams) -> SamplingParams:
        if self._seeds is None or params.seed is not None:
            return params
        return replace(params, seed=next(self._seeds) % 2**63)

    def close(self) -> None:
        """Stop the adapter loader and close the adapter store; calls after it raise
        ``EngineStoppedError``."""
        with self._turn, self._admin:
            if not self._closed:
                self._closed = True
                self.engine.close()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineStoppedError("this LLM is closed: make a new LLM(...)")

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Batch:
    """Feed the engine up to ``max_queued_requests`` at a time and step it to the end. A
    prompt whose ``SamplingParams.n`` asks for several completions runs as ``n`` engine
    requests, choice ``j`` seeded ``seed + j`` as vLLM seeds them (they share the
    prompt's cached blocks)."""

    def __init__(self, engine: Engine, requests: list[GenerateRequest], ids, bar) -> None:
        self.engine, self.requests, self.bar = engine, requests, bar
        self.request_ids = [f"offline-{next(ids)}" for _ in requests]
        self.index = {request_id: i for i, request_id in enumerate(self.request_ids)}
        self.results: dict[str, RequestOutput] = {}
        self.choice: dict[str, tuple[str, CompletionOutput]] = {}  # engine id -> whose, what
        self.text: dict[str, list[str]] = {}
        self.left: dict[str, int] = {}  # request id -> choices not finished
        self.k: dict[str, tuple[int, int]] = {}  # engine id -> its logprobs' k, prompt's k
        self._texts: dict[int, str] = {}  # token id -> its text alone

    def _position(self, entry: TokenLogprob, k: int) -> Position:
        """A ``TokenLogprob`` as vLLM's ``{token id: Logprob}``."""
        return {t: Logprob(logprob, rank, self._text(t)) for t, logprob, rank in entry.ranked(k)}

    def _text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.engine.tokenizer.decode([token_id])
        return text

    def run(self) -> list[RequestOutput]:
        pending = (item for rid, request in zip(self.request_ids, self.requests)
                   for item in self._choices(rid, request))
        limit = self.engine.limits.max_queued_requests
        try:
            while True:
                while len(self.engine.requests) < limit and (item := next(pending, None)):
                    self._add(*item)
                if not self.engine.has_unfinished():
                    break
                for out in self.engine.step():
                    self._collect(out)
        except BaseException:
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)
            raise
        return [self.results[i] for i in self.request_ids]

    def _choices(self, request_id: str, request: GenerateRequest):
        n = request.params.n
        if not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise InvalidRequestError(f"n must be between 1 and {MAX_N}, got {short(n)}")
        self.left[request_id] = n
        for j in range(n):
            yield (request_id if n == 1 else f"{request_id}-{j}", request_id, j,
                   replace(request, params=child_params(request.params, j)))

    def _add(self, engine_id: str, request_id: str, j: int, request: GenerateRequest) -> None:
        try:
            prompt, params, adapter = engine_input(self.engine.tokenizer,
                                                   self.engine.model_name, request,
                                                   registered_in(self.engine.store),
                                                   self.engine.limits.longest_prompt)
            self.engine.add_request(engine_id, prompt, params, adapter)
        except ServingError as e:
            raise _about(e, self.index[request_id]) from None
        named = len(params.logprob_token_ids or ())  # they replace the k likeliest
        self.k[engine_id] = (named or params.logprobs or 0, params.prompt_logprobs or 0)
        text = request.prompt if request.messages is None else self.engine.tokenizer.decode(
            prompt, skip_special_tokens=False)
        result = self.results.setdefault(request_id, RequestOutput(request_id, prompt, adapter,
                                                                   prompt=text))
        result.outputs.append(CompletionOutput(j, "", [], ""))
        self.choice[engine_id] = (request_id, result.outputs[-1])
        self.text[engine_id] = []

    def _collect(self, out) -> None:
        request_id, choice = self.choice[out.request_id]
        if out.finish_reason is FinishReason.ERROR:
            raise _about(failure(out), self.index[request_id])
        result = self.results[request_id]
        self.text[out.request_id].append(out.text)
        choice.token_ids += out.token_ids
        k, k_prompt = self.k[out.request_id]
        if out.logprobs is not None:
            choice.logprobs = (choice.logprobs or []) + [self._position(e, k)
                                                         for e in out.logprobs]
            choice.cumulative_logprob = (choice.cumulative_logprob or 0.0) + sum(
                e.logprob for e in out.logprobs)
        if out.prompt_logprobs is not None and result.prompt_logprobs is None:
            result.prompt_logprobs = [None if e is None else self._position(e, k_prompt)
                                      for e in out.prompt_logprobs]
        if out.finished:
            choice.text = "".join(self.text.pop(out.request_id))
            choice.finish_reason = ("stop" if out.finish_reason is FinishReason.EOS
                                    else out.finish_reason.value)  # vLLM's: EOS is a stop
            choice.stop_reason = out.stop_reason
            if choice.index == 0:
                result.num_cached_tokens = out.cached_tokens
            self.left[request_id] -= 1
            if self.bar is not None and not self.left[request_id]:
                self.bar.update(1)


def _about(error: ServingError, index: int) -> ServingError:
    """``error`` with its message naming the prompt it is about (the others' outputs are
    dropped with the call, as vLLM's ``LLM`` drops them)."""
    error.args = (f"prompt {index}: {error.args[0]}", *error.args[1:])
    return error


def _numbered(index: int, parse: Callable[[Any], T], value: object) -> T:
    """``parse(value)``, its ``InvalidRequestError`` naming the prompt (``_about``)."""
    try:
        return parse(value)
    except InvalidRequestError as e:
        raise _about(e, index) from None


def _messages(conversation: object) -> list[ChatMessage]:
    if not isinstance(conversation, list | tuple) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in conversation):
        raise InvalidRequestError(f"a conversation is a list of {{'role': str, 'content': "
                                  f"str}} dicts, got {short(conversation)}", "messages")
    return [ChatMessage(m["role"], m["content"]) for m in conversation]


def _request(prompt: Prompt) -> GenerateRequest:
    """A prompt as a request: text, token ids, or vLLM's prompt dicts."""
    if isinstance(prompt, dict):
        if prompt.keys() == {"prompt"}:
            prompt = prompt["prompt"]
        elif prompt.keys() == {"prompt_token_ids"}:
            prompt = prompt["prompt_token_ids"]
        else:
            raise InvalidRequestError(f"a prompt dict has {sorted(prompt)}: give {{'prompt': "
                                      "text} or {'prompt_token_ids': [ids]} (no multi-modal "
                                      "data)", "prompt")
    if isinstance(prompt, str):
        return GenerateRequest(prompt=prompt)
    if isinstance(prompt, list | tuple) and all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
        return GenerateRequest(prompt_token_ids=[int(t) for t in prompt])
    raise InvalidRequestError(f"a prompt is a string, a list of token ids or a prompt dict, "
                              f"got {short(prompt)}", "prompt")


def _each(value, n: int, default) -> list:
    """One value per request: a single value (or None = ``default``) repeats."""
    if value is None or not isinstance(value, (list, tuple)):
        return [default if value is None else value] * n
    if len(value) != n:
        raise InvalidRequestError(f"got {len(value)} values for {n} prompts; pass one or one each")
    return [default if v is None else v for v in value]


def _progress(n: int, use_tqdm: bool | None):
    if not (use_tqdm if use_tqdm is not None else n > 8):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=n, desc="generating", unit="req")
