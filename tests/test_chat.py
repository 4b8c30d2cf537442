"""vLLM's chat options (``add_generation_prompt``, ``continue_final_message``,
``chat_template_kwargs``): rendered as transformers' ``apply_chat_template`` renders them
(SmolLM2's own template), refused with a message naming the field where the template
cannot take them, and the same over HTTP, gRPC and the offline ``LLM``."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest
from conftest import tiny_llama
from engine_helpers import make_engine
from grpc import StatusCode as Code
from openai_helpers import http, http_serving, openai_client, with_chat_template
from server_helpers import expect_code, serving

from nolaserve.adapters.errors import InvalidRequestError
from nolaserve.server.chat import ChatMessage, ChatOptions, render_chat
from nolaserve.server.convert import chat_options
from nolaserve.server.engine.sequence import SamplingParams
from nolaserve.server.generation import GenerateRequest, prompt_token_ids
from nolaserve.server.offline import LLM
from nolaserve.v1 import inference_pb2

CONVERSATION = [{"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "The color is"}]
THINKING = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}"
            "{% if enable_thinking is defined and not enable_thinking %}<no_think>{% endif %}"
            "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}"
            "{% endif %}")


@pytest.fixture(scope="module")
def thinking(bytebpe):
    tok = copy.deepcopy(bytebpe)
    tok.chat_template = THINKING
    return tok


@pytest.mark.parametrize(("options", "theirs"), [
    (ChatOptions(), dict(add_generation_prompt=True)),
    (ChatOptions(add_generation_prompt=False), dict(add_generation_prompt=False)),
    (ChatOptions(False, True), dict(add_generation_prompt=False, continue_final_message=True)),
])
def test_smollm2s_template_renders_as_transformers_does(smollm2, options, theirs):
    want = smollm2.apply_chat_template(CONVERSATION, tokenize=False, **theirs)
    assert render_chat(smollm2, CONVERSATION, None, options) == want
    if options.continue_final_message:
        assert want.endswith("The color is")  # left open for the model


def test_template_kwargs_reach_the_template(thinking):
    off = render_chat(thinking, CONVERSATION[:1], None, ChatOptions(
        template_kwargs={"enable_thinking": False}))
    assert off.endswith("<assistant><no_think>")
    assert render_chat(thinking, CONVERSATION[:1], None, ChatOptions()).endswith("<assistant>")


@pytest.mark.parametrize(("options", "messages", "field", "message"), [
    (ChatOptions(True, True), CONVERSATION, "continue_final_message",
     "set add_generation_prompt to false"),
    (ChatOptions(False, True), CONVERSATION[:1], "continue_final_message",
     "needs an assistant message last"),
    (ChatOptions(template_kwargs={"chat_template": "{{ 7 * 7 }}"}), CONVERSATION,
     "chat_template_kwargs", "cannot set 'chat_template'"),
    (ChatOptions(template_kwargs={"messages": []}), CONVERSATION, "chat_template_kwargs",
     "cannot set 'messages'"),
    (ChatOptions(template_kwargs={"tokenize": True}), CONVERSATION, "chat_template_kwargs",
     "cannot set 'tokenize'"),
    (ChatOptions(template_kwargs={"a-b": 1}), CONVERSATION, "chat_template_kwargs",
     "cannot set 'a-b'"),
    (ChatOptions(template_kwargs={f"k{i}": i for i in range(33)}), CONVERSATION,
     "chat_template_kwargs", "at most 32"),
    (ChatOptions(), [{"role": "system", "content": "x"}], "messages",
     "the chat template cannot render these messages: 'no system'"),
])
def test_options_the_template_cannot_take_are_refused(thinking, options, messages, field,
                                                      message):
    with pytest.raises(InvalidRequestError, match=message) as e:
        render_chat(thinking, messages, None, options)
    assert e.value.param == field


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=300)


def rendered_ids(tokenizer, options: ChatOptions) -> list[int]:
    return prompt_token_ids(tokenizer, GenerateRequest(
        messages=[ChatMessage(m["role"], m["content"]) for m in CONVERSATION], chat=options))


def test_http_takes_vllms_chat_fields(model, thinking):
    engine = make_engine(model, thinking)
    fields = {"add_generation_prompt": False, "continue_final_message": True,
              "chat_template_kwargs": {"enable_thinking": False}}
    want = len(rendered_ids(thinking, ChatOptions(False, True, {"enable_thinking": False})))

    async def main():
        async with http_serving(engine) as (_, url), http(url) as h:
            got = await openai_client(url).chat.completions.create(
                model="", messages=CONVERSATION, max_tokens=2, extra_body=fields)
            bad = [await h.post("/v1/chat/completions", json={
                "messages": CONVERSATION, **b}) for b in (
                {"chat_template_kwargs": {"chat_template": "x"}},
                {"continue_final_message": True}, {"chat_template_kwargs": [1]})]
            counted = await h.post("/tokenize", json={"messages": CONVERSATION, **fields})
            return got, bad, counted.json()

    got, bad, counted = asyncio.run(main())
    assert got.usage.prompt_tokens == want == counted["count"]
    assert want != len(rendered_ids(thinking, ChatOptions()))
    assert [r.status_code for r in bad] == [400, 400, 400]
    assert [r.json()["error"]["param"] for r in bad[:2]] == [
        "chat_template_kwargs", "continue_final_message"]


def test_a_developer_message_is_the_system_prompt(model, bytebpe):
    """OpenAI's ``developer`` role (what its SDK's newer code sends instead of
    ``system``) renders as ``system``: the same tokens over HTTP and gRPC."""
    engine = make_engine(model, with_chat_template(bytebpe))
    said = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    system = [{"role": "system", "content": "be brief"}, said[1]]

    async def main():
        async with http_serving(engine) as (c, url):
            oa = openai_client(url)
            http_ids = [(await oa.chat.completions.create(
                model="", messages=m, max_tokens=4, temperature=0,
                extra_body={"return_token_ids": True, "ignore_eos": True})).choices[0]
                .token_ids for m in (said, system)]
            grpc_ids = [list((await c.inference.Generate(inference_pb2.GenerateRequest(
                messages=inference_pb2.ChatMessages(messages=[
                    inference_pb2.ChatMessage(**m) for m in ms]),
                sampling=inference_pb2.SamplingParams(max_tokens=4, temperature=0,
                                                      ignore_eos=True)))).token_ids)
                for ms in (said, system)]
            return http_ids, grpc_ids

    http_ids, grpc_ids = asyncio.run(main())
    assert http_ids[0] == http_ids[1] == grpc_ids[0] == grpc_ids[1]
    assert render_chat(engine.tokenizer, [ChatMessage(**m).template_dict() for m in said],
                       None, ChatOptions()).startswith("<system>be brief")


DOCS_TEMPLATE = ("{% for d in documents or [] %}<doc {{ d.title }}>{{ d.text }}\n{% endfor %}"
                 "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
DOCS = [{"title": "café", "text": "naïve wörld"}, {"title": "b", "text": "héllo"}]


def test_documents_reach_rag_templates_from_every_front_end(model, bytebpe, tmp_path):
    """vLLM's ``documents`` (RAG sources for templates that render them): HTTP chat and
    ``/tokenize``, gRPC and ``LLM.chat`` see the prompt transformers renders with them."""
    tok = copy.deepcopy(bytebpe)
    tok.chat_template = DOCS_TEMPLATE
    engine = make_engine(model, tok)
    messages = CONVERSATION[:1]
    want = tok(tok.apply_chat_template(messages, documents=DOCS, tokenize=False,
                                       add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]
    plain = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    async def main():
        async with http_serving(engine) as (c, url), http(url) as h:
            chat = await openai_client(url).chat.completions.create(
                model="", messages=messages, max_tokens=1, extra_body={"documents": DOCS})
            counted = await h.post("/tokenize", json={"messages": messages, "documents": DOCS})
            bad = [await h.post("/v1/chat/completions", json={"messages": messages, **b})
                   for b in ({"documents": [{"title": 5}]}, {"documents": [{}] * 65},
                             {"documents": "x"})]
            grpc = await c.inference.Generate(inference_pb2.GenerateRequest(
                messages=inference_pb2.ChatMessages(
                    messages=[inference_pb2.ChatMessage(**m) for m in messages],
                    documents=[inference_pb2.Document(fields=d) for d in DOCS]),
                sampling=inference_pb2.SamplingParams(max_tokens=1)))
            return chat, counted.json(), bad, grpc

    chat, counted, bad, grpc = asyncio.run(main())
    assert counted["tokens"] == want and len(want) > len(tok(plain)["input_ids"])
    assert chat.usage.prompt_tokens == grpc.usage.prompt_tokens == len(want)
    assert [r.status_code for r in bad] == [400] * 3
    assert bad[1].json()["error"]["param"] == "documents"
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    with LLM(str(tmp_path / "model"), device="cpu", dtype="float32", num_slots=1,
             max_rank=4, cache_dir=str(tmp_path / "cache"), kv_cache_bytes=4 << 20) as llm:
        out = llm.chat(messages, SamplingParams(max_tokens=1), documents=DOCS)[0]
    assert out.prompt_token_ids == want


def test_grpc_takes_them_in_chat_messages(model, thinking):
    engine = make_engine(model, thinking)
    want = len(rendered_ids(thinking, ChatOptions(False, True, {"enable_thinking": False})))

    def request(**fields):
        chat = inference_pb2.ChatMessages(messages=[inference_pb2.ChatMessage(**m)
                                                    for m in CONVERSATION], **fields)
        return inference_pb2.GenerateRequest(messages=chat, sampling=inference_pb2.SamplingParams(
            max_tokens=2))

    async def main():
        async with serving(engine) as c:
            got = await c.inference.Generate(request(
                add_generation_prompt=False, continue_final_message=True,
                chat_template_kwargs=json.dumps({"enable_thinking": False})))
            for bad, message in (("[1]", "must be a JSON object"),
                                 ("{", "is not JSON (Expecting property name"),
                                 ('{"a":' * 5000 + "1" + "}" * 5000, "nests too deep"),
                                 ('{"tools": 1}', "cannot set 'tools'")):
                await expect_code(Code.INVALID_ARGUMENT, c.inference.Generate(
                    request(chat_template_kwargs=bad)), message)
            return got

    assert asyncio.run(main()).usage.prompt_tokens == want


def test_offline_chat_takes_them_as_vllms_llm_chat_does(model, thinking, tmp_path):
    model.save_pretrained(tmp_path / "model")
    thinking.save_pretrained(tmp_path / "model")
    llm = LLM(str(tmp_path / "model"), device="cpu", dtype="float32", num_slots=1,
              max_rank=4, cache_dir=str(tmp_path / "cache"), kv_cache_bytes=4 << 20)
    try:
        params = SamplingParams(max_tokens=2, temperature=0.0)
        out = llm.chat(CONVERSATION, params, add_generation_prompt=False,
                       continue_final_message=True,
                       chat_template_kwargs={"enable_thinking": False})[0]
        with pytest.raises(InvalidRequestError, match="cannot set 'chat_template'"):
            llm.chat(CONVERSATION, params, chat_template_kwargs={"chat_template": "x"})
    finally:
        llm.close()
    assert out.prompt_token_ids == rendered_ids(
        thinking, ChatOptions(False, True, {"enable_thinking": False}))


@pytest.mark.parametrize(("text", "message"), [
    ("{", "chat_template_kwargs is not JSON (Expecting property name"),
    ('{"n": ' + "9" * 5000 + "}", "is not JSON (a number of more than 4300 digits): send a "
     "JSON object"),  # it told the client to call sys.set_int_max_str_digits()
    ("[1]", "chat_template_kwargs must be a JSON object"),
])
def test_grpc_chat_template_kwargs_that_do_not_parse_say_what_to_send(text, message):
    with pytest.raises(InvalidRequestError) as e:
        chat_options(inference_pb2.ChatMessages(chat_template_kwargs=text))
    assert message in str(e.value) and e.value.param == "chat_template_kwargs"
