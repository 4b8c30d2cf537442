"""IncrementalDetokenizer: streamed pieces add up to decode(), never half a character, and
stop strings cut the text before them, even when split across tokens."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nolaserve.adapters.errors import InvalidRequestError
from nolaserve.server.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

MULTIBYTE = "aé中文字😀🎉こんにちは 🇫🇷 naïve\n."
TEXT = st.text(alphabet=st.sampled_from(MULTIBYTE) | st.characters(codec="utf-8"), max_size=40)
HYPO = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="session")
def metaspace():
    """A SentencePiece-style BPE (``▁`` for spaces, ``<0xNN>`` byte fallback): decode drops
    the first token's leading space, so a token's text depends on the window's start."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(["hello world the end 中文 naïve café said"] * 20, trainer)
    spec = json.loads(tok.to_str())
    for b in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


class Proxy:
    """A tokenizer seen through ``__getattr__``: ``window=True`` hides its
    ``backend_tokenizer`` (as a slow tokenizer has none), so the detokenizer takes its
    Python window path; ``decodes`` counts the Python ``decode`` calls."""

    def __init__(self, tok, window: bool) -> None:
        self._tok, self._window, self.decodes = tok, window, 0

    def __getattr__(self, name):
        if name == "backend_tokenizer" and self._window:
            raise AttributeError(name)
        return getattr(self._tok, name)

    def __len__(self) -> int:
        return len(self._tok)

    def decode(self, *args, **kwargs):
        self.decodes += 1
        return self._tok.decode(*args, **kwargs)


@pytest.fixture(params=[f"{name}-{path}" for name in ("bytebpe", "metaspace", "smollm2")
                        for path in ("stream", "window")])
def tokenizer(request):
    name, path = request.param.split("-")
    return Proxy(request.getfixturevalue(name), window=path == "window")


def test_a_fast_tokenizer_streams_without_a_python_decode_per_token(smollm2):
    """Its ``DecodeStream`` decodes each token; the Python ``decode`` runs only at the end
    (the window finishing the text), the same text either way."""
    ids = smollm2.encode("naïve café 😀 中文 " * 8, add_special_tokens=False)
    texts = {}
    for window in (False, True):
        tok = Proxy(smollm2, window)
        detok = IncrementalDetokenizer(tok, [])
        texts[window] = "".join(detok.add([i]) for i in ids)
        assert tok.decodes == (2 * len(ids) if window else 0)
        texts[window] += detok.flush()
    assert texts[False] == texts[True] == smollm2.decode(ids)


def stream(tok, ids, stop=(), chunks=None, skip_special_tokens=True, include_stop=False):
    """Feed ``ids`` in ``chunks`` (sizes, cycled; default 1); flush unless stopped."""
    detok = IncrementalDetokenizer(tok, list(stop), skip_special_tokens,
                                   include_stop=include_stop)
    sizes, pieces, i, j = chunks or [1], [], 0, 0
    while i < len(ids):
        n = sizes[j % len(sizes)]
        pieces.append(detok.add(ids[i : i + n]))
        i, j = i + n, j + 1
    if not detok.stopped:
        pieces.append(detok.flush())
    assert "".join(pieces) == detok.text
    return detok, pieces


def decode(tok, ids, skip_special_tokens=True):
    return tok.decode(ids, skip_special_tokens=skip_special_tokens)


def truncate(text, stop, include=False):
    """``text`` cut before the stop string that completes first, character by character
    (after it with ``include``)."""
    for end in range(len(text) + 1):
        done = [s for s in stop if text[:end].endswith(s)]
        if done:
            return text[:end] if include else text[: end - max(map(len, done))]
    return text


def random_ids(tok, rng, plain):
    """Up to 30 ids: specials, ``plain`` tokens and the tokens of multi-byte characters."""
    ids, n = [], rng.randrange(1, 30)
    while len(ids) < n:
        roll = rng.random()
        if roll < 0.1:
            ids.append(rng.choice(tok.all_special_ids))
        elif roll < 0.4:
            ids += tok.encode(rng.choice("é中😀🇫🇷"), add_special_tokens=False)
        else:
            ids.append(rng.choice(plain))
    return ids


