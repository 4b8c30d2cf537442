"""Training NOLA adapters (``adapters/train.py``) and serving them: gradients through the
regenerated basis, the transformers Trainer, export to format v1, the ``train-nola`` CLI,
and two adapters trained on two tasks that the gRPC server then serves with the logits and
greedy tokens of the training-time model."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import random

import pytest
import torch
from conftest import merged, tiny_llama
from engine_helpers import hf_greedy, make_engine
from server_helpers import request, serving

from nolaserve.adapters import philox, train_loop
from nolaserve.adapters.nola import NolaAdapter
from nolaserve.adapters.train import (
    NolaTrainLinear,
    basis_matvec,
    export,
    make_trainable,
    trainable_modules,
)
from nolaserve.adapters.train_loop import IGNORE, Example, collate, encode, fit
from nolaserve.clients import cli
from nolaserve.server.engine.model_runner import StepBatch

TARGETS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
KEYWORD = " café naïve"  # task A: every prompt is answered with this
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add wake-up latency (100x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base():
    """A tiny random Llama whose lm_head can be confident (init std 0.1, not 0.02)."""
    return tiny_llama(vocab_size=300, initializer_range=0.1)


def letters(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 5)))


def explicit_delta(m: NolaTrainLinear, x: torch.Tensor) -> torch.Tensor:
    """The reference: the whole basis drawn, ``scale * x A^T B^T`` by plain autograd."""
    k, l_ = m.alpha.shape[0], m.beta.shape[0]
    basis_a = philox.basis_values(m.seed, m.stream, 0, k * m.rank * m.in_features)
    basis_b = philox.basis_values(m.seed, m.stream + 1, 0, l_ * m.out_features * m.rank)
    a = (m.alpha @ basis_a.view(k, -1) / math.sqrt(k)).view(m.rank, m.in_features)
    b = (m.beta @ basis_b.view(l_, -1) / math.sqrt(l_)).view(m.out_features, m.rank)
    return m.scale * (x @ a.T) @ b.T


def test_gradients_flow_through_the_regenerated_basis():
    lin = torch.nn.Linear(12, 10)
    m = NolaTrainLinear(lin, seed=5, layer=1, target=1, num_targets=2, name="q", rank=3,
                        num_basis_a=7, num_basis_b=5, lora_alpha=6.0,
                        generator=torch.Generator().manual_seed(5))
    x = torch.randn(4, 12)
    assert torch.equal(m(x), lin(x))  # beta starts at zero: delta W = 0
    assert m.stream == 6 and m.alpha.abs().min() > 0
    with torch.no_grad():
        m.beta.normal_()
    grad_out = torch.randn(4, 10)
    (m(x) * grad_out).sum().backward()
    got = m.alpha.grad.clone(), m.beta.grad.clone()
    m.alpha.grad = m.beta.grad = None
    (explicit_delta(m, x) * grad_out).sum().backward()
    torch.testing.assert_close(got[0], m.alpha.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], m.beta.grad, rtol=1e-5, atol=1e-6)
    assert lin.weight.grad is None and not lin.weight.requires_grad


def test_backward_saves_no_basis():
    """Autograd keeps the coefficients, the input and LoRA-sized factors; never a basis."""
    lin = torch.nn.Linear(48, 40)
    m = NolaTrainLinear(lin, seed=1, layer=0, target=0, num_targets=1, name="q", rank=4,
                        num_basis_a=64, num_basis_b=64, lora_alpha=8.0,
                        generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 48)
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    y.sum().backward()
    assert sizes and max(sizes) <= max(x.numel(), 4 * 48, 40 * 4) < 64 * 4 * 40


@pytest.mark.parametrize("chunk", [8, 40, 1 << 19])  # row chunks, one row, whole basis
def test_basis_matvec_is_the_transpose_of_contract(monkeypatch, chunk):
    monkeypatch.setattr(philox, "CHUNK", chunk)
    vec = torch.randn(20)
    want = philox.basis_values(9, 3, 0, 6 * 20).view(6, 20) @ vec
    torch.testing.assert_close(basis_matvec(9, 3, vec, 6, 20), want, rtol=1e-5, atol=1e-5)


def test_make_trainable_and_export(base):
    model = copy.deepcopy(base)
    mods = make_trainable(model, seed=11, targets=["self_attn.v_proj", "mlp.up_proj"], rank=4,
                          num_basis=16, num_basis_b=8, lora_alpha=8.0)
    assert [(m.layer, m.name) for m in mods] == [
        (0, "self_attn.v_proj"), (0, "mlp.up_proj"), (1, "self_attn.v_proj"), (1, "mlp.up_proj")]
    assert trainable_modules(model) == mods
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 8 and all(n.endswith((".alpha", ".beta")) for n in trainable)
    with torch.no_grad():
        for m in mods:
            m.beta.normal_()
    adapter = NolaAdapter.from_bytes(export(model, description="d").to_bytes())
    assert (adapter.seed, adapter.rank, adapter.lora_alpha, adapter.num_layers) == (11, 4, 8.0, 2)
    assert adapter.target_modules == ["self_attn.v_proj", "mlp.up_proj"]
    assert adapter.module_shapes == {"self_attn.v_proj": (64, 32), "mlp.up_proj": (64, 96)}
    assert adapter.alpha.shape == (2, 2, 16) and adapter.beta.shape == (2, 2, 8)
    assert torch.equal(adapter.alpha[1, 0], mods[2].alpha.detach())
    assert torch.equal(adapter.beta[0, 1], mods[1].beta.detach())
    factors = adapter.materialize().modules[(1, "mlp.up_proj")]
    a, b = mods[3].factors()
    assert torch.equal(factors.A, a.detach()) and torch.equal(factors.B, b.detach())
    again = copy.deepcopy(base)  # same seed, same start
    make_trainable(again, seed=11, targets=["self_attn.v_proj", "mlp.up_proj"], rank=4,
                   num_basis=16, num_basis_b=8)
    assert torch.equal(export(again).alpha, adapter.alpha)
    with pytest.raises(ValueError, match="already"):
        make_trainable(model, seed=1)
    with pytest.raises(Exception, match="not an nn.Linear"):
        make_trainable(copy.deepcopy(base), seed=1, targets=["mlp.nope"])
    with pytest.raises(ValueError, match="make_trainable"):
        export(base)


def test_transformers_trainer_trains_the_coefficients(base, bytebpe, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = copy.deepcopy(base)
    make_trainable(model, seed=3, targets=TARGETS, rank=4, num_basis=32)
    start = export(model)
    rng = random.Random(0)
    data = [vars(encode(bytebpe, letters(rng), KEYWORD)) for _ in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, learning_rate=5e-2,
                             per_device_train_batch_size=8, save_strategy="no", report_to=[],
                             use_cpu=True, remove_unused_columns=False, logging_steps=1,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=lambda rows: collate([Example(**r) for r in rows]))
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    trained = export(model)
    assert not torch.equal(trained.beta, start.beta) and trained.beta.abs().sum() > 0
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    ref = dict(base.named_parameters())
    for name, p in frozen.items():  # base weights untouched
        assert torch.equal(p, ref[name.replace(".base.", ".")]), name


@pytest.fixture(scope="module")
def trained(base, bytebpe):
    """Task A (answer every prompt with KEYWORD) and task B (digit -> its English word),
    each a NOLA adapter trained on its own copy of ``base``."""
    rng = random.Random(0)
    tasks = {"A": [encode(bytebpe, letters(rng), KEYWORD) for _ in range(64)],
             "B": [encode(bytebpe, str(d), WORDS[d]) for d in range(10)]}
    models = {}
    for seed, (name, examples) in enumerate(tasks.items(), 1):
        model = copy.deepcopy(base)
        make_trainable(model, seed=100 + seed, targets=TARGETS, rank=8, num_basis=64)
        losses = fit(model, examples, steps=250, lr=5e-2, batch_size=10, seed=seed)
        assert losses[-1] < 0.5 * losses[0], (name, losses[0], losses[-1])
        models[name] = model.eval()
    return models


def held_prompts() -> dict[str, list[tuple[str, str]]]:
    """(prompt, expected completion) per task, A's prompts unseen in training."""
    rng = random.Random(1234)
    return {"A": [(letters(rng) + "c", KEYWORD) for _ in range(4)],
            "B": [(str(d), WORDS[d]) for d in (0, 3, 7, 9)]}


