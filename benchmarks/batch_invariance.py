"""How much does batching move a request's logits and greedy tokens? Each request run alone
vs the same requests run together, on SmolLM2 (fp32, CPU), per adapter kind.

    python -m nolaserve.benchmarks.batch_invariance [--requests 16] [--max-tokens 16]
        [--trained digits.safetensors] [--invariant]

Batch composition changes the floating-point reduction order (matmul blocking over the
step's token count, attention padding to the longest context, LoRA segments, the torch
backend ``choose_backend`` picks), so logits differ from a solo run in the last bits. The
adapted network then amplifies that noise by its sensitivity to its input, which grows with
the adapter's delta ``scale * B @ A`` relative to the base weight. For every scenario this
prints the delta's spectral norm relative to the base weight (largest over layers and
modules), the max |logit diff| between the batched and the solo run (max and median over
requests, over the steps up to the first token where they part, where both runs saw the
same prefix), how many outputs differ, and the solo run's smallest top-2 logit gap; then
the same for each request run alone again with ``--noise`` (1e-6) Gaussian noise on its
input embeddings, against its clean solo run: a spread as large as the batched one means
batching moves the request no more than any rounding-sized change of its input would.
Scenarios: base model; half the requests on 8 ``create-nola`` demo adapters (random
coefficients, std 1); on 8 random adapters with std 0.1 (the std of trained coefficients);
on the ``--trained`` file (a ``train-nola`` output) if given. ``--invariant`` also runs
each scenario with ``batch_invariant``, whose outputs must equal the solo runs exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import statistics
import time
from collections.abc import Iterator

import torch

from nolaserve.adapters.nola import random_nola
from nolaserve.server.build import build_engine
from nolaserve.server.config import Config
from nolaserve.server.engine.engine import Engine
from nolaserve.server.engine.model_loader import load_model
from nolaserve.server.engine.sequence import SamplingParams

TARGETS = ["self_attn.q_proj", "self_attn.v_proj"]  # create-nola's and train-nola's default
SUBJECTS = ["the ocean", "a small robot", "Paris", "prime numbers", "an old lighthouse",
            "coffee", "the moon landing", "a chess opening", "rainforests", "a violin",
            "winter in Norway", "the printing press", "honeybees", "a city at night",
            "volcanoes", "the first computer"]
FORMS = ["Write one sentence about {}.", "Tell me a fact about {}.",
         "Describe {} to a child.", "What is surprising about {}?"]
Request = tuple[list[int], str | None]
Run = list[tuple[list[int], list[torch.Tensor]]]  # per request: tokens, logits per step


def prompts(engine: Engine, n: int) -> list[list[int]]:
    rng = random.Random(0)
    texts = [rng.choice(FORMS).format(rng.choice(SUBJECTS)) for _ in range(n)]
    tok = engine.tokenizer
    return [tok(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                        add_generation_prompt=True),
                add_special_tokens=False)["input_ids"] for t in texts]


def run(engine: Engine, reqs: list[Request], max_tokens: int) -> tuple[Run, float]:
    """Every request at once, greedy; per request its tokens and the logits it was sampled
    from at each step (rows told apart by their own ``SamplingParams`` object), and the
    generated tokens per second."""
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
              for _ in reqs]
    which = {id(p): i for i, p in enumerate(params)}
    out: Run = [([], []) for _ in reqs]
    sample = engine.sampler.sample

    def spy(logits, row_params, generators):
        for row, p in zip(logits, row_params):
            out[which[id(p)]][1].append(row.double().clone())
        return sample(logits, row_params, generators)

    engine.sampler.sample = spy
    try:
        for i, ((prompt, adapter), p) in enumerate(zip(reqs, params)):
            engine.add_request(f"r{i}", prompt, p, adapter)
        start = time.perf_counter()
        while engine.has_unfinished():
            for o in engine.step():
                out[int(o.request_id[1:])][0].extend(o.token_ids)
        seconds = time.perf_counter() - start
    finally:
        engine.sampler.sample = sample
    return out, len(reqs) * max_tokens / seconds


@contextlib.contextmanager
def input_noise(model: torch.nn.Module, eps: float) -> Iterator[None]:
    """Adds ``eps`` * N(0, 1) noise (seeded) to every token's input embedding: how far the
    network moves a solo run for an input change of the size of fp32 rounding."""
    gen = torch.Generator().manual_seed(0)

    def hook(module, args, out):
        return out + eps * torch.randn(out.shape, generator=gen).to(out)

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def compare(name: str, together: Run, alone: Run, tps: float) -> None:
    """One line: logit spread up to where the outputs part, and which outputs differ."""
    spreads, parted = [], []
    for (got, got_logits), (want, want_logits) in zip(together, alone):
        step = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), None)
        last = len(want) - 1 if step is None else step
        spreads.append(max(float((a - b).abs().max())
                           for a, b in zip(got_logits[:last + 1], want_logits[:last + 1])))
        if step is not None:
            top2 = want_logits[step].topk(2).values
            parted.append((step, float(top2[0] - top2[1])))
    detail = ", ".join(f"token {s} (gap {g:.3g})" for s, g in sorted(parted)) or "-"
    print(f"  {name:26s} {tps:6.1f} tok/s  max |logit diff| {max(spreads):.3g} (median "
          f"{statistics.median(spreads):.3g})  {len(parted)}/{len(together)} differ: {detail}")


def delta_ratio(model: torch.nn.Module, engine: Engine, adapter_ids: list[str]) -> float:
    """The largest ``||scale * B @ A||_2 / ||W||_2`` over the adapters' layers and modules."""
    worst = 0.0
    for adapter_id in adapter_ids:
        for (layer, name), f in engine.store.factors(adapter_id).modules.items():
            w = model.model.layers[layer].get_submodule(name).weight.detach()
            ratio = torch.linalg.matrix_norm(f.delta().to(w.dtype), 2) / \
                torch.linalg.matrix_norm(w, 2)
            worst = max(worst, float(ratio))
    return worst


