"""The offline API as vLLM users write it: the same user code (``USER_CODE``) run with
``from vllm import LLM, SamplingParams, ...`` in the vLLM virtualenv and with ``from
nolaserve import ...`` here, on one tiny checkpoint and PEFT LoRA, gives the same greedy
tokens, text, ``finish_reason`` (EOS is ``stop``), ``stop_reason``, ``prompt`` and
``cumulative_logprob``: a string ``stop``, vLLM's prompt dicts, ``LoRARequest``,
``StructuredOutputsParams``, ``get_tokenizer``, vLLM's ``LLM`` arguments, the default
``SamplingParams`` of ``chat``, and which ``SamplingParams`` are refused as they are
built."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
from conftest import tiny_llama
from openai_helpers import with_chat_template
from peft import LoraConfig, get_peft_model
from vllm_helpers import VLLM_ENV, VLLM_LLAMA, vllm_python

pytestmark = pytest.mark.slow

USER_CODE = textwrap.dedent('''
    def run(LLM, SamplingParams, LoRARequest, StructuredOutputsParams, model, peft, **kw):
        llm = LLM(model=model, seed=0, enable_lora=True, max_lora_rank=8,
                  trust_remote_code=True, tokenizer=model, **kw)
        ids = llm.get_tokenizer().encode("café naïve")
        greedy = dict(temperature=0, max_tokens=8)
        free = llm.generate("héllo wörld", SamplingParams(**greedy))[0].outputs[0].text
        outs = {}

        def record(name, out):
            c = out.outputs[0]
            lp = None if c.cumulative_logprob is None else round(c.cumulative_logprob, 3)
            outs[name] = [c.text, list(c.token_ids), c.finish_reason, c.stop_reason, lp,
                          out.prompt]

        record("stop as a string", llm.generate(
            "héllo wörld", SamplingParams(stop=free[3:5], **greedy))[0])
        record("eos", llm.generate("héllo wörld", SamplingParams(
            temperature=0, max_tokens=8, min_tokens=2, logit_bias={0: 100.0}))[0])
        scored = llm.generate("café", SamplingParams(logprobs=2, prompt_logprobs=1,
                                                     **greedy))[0]
        record("logprobs", scored)
        outs["positions"] = [
            None if p is None else {str(t): [lp.logprob, lp.rank, lp.decoded_token]
                                    for t, lp in p.items()}
            for p in [*scored.prompt_logprobs, *scored.outputs[0].logprobs]]
        for i, out in enumerate(llm.generate([{"prompt": "café naïve"},
                                              {"prompt_token_ids": ids}],
                                             SamplingParams(**greedy))):
            record(f"prompt dict {i}", out)
        record("lora", llm.generate("héllo wörld", SamplingParams(**greedy),
                                    lora_request=LoRARequest("l", 1, peft))[0])
        record("choice", llm.generate("héllo", SamplingParams(
            structured_outputs=StructuredOutputsParams(choice=["oui", "non merci"]),
            temperature=0, max_tokens=32))[0])
        chat = llm.chat([{"role": "user", "content": "héllo"}])[0].outputs[0]
        outs["chat default"] = [chat.finish_reason == "length", len(chat.token_ids)]
        outs["refused at construction"] = []  # of each of these fields
        for fields in ({"temperature": -1.0}, {"temperature": float("nan")}, {"top_p": 0.0},
                       {"max_tokens": 0}, {"min_p": 2.0}, {"presence_penalty": 3.0},
                       {"repetition_penalty": 0.0}, {"top_k": -2}, {"top_k": -1},
                       {"min_tokens": 9, "max_tokens": 8}, {"stop": [""]}):
            try:
                SamplingParams(**fields)
                refused = False
            except Exception:  # vLLM 0.32's VLLMValidationError is no ValueError
                refused = True
            outs["refused at construction"].append(refused)
        return outs
''')

VLLM_SCRIPT = USER_CODE + textwrap.dedent('''
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import StructuredOutputsParams
    outs = run(LLM, SamplingParams, LoRARequest, StructuredOutputsParams, sys.argv[1],
               sys.argv[2], dtype="float32", enforce_eager=True, max_model_len=256)
    print("RESULT " + json.dumps(outs))
''')


def test_vllm_user_code_gives_vllms_outputs(tmp_path, bytebpe):
    python = vllm_python()
    model = tiny_llama(3, eos_token_id=0, **VLLM_LLAMA)  # EOS: the tokenizer's <eos>
    model.save_pretrained(tmp_path / "model")
    with_chat_template(bytebpe).save_pretrained(tmp_path / "model")
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                     target_modules=["q_proj", "v_proj"])
                   ).save_pretrained(tmp_path / "peft")
    paths = [str(tmp_path / "model"), str(tmp_path / "peft")]
    run = subprocess.run([python, "-c", VLLM_SCRIPT, *paths], env={**os.environ, **VLLM_ENV},
                         capture_output=True, text=True, timeout=900)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, run.stderr[-3000:]
    theirs = json.loads(line.removeprefix("RESULT "))

    import nolaserve

    scope: dict = {}
    exec(USER_CODE, scope)  # noqa: S102 - the same user code, with nolaserve's names
    ours = scope["run"](nolaserve.LLM, nolaserve.SamplingParams, nolaserve.LoRARequest,
                        nolaserve.StructuredOutputsParams, *paths, device="cpu",
                        dtype="float32", cache_dir=str(tmp_path / "cache"), num_slots=2,
                        max_rank=8, kv_cache_bytes=4 << 20)
    ours = json.loads(json.dumps(ours))  # tuples as lists, as vLLM's came
    # vLLM's {token id: Logprob(logprob, rank, decoded_token)}, prompt's and output's
    positions, theirs_positions = ours.pop("positions"), theirs.pop("positions")
    assert [p and sorted(p) for p in positions] == [p and sorted(p) for p in theirs_positions]
    for mine, want in zip(positions, theirs_positions):
        for t, (logprob, rank, text) in (mine or {}).items():
            assert logprob == pytest.approx(want[t][0], abs=1e-4)
            assert rank == want[t][1]
            # a byte token that is part of a character: its own decode (U+FFFD), where
            # vLLM guesses from the tokens before it
            assert text == want[t][2] or text.endswith("\ufffd"), (text, want[t])
    for name, out in ours.items():  # a random model writes bytes that are not UTF-8:
        if isinstance(out[0], str) and "\ufffd" in out[0]:  # vLLM holds back its text
            out[0] = theirs[name][0] = None  # after them; ours is transformers' decode
    assert ours == theirs
    assert ours["choice"][0] in ("oui", "non merci")  # texts compared where both are text
    assert theirs["stop as a string"][2:4] == ["stop", theirs["stop as a string"][3]]
    assert theirs["eos"][2:4] == ["stop", None]
    assert theirs["chat default"] in ([True, 16], [False, theirs["chat default"][1]])
