"""Streaming detokenization: token ids in, new text out, stop strings cut.

The prefix/read-offset scheme of vLLM's ``detokenize_incrementally``: each step decodes
only a short window of ids, ``ids[prefix_offset:]``, and emits what it adds to the text of
``ids[prefix_offset:read_offset]``. Decoding the same window start twice keeps
tokenizer-specific joins (SentencePiece's leading space, byte-level merges) consistent, and
a window whose text ends in U+FFFD is an incomplete UTF-8 character: it waits for the next
token. A fast tokenizer's tokens go through its Rust ``DecodeStream`` instead (the same
text, as vLLM's fast detokenizer does it: about 1 us a token against 8 us for the two
Python ``decode`` calls of a window), the window only finishing the text at the end. No
torch.
"""

from __future__ import annotations

from typing import Any

from nolaserve.adapters.errors import InvalidRequestError

try:
    from tokenizers import Tokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21: the Python window for every tokenizer
    Tokenizer = DecodeStream = None

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's output tokens into streamed text.

    ``add(ids)`` returns the text to send now, ``flush()`` the text held back when the
    request ends for another reason than a stop string, and ``text`` everything sent so
    far. The pieces add up to ``tokenizer.decode(output_ids, skip_special_tokens=...)``, cut
    before the first ``stop`` string to complete (after it with ``include_stop``, vLLM's
    ``include_stop_str_in_output``); then ``stopped`` is True and later tokens are
    ignored. "First to complete" does not depend on how the tokens are chunked: of
    stops "abcd" and "bc" in "abcd", "bc" completes first and the text is "a".

    Text is held back while it ends in half a UTF-8 character or in a prefix of a stop
    string. The output is decoded on its own, not after the prompt, so that it equals
    ``decode(output_ids)``. One known gap, shared with vLLM: a
    byte-fallback tokenizer (``<0xNN>`` tokens, Llama 2 style) turns a whole run of byte
    tokens into U+FFFDs once one byte in it is invalid UTF-8, so for such malformed output
    the stream may show a valid character where ``decode`` of the whole shows U+FFFD.
    """

    def __init__(
        self,
        tokenizer: Any,
        stop: list[str],
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
        include_stop: bool = False,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        """``min_tokens``: stop strings are not looked for before that many output tokens
        (the text until then is emitted as it comes), as vLLM does.
        ``spaces_between_special_tokens=False`` (vLLM's; it matters only with
        ``skip_special_tokens=False``): an added token right after another is its bare
        text, without the space a decoder (WordPiece's, a slow tokenizer's) puts between."""
        if any(not s for s in stop):
            raise InvalidRequestError("stop strings must be non-empty")
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.skip_special_tokens = skip_special_tokens
        self.min_tokens, self.include_stop = min_tokens, include_stop
        self.output_token_ids: list[int] = []
        self.stopped = False
        self.stop_hit: str | None = None  # the stop string that ended the text
        self._prefix_offset = 0  # window start: ids before it are fully decoded
        self._read_offset = 0  # ids before it are in _decoded
        self._decoded = ""  # complete characters decoded so far, emitted or held
        self._emitted = 0  # _decoded[:_emitted] has been returned to the caller
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = (backend, DecodeStream(skip_special_tokens=skip_special_tokens)) \
            if DecodeStream is not None and isinstance(backend, Tokenizer) else None
        self._decode_kwargs = {}  # the window's decode: a slow tokenizer's own argument
        self._bare: dict[int, str] = {}  # the stream's: added token id -> its text
        if not (skip_special_tokens or spaces_between_special_tokens):
            self._decode_kwargs = {"spaces_between_special_tokens": False}
            if self._stream is not None:
                self._bare = {i: t.content for i, t in
                              tokenizer.added_tokens_decoder.items()}
        self._after_added = False  # the last token was one of ``_bare``

    @property
    def text(self) -> str:
        """All text emitted so far (a stop string only with ``include_stop``)."""
        return self._decoded[: self._emitted]

    def add(self, token_ids: list[int]) -> str:
        """Append new output tokens; returns the new text that is safe to emit."""
        if self.stopped:
            return ""
        for token_id in token_ids:
            self.output_token_ids.append(token_id)
            if self._stream is None:
                self._decode_window(final=False)
            else:
                self._step_stream(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """The rest of the text, held-back parts included (call when the request finishes
        by length or EOS). Returns ``""`` after a stop string and on later calls."""
        if self.stopped:
            return ""
        self._decode_window(final=True)
        return self._release(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
            **self._decode_kwargs,
        )

    def _decode_window(self, final: bool) -> None:
        """Move the newly complete text of the window into ``_decoded``; an unfinished
        UTF-8 character stays in the window unless ``final``."""
        ids = self.output_token_ids
        prefix_text = self._decode(ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text):
            return  # e.g. a skipped special token: keep the window as it is
        if new_text.endswith(REPLACEMENT_CHAR) and not final:
            return
        self._decoded += new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(ids)

    def _step_stream(self, token_id: int) -> None:
        """``_decode_window`` by the tokenizer's ``DecodeStream``: no text yet while a
        character is unfinished (or the token is skipped); the offsets then stay, so that
        ``flush`` decodes what is left as a window."""
        backend, stream = self._stream
        piece = stream.step(backend, token_id)
        if self._bare:  # as vLLM's fast detokenizer does it
            bare = self._bare.get(token_id)
            if bare is not None and self._after_added:
                piece = bare
            self._after_added = bare is not None
        if piece:
            self._decoded += piece
            self._prefix_offset, self._read_offset = self._read_offset, \
                len(self.output_token_ids)

    def _release(self, final: bool) -> str:
        """Emit decoded text up to the first stop string, or up to any suffix that could
        still grow into one (unless ``final``)."""
        end = len(self._decoded)
        if len(self.output_token_ids) < self.min_tokens:  # no stop string yet
            piece, self._emitted = self._decoded[self._emitted:end], end
            return piece
        cut = self._find_stop()
        if cut is not None:
            self.stopped, self.stop_hit = True, self._decoded[cut[0]:cut[1]]
            end = cut[1] if self.include_stop else cut[0]
            self._decoded = self._decoded[:end]
        elif not final:
            end -= self._held_suffix_len()
        piece = self._decoded[self._emitted : end]
        self._emitted = end
        return piece

    def _find_stop(self) -> tuple[int, int] | None:
        """``(start, end)`` of the stop string that completes first, as if the text arrived
        one character at a time: the earliest end wins, then the earliest start. Only the
        unemitted text is searched: emitted text never holds the start of a stop string,
        since a suffix that could begin one is held back."""
        hits = []
        for s in self.stop:
            start = self._decoded.find(s, self._emitted)
            if start >= 0:
                hits.append((start + len(s), start))
        return min(hits)[::-1] if hits else None

    def _held_suffix_len(self) -> int:
        """Length of the longest unemitted suffix that is a proper prefix of a stop."""
        pending = self._decoded[self._emitted :]
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(pending)), held, -1):
                if pending.endswith(s[:k]):
                    held = k
                    break
        return held