def register(engines: list[Engine], trained: str | None) -> dict[str, list[str]]:
    """The scenarios' adapters in every engine; returns each scenario's adapter ids."""
    spec = engines[0].store.spec
    files = {f"demo-{i}": random_nola(spec, seed=i, targets=TARGETS).to_bytes()
             for i in range(8)}
    files |= {f"std01-{i}": random_nola(spec, seed=i, targets=TARGETS, coeff_std=0.1)
              .to_bytes() for i in range(8)}
    if trained:
        with open(trained, "rb") as f:
            files["trained"] = f.read()
    for engine in engines:
        for name, data in files.items():
            engine.store.register(name, data)
    scenarios = {"base model": [None],
                 "8 create-nola demo adapters (std 1)": [f"demo-{i}" for i in range(8)],
                 "8 random adapters, std 0.1": [f"std01-{i}" for i in range(8)]}
    if trained:
        scenarios["the trained adapter"] = ["trained"]
    return scenarios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--trained", metavar="FILE", help="a train-nola output to measure")
    parser.add_argument("--noise", type=float, default=1e-6,
                        help="std of the noise added to the solo runs' input embeddings")
    parser.add_argument("--invariant", action="store_true",
                        help="also run each scenario with batch_invariant")
    args = parser.parse_args()
    model, tokenizer = load_model(None, device="cpu", dtype="float32")
    models = [copy.deepcopy(model) for _ in range(1 + args.invariant)]
    engines = [build_engine(Config(registry_path=":memory:", max_rank=8, dtype="float32",
                                   max_num_seqs=args.requests, batch_invariant=mode,
                                   max_num_batched_tokens=1024), model=m, tokenizer=tokenizer)
               for m, mode in zip(models, (False, True))]
    scenarios = register(engines, args.trained)
    engine = engines[0]
    ps = prompts(engine, args.requests)
    print(f"SmolLM2 fp32, {args.requests} requests x {args.max_tokens} greedy tokens, "
          f"{torch.get_num_threads()} threads")
    for name, ids in scenarios.items():
        # odd requests on the scenario's adapters in turn, even ones on the base model
        reqs = [(p, ids[i // 2 % len(ids)] if i % 2 else None) for i, p in enumerate(ps)]
        adapted = [i for i in ids if i is not None]
        ratio = f"{delta_ratio(model, engine, adapted):.3g}" if adapted else "-"
        alone = [run(engine, [r], args.max_tokens)[0][0] for r in reqs]
        gaps = [float(t.topk(2).values.diff().abs()) for _, steps in alone for t in steps]
        print(f"{name}: delta/W spectral norm {ratio}, smallest solo top-2 gap "
              f"{min(gaps):.3g}")
        together, tps = run(engine, reqs, args.max_tokens)
        compare("batched", together, alone, tps)
        with input_noise(models[0], args.noise):
            noisy = [run(engine, [r], args.max_tokens)[0][0] for r in reqs]
        compare(f"solo, input + {args.noise:g} noise", noisy, alone, float("nan"))
        if args.invariant:
            together, tps = run(engines[1], reqs, args.max_tokens)
            compare("batched, batch_invariant", together, alone, tps)


if __name__ == "__main__":
    main()
