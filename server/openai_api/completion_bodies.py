"""Engine outputs -> OpenAI response bodies and server-sent-event chunks, for
``/v1/completions`` (``text_completion``) and ``/v1/chat/completions``
(``chat.completion``), in the shapes the official ``openai`` client parses."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace

from nolaserve.adapters.errors import EngineStoppedError
from nolaserve.adapters.registry_rows import AdapterRecord

from ..engine.engine_types import RequestOutput, TokenLogprob
from ..engine.sequence import FinishReason
from .errors import sse_error
from .logprobs import LogprobFormat
from .tool_calls import CallStream, ToolMode

OWNED_BY = "nolaserve"
_FINISH = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop"}
DONE = b"data: [DONE]\n\n"


def finish_reason(out: RequestOutput) -> str | None:
    """OpenAI's ``stop`` (EOS or a stop string) or ``length``; None until the last output.
    A request the server cancelled (it is shutting down) is an error, not a finish."""
    if not out.finished:
        return None
    if out.finish_reason not in _FINISH:
        raise EngineStoppedError("the server stopped this request (it is shutting down); "
                                 "retry on another replica")
    return _FINISH[out.finish_reason]


@dataclass(frozen=True)
class Shape:
    """What one request asked of its response: ``n`` choices per prompt (choice
    ``i * n + j`` is prompt ``i``'s ``j``-th), logprobs, and (completions' ``echo``) each
    prompt's text and token ids, put before its choices."""

    chat: bool
    model: str
    request_id: str
    token_ids: bool = False  # vLLM's return_token_ids
    n: int = 1
    logprobs: LogprobFormat | None = None
    echo: list[tuple[str, list[int]]] | None = None
    tools: ToolMode | None = None  # the output becomes tool calls (tool_calls.py)
    prompt_logprobs: LogprobFormat | None = None  # vLLM's, asked for (not by echo)
    stream_usage: str = ""  # "final": a closing usage chunk; "continuous": each chunk too
    prompt_ids: tuple[list[int], ...] = ()  # each prompt's token ids, as the engine got them
    cached_details: bool = False  # usage's prompt_tokens_details.cached_tokens (vLLM's flag)
    echo_only: bool = False  # echo with max_tokens 0: the generated token is not shown


