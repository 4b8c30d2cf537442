"""LoRA format v1 and PEFT import, held to PEFT's own forward pass."""

from __future__ import annotations

import contextlib
import copy
import json
import random
import re
from dataclasses import replace

import pytest
import torch
from conftest import LINEARS, merged, spec_of
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file

from nolaserve.adapters import peft_import
from nolaserve.adapters import safetensors_io as st
from nolaserve.adapters.errors import IncompatibleAdapterError, InvalidAdapterError
from nolaserve.adapters.lora import LoraAdapter
from nolaserve.adapters.peft_import import from_peft, import_peft
from nolaserve.adapters.spec import AdapterFactors, ModuleFactors

SHORT = [name.split(".")[1] for name in LINEARS]  # q_proj, ..., down_proj
PEFT_CASES = {
    "qv": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16),
    "all_linears": dict(target_modules=SHORT, r=3, lora_alpha=5),
    "patterns": dict(
        target_modules=SHORT, r=4, lora_alpha=8,
        # plain module names only (regex keys are refused); ".*\\." is what PEFT writes
        rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 6, "model.layers.1.mlp.up_proj": 5,
                      r"model\.layers\.1\.mlp\.gate_proj": 5, r".*\.1.mlp.down_proj": 5},
        # first match wins: layer 1 q_proj takes 3, not 32
        alpha_pattern={"layers.1.self_attn.q_proj": 3, "q_proj": 32, "mlp.down_proj": 7},
    ),
    "rslora": dict(target_modules=["q_proj", "k_proj", "down_proj"], r=8, lora_alpha=4,
                   use_rslora=True),
    "sparse_layers": dict(target_modules=["o_proj", "up_proj"], r=2, lora_alpha=2,
                          layers_to_transform=[1]),
}


def save_peft(base, directory, **config):
    """Wrap a copy of ``base`` in a PEFT LoRA with non-zero B, save it, return the PeftModel."""
    peft_model = get_peft_model(copy.deepcopy(base),
                                LoraConfig(init_lora_weights=False, **config)).eval()
    peft_model.save_pretrained(directory)
    return peft_model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def qv_dir(llama, tmp_path_factory):
    directory = tmp_path_factory.mktemp("peft_qv")
    save_peft(llama, directory, **PEFT_CASES["qv"])
    return directory


def peft_files(directory):
    config = json.loads((directory / "adapter_config.json").read_text())
    _, tensors = st.read((directory / "adapter_model.safetensors").read_bytes())
    return config, tensors


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_import_matches_peft_forward(llama, tmp_path, case):
    peft_model = save_peft(llama, tmp_path, **PEFT_CASES[case])
    adapter = import_peft(tmp_path)
    adapter.validate(spec_of(llama))
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = logits(peft_model, ids)
    got = logits(merged(llama, adapter.materialize()), ids)
    assert not torch.allclose(expected, logits(llama, ids), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # also through PeftModel.from_pretrained, i.e. PEFT's own reading of the files
    reloaded = PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path).eval()
    torch.testing.assert_close(got, logits(reloaded, ids), atol=1e-5, rtol=1e-5)


def test_import_details(llama, tmp_path):
    save_peft(llama, tmp_path, **PEFT_CASES["patterns"])
    adapter = import_peft(tmp_path)
    mods = adapter.factors.modules
    assert adapter.num_layers == 2 and adapter.rank == 6
    assert sorted(adapter.target_modules) == sorted(LINEARS)
    assert mods[(0, "self_attn.q_proj")].rank == 2 and mods[(1, "self_attn.q_proj")].rank == 4
    assert mods[(1, "mlp.up_proj")].rank == 5 and mods[(0, "mlp.up_proj")].rank == 4
    assert mods[(0, "self_attn.q_proj")].scale == 16.0  # 32 / 2
    assert mods[(1, "self_attn.q_proj")].scale == 0.75  # 3 / 4
    assert mods[(1, "mlp.down_proj")].scale == torch.tensor(7 / 5).item()  # float32-rounded
    assert all(f.A.dtype == torch.float32 for f in mods.values())

    save_peft(llama, tmp_path / "sparse", **PEFT_CASES["sparse_layers"])
    sparse = import_peft(tmp_path / "sparse")
    assert sorted(sparse.factors.modules) == [(1, "mlp.up_proj"), (1, "self_attn.o_proj")]

    save_peft(llama, tmp_path / "rs", **PEFT_CASES["rslora"])
    assert all(f.scale == pytest.approx(4 / 8**0.5)
               for f in import_peft(tmp_path / "rs").factors.modules.values())