@HYPO
@given(text=TEXT, chunks=st.lists(st.integers(1, 3), min_size=1, max_size=4))
def test_pieces_add_up_to_decode(tokenizer, text, chunks):
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = decode(tokenizer, ids)
    detok, pieces = stream(tokenizer, ids, chunks=chunks)
    assert detok.text == full
    assert not detok.stopped
    if REPLACEMENT_CHAR not in full:
        assert all(REPLACEMENT_CHAR not in p for p in pieces)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_add_up_to_decode(tokenizer, skip_special_tokens):
    """Arbitrary ids: special tokens, bytes that never form a character."""
    rng = random.Random(0)
    # a byte-fallback tokenizer gets no lone <0xNN> tokens (see the detokenizer's note)
    byte_fallback = {i for t, i in tokenizer.get_vocab().items() if t.startswith("<0x")}
    plain = [i for i in range(len(tokenizer)) if i not in byte_fallback]
    for _ in range(150):
        ids = random_ids(tokenizer, rng, plain)
        full = decode(tokenizer, ids, skip_special_tokens)
        detok, pieces = stream(tokenizer, ids, chunks=[rng.randint(1, 3)],
                               skip_special_tokens=skip_special_tokens)
        assert detok.text == full
        if REPLACEMENT_CHAR not in full:
            assert all(REPLACEMENT_CHAR not in p for p in pieces)


def test_split_character_is_held_until_complete(bytebpe):
    ids = bytebpe.encode("a😀", add_special_tokens=False)
    raw = [bytebpe.encode(ch, add_special_tokens=False) for ch in "a😀"]
    assert len(raw[1]) > 1, "the emoji must span tokens for this test to mean anything"
    detok = IncrementalDetokenizer(bytebpe, [])
    pieces = [detok.add([i]) for i in ids]
    assert pieces[0] == "a"
    assert pieces[1:-1] == [""] * (len(ids) - 2)
    assert pieces[-1] == "😀"
    assert detok.flush() == ""


def test_smollm2_emoji_split_across_tokens(smollm2):
    ids = smollm2.encode("ok 😀 中文字", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm2, [])
    pieces = [detok.add([i]) for i in ids]
    assert detok.text == "ok 😀 中文字"
    assert detok.flush() == ""
    assert " 😀" in pieces  # emitted whole, by the token that completes it
    assert pieces[pieces.index(" 😀") - 1] == ""  # after holding the first half back
    assert all(REPLACEMENT_CHAR not in p for p in pieces)


