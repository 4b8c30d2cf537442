"""The offline API (``nolaserve.LLM``) against a server built from the same checkpoint:
the same requests give the same outputs, for the base model, a NOLA and a PEFT LoRA
adapter, greedy and seeded sampling, plain prompts, token ids and chat; outputs keep the
input order."""

import asyncio

import pytest
from conftest import tiny_llama
from openai_helpers import GREEDY, openai_client, with_chat_template
from peft import LoraConfig, get_peft_model
from server_helpers import free_port

from nolaserve import LLM, SamplingParams
from nolaserve.adapters.nola import random_nola
from nolaserve.clients.client import AsyncClient
from nolaserve.server.app import start
from nolaserve.server.config import Config

PROMPTS = ["héllo wörld", "café naïve", "こんにちは", "🎉 中文字"]
CHAT = [{"role": "user", "content": "héllo"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, bytebpe):
    """A tiny Llama with a chat template, a NOLA file and a PEFT LoRA directory."""
    tmp = tmp_path_factory.mktemp("offline")
    model = tiny_llama(vocab_size=300, max_position_embeddings=1024)
    model.save_pretrained(tmp / "model")
    with_chat_template(bytebpe).save_pretrained(tmp / "model")
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(tmp / "peft")
    return tmp


def settings(tmp) -> dict:
    return dict(device="cpu", dtype="float32", cache_dir=str(tmp / "cache"), num_slots=2,
                max_rank=8, kv_cache_bytes=4 << 20)


def test_offline_outputs_equal_the_servers(checkpoint, capfd):
    llm = LLM(str(checkpoint / "model"), **settings(checkpoint))
    nola = random_nola(llm.engine.store.spec, seed=3, rank=4, num_basis=16).to_bytes()
    llm.register_adapter("n", nola)
    llm.register_adapter("l", checkpoint / "peft")
    lora = llm.engine.store.registry.data("l")
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=6, temperature=0.9, top_k=20, seed=5, ignore_eos=True)
    cases = [(p, a, s) for p in PROMPTS for a in (None, "n", "l") for s in (greedy, seeded)]
    outs = llm.generate([p for p, _, _ in cases], [s for _, _, s in cases],
                        adapter_ids=[a for _, a, _ in cases])
    by_ids = llm.generate(outs[0].prompt_token_ids, greedy)
    chat = llm.chat(CHAT, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
                    adapter_ids="n")
    llm.close()
    assert "generating" in capfd.readouterr().err  # 24 prompts: a progress bar

    served, chat_served = asyncio.run(_served(checkpoint, cases, {"n": nola, "l": lora}))
    assert [o.token_ids for o in outs] == [s.token_ids for s in served]
    assert [o.text for o in outs] == [s.text for s in served]
    assert [o.outputs[0].finish_reason for o in outs] == ["length"] * len(cases)
    assert by_ids[0].token_ids == outs[0].token_ids
    assert chat[0].token_ids == chat_served
    assert len({tuple(o.token_ids) for o in outs}) > len(PROMPTS) * 2  # adapters matter


async def _served(tmp, cases, adapters: dict[str, bytes]):
    config = Config(model=str(tmp / "model"), registry_path=":memory:", port=0,
                    metrics_port=0, http_port=free_port(), **settings(tmp))
    running = await start(config)
    try:
        async with AsyncClient(running.address) as client:
            for adapter_id, data in adapters.items():
                await client.register_adapter(adapter_id, data)
            outs = [await client.generate(p, adapter_id=a or "", max_tokens=s.max_tokens,
                                          temperature=s.temperature, top_k=s.top_k,
                                          seed=s.seed, ignore_eos=True)
                    for p, a, s in cases]
        chat = await openai_client(running.http_url).chat.completions.create(
            model="n", messages=CHAT, max_tokens=5, temperature=0, extra_body=GREEDY)
        return outs, chat.choices[0].token_ids
    finally:
        await running.stop(0)