PATTERN_KEYS = ["v_proj", "layers.0.self_attn.q_proj", "proj", "mlp.up_proj", "up_proj",
                "model.layers.11.self_attn.v_proj", "q_proj", "q_pr.j", "self_attn.q.proj",
                "layers.1.mlp.up_proj", r"layers\.1\.mlp\.gate_proj", r".*\.1.mlp.down_proj",
                r".*\.up_proj", "l.yers.0.mlp", "s.lf_attn.k_proj", "0.mlp.gate_proj"]


@pytest.mark.parametrize("module", [
    "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.gate_proj",
    "model.layers.11.self_attn.v_proj", "model.layers.1.mlp.down_proj", "q_proj", "up_proj",
    "model.layers.10.mlp.gate_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp",
    "model.layers.2.self_attn.qXproj"])
def test_pattern_value_is_peft_get_pattern_key(module):
    """Keys read as PEFT's regex reads them, bare dots matching any character ("q_pr.j" is
    PEFT's key for q_proj), with no regex run; the first matching key in file order wins."""
    for keys in (PATTERN_KEYS, PATTERN_KEYS[::-1], []):
        pattern = peft_import._pattern({"p": {k: i for i, k in enumerate(keys)}}, "p", "a", False)
        got = pattern.value(module, -1)
        assert (keys[got] if got >= 0 else module) == get_pattern_key(keys, module)


def test_pattern_checks_are_bounded(monkeypatch):
    monkeypatch.setattr(peft_import, "MAX_PATTERN_CHECKS", 100)
    keys = {f"model.layers.{i}.self_attn.q_proj": 4 for i in range(60)}
    pattern = peft_import._pattern({"p": keys}, "p", "adapter", True)
    assert pattern.value("model.layers.7.self_attn.q_proj", 8) == 4
    with pytest.raises(InvalidAdapterError, match="adapter: p needs more than 100 key-against"):
        pattern.value("model.layers.8.self_attn.q_proj", 8)


@pytest.mark.parametrize("key", ["(a|a)*X", "q_proj$", "^model", ".*", "layers\\.[0-9]+",
                                 "q_proj|v_proj", "a" * 1025, "", "mlp..up_proj"])
def test_regex_pattern_keys_are_refused(qv_dir, key):
    config, tensors = peft_files(qv_dir)
    for name in ("rank_pattern", "alpha_pattern"):
        with pytest.raises(InvalidAdapterError, match=f"{name} key .* is not a module name"):
            from_peft({**config, name: {key: 4}}, tensors)


def test_no_regex_from_the_file_is_ever_run(qv_dir, monkeypatch):
    """The issue's ReDoS: rank_pattern {"(a|a)*X": 8} with a long key held the GIL 9.9 s.
    With ``re`` gone from the importer, a config with patterns still imports: nothing
    compiles or matches a pattern from the file."""

    config, tensors = peft_files(qv_dir)
    config["rank_pattern"] = {"q_proj": 4, r".*\.v_proj": 4}
    config["alpha_pattern"] = {"model.layers.0.self_attn.q_proj": 2}
    monkeypatch.setattr(peft_import, "re", None)
    adapter = from_peft(config, tensors)
    assert adapter.factors.modules[(0, "self_attn.q_proj")].scale == 0.5  # 2 / 4
    assert adapter.factors.modules[(1, "self_attn.q_proj")].scale == 4.0  # 16 / 4


