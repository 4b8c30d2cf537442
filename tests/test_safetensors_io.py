"""The safetensors header reader: refusals that name the key (invalid UTF-8, a key written
twice, an integer too long to convert) and what a file the registry holds still reads."""

import pytest
import torch

from nolaserve.adapters import safetensors_io as st
from nolaserve.adapters.errors import InvalidAdapterError

GOOD = st.write({"t": torch.zeros(2)}, {"format": "x", "description": "DESC"})


def with_header(edit) -> bytes:
    """``GOOD`` with ``edit(header bytes)`` as its header."""
    n = int.from_bytes(GOOD[:8], "little")
    header = edit(GOOD[8 : 8 + n])
    return len(header).to_bytes(8, "little") + header + GOOD[8 + n :]


@pytest.mark.parametrize("bad", [b"caf\xff", b"\\ud800", b"x\\udfff\xe9"],
                         ids=["raw-byte", "escaped-surrogate", "both"])
def test_a_metadata_value_not_utf8_is_named(bad):
    data = with_header(lambda h: h.replace(b"DESC", bad))
    with pytest.raises(InvalidAdapterError, match="adapter: metadata 'description' is not "
                       "valid UTF-8"):
        st.read(data)
    with pytest.raises(InvalidAdapterError, match="'description' is not valid UTF-8"):
        st.read(data, strict=False)


def test_a_metadata_key_or_tensor_name_not_utf8_is_named():
    with pytest.raises(InvalidAdapterError, match=r"metadata key '\\udcff' is not valid UTF-8"):
        st.read(with_header(lambda h: h.replace(b'"description"', b'"\xff"')))
    with pytest.raises(InvalidAdapterError, match=r"tensor name '\\udcff' is not valid UTF-8"):
        st.read(with_header(lambda h: h.replace(b'"t"', b'"\xff"')))


def test_a_header_over_the_limit_is_named_and_a_short_file_is_called_truncated():
    """A whole file with a 17 MiB header was told it claims more than it holds."""
    data = with_header(lambda h: h.replace(b"DESC", b"x" * (17 << 20)))
    with pytest.raises(InvalidAdapterError, match=r"the safetensors header is 178\d+ bytes, "
                       r"over the limit of 16777216 \(16 MiB\): shorten its metadata"):
        st.read(data)
    with pytest.raises(InvalidAdapterError, match="truncated or not a safetensors file"):
        st.read(GOOD[:40])


def test_invalid_utf8_outside_a_string_keeps_the_decoder_message():
    data = with_header(lambda h: h.replace(b"{", b"\xff{", 1))
    with pytest.raises(InvalidAdapterError, match="not valid JSON: 'utf-8' codec can't decode "
                       "byte 0xff in position 0"):
        st.read(data)


TWICE = {  # the safetensors package reads these keeping the last
    "format": lambda h: h.replace(b'"__metadata__":{', b'"__metadata__":{"format":"y",'),
    "t": lambda h: h.replace(b'{"__metadata__"', b'{"t":{"data_offsets":[0,8],"dtype":"F64",'
                             b'"shape":[1]},"__metadata__"'),
}


@pytest.mark.parametrize("key", TWICE)
def test_duplicate_header_keys_are_refused_when_strict_and_the_last_wins_otherwise(key):
    data = with_header(TWICE[key])
    with pytest.raises(InvalidAdapterError, match=f"the safetensors header holds the key "
                       f"'{key}' twice; write each key once"):
        st.read(data)
    metadata, tensors = st.read(data, strict=False)  # a file the registry holds
    assert metadata["format"] == "x" and tensors["t"].dtype == torch.float32


def test_a_key_twice_in_a_tensor_entry_is_named():
    data = with_header(lambda h: h.replace(b'"dtype":"F32"', b'"dtype":"F64","dtype":"F32"'))
    with pytest.raises(InvalidAdapterError, match="holds the key 'dtype' twice"):
        st.read(data)


def test_a_header_integer_too_long_to_convert_is_named():
    data = with_header(lambda h: h.replace(b'"shape":[2]', b'"shape":[' + b"9" * 5000 + b"]"))
    with pytest.raises(InvalidAdapterError, match="holds a 5000-digit integer; shapes and "
                       "data offsets must be below 2"):
        st.read(data)


def test_integer_metadata_too_long_to_convert_names_the_key_and_range():
    meta = st.Metadata({"seed": "0" * 6000 + "7", "rank": "1" * 5000}, "NOLA adapter",
                       strict=False)
    assert meta.int("seed", 0, 2**63 - 1) == 7  # leading zeros: as an older file holds them
    with pytest.raises(InvalidAdapterError, match=r"NOLA adapter: metadata 'rank' has 5000 "
                       r"digits; it must be in \[1, 65536\]"):
        meta.int("rank", 1, 1 << 16)