def test_spaces_between_special_tokens_false_joins_adjacent_added_tokens():
    """vLLM's ``spaces_between_special_tokens=False`` (with special tokens kept): an added
    token right after another is its bare text, without the space WordPiece's decoder puts
    between tokens. The texts are vLLM 0.32's ``FastIncrementalDetokenizer``'s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["[UNK]", "[CLS]", "[SEP]", "hello", "world", "##s", "a"]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]")
    ids = [3, 2, 1, 2, 4, 5, 1, 6]
    texts = {}
    for spaces in (True, False):
        detok = IncrementalDetokenizer(tok, [], False, spaces_between_special_tokens=spaces)
        texts[spaces] = "".join(detok.add([i]) for i in ids) + detok.flush()
    assert texts == {True: "hello [SEP] [CLS] [SEP] worlds [CLS] a",
                     False: "hello [SEP][CLS][SEP] worlds [CLS] a"}
    bare = IncrementalDetokenizer(tok, [], True, spaces_between_special_tokens=False)
    assert bare.add(ids) == "hello worlds a"  # skipped special tokens: nothing to join


def test_special_tokens_skipped_or_kept(smollm2):
    eos = smollm2.convert_tokens_to_ids("<|im_end|>")
    ids = smollm2.encode("Hi", add_special_tokens=False) + [eos] + smollm2.encode(" there")
    assert stream(smollm2, ids)[0].text == "Hi there"
    assert stream(smollm2, ids, skip_special_tokens=False)[0].text == "Hi<|im_end|> there"


TEXT_EN = "Hello world, this is the end."


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["s is t"], "Hello world, thi"),  # spans three tokens
        (["wor"], "Hello "),  # ends inside a token
        (["Hello"], ""),  # at the very start
        (["end", "world"], "Hello "),  # the earliest of several
        (["o world, this", "world"], "Hello "),  # the first to complete, not to start
        (["the end."], "Hello world, this is "),  # ends exactly with the text
        (["absent"], TEXT_EN),
    ],
)
def test_stop_strings(smollm2, stop, expected):
    ids = smollm2.encode(TEXT_EN, add_special_tokens=False)
    detok, pieces = stream(smollm2, ids, stop=stop)
    assert detok.text == expected
    assert detok.stopped == (expected != TEXT_EN)
    assert not any(s in "".join(pieces) for s in stop)


def test_include_stop_ends_the_text_after_the_stop_string(smollm2):
    ids = smollm2.encode(TEXT_EN, add_special_tokens=False)
    detok, pieces = stream(smollm2, ids, stop=["o world, this", "world"], include_stop=True)
    assert detok.text == "Hello world" and detok.stopped and detok.stop_hit == "world"
    detok, _ = stream(smollm2, ids, stop=["absent"], include_stop=True)
    assert detok.text == TEXT_EN and not detok.stopped


def test_stop_prefix_is_held_then_released(smollm2):
    ids = smollm2.encode(TEXT_EN, add_special_tokens=False)
    words = [smollm2.decode([i]) for i in ids]
    detok = IncrementalDetokenizer(smollm2, ["the end!"])
    texts = []
    for i in ids:
        detok.add([i])
        texts.append(detok.text)
    at_the = words.index(" the")
    assert texts[at_the] == "Hello world, this is "  # "the" could start "the end!"
    assert texts[at_the + 1] == "Hello world, this is "  # so could "the end"
    assert texts[-1] == TEXT_EN  # "the end." cannot: released
    assert not detok.stopped
    assert detok.flush() == ""


def test_flush_releases_held_text_and_ignores_later_calls(smollm2):
    ids = smollm2.encode("say STO", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm2, ["STOP"])
    assert "".join(detok.add([i]) for i in ids) == "say "
    assert detok.flush() == "STO"
    assert detok.text == "say STO"
    assert not detok.stopped
    assert detok.flush() == ""


def test_tokens_after_stop_are_ignored(smollm2):
    detok = IncrementalDetokenizer(smollm2, ["STOP"])
    assert detok.add(smollm2.encode("a STOP b", add_special_tokens=False)) == "a "
    assert detok.stopped
    assert detok.add(smollm2.encode(" more", add_special_tokens=False)) == ""
    assert detok.flush() == ""
    assert detok.text == "a "


@HYPO
@given(data=st.data(), text=TEXT, chunks=st.lists(st.integers(1, 3), min_size=1, max_size=4))
def test_stop_truncates_at_first_occurrence(tokenizer, data, text, chunks):
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = decode(tokenizer, ids)
    substrings = st.tuples(st.integers(0, len(full)), st.integers(1, 4)).map(
        lambda t: full[t[0] : t[0] + t[1]]).filter(bool) if full else st.nothing()
    stop = data.draw(st.lists(substrings | TEXT.filter(bool), min_size=1, max_size=3))
    include = data.draw(st.booleans())  # vLLM's include_stop_str_in_output
    detok, pieces = stream(tokenizer, ids, stop=stop, chunks=chunks, include_stop=include)
    expected = truncate(full, stop, include)
    assert detok.text == expected
    assert detok.stopped == any(s in full for s in stop)
    if REPLACEMENT_CHAR not in full:
        assert all(REPLACEMENT_CHAR not in p for p in pieces)


def test_empty_stop_string_is_rejected(bytebpe):
    with pytest.raises(InvalidRequestError, match="non-empty"):
        IncrementalDetokenizer(bytebpe, ["ok", ""])