@pytest.mark.parametrize(("key", "layer", "module"), [
    ("base_model.model.transformer.h.3.self_attention.dense", 3, "self_attention.dense"),
    ("base_model.model.blocks.12.attn.proj", 12, "attn.proj"),
    ("model.language_model.layers.0.mlp.up_proj", 0, "mlp.up_proj"),  # no PEFT prefix
])
def test_layer_naming_schemes(key, layer, module):
    tensors = {f"{key}.lora_A.weight": torch.ones(2, 6), f"{key}.lora_B.weight": torch.ones(5, 2)}
    adapter = from_peft({"peft_type": "LORA", "r": 2, "lora_alpha": 4}, tensors)
    assert list(adapter.factors.modules) == [(layer, module)]
    assert adapter.num_layers == layer + 1 and adapter.module_shapes == {module: (6, 5)}
    assert adapter.factors.modules[(layer, module)].scale == 2.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_becomes_float32(qv_dir, dtype):
    config, tensors = peft_files(qv_dir)
    half = {k: v.to(dtype) for k, v in tensors.items()}
    adapter = from_peft(config, half)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    factor = adapter.factors.modules[(1, "self_attn.v_proj")].B
    assert factor.dtype == torch.float32 and torch.equal(factor, half[key].float())


def test_round_trip_is_exact(llama, tmp_path):
    save_peft(llama, tmp_path, **PEFT_CASES["patterns"])
    adapter = replace(import_peft(tmp_path), description="round trip")
    data = adapter.to_bytes()
    back = LoraAdapter.from_bytes(data)
    # same metadata and tensors (not same bytes: safetensors orders metadata keys at random)
    (meta_a, tensors_a), (meta_b, tensors_b) = st.read(data), st.read(back.to_bytes())
    assert meta_a == meta_b and tensors_a.keys() == tensors_b.keys()
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    assert (back.target_modules, back.module_shapes, back.num_layers, back.base_model,
            back.description) == (adapter.target_modules, adapter.module_shapes,
                                  adapter.num_layers, adapter.base_model, "round trip")
    assert back.factors.modules.keys() == adapter.factors.modules.keys()
    for key, f in adapter.factors.modules.items():
        g = back.factors.modules[key]
        assert torch.equal(f.A, g.A) and torch.equal(f.B, g.B) and f.scale == g.scale
    assert back.nbytes == adapter.nbytes and back.kind == "lora"


def test_materialize_copies(qv_dir):
    adapter = import_peft(qv_dir)
    out = adapter.materialize("cpu")
    for key, f in out.modules.items():
        assert f.A.data_ptr() != adapter.factors.modules[key].A.data_ptr()


def test_validate_refuses_other_model(llama, qv_dir):
    adapter = import_peft(qv_dir)
    spec = spec_of(llama)
    adapter.validate(spec)
    other = {k: (32, v[1]) for k, v in spec.module_shapes.items()}
    with pytest.raises(IncompatibleAdapterError, match="shape"):
        adapter.validate(replace(spec, module_shapes=other))
    with pytest.raises(IncompatibleAdapterError, match="max_rank 2"):
        adapter.validate(replace(spec, max_rank=2))
    with pytest.raises(IncompatibleAdapterError, match="layers"):
        adapter.validate(replace(spec, num_layers=1))


