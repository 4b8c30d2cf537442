"""Engine outputs -> the Responses API's ``response`` object, whole or as its typed
stream events (``/v1/responses``, responses_api.py), in the shapes the official ``openai``
client parses and as vLLM sends them.

The output is a ``message`` item with one ``output_text`` part and, when the request has
tools in play, ``function_call`` items (chat's tool calls, ``ToolMode.split``). A stream
sends the text as it comes and, with tools, each call as it is written (chat's
``CallStream``): its item added once its name is known, then its arguments in pieces.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..engine.engine_types import RequestOutput
from .completion_bodies import Shape, finish_reason
from .errors import error_of
from .responses_api import ResponsesRequest
from .tool_calls import CallStream


class ResponseBodies:
    """The ``response`` of one request: whole (``add`` each output, then ``complete``) or
    as stream events (``first_chunks``, ``chunk``, ``last_chunks``)."""

    def __init__(self, shape: Shape, request: ResponsesRequest) -> None:
        self.shape, self.request = shape, request
        self.id, self.message_id = "resp_" + shape.request_id, "msg_" + shape.request_id
        self.created = int(time.time())
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list = []  # the engine's TokenLogprobs, when asked for
        self.last: RequestOutput | None = None
        self.sequence = 0
        self.opened = False  # the message item and its text part were announced
        self.sent = 0  # characters of its text sent as deltas
        self.stream: CallStream | None = None  # a stream with tools: what it has sent
        self.called = False  # that stream's output ended holding calls
        self.closed = False  # the message item is done (a call follows it)

    def add(self, index: int, out: RequestOutput) -> None:
        self.text.append(out.text)
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        if out.finished:
            finish_reason(out)  # a request the server cancelled raises
            self.last = out

    def complete(self) -> dict:
        return self._response(self._status(), self._output())

    def first_chunks(self) -> list[bytes]:
        """``response.created`` and ``in_progress``; without tools the message item and
        its empty text part, before the first token."""
        empty = self._response("in_progress", [])
        opening = [self._event("response.created", response=empty),
                   self._event("response.in_progress", response=empty)]
        return opening + (self._open() if self.shape.tools is None else [])

    def chunk(self, index: int, out: RequestOutput) -> bytes | None:
        """Without tools, each output's text (and logprobs) as a delta; with tools, the
        content and each call as they are written (``CallStream``): a call's item is
        added once its name is known, then its arguments go as deltas."""
        self.add(index, out)
        if self.shape.tools is None:
            if not (out.text or self.shape.logprobs is not None and out.token_ids):
                return None  # a token's text may wait for its next bytes; logprobs do not
            self.sent += len(out.text)
            return self._delta(0, out.text, self._logprobs_of(out.token_ids, out.logprobs))
        stream = self.stream = self.stream or CallStream(self.shape.tools)
        if out.finished:
            content, deltas, self.called = stream.finish(out.text, self._status() == "completed")
        else:
            content, deltas = stream.feed(out.text)
        events = [] if self.opened or not content else self._open()
        if content:
            self.sent += len(content)
            events.append(self._delta(0, content, []))
        if deltas and self.opened and not self.closed:  # items go one after another
            self.closed = True
            events += self._message_events(self._output()[0], 0)
        for d in deltas:
            events += self._call_delta(d)
        return b"".join(events) or None

    def _call_delta(self, delta: dict) -> list[bytes]:
        """A streamed call's events: its item added when it is announced, then its
        arguments' piece."""
        at = delta["index"] + self.opened  # after the message, if it has content
        item = _call_item(self.stream.sent[delta["index"]], "in_progress") | {"arguments": ""}
        added = [] if "id" not in delta else [
            self._event("response.output_item.added", output_index=at, item=item)]
        piece = delta["function"]["arguments"]
        return added + ([self._event("response.function_call_arguments.delta",
                                     item_id=item["id"], output_index=at, delta=piece)]
                        if piece else [])

    def last_chunks(self) -> list[bytes]:
        """Each output item's events (a message's text, part and item ``done``; a call's
        arguments and item ``done``), then ``response.completed``, its status
        ``incomplete`` when the output reached ``max_output_tokens`` (as vLLM sends it;
        the client's ``get_final_response`` needs that event)."""
        items, events = self._output(), []
        for at, item in enumerate(items):
            if item["type"] == "message":
                events += [] if self.closed else self._message_events(item, at)
            else:
                events += self._call_events(item, at, streamed=self.stream is not None)
        return events + [self._event("response.completed",
                                     response=self._response(self._status(), items))]

    def error_chunks(self, exc: BaseException) -> list[bytes]:
        error = error_of(exc)[2]["error"]
        return [self._event("error", code=str(error["code"]), message=error["message"],
                            param=error["param"])]

    def _output(self) -> list[dict]:
        """The message (unless tool calls are all there is) and the tool calls: what a
        stream sends, whole or streamed (a call cut short is ``incomplete``)."""
        text, calls, status = "".join(self.text), None, self._status()
        called = status == "completed"
        if self.stream is not None:
            text, calls = self.stream.text[:self.stream.content], self.stream.sent
            called = self.called
        elif self.shape.tools is not None:
            text, calls, called = CallStream.whole(self.shape.tools, text, called)
        logprobs = [] if calls else self._logprobs_of(self.token_ids, self.logprobs)
        items = [self._message("completed" if self.closed else status, text, logprobs)
                 ] if text or not calls else []
        return items + [_call_item(c, "completed" if called else "incomplete")
                        for c in calls or []]

    def _message_events(self, item: dict, at: int) -> list[bytes]:
        """The text not streamed yet (all of it, announced first, if none was), then the
        text's, part's and item's ``done``."""
        part = item["content"][0]
        text = part["text"]
        events = [] if self.opened else self._open()
        rest = text[self.sent:]
        if rest:
            events.append(self._delta(at, rest, [] if self.sent else part["logprobs"]))
        return events + [
            self._event("response.output_text.done", **self._where(at), text=text,
                        logprobs=part["logprobs"]),
            self._event("response.content_part.done", **self._where(at), part=part),
            self._event("response.output_item.done", output_index=at, item=item)]

    def _call_events(self, item: dict, at: int, streamed: bool) -> list[bytes]:
        """A call's arguments and item ``done``; announced and its arguments sent first
        unless ``streamed`` already."""
        where = {"item_id": item["id"], "output_index": at}
        sent = [] if streamed else [
            self._event("response.output_item.added", output_index=at,
                        item=item | {"arguments": "", "status": "in_progress"}),
            self._event("response.function_call_arguments.delta", **where,
                        delta=item["arguments"])]
        return sent + [self._event("response.function_call_arguments.done", **where,
                                   name=item["name"], arguments=item["arguments"]),
                       self._event("response.output_item.done", output_index=at, item=item)]

    def _open(self) -> list[bytes]:
        """The message item (output 0: it comes before any tool call) and its empty text
        part, announced."""
        self.opened = True
        return [self._event("response.output_item.added", output_index=0,
                            item=self._message("in_progress", None)),
                self._event("response.content_part.added", **self._where(0),
                            part=_part(""))]

    def _delta(self, at: int, text: str, logprobs: list[dict]) -> bytes:
        return self._event("response.output_text.delta", **self._where(at), delta=text,
                           logprobs=logprobs)

    def _logprobs_of(self, token_ids: list[int], entries: list | None) -> list[dict]:
        """Chat's logprob entries (``token``, ``logprob``, ``bytes``, ``top_logprobs``),
        which the Responses API's text parts carry too; none unless asked."""
        fmt = self.shape.logprobs
        return [] if fmt is None else fmt.chat(token_ids, entries)["content"]

    def _status(self) -> str:
        return "incomplete" if self.last and finish_reason(self.last) == "length" \
            else "completed"

    def _where(self, at: int) -> dict[str, Any]:
        return {"item_id": self.message_id, "output_index": at, "content_index": 0}

    def _message(self, status: str, text: str | None,
                 logprobs: list[dict] | None = None) -> dict:
        return {"type": "message", "id": self.message_id, "status": status,
                "role": "assistant",
                "content": [] if text is None else [_part(text, logprobs)]}

    def _response(self, status: str, output: list[dict]) -> dict:
        r, last = self.request, self.last
        usage = None if last is None or status == "in_progress" else {
            "input_tokens": last.prompt_tokens,
            "input_tokens_details": {"cached_tokens": last.cached_tokens},
            "output_tokens": last.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": last.prompt_tokens + last.completion_tokens}
        return {"id": self.id, "object": "response", "created_at": self.created,
                "status": status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"}
                if status == "incomplete" else None,
                "instructions": r.instructions, "max_output_tokens": r.max_output_tokens,
                "model": self.shape.model, "output": output,
                "parallel_tool_calls": r.parallel_tool_calls is not False,
                "previous_response_id": None, "temperature": r.temperature, "top_p": r.top_p,
                "tool_choice": r.tool_choice or "auto", "tools": r.tools or [],
                "text": {"format": r.text_format}, "truncation": "disabled",
                "metadata": r.metadata or {}, "store": False, "background": False,
                "usage": usage}

    def _event(self, kind: str, **fields: Any) -> bytes:
        """One server-sent event, named as its ``type`` (as OpenAI's stream names them)."""
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


def _part(text: str, logprobs: list[dict] | None = None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [],
            "logprobs": logprobs or []}


def _call_item(call: dict, status: str) -> dict:
    """Chat's tool call as a ``function_call`` output item."""
    return {"type": "function_call", "id": "fc_" + call["id"].removeprefix("call_"),
            "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": status}
