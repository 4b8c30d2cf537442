"""vLLM's ``allowed_token_ids`` and ``bad_words``: tokens a request may not sample this
step, set to -inf before the rest of the logits processing (logits_process.py), in vLLM
v1's order.

- ``allowed_token_ids``: every other token is masked. Each request's mask is a bool row
  ``[V]`` built on the device at its first step and kept until its Sequence goes.
- ``bad_words``: each word becomes token sequences once, at ``add_request``
  (:func:`bad_word_ids`, vLLM's ``update_from_tokenizer``); a sequence's last token is
  masked when the output so far ends with the rest of it, so the word is never completed.
  As in vLLM, only the output is matched, never the prompt.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from nolaserve.adapters.errors import InvalidRequestError

from .sampler import row_tensor
from .sequence import MAX_BAD_WORDS, Sequence


def bad_word_ids(tokenizer, words: list[str]) -> tuple[tuple[int, ...], ...]:
    """``words`` as the token sequences to ban, exactly as vLLM tokenizes them: each word
    (leading spaces stripped) alone, and after a space when that gives a different first
    token and as many tokens (a word both at the start and in the middle of a text)."""
    if not words:
        return ()
    if tokenizer is None:
        raise InvalidRequestError("bad_words needs the model's tokenizer, and this engine "
                                  "takes token ids only: leave bad_words unset", "bad_words")
    banned: list[tuple[int, ...]] = []
    for word in dict.fromkeys(words):
        alone = _ids(tokenizer, word.lstrip())
        if not alone:
            raise InvalidRequestError(f"bad_words entry {word[:40]!r} tokenizes to no token",
                                      "bad_words")
        spaced = _ids(tokenizer, " " + word.lstrip())
        banned.append(alone)
        if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
            banned.append(spaced)
    if len(banned) > MAX_BAD_WORDS:
        raise InvalidRequestError(
            f"bad_words gives {len(banned)} token sequences (one or two a word: alone, and "
            f"after a space, as vLLM counts them); at most {MAX_BAD_WORDS} are allowed: send "
            "fewer words", "bad_words")
    return tuple(banned)


def _ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def banned_now(bad: tuple[tuple[int, ...], ...], output: list[int]) -> list[int]:
    """The tokens that would complete one of ``bad`` after ``output``."""
    return [w[-1] for w in bad if len(w) <= len(output) + 1
            and tuple(output[len(output) - len(w) + 1:]) == w[:-1]]


def asks(seq: Sequence) -> bool:
    """Whether ``seq`` masks tokens here (allowed_token_ids, or bad words to complete)."""
    return seq.params.allowed_token_ids is not None or bool(seq.bad_word_ids)


class TokenMasks:
    """Applies both to a batch; holds the ``allowed_token_ids`` rows across steps."""

    def __init__(self) -> None:
        self._allowed: weakref.WeakKeyDictionary[Sequence, Tensor] = \
            weakref.WeakKeyDictionary()

    def apply(self, logits: Tensor, seqs: list[Sequence]) -> None:
        """Mask, in place, row ``i`` of ``logits`` ``[N, V]`` for ``seqs[i]``."""
        limited = [i for i, s in enumerate(seqs) if s.params.allowed_token_ids is not None]
        if limited:
            index = row_tensor(limited, torch.int64, logits)
            masks = torch.stack([self._allowed_row(seqs[i], logits) for i in limited])
            logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(
                masks, float("-inf")))
        rows, cols = [], []
        for i, s in enumerate(seqs):
            tokens = banned_now(s.bad_word_ids, s.output_token_ids)
            rows += [i] * len(tokens)
            cols += tokens
        mask_pairs(logits, rows, cols)

    def _allowed_row(self, seq: Sequence, like: Tensor) -> Tensor:
        row = self._allowed.get(seq)
        if row is None:
            row = torch.ones(like.shape[1], dtype=torch.bool, device=like.device)
            ids = [t for t in seq.params.allowed_token_ids if t < like.shape[1]]
            row.index_fill_(0, row_tensor(ids, torch.int64, like), False)
            self._allowed[seq] = row
        return row


def mask_pairs(logits: Tensor, rows: list[int], cols: list[int]) -> None:
    """``logits[rows[j], cols[j]] = -inf`` for every ``j``: one int64 ``[2, K]`` copy to the
    device and a fill there."""
    if rows:
        logits.index_put_(pair_index(rows, cols, logits), torch.full(
            (len(rows),), float("-inf"), dtype=logits.dtype, device=logits.device))


def pair_index(rows: list[int], cols: list[int], like: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, cols)`` as one int64 ``[2, K]`` copy to ``like``'s device, split."""
    both = row_tensor([rows, cols], torch.int64, like)
    return both[0], both[1]