@dataclass
class _Choice:
    """One choice so far: what ``add`` collected, or what a stream has sent."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    last: RequestOutput | None = None
    offset: int = 0  # completions' text_offset of the next token
    started: bool = False
    calls: CallStream | None = None  # a chat stream's tool calls so far
    streamed: int = 0  # token ids the stream has had so far
    carried: int = 0  # of ``token_ids``: those a tool stream's chunks have carried


class CompletionBodies:
    """The bodies of one request: whole (``add`` each output, then ``complete``) or as
    stream chunks, one choice per chunk."""

    def __init__(self, shape: Shape) -> None:
        self.shape, self.chat = shape, shape.chat
        self.id = ("chatcmpl-" if shape.chat else "cmpl-") + shape.request_id
        self.object = "chat.completion" if shape.chat else "text_completion"
        self.created = int(time.time())
        self._choices: dict[int, _Choice] = defaultdict(_Choice)

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created,
                "model": self.shape.model, "choices": choices}

    def _choice(self, index: int, text: str, token_ids: list[int], logprobs: dict | None,
                reason: str | None, delta: bool, stop_reason: str | int | None = None,
                calls: list[dict] | None = None) -> dict:
        """One choice; ``stop_reason`` is vLLM's (the stop string or token id that ended
        it, else null); ``calls``: a message's tool calls, or a chunk's tool-call deltas."""
        choice: dict = {"index": index, "logprobs": logprobs, "finish_reason": reason,
                        "stop_reason": stop_reason}
        if not self.chat:
            choice["text"] = text
        elif delta:
            choice["delta"] = {"content": text} if text else {}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        if calls is not None and delta:
            choice["delta"]["tool_calls"] = calls
        elif calls is not None:
            choice["message"] |= {"content": text or None, "tool_calls": calls}
        if self.shape.token_ids:
            choice["token_ids"] = token_ids
        return choice

    def _content(self, index: int, text: str, token_ids: list[int],
                 entries: list[TokenLogprob] | None,
                 prompt_entries: list[TokenLogprob | None] | None) -> tuple[str, dict | None]:
        """The text and logprobs of a choice's next piece; its first piece starts with
        the echoed prompt."""
        state, fmt = self._choices[index], self.shape.logprobs
        echo = self.shape.echo[index // self.shape.n] if self.shape.echo else None
        if echo is not None and not state.started:
            text = echo[0] + text
        state.started = True
        if fmt is None:
            return text, None
        if self.chat:
            return text, fmt.chat(token_ids, entries)
        if echo is not None and prompt_entries is not None:
            token_ids, entries = echo[1] + token_ids, prompt_entries + (entries or [])
        logprobs, state.offset = fmt.completion(token_ids, entries, state.offset)
        return text, logprobs

    def _shown(self, out: RequestOutput) -> RequestOutput:
        """What the client sees of ``out``: all of it, or with ``echo_only`` nothing of the
        token generated (the prompt, its logprobs and the finish only)."""
        if not self.shape.echo_only:
            return out
        return replace(out, text="", token_ids=[], completion_tokens=0,
                       logprobs=None if out.logprobs is None else [])

    def add(self, index: int, out: RequestOutput) -> None:
        """Collect an output of choice ``index`` for ``complete``."""
        out = self._shown(out)
        choice = self._choices[index]
        choice.text.append(out.text)
        choice.token_ids += out.token_ids
        choice.logprobs += out.logprobs or []
        if out.prompt_logprobs is not None:
            choice.prompt_logprobs = out.prompt_logprobs
        choice.last = out

    def complete(self) -> dict:
        choices = []
        for index in sorted(self._choices):
            c = self._choices[index]
            text, logprobs = self._content(index, "".join(c.text), c.token_ids,
                                           c.logprobs, c.prompt_logprobs)
            reason, calls = finish_reason(c.last), None
            if self.chat and self.shape.tools is not None:
                text, calls, reason = self._calls(text, reason)
            choices.append(self._choice(index, text, c.token_ids, logprobs, reason, False,
                                        c.last.stop_reason, calls))
            if self.shape.prompt_logprobs is not None and not self.chat:
                choices[-1]["prompt_logprobs"] = self._prompt_logprobs(c)
            if self.shape.token_ids and not self.chat:
                choices[-1]["prompt_token_ids"] = self.shape.prompt_ids[index // self.shape.n]
        body = self._envelope(self.object, choices)
        if self.shape.token_ids and self.chat:  # vLLM's: the response's, with token_ids
            body["prompt_token_ids"] = self.shape.prompt_ids[0]
        if self.shape.prompt_logprobs is not None and self.chat:  # vLLM: the response's
            body["prompt_logprobs"] = self._prompt_logprobs(self._choices[0])
        body["usage"] = self._usage()
        return body

    def _calls(self, text: str, reason: str) -> tuple[str, list[dict] | None, str]:
        """A whole response's content, tool calls and finish reason (``CallStream.whole``):
        ``tool_calls`` when the output ended on a stop and holds calls; cut at
        ``max_tokens``, the calls as far as written and ``length``, as vLLM's."""
        content, calls, called = CallStream.whole(self.shape.tools, text, reason == "stop")
        return content, calls or None, "tool_calls" if called else reason

    def _prompt_logprobs(self, choice: _Choice) -> list[dict | None] | None:
        if choice.prompt_logprobs is None:
            return None
        return self.shape.prompt_logprobs.prompt(choice.prompt_logprobs)

    def first_chunks(self) -> list[bytes]:
        """Chat streams open with the assistant's role for each choice, as OpenAI's do."""
        if not self.chat:
            return []
        return [self._sse({"index": i, "delta": {"role": "assistant", "content": ""},
                           "logprobs": None, "finish_reason": None},
                          i == 0 and self.shape.token_ids)
                for i in range(self.shape.n)]  # a chat request has one prompt

    def chunk(self, index: int, out: RequestOutput) -> bytes | None:
        """The chunk of one engine output; None for an output with nothing to send."""
        out = self._shown(out)
        self._choices[index].streamed += len(out.token_ids)
        if self.chat and self.shape.tools is not None:
            return self._tool_chunk(index, out)
        reason = finish_reason(out)
        if out.finished:
            self._choices[index].last = out
        sends_ids = (self.shape.token_ids or self.shape.logprobs) and out.token_ids
        if (not out.text and reason is None and not sends_ids
                and (self.shape.echo is None or self._choices[index].started)):
            return None
        first = not self._choices[index].started
        text, logprobs = self._content(index, out.text, out.token_ids, out.logprobs,
                                       out.prompt_logprobs)
        choice = self._choice(index, text, out.token_ids, logprobs, reason, True,
                              out.stop_reason)
        if first and self.shape.token_ids and not self.chat:  # vLLM's: in a choice's first
            choice["prompt_token_ids"] = self.shape.prompt_ids[index // self.shape.n]
        return self._sse(choice)

    def _tool_chunk(self, index: int, out: RequestOutput) -> bytes | None:
        """The content and tool-call deltas an output lets stream (``CallStream``), with
        the token ids and logprobs no chunk has carried yet; the last chunk has the rest,
        and the finish reason ``tool_calls`` when the output holds calls."""
        state = self._choices[index]
        state.token_ids += out.token_ids
        state.logprobs += out.logprobs or []
        stream = state.calls = state.calls or CallStream(self.shape.tools)
        if not out.finished:
            content, deltas = stream.feed(out.text)
            if not content and not deltas:
                return None  # its tokens go with the next chunk
            return self._sse(self._choice(index, content, *self._uncarried(state), None,
                                          True, calls=deltas or None))
        state.last = out
        reason = finish_reason(out)
        content, deltas, called = stream.finish(out.text, reason == "stop")
        return self._sse(self._choice(index, content, *self._uncarried(state),
                                      "tool_calls" if called else reason, True,
                                      out.stop_reason, deltas or None))

    def _uncarried(self, state: _Choice) -> tuple[list[int], dict | None]:
        """The token ids of a tool stream's choice that no chunk has carried yet, and
        their logprobs when asked."""
        ids, entries = state.token_ids[state.carried:], state.logprobs[state.carried:]
        state.carried = len(state.token_ids)
        return ids, None if self.shape.logprobs is None else self.shape.logprobs.chat(ids, entries)

    def last_chunks(self) -> list[bytes]:
        """The stream's end: with ``stream_options.include_usage`` a closing usage chunk
        (empty choices), then ``[DONE]``."""
        if not self.shape.stream_usage:
            return [DONE]
        body = self._envelope(self._chunk_object, [])
        body["usage"] = self._usage()
        return [_event(body), DONE]

    @staticmethod
    def error_chunks(exc: BaseException) -> list[bytes]:
        """An error after the stream started: one event, as vLLM sends it, then
        ``[DONE]``."""
        return [sse_error(exc), DONE]

    def _usage(self) -> dict:
        """Every choice's completion tokens; each prompt's tokens once (its ``n`` choices
        share it), and its cached tokens as those cached before it came: its choices'
        least (the one that computed the prompt's blocks; which one did depends on how
        they arrived)."""
        lasts = [(i, c.last) for i, c in self._choices.items() if c.last is not None]
        firsts = [out for i, out in lasts if i % self.shape.n == 0]
        prompt = sum(out.prompt_tokens for out in firsts)
        completion = sum(out.completion_tokens for _, out in lasts)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}
        if self.shape.cached_details:
            cached: dict[int, int] = {}
            for i, out in lasts:
                prompt_index = i // self.shape.n
                cached[prompt_index] = min(cached.get(prompt_index, out.cached_tokens),
                                           out.cached_tokens)
            usage["prompt_tokens_details"] = {"cached_tokens": sum(cached.values())}
        return usage

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _sse(self, choice: dict, prompt_ids: bool = False) -> bytes:
        """One chunk (``prompt_ids``: with the prompt's token ids, vLLM's first chat
        chunk's); with usage asked, its ``usage``: null, or (continuous) the choice's
        prompt and the tokens streamed so far, as vLLM counts them."""
        body = self._envelope(self._chunk_object, [choice])
        if prompt_ids:
            body["prompt_token_ids"] = self.shape.prompt_ids[0]
        if self.shape.stream_usage == "continuous":
            index = choice["index"]
            prompt = len(self.shape.prompt_ids[index // self.shape.n])
            done = self._choices[index].streamed
            body["usage"] = {"prompt_tokens": prompt, "completion_tokens": done,
                             "total_tokens": prompt + done}
        elif self.shape.stream_usage:
            body["usage"] = None
        return _event(body)


def _event(body: dict) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


def model_card(model_id: str, created: float, parent: str | None, root: str,
               max_model_len: int | None = None) -> dict:
    card = {"id": model_id, "object": "model", "created": int(created),
            "owned_by": OWNED_BY, "root": root, "parent": parent}
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return card


def adapter_card(record: AdapterRecord, base_model: str, name: str) -> dict:
    """An adapter in ``/v1/models`` under ``name``, the model name that serves it;
    ``root`` and ``parent`` are the base model's id."""
    return model_card(name, record.created_at, base_model, base_model)