def test_n_completions_per_prompt_as_vllms_llm_gives_them(checkpoint):
    """``SamplingParams(n=3)``: each prompt's ``outputs`` holds 3 completions, indexed,
    choice ``j`` the one the same request seeded ``seed + j`` gives alone (vLLM's
    seeding, and HTTP's ``n``); a bad ``n`` is refused as it is built, and one set later
    before anything runs."""
    from nolaserve.adapters.errors import InvalidRequestError

    llm = LLM(str(checkpoint / "model"), **settings(checkpoint))
    three = SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=7, ignore_eos=True)
    outs = llm.generate(PROMPTS[:2], three)
    alone = [[llm.generate(p, SamplingParams(max_tokens=6, temperature=1.0, seed=7 + j,
                                             ignore_eos=True))[0].token_ids
              for j in range(3)] for p in PROMPTS[:2]]
    for bad in (0, 65, "2"):
        with pytest.raises(InvalidRequestError, match="n must be (between 1 and 64|a whole)"):
            SamplingParams(n=bad)  # where it is written, as the README says (it was not)
        params = SamplingParams()
        params.n = bad
        with pytest.raises(InvalidRequestError, match="n must be between 1 and 64"):
            llm.generate(PROMPTS[0], params)
    assert not llm.engine.has_unfinished()
    llm.close()
    assert [[c.index for c in o.outputs] for o in outs] == [[0, 1, 2]] * 2
    assert [[c.token_ids for c in o.outputs] for o in outs] == alone
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) > 1  # the seeds differ
    assert all(c.finish_reason == "length" and c.text for o in outs for c in o.outputs)


def test_num_cached_tokens_counts_the_prefix_cache_hits(checkpoint):
    """vLLM's ``RequestOutput.num_cached_tokens``: 0 the first time, whole blocks of the
    prompt when it comes again."""
    llm = LLM(str(checkpoint / "model"), **settings(checkpoint))
    prompt = "héllo wörld " * 12
    params = SamplingParams(max_tokens=1, temperature=0)
    first, again = (llm.generate(prompt, params)[0] for _ in range(2))
    block = llm.engine.scheduler.block_manager.block_size
    llm.close()
    assert first.num_cached_tokens == 0
    assert 0 < again.num_cached_tokens < len(again.prompt_token_ids)
    assert again.num_cached_tokens % block == 0


def test_calls_from_threads_take_turns_and_a_closed_llm_says_so(checkpoint):
    """Four threads generating at once each get what a lone call gets (an outside probe's
    four threads each lost their results to KeyError and the engine's step failed); after
    ``close`` every call is ``EngineStoppedError``."""
    from concurrent.futures import ThreadPoolExecutor

    from nolaserve.adapters.errors import EngineStoppedError

    llm = LLM(str(checkpoint / "model"), **settings(checkpoint))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    alone = [llm.generate(p, params)[0].token_ids for p in PROMPTS]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: llm.generate([p] * 3, params), PROMPTS))
    assert [[o.token_ids for o in outs] for outs in together] == [[a] * 3 for a in alone]
    llm.close()
    llm.close()
    for call in (lambda: llm.generate("hi", params), lambda: llm.chat(CHAT),
                 lambda: llm.register_adapter("x", b"x"), lambda: llm.delete_adapter("x")):
        with pytest.raises(EngineStoppedError, match="this LLM is closed"):
            call()


def test_close_waits_for_a_registration_in_flight(checkpoint):
    """``close`` from another thread waits for a registration that has begun, which then
    succeeds (before, the store could close under it: an untyped error mid-write)."""
    import threading

    llm = LLM(str(checkpoint / "model"), **settings(checkpoint))
    inside, go = threading.Event(), threading.Event()
    register = llm.engine.store.register

    def slow_register(*args):
        inside.set()
        go.wait(10)
        return register(*args)

    llm.engine.store.register = slow_register
    blob = random_nola(llm.engine.store.spec, seed=3, rank=4, num_basis=16).to_bytes()
    records = []
    registering = threading.Thread(target=lambda: records.append(llm.register_adapter("x", blob)))
    registering.start()
    assert inside.wait(10)
    closing = threading.Thread(target=llm.close)
    closing.start()
    closing.join(0.3)
    assert closing.is_alive()  # it waits for the registration
    go.set()
    registering.join(10)
    closing.join(10)
    assert not closing.is_alive() and records[0].id == "x"


