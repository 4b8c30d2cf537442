"""The vLLM backend's sampling fields: ``vllm_args.sampling`` hands vLLM every field of
ours, and vLLM's logprobs and prompt logprobs come back through ``request_output`` as the
``TokenLogprob`` lists the native engine gives, held to transformers' ``log_softmax`` on
the same tiny model. vLLM runs in its own virtualenv (``NOLASERVE_VLLM_PYTHON``)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
import torch
from engine_helpers import greedy, make_engine, step_all, word_of
from engine_helpers import run as run_engine
from vllm_helpers import VLLM_ENV, save_model, vllm_python

from nolaserve.server.engine.token_masks import bad_word_ids

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent('''
    import json, sys
    from vllm import LLM
    from vllm.sampling_params import RequestOutputKind
    from nolaserve.server.engine import vllm_args
    from nolaserve.server.engine.sequence import SamplingParams

    model, prompt = sys.argv[1], json.loads(sys.argv[2])
    ours = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3,
                          prompt_logprobs=2, logit_bias={7: -100.0}, presence_penalty=0.5,
                          frequency_penalty=0.25, repetition_penalty=1.2, min_tokens=2,
                          min_p=0.25, stop_token_ids=[9, 11], include_stop_str_in_output=True,
                          skip_special_tokens=False, stream_interval=3)
    theirs = vllm_args.sampling(ours)
    fields = {f: getattr(theirs, f) for f in ("logprobs", "prompt_logprobs", "logit_bias",
              "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens",
              "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens",
              "stream_interval")}
    # vLLM clears min_p for greedy requests: read it from a sampled one
    fields["min_p"] = vllm_args.sampling(SamplingParams(temperature=1.0, min_p=0.25)).min_p
    plain = vllm_args.sampling(SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                              logprobs=3, prompt_logprobs=2))
    plain.output_kind = RequestOutputKind.FINAL_ONLY
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=128, seed=0)
    out = llm.generate({"prompt_token_ids": prompt}, plain)[0]
    got = vllm_args.request_output("r", out, len(prompt), 6, ours)
    lp = lambda x: None if x is None else [x.token_id, x.logprob, [list(t) for t in x.top]]
    masked = {}
    for name, value in json.loads(sys.argv[3]).items():
        mine = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, **{name: value})
        theirs = vllm_args.sampling(mine)
        fields[name] = getattr(theirs, name)
        theirs.output_kind = RequestOutputKind.FINAL_ONLY
        masked[name] = list(llm.generate({"prompt_token_ids": prompt}, theirs)[0]
                            .outputs[0].token_ids)
    theirs.update_from_tokenizer(llm.get_tokenizer())
    named = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=0,
                           logprob_token_ids=[40, 5, 299])
    asked = vllm_args.sampling(named)
    asked.output_kind = RequestOutputKind.FINAL_ONLY
    scored = vllm_args.request_output("r", llm.generate({"prompt_token_ids": prompt}, asked)[0],
                                      len(prompt), 4, named)
    print("RESULT " + json.dumps({"fields": fields, "tokens": got.token_ids,
                                  "logprobs": [lp(x) for x in got.logprobs],
                                  "prompt_logprobs": [lp(x) for x in got.prompt_logprobs],
                                  "masked": masked, "bad_ids": theirs._bad_words_token_ids,
                                  "named": [lp(x) for x in scored.logprobs]}))
''')


def test_vllm_gets_every_field_and_gives_logprobs_back(tmp_path, bytebpe):
    """... and vLLM's greedy tokens under ``allowed_token_ids`` and ``bad_words`` (the
    last word tokenized by vLLM's ``update_from_tokenizer``) are the native engine's."""
    python = vllm_python()
    model = save_model(tmp_path / "model", bytebpe)
    prompt = [5, 17, 99, 3, 250, 42, 8]
    free = run_engine(make_engine(model, bytebpe), {"r": (prompt, greedy(8), None)})["r"]
    masks = {"allowed_token_ids": [4, 40, 77, 123],
             "bad_words": [word_of(bytebpe, free, 1), "héllo", " wörld"]}
    run = subprocess.run([python, "-c", SCRIPT, str(tmp_path / "model"), json.dumps(prompt),
                          json.dumps(masks)],
                         env={**os.environ, **VLLM_ENV}, capture_output=True, text=True,
                         timeout=900)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, run.stderr[-3000:]
    got = json.loads(line.removeprefix("RESULT "))
    assert got["fields"] == {"logprobs": 3, "prompt_logprobs": 2, "logit_bias": {"7": -100.0},
                             "presence_penalty": 0.5, "frequency_penalty": 0.25,
                             "repetition_penalty": 1.2, "min_tokens": 2, "min_p": 0.25,
                             "stop_token_ids": [9, 11], "include_stop_str_in_output": True,
                             "skip_special_tokens": False, "stream_interval": 3, **masks}
    assert [list(w) for w in bad_word_ids(bytebpe, masks["bad_words"])] == got["bad_ids"]
    engine = make_engine(model, bytebpe)
    for name, value in masks.items():
        ours = run_engine(engine, {"r": (prompt, greedy(8, **{name: value}), None)})["r"]
        assert ours == got["masked"][name] != free, name
    engine.add_request("named", prompt, greedy(4, logprobs=0, logprob_token_ids=[40, 5, 299]))
    named = [lp for o in step_all(engine)["named"] for lp in o.logprobs]
    assert [[t for t, _ in x[2]] for x in got["named"]] == [[40, 5, 299]] * 4
    assert [v for x in got["named"] for _, v in x[2]] == pytest.approx(
        [v for lp in named for _, v in lp.top], abs=1e-3)  # vLLM's values are ours
    ids = prompt + got["tokens"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)
    assert got["prompt_logprobs"][0] is None and len(got["prompt_logprobs"]) == len(prompt)
    rows = [(p - 1, e, 2) for p, e in enumerate(got["prompt_logprobs"]) if e is not None]
    rows += [(len(prompt) - 1 + j, e, 3) for j, e in enumerate(got["logprobs"])]
    for pos, (token, logprob, top), k in rows:
        assert token == ids[pos + 1]
        assert logprob == pytest.approx(ref[pos, token].item(), abs=1e-3)
        values, top_ids = ref[pos].topk(k)
        assert [t for t, _ in top] == top_ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-3)