def test_two_trained_adapters_are_served_and_each_does_its_task(base, bytebpe, trained):
    adapters = {name: export(m).to_bytes() for name, m in trained.items()}
    eos = bytebpe.eos_token_id
    cases = [(task, prompt, want, adapter) for task, items in held_prompts().items()
             for prompt, want in items for adapter in ("", "A", "B")]

    async def main():
        async with serving(make_engine(base, bytebpe, max_rank=8)) as c:
            from nolaserve.v1 import admin_pb2

            for name, data in adapters.items():
                await c.admin.RegisterAdapter(admin_pb2.RegisterAdapterRequest(
                    adapter_id=f"task-{name}", data=data))
            out = []
            for task, prompt, want, adapter in cases:
                n = len(bytebpe(want)["input_ids"]) + 1
                req = request(prompt, max_tokens=n, adapter=adapter and f"task-{adapter}")
                out.append(list((await c.inference.Generate(req)).token_ids))
            return out

    served = asyncio.run(main())
    for (task, prompt, want, adapter), tokens in zip(cases, served):
        want_ids = bytebpe(want)["input_ids"] + [eos]
        does_task = tokens == want_ids
        assert does_task == (adapter == task), (task, prompt, adapter, bytebpe.decode(tokens))
        if adapter:  # the served greedy tokens are the training-time model's
            prompt_ids = bytebpe(prompt)["input_ids"]
            assert tokens == hf_greedy(trained[adapter], prompt_ids, len(tokens))[0]


