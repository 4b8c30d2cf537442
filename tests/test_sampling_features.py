"""Per-request sampling features in the engine: logit_bias, penalties, min_tokens, logprobs
and prompt logprobs, each held to a reference we did not write (transformers) or to
hand-written expectations, and each per row inside mixed batches."""

from __future__ import annotations

import pytest

from nolaserve.adapters.errors import InvalidRequestError
from nolaserve.server.engine.engine_types import EngineLimits, check_limits
from nolaserve.server.engine.sequence import SamplingParams

LIMITS = EngineLimits(100, 50, 200, 10, vocab_size=32)


@pytest.mark.parametrize(("fields", "message"), [
    ({"logprobs": 21}, "logprobs must be between 0 and 20"),
    ({"logprobs": -1}, "logprobs must be between 0 and 20"),
    ({"prompt_logprobs": 99}, "prompt_logprobs must be between 0 and 20"),
    ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty must be in [-2, 2]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0"),
    ({"min_tokens": 17}, "min_tokens must be between 0 and max_tokens (16)"),
    ({"min_tokens": -1}, "min_tokens must be between 0 and max_tokens"),
    ({"logit_bias": {32: 1.0}}, "logit_bias token id 32 is out of range: token ids are 0 to 31"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias token id -1 is out of range"),
    ({"logit_bias": {3: 101.0}}, "logit_bias for token 3 must be in [-100, 100]"),
    ({"logit_bias": {3: float("inf")}}, "logit_bias for token 3 must be in [-100, 100]"),
    ({"logit_bias": dict.fromkeys(range(301), 1.0)}, "at most 300"),
])
def test_bad_sampling_fields_say_what_to_fix(fields, message):
    with pytest.raises(InvalidRequestError) as e:
        check_limits(LIMITS, [1, 2], SamplingParams(**fields))
    assert message in str(e.value)


def test_good_sampling_fields_pass():
    check_limits(LIMITS, [1, 2], SamplingParams(
        logprobs=20, prompt_logprobs=0, logit_bias={0: -100, 31: 100.0}, presence_penalty=-2,
        frequency_penalty=2, repetition_penalty=1.3, min_tokens=16))
