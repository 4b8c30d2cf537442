"""The engine's ``TokenLogprob``s in OpenAI's shapes: completions' ``{tokens,
token_logprobs, top_logprobs, text_offset}`` and chat's ``{content: [{token, logprob,
bytes, top_logprobs}]}``; and vLLM's ``prompt_logprobs``. A token is shown as the
tokenizer's decoding of its id alone (``bytes``: that text's UTF-8, as vLLM does), or
with vLLM's ``return_tokens_as_token_ids`` as ``"token_id:<id>"`` (vLLM's placeholder,
with its quirks: completions' offsets count the placeholder's characters, and a chat
token's own ``bytes`` stay its text's); ``-inf`` becomes OpenAI's ``-9999.0``."""

from __future__ import annotations

from collections.abc import Sequence

from nolaserve.adapters.errors import UnsupportedFieldError

from ..engine.engine_types import TokenLogprob

LOWEST = -9999.0  # OpenAI's logprob of a token "very unlikely"; JSON has no -inf


class LogprobFormat:
    """The logprobs of one request, ``k`` most likely tokens per position."""

    def __init__(self, tokenizer, k: int, as_ids: bool = False) -> None:
        self.tokenizer, self.k, self.as_ids = tokenizer, k, as_ids
        self._pieces: dict[int, str] = {}

    def label(self, token_id: int) -> str:
        """How a token is named: its text, or ``token_id:<id>`` when asked."""
        return f"token_id:{token_id}" if self.as_ids else self.piece(token_id)

    def piece(self, token_id: int) -> str:
        text = self._pieces.get(token_id)
        if text is None:
            text = self._pieces[token_id] = self.tokenizer.decode([token_id])
        return text

    def completion(self, token_ids: Sequence[int],
                   entries: Sequence[TokenLogprob | None] | None, offset: int
                   ) -> tuple[dict, int]:
        """Completions' ``logprobs`` of ``token_ids`` (an entry ``None``: the first prompt
        token, which has none), text offsets from ``offset``; and the offset after them."""
        entries = _checked(entries, len(token_ids))
        tokens = [self.label(t) for t in token_ids]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens,
                "token_logprobs": [None if e is None else _value(e.logprob) for e in entries],
                "top_logprobs": [None if e is None else self._top(e) for e in entries],
                "text_offset": offsets}, offset

    def _top(self, entry: TokenLogprob) -> dict[str, float]:
        """The sampled token and the ``k`` most likely (OpenAI: up to ``k + 1``)."""
        top = {self.label(entry.token_id): _value(entry.logprob)}
        for token_id, logprob in entry.top[:self.k]:
            top.setdefault(self.label(token_id), _value(logprob))
        return top

    def chat(self, token_ids: Sequence[int], entries: Sequence[TokenLogprob] | None
             ) -> dict:
        """Chat's ``logprobs``: ``{"content": [...], "refusal": None}``."""
        entries = _checked(entries, len(token_ids))
        content = [self._chat_token(e.token_id, e.logprob)
                   | {"bytes": list(self.piece(e.token_id).encode()),
                      "top_logprobs": [self._chat_token(t, v) for t, v in e.top[:self.k]]}
                   for e in entries]
        return {"content": content, "refusal": None}

    def prompt(self, entries: Sequence[TokenLogprob | None]) -> list[dict | None]:
        """vLLM's ``prompt_logprobs``: per prompt position ``None`` (the first) or
        ``{token id: {logprob, rank, decoded_token}}`` of the prompt token and the ``k``
        most likely."""
        out: list[dict | None] = []
        for e in entries:
            if e is None:
                out.append(None)
                continue
            out.append({t: {"logprob": _value(logprob), "rank": rank,
                            "decoded_token": self.piece(t)}
                        for t, logprob, rank in e.ranked(self.k)})
        return out

    def _chat_token(self, token_id: int, logprob: float) -> dict:
        text = self.label(token_id)
        return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode())}


def _value(logprob: float) -> float:
    return max(logprob, LOWEST)


def _checked(entries: Sequence | None, count: int) -> Sequence:
    if entries is None and count == 0:
        return ()
    if entries is None or len(entries) != count:
        raise UnsupportedFieldError("this server's engine backend does not compute "
                                    "logprobs: leave logprobs unset", "logprobs")
    return entries