def test_served_logits_equal_the_training_time_logits(base, bytebpe, trained):
    engine = make_engine(base, bytebpe, max_rank=8)
    for name, model in trained.items():
        adapter = export(model)
        engine.store.register(name, adapter.to_bytes())
        slot = engine.store.acquire(name)
        reference = merged(base, adapter.materialize())
        for prompt, _ in held_prompts()[name]:
            ids = bytebpe(prompt)["input_ids"]
            with torch.no_grad():
                want = model(torch.tensor([ids])).logits[0]  # [S, vocab]
                merged_logits = reference(torch.tensor([ids])).logits[0]
            table = list(range(-(-len(ids) // engine.runner.block_size)))
            got = engine.runner.execute(StepBatch.from_seqs([(ids, 0, table, slot, True)]))
            assert (got[0] - want[-1]).abs().max() <= 1e-4
            assert (merged_logits - want).abs().max() <= 1e-4
        engine.store.release(slot)


def test_train_nola_cli_writes_reports_and_registers(base, bytebpe, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tok = copy.deepcopy(bytebpe)
    tok.chat_template = CHAT_TEMPLATE
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": "abc", "completion": KEYWORD},
            {"messages": [{"role": "user", "content": "7"},
                          {"role": "assistant", "content": "seven"}]}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "a.safetensors"
    argv = ["train-nola", str(data), "--model", str(model_dir), "--device", "cpu", "--out",
            str(out), "--steps", "3", "--rank", "4", "--num-basis", "16", "--targets",
            "self_attn.q_proj", "mlp.down_proj", "--seed", "9", "-q", "--register", "mine"]

    async def main():
        async with serving(make_engine(base, tok, max_rank=8, max_num_basis=32)) as c:
            target = ["--target", f"127.0.0.1:{c.running.port}"]
            code = await asyncio.to_thread(cli.main, [*argv, *target])
            printed = capsys.readouterr().out
            # refused before the model loads (it does not exist), not after the run
            again = ["--model", "/nonexistent", *target]
            refused = [(await asyncio.to_thread(cli.main, [*argv, *again, *more]),
                        capsys.readouterr().err)
                       for more in ([], ["--rank", "16"], ["--num-basis", "64"])]
            return code, printed, refused

    code, printed, refused = asyncio.run(main())
    assert refused == [(2, "nolaserve: error: --register mine: the id is taken; pass "
                           "--replace or another id\n"),
                       (2, "nolaserve: error: --rank 16 is over the server's max_rank 8\n"),
                       (2, "nolaserve: error: --num-basis 64 is over the server's "
                           "max_num_basis 32\n")]
    assert code == 0, printed
    adapter = NolaAdapter.from_bytes(out.read_bytes())
    assert (adapter.seed, adapter.rank, adapter.alpha.shape) == (9, 4, (2, 2, 16))
    assert adapter.target_modules == ["self_attn.q_proj", "mlp.down_proj"]
    assert adapter.beta.abs().sum() > 0
    assert "registered mine (nola, rank 4" in printed
    storage = next(line for line in printed.splitlines() if line.startswith("storage:"))
    nola_bytes, lora_bytes = (int(s.split(" B)")[0]) for s in storage.split("(")[1:3])
    assert nola_bytes == out.stat().st_size < lora_bytes
    assert cli.main(["train-nola", str(tmp_path / "none.jsonl"), "--model", "/nonexistent",
                     "--out", str(out)]) == 2  # refused before the model loads
    assert "none.jsonl: no such file" in capsys.readouterr().err


def test_train_nola_refuses_what_would_fail_the_run_before_it(base, bytebpe, tmp_path,
                                                                 capsys, monkeypatch):
    """An outside probe's typo'd "completon" trained an adapter that only learned to stop,
    --lr inf wrote an adapter of NaNs and exited 0, and a missing --out folder failed
    after the whole run."""
    model_dir = tmp_path / "model"
    base.save_pretrained(model_dir)
    bytebpe.save_pretrained(model_dir)
    data, out = tmp_path / "d.jsonl", tmp_path / "a.safetensors"
    data.write_text(json.dumps({"prompt": "abc", "completion": "x"}) + "\n")
    argv = ["train-nola", str(data), "--model", str(model_dir), "--device", "cpu", "--out",
            str(out), "--steps", "2", "--rank", "2", "--num-basis", "4", "-q"]
    capsys.readouterr()  # save_pretrained's progress bars

    def said(*more: str) -> str:
        assert cli.main([*argv, *more]) == 2
        return capsys.readouterr().err.split("nolaserve: error: ")[-1].strip()

    for lr in ("-1", "nan", "inf", "2"):
        assert said("--lr", lr) == f"--lr must be in (0, 1], got {float(lr)}"
    for bad_out in (tmp_path / "none" / "a.safetensors", tmp_path):
        assert said("--out", str(bad_out)) == (f"--out {bad_out}: name a file in a folder "
                                               "that exists")
    assert said("--lora-alpha", "inf") == "--lora-alpha must be a finite number, got inf"
    # before the model loads (--device banana was a traceback; a bad --register id failed
    # after the whole run)
    assert said("--seed", "-1", "--model", "/nonexistent") == ("--seed must be in "
                                                                "[0, 2^63 - 1], got -1")
    assert said("--device", "banana", "--model", "/nonexistent") == (
        "--device must be auto, cpu, cuda or cuda:N, got 'banana'")
    assert said("--register", "bad id!", "--model", "/nonexistent").startswith(
        "--register: invalid adapter id 'bad id!'")
    monkeypatch.setattr(train_loop, "fit", lambda *a, **k: [math.nan])
    assert said() == ("training diverged (final loss nan, or a coefficient not finite): "
                      "lower --lr (was 0.01); nothing written")
    monkeypatch.undo()
    assert not out.exists()
    for line, why in ((json.dumps({"prompt": "abc", "completon": "x"}),
                       '1: an example needs "prompt" and "completion" (strings), or '
                       "\"messages\"; got ['completon', 'prompt']"),
                      ("[1, 2]", "1: an example needs"),
                      (json.dumps({"messages": "hi"}), '1: "messages" must be a list')):
        data.write_text(line + "\n")  # before the model loads: there is none
        assert said("--model", "/nonexistent").startswith(f"{data}:{why}")
    data.write_bytes(b'{"prompt": "\xff"}\n')
    assert said("--model", "/nonexistent") == f"{data}: not UTF-8 text (byte 12)"


def test_encode_masks_the_prompt_and_appends_eos(bytebpe):
    e = encode(bytebpe, "abc", "de")
    n = len(bytebpe("abc")["input_ids"])
    assert e.labels[:n] == [IGNORE] * n and e.labels[n:] == e.input_ids[n:]
    assert e.input_ids[-1] == bytebpe.eos_token_id
    with pytest.raises(ValueError, match="assistant"):
        encode(bytebpe, messages=[{"role": "user", "content": "x"}])
