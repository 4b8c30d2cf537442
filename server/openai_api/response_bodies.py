"""Engine outputs -> the Responses API's ``response`` object, whole or as its typed
stream events (``/v1/responses``, responses_api.py), in the shapes the official ``openai``
client parses and as vLLM sends them.

The output is a ``message`` item with one ``output_text`` part and, when the request has
tools in play, ``function_call`` items (chat's tool calls, ``ToolMode.split``). A stream
without tools sends the text as it comes; with tools the output's meaning is known only
at its end, so its items are all sent then, each as OpenAI streams one.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..engine.engine_types import RequestOutput
from .completion_bodies import Shape, finish_reason
from .errors import error_of
from .responses_api import ResponsesRequest


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
        self.held = ""  # tools with a parser: text that may begin a tool call

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
        """Without tools, each output's text (and logprobs) as a delta; with a tool-call
        parser, the text up to a tool call's tag (``ToolMode.streamable``); with other
        tool modes nothing until the end."""
        self.add(index, out)
        tools = self.shape.tools
        if tools is None:
            if not (out.text or self.shape.logprobs is not None and out.token_ids):
                return None  # a token's text may wait for its next bytes; logprobs do not
            self.sent += len(out.text)
            return self._delta(0, out.text, self._logprobs_of(out.token_ids, out.logprobs))
        held = self.held + out.text
        end = tools.streamable(held)
        piece, self.held = held[:end], held[end:]
        if not piece:
            return None
        opening = [] if self.opened else self._open()
        self.sent += len(piece)
        return b"".join(opening + [self._delta(0, piece, [])])

    def last_chunks(self) -> list[bytes]:
        """Each output item's events (a message's text, part and item ``done``; a call's
        arguments and item ``done``), then ``response.completed``, its status
        ``incomplete`` when the output reached ``max_output_tokens`` (as vLLM sends it;
        the client's ``get_final_response`` needs that event)."""
        items, events = self._output(), []
        for at, item in enumerate(items):
            if item["type"] == "message":
                events += self._message_events(item, at)
            else:
                events += self._call_events(item, at)
        return events + [self._event("response.completed",
                                     response=self._response(self._status(), items))]

    def error_chunks(self, exc: BaseException) -> list[bytes]:
        error = error_of(exc)[2]["error"]
        return [self._event("error", code=str(error["code"]), message=error["message"],
                            param=error["param"])]

    def _output(self) -> list[dict]:
        """The message (unless tool calls are all there is) and the tool calls."""
        text, calls, status = "".join(self.text), None, self._status()
        if self.shape.tools is not None and status == "completed":
            text, calls = self.shape.tools.split(text)
        logprobs = [] if calls else self._logprobs_of(self.token_ids, self.logprobs)
        items = [self._message(status, text, logprobs)] if text or not calls else []
        return items + [{"type": "function_call", "id": "fc_" + c["id"].removeprefix("call_"),
                         "call_id": c["id"], "name": c["function"]["name"],
                         "arguments": c["function"]["arguments"], "status": "completed"}
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

    def _call_events(self, item: dict, at: int) -> list[bytes]:
        where = {"item_id": item["id"], "output_index": at}
        return [self._event("response.output_item.added", output_index=at,
                            item=item | {"arguments": "", "status": "in_progress"}),
                self._event("response.function_call_arguments.delta", **where,
                            delta=item["arguments"]),
                self._event("response.function_call_arguments.done", **where,
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
            "input_tokens": last.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
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
