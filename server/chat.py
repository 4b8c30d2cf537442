"""Chat input: the messages every front end takes and how the model's chat template renders
them, with vLLM's options (``add_generation_prompt``, ``continue_final_message``,
``chat_template_kwargs``). A template that cannot render a request's messages is that
request's error, never the server's."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from nolaserve.adapters.errors import InvalidRequestError, check_utf8, short

# Any other role is refused rather than rendered raw. OpenAI's "developer" message is
# the system prompt (open models' templates know "system" only), as vLLM's harmony and
# OpenAI itself treat it.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
_RENDERED_AS = {"developer": "system"}
MAX_TEMPLATE_KWARGS = 32
MAX_DOCUMENTS = 64


@dataclass
class ChatMessage:
    role: str
    content: str
    tool_calls: list[dict] | None = None  # an assistant's calls, OpenAI's shape
    tool_call_id: str | None = None  # a "tool" message: the call it answers

    def template_dict(self) -> dict:
        """The message as chat templates take it (tool fields only when set)."""
        tools = {"tool_calls": self.tool_calls, "tool_call_id": self.tool_call_id}
        return {"role": _RENDERED_AS.get(self.role, self.role), "content": self.content,
                **{k: v for k, v in tools.items() if v is not None}}


@dataclass
class ChatOptions:
    """How ``messages`` are rendered (vLLM's chat fields): ``add_generation_prompt`` opens
    the assistant's turn; ``continue_final_message`` leaves the last message, an
    assistant's, open for the model to go on with instead; ``template_kwargs`` are extra
    variables for the chat template (``{"enable_thinking": false}``); ``documents``
    (``[{"title", "text"}, ...]``) what RAG templates render as sources."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    documents: list[dict[str, str]] | None = None

    def check(self, tokenizer, messages: list[dict]) -> None:
        """``InvalidRequestError`` naming the field for options the template cannot take:
        a variable that is one of ``apply_chat_template``'s own arguments (so a request
        cannot swap the template itself) or not a name."""
        if self.add_generation_prompt and self.continue_final_message:
            raise InvalidRequestError(
                "continue_final_message continues the last message, add_generation_prompt "
                "opens a new one: set add_generation_prompt to false", "continue_final_message")
        if self.continue_final_message and messages[-1]["role"] != "assistant":
            raise InvalidRequestError("continue_final_message needs an assistant message "
                                      "last", "continue_final_message")
        if len(self.template_kwargs) > MAX_TEMPLATE_KWARGS:
            raise InvalidRequestError(f"chat_template_kwargs has {len(self.template_kwargs)} "
                                      f"entries; at most {MAX_TEMPLATE_KWARGS} are allowed",
                                      "chat_template_kwargs")
        self._check_documents()
        reserved = {"messages", *inspect.signature(tokenizer.apply_chat_template).parameters}
        for name in self.template_kwargs:
            if not isinstance(name, str) or not name.isidentifier() or name in reserved:
                raise InvalidRequestError(
                    f"chat_template_kwargs cannot set {short(name)}: use names the template "
                    "reads (enable_thinking), not apply_chat_template's own arguments",
                    "chat_template_kwargs")


    def _check_documents(self) -> None:
        docs = self.documents or []
        if len(docs) > MAX_DOCUMENTS or not all(
                isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in d.items()) for d in docs):
            raise InvalidRequestError(f"documents must be at most {MAX_DOCUMENTS} objects of "
                                      'strings, such as {"title": ..., "text": ...}',
                                      "documents")
        for i, doc in enumerate(docs):
            for key, value in doc.items():
                check_utf8(key + value, f"documents[{i}]")


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None,
                options: ChatOptions) -> str:
    """``messages`` through the chat template as ``options`` say; a template that raises
    on them (a role order it refuses, a variable it cannot use) is the request's error."""
    options.check(tokenizer, messages)
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message, tokenize=False,
            documents=options.documents or None, **options.template_kwargs)
    except Exception as e:  # the template's own code (Jinja) on the request's input
        raise InvalidRequestError(f"the chat template cannot render these messages: "
                                  f"{short(str(e), 200)}", "messages") from None