CONFIG_REFUSALS = [
    ({"peft_type": "IA3"}, "only PEFT LoRA"),
    ({"use_dora": True}, "DoRA.*use_dora=false"),
    ({"fan_in_fan_out": True}, "Conv1D"),
    ({"lora_bias": True}, "lora_bias=false"),
    ({"bias": "all"}, "bias='none'"),
    ({"modules_to_save": ["lm_head"]}, "without modules_to_save"),
    ({"init_lora_weights": "pissa"}, "path_initial_model_for_weight_conversion"),
    ({"alora_invocation_tokens": [1, 2]}, "variant alora_invocation_tokens"),
    ({"target_parameters": ["mlp.experts"]}, "target_parameters"),
    ({"r": 0}, "r must be a positive integer"),
    ({"lora_alpha": "8"}, "lora_alpha must be a finite number"),
    ({"rank_pattern": {"q_proj": 5}}, r"rank 4 but adapter_config.json .* says 5"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern must be a JSON object"),
    ({"alpha_pattern": {"q_proj(": 2}}, "alpha_pattern key .* is not a module name"),
]


@pytest.mark.parametrize(("change", "match"), CONFIG_REFUSALS)
def test_peft_config_refusals(qv_dir, change, match):
    config, tensors = peft_files(qv_dir)
    with pytest.raises(InvalidAdapterError, match=match):
        from_peft({**config, **change}, tensors)


PREFIX = "base_model.model.model.layers.0.self_attn.q_proj."
TENSOR_REFUSALS = [
    ("base_model.model.model.embed_tokens.lora_embedding_A", "embedding layers"),
    ("base_model.model.lm_head.lora_A.weight", "outside the decoder layers.*lm_head"),
    ("base_model.model.lm_head.weight", "not a LoRA factor.*modules_to_save"),
    (PREFIX + "lora_B.bias", "lora_bias"),
    (PREFIX + "lora_magnitude_vector", "DoRA"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", "not a LoRA"),
]


@pytest.mark.parametrize(("name", "match"), TENSOR_REFUSALS)
def test_peft_tensor_refusals(qv_dir, name, match):
    config, tensors = peft_files(qv_dir)
    with pytest.raises(InvalidAdapterError, match=match):
        from_peft(config, {**tensors, name: torch.zeros(4, 64)})


@pytest.mark.parametrize(("edit", "match"), [
    (lambda t: t.pop(PREFIX + "lora_B.weight"), "lora_B.weight is missing"),
    (lambda t: t.update({PREFIX + "lora_B.weight": torch.zeros(64, 3)}), "rank mismatch"),
    (lambda t: t[PREFIX + "lora_A.weight"].__setitem__((0, 0), float("nan")), "NaN"),
    (lambda t: t.update({PREFIX + "lora_A.weight": torch.zeros(4, 64, dtype=torch.int32)}),
     "not floating point"),
    (lambda t: t.clear(), "no LoRA factors"),
])
def test_peft_bad_tensors(qv_dir, edit, match):
    config, tensors = peft_files(qv_dir)
    edit(tensors)
    with pytest.raises(InvalidAdapterError, match=match):
        from_peft(config, tensors)


def test_import_peft_file_refusals(qv_dir, tmp_path):
    config_text = (qv_dir / "adapter_config.json").read_text()
    with pytest.raises(InvalidAdapterError, match="adapter_config.json is missing"):
        import_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidAdapterError, match="not valid JSON"):
        import_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1]")
    with pytest.raises(InvalidAdapterError, match="must hold a JSON object"):
        import_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text(config_text)
    with pytest.raises(InvalidAdapterError, match="adapter_model.safetensors is missing"):
        import_peft(tmp_path)
    # a pickle that would run code if loaded: it must be refused, never read
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'false'\ntR.")
    with pytest.raises(InvalidAdapterError, match="safe_serialization=True"):
        import_peft(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10" + bytes(20))
    with pytest.raises(InvalidAdapterError, match="safetensors"):
        import_peft(tmp_path)


def small_adapter() -> LoraAdapter:
    gen = torch.Generator().manual_seed(0)
    mods = {(0, "self_attn.q_proj"): ModuleFactors(torch.randn(2, 8, generator=gen),
                                                   torch.randn(8, 2, generator=gen), 0.5),
            (2, "mlp.up_proj"): ModuleFactors(torch.randn(3, 8, generator=gen),
                                              torch.randn(4, 3, generator=gen), 2.0)}
    return LoraAdapter(["self_attn.q_proj", "mlp.up_proj"],
                       {"self_attn.q_proj": (8, 8), "mlp.up_proj": (8, 4)}, 3,
                       AdapterFactors(mods), base_model="tiny")


def edited(name: str | None = None, value: torch.Tensor | None = None, drop: str | None = None,
           **meta: str) -> bytes:
    metadata, tensors = st.read(small_adapter().to_bytes())
    if name:
        tensors[name] = value
    tensors.pop(drop, None)
    return st.write(tensors, {**metadata, **meta})


Q = "layers.0.self_attn.q_proj."


@pytest.mark.parametrize(("data", "match"), [
    (edited("extra", torch.zeros(1)), "unexpected tensor 'extra'"),
    (edited("layers.3.mlp.up_proj.lora_A", torch.zeros(3, 8)), "layer index 3 >= num_layers 3"),
    (edited("layers.01.mlp.up_proj.lora_A", torch.zeros(3, 8)), "unexpected tensor"),
    (edited("layers.0.mlp.down_proj.scale", torch.ones(1)), "not in target_modules"),
    (edited(Q + "lora_B", torch.zeros(8, 3)), "rank mismatch"),
    (edited(Q + "lora_A", torch.zeros(2, 7)), r"shape \[2, 7\], expected \[2, 8\]"),
    (edited(drop=Q + "lora_B"), "lora_B' is missing"),
    (edited(Q + "lora_A", torch.zeros(0, 8)), "rank mismatch"),
    (edited(Q + "lora_A", torch.full((2, 8), float("nan"))), "NaN or Inf"),
    (edited(Q + "scale", torch.tensor([float("inf")])), "NaN or Inf"),
    (edited(drop=Q + "scale"), "scale' is missing"),
    (edited(Q + "scale", torch.ones(2)), r"shape \[2\], expected \[1\]"),
    (edited(Q + "lora_A", torch.zeros(2, 8, dtype=torch.float16)), "must be torch.float32"),
    (edited(format="nolaserve.nola"), "expected 'nolaserve.lora'"),
    (edited(format_version="2"), "format_version"),
    (edited(num_layers="-1"), "decimal integer"),
    (edited(target_modules='["self_attn.q_proj"]'), "module_shapes keys"),
])
def test_from_bytes_refusals(data, match):
    with pytest.raises(InvalidAdapterError, match=match):
        LoraAdapter.from_bytes(data)


def test_from_bytes_rank_zero():
    metadata, tensors = st.read(small_adapter().to_bytes())
    tensors[Q + "lora_A"] = torch.zeros(0, 8)
    tensors[Q + "lora_B"] = torch.zeros(8, 0)
    with pytest.raises(InvalidAdapterError, match="rank 0"):
        LoraAdapter.from_bytes(st.write(tensors, metadata))


def test_from_bytes_sparse_and_empty():
    adapter = LoraAdapter.from_bytes(small_adapter().to_bytes())
    assert sorted(adapter.factors.modules) == [(0, "self_attn.q_proj"), (2, "mlp.up_proj")]
    assert adapter.rank == 3 and adapter.base_model == "tiny"
    metadata, _ = st.read(small_adapter().to_bytes())
    with pytest.raises(InvalidAdapterError, match="no LoRA factors"):
        LoraAdapter.from_bytes(st.write({}, metadata))


def test_damaged_bytes_raise_only_invalid_adapter(tmp_path):
    data = small_adapter().to_bytes()
    rng = random.Random(0)
    cuts = sorted({*range(0, 64), *rng.sample(range(len(data)), 150)})
    for n in cuts:
        with pytest.raises(InvalidAdapterError):
            LoraAdapter.from_bytes(data[:n])
    for _ in range(400):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            mutated[rng.randrange(len(data))] = rng.randrange(256)
        with contextlib.suppress(InvalidAdapterError):  # anything else fails the test
            LoraAdapter.from_bytes(bytes(mutated))
    # the same holds for the PEFT importer's files
    save_file({"x.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    body = (tmp_path / "adapter_model.safetensors").read_bytes()
    for n in range(0, len(body), 7):
        (tmp_path / "adapter_model.safetensors").write_bytes(body[:n])
        with pytest.raises(InvalidAdapterError, match=re.escape(str(tmp_path))):
            import_peft(tmp_path)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("base_model_name_or_path", "m" * 1025, "'base_model' has 1025 bytes; the limit is 1024"),
    ("base_model_name_or_path", "\ud800", "'base_model' is not valid UTF-8"),
])
def test_peft_free_text_is_bounded(qv_dir, field, value, match):
    config, tensors = peft_files(qv_dir)
    with pytest.raises(InvalidAdapterError, match=match):
        from_peft({**config, field: value}, tensors)
    with pytest.raises(InvalidAdapterError, match="'description' has 4097 bytes"):
        from_peft(config, tensors, description="d" * 4097)