@pytest.mark.parametrize(("call", "message"), [
    (lambda llm: llm.generate(123), "a prompt is a string, a list of token ids"),
    (lambda llm: llm.generate(b"hello"), "a prompt is a string"),
    (lambda llm: llm.generate([[1, 2.9]]), "a prompt is a string"),
    (lambda llm: llm.generate([[True, False]]), "a prompt is a string"),
    (lambda llm: llm.generate("a", {"max_tokens": 2}), "sampling_params must be SamplingParams"),
    (lambda llm: llm.generate("a", adapter_ids=5), "an adapter id is a string or None"),
    (lambda llm: llm.chat("hello"), "messages is a conversation"),
    (lambda llm: llm.chat([{"role": "user"}]), "a conversation is a list of"),
    (lambda llm: llm.generate(["a", "é" * 2000]), "prompt 1: the prompt has more than 2048 "
                                                  "bytes"),
    (lambda llm: llm.generate(["a", "b"], adapter_ids=[None, "nope"]), "prompt 1: .*nope"),
    # an outside probe's: no index, or TypeError, or bytes read as a path
    (lambda llm: llm.generate(["hi", 5]), "prompt 1: a prompt is a string"),
    (lambda llm: llm.chat([[{"role": "user", "content": "a"}], [{"role": "user",
                                                                  "content": 5}]]),
     "prompt 1: a conversation is a list of"),
    (lambda llm: llm.chat([{"role": "user", "content": "a"}], chat_template_kwargs=[1]),
     "chat_template_kwargs must be a dict, got \\[1\\]"),
    (lambda llm: llm.register_adapter("x", None), "an adapter source is its file's bytes"),
    (lambda llm: llm.register_adapter("x", bytearray(b"\0junk")), "safetensors"),
])
def test_bad_arguments_are_typed_errors_naming_the_prompt(checkpoint, call, message):
    """Each wrong argument is ``InvalidRequestError`` (or the adapter's typed error) saying
    what to fix, and which prompt of a batch; the byte bound holds before tokenizing, as on
    the servers (a 30 MB prompt took 23 s and 4.6 GB)."""
    from nolaserve.adapters.errors import ServingError

    llm = LLM(str(checkpoint / "model"), max_prompt_tokens=64, **settings(checkpoint))
    with pytest.raises(ServingError, match=message):
        call(llm)
    assert llm.generate([1, 2], SamplingParams(max_tokens=1))[0].prompt_token_ids == [1, 2]
    llm.close()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("seed", 1.5, "seed must be a whole number"), ("max_tokens", True, "max_tokens must be a "
                                                                       "whole number"),
    ("temperature", "hot", "temperature must be a number"), ("stop", 5, "stop must be a string"),
    ("truncate_prompt_tokens", 0, "truncate_prompt_tokens must be >= 1"),
    ("top_k", None, "top_k must be a whole number"),
    ("structured_outputs", {"choice": []}, r"structured_outputs.choice is \[\]: send a list "
                                           "of non-empty strings"),
    ("structured_outputs", {"regex": 5}, "structured_outputs.regex is 5: send a string"),
    ("structured_outputs", {}, r"structured_outputs sets nothing: set exactly one of"),
])
def test_sampling_params_refuse_wrong_types_where_written(field, value, message):
    from nolaserve.adapters.errors import InvalidRequestError
    from nolaserve.server.engine.sequence import StructuredOutputsParams

    if field == "structured_outputs":
        value = StructuredOutputsParams(**value)
    with pytest.raises(InvalidRequestError, match=message) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field


def test_a_lora_request_naming_a_taken_id_says_how_to_replace_it(checkpoint):
    from nolaserve.adapters.errors import AdapterExistsError
    from nolaserve.server.offline import LoRARequest

    llm = LLM(str(checkpoint / "model"), **settings(checkpoint))
    llm.register_adapter("a", random_nola(llm.engine.store.spec, seed=1, rank=4,
                                          num_basis=16).to_bytes())
    with pytest.raises(AdapterExistsError, match=r"llm.register_adapter\('a', path, "
                                                 r"replace=True\)"):
        llm.generate("hi", lora_request=LoRARequest("a", 1, str(checkpoint / "peft")))
    llm.close()
