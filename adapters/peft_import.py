"""Import PEFT LoRA directories (``adapter_config.json`` + ``adapter_model.safetensors``)
into nolaserve LoRA adapters, refusing anything that would not serve as plain LoRA."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch

from . import safetensors_io as st
from .errors import InvalidAdapterError, short
from .files import open_checked, os_errors, read_fd, shown
from .lora import MAX_LAYERS, LoraAdapter, check_rank
from .spec import AdapterFactors, ModuleFactors

_PEFT_PREFIX = "base_model.model."
_PEFT_FACTOR = re.compile(r"(.+)\.(lora_A|lora_B)\.weight")
_DECODER_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.([0-9]+)\.(.+)")
_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")  # linear: no overlap
_ANY_PARENT = r".*\."  # what PEFT's weight conversion writes before a module name
MAX_PATTERN_KEY = 1024
MAX_PATTERN_CHECKS = 1 << 20
_MUTATED_BASE_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
_VARIANTS = ("alora_invocation_tokens", "use_qalora", "use_bdlora", "kasa_config",
             "monteclora_config", "arrow_config")
_REFUSED = {  # config key -> why and what to do; refused when the value is truthy
    "use_dora": "DoRA (use_dora) is not supported; merge it into the base model or retrain "
                "with use_dora=false",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers, GPT-2 style) is not supported; only "
                      "nn.Linear base models can be served",
    "lora_bias": "lora_bias (a bias on lora_B) is not supported; retrain with lora_bias=false",
    "modules_to_save": "modules_to_save (full copies of modules) is not supported; retrain "
                       "without modules_to_save",
    "trainable_token_indices": "trainable tokens are not supported; retrain without them",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported; target "
                         "nn.Linear modules with target_modules",
    "layer_replication": "layer_replication is not supported; retrain without it",
    **{k: f"the LoRA variant {k} changes the forward pass and is not supported; export a "
          "plain LoRA adapter" for k in _VARIANTS},
}


@dataclass
class _PeftConfig:
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: _Pattern
    alpha_pattern: _Pattern


def import_peft(directory: str | os.PathLike[str], description: str = "") -> LoraAdapter:
    """Import a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Raises ``InvalidAdapterError`` saying what to do for anything that is not plain LoRA on
    decoder-layer linears, and never unpickles ``adapter_model.bin``.
    """
    with os_errors(directory), open_checked(directory, None) as fd:
        return import_peft_fd(fd, directory, None, None, description)


def import_peft_fd(fd: int, directory: str | os.PathLike[str], allowed_dirs: list[str] | None,
                   max_bytes: int | None, description: str = "") -> LoraAdapter:
    """``import_peft`` of the directory open on ``fd`` (named ``directory`` in messages):
    its files are opened relative to ``fd``, each checked against ``allowed_dirs`` (if
    given) and bounded by ``max_bytes`` (if given)."""
    what = f"PEFT adapter {shown(directory)}"

    def member(name: str) -> bytes | None:
        try:
            with open_checked(name, allowed_dirs, dir_fd=fd) as file:
                return read_fd(file, name, max_bytes)
        except FileNotFoundError:
            return None

    config_bytes = member("adapter_config.json")
    if config_bytes is None:
        raise InvalidAdapterError(
            f"{what}: adapter_config.json is missing; save the adapter with "
            "PeftModel.save_pretrained(directory)"
        )
    try:
        config = json.loads(config_bytes)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InvalidAdapterError(f"{what}: adapter_config.json is not valid JSON: {e}") from None
    _peft_config(config, what)  # refuse what PEFT cannot give us before asking for a re-save
    weights = member("adapter_model.safetensors")
    if weights is None:
        if _exists("adapter_model.bin", fd):
            raise InvalidAdapterError(
                f"{what}: only adapter_model.bin (pickle) is present, which is never unpickled; "
                "re-save the adapter with save_pretrained(directory, safe_serialization=True)"
            )
        raise InvalidAdapterError(f"{what}: adapter_model.safetensors is missing")
    _, tensors = st.read(weights, what)
    return from_peft(config, tensors, what=what, description=description)


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def from_peft(config: dict, tensors: dict[str, torch.Tensor], what: str = "PEFT adapter",
              description: str = "") -> LoraAdapter:
    """Build a ``LoraAdapter`` from a PEFT LoRA config dict and its saved state dict.

    ``scale = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), ``alpha`` from
    ``alpha_pattern`` matched as PEFT matches it, else ``lora_alpha``; fp16/bf16 factors
    become float32.
    """
    cfg = _peft_config(config, what)
    pairs = _peft_pairs(tensors, what)
    modules, shapes = {}, {}
    for (i, name), (key, ab) in sorted(pairs.items()):
        f = _peft_module(key, ab, cfg, what)
        shape = (f.A.shape[1], f.B.shape[0])
        if shapes.setdefault(name, shape) != shape:
            raise InvalidAdapterError(
                f"{what}: {key}: [in, out] = {list(shape)} differs from {list(shapes[name])} "
                f"of {short(name)} in another layer"
            )
        modules[(i, name)] = f
    base = config.get("base_model_name_or_path")
    base = st.check_text("base_model", base if isinstance(base, str) else "", what)
    return LoraAdapter(sorted(shapes), shapes, max(i for i, _ in modules) + 1,
                       AdapterFactors(modules), base_model=base,
                       description=st.check_text("description", description, what))


def _peft_config(config: object, what: str) -> _PeftConfig:
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"{what}: adapter_config.json must hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise InvalidAdapterError(
            f"{what}: peft_type is {short(config.get('peft_type'))}; only PEFT LoRA adapters "
            "(peft_type 'LORA') can be imported"
        )
    for key, message in _REFUSED.items():
        if config.get(key):
            raise InvalidAdapterError(f"{what}: {message}")
    if config.get("bias", "none") != "none":
        raise InvalidAdapterError(
            f"{what}: bias={short(config['bias'])} trains base-model biases, which is not "
            "supported; retrain with bias='none'"
        )
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_MUTATED_BASE_INITS):
        raise InvalidAdapterError(
            f"{what}: init_lora_weights={short(init)} makes the adapter fit only a base model that "
            "this initialization modified; convert it to plain LoRA with save_pretrained("
            "..., path_initial_model_for_weight_conversion=...)"
        )
    rank_pattern = _pattern(config, "rank_pattern", what, positive_int=True)
    alpha_pattern = _pattern(config, "alpha_pattern", what, positive_int=False)
    return _PeftConfig(r=_check_number(config.get("r", 8), f"{what}: r", True),
                       lora_alpha=_check_number(config.get("lora_alpha", 8), f"{what}: lora_alpha"),
                       use_rslora=bool(config.get("use_rslora", False)),
                       rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def _check_number(value: object, where: str, positive_int: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if positive_int and not (ok and isinstance(value, int) and value > 0):
        raise InvalidAdapterError(f"{where} must be a positive integer, got {short(value)}")
    if not ok:
        raise InvalidAdapterError(f"{where} must be a finite number, got {short(value)}")
    return value


@dataclass(frozen=True)
class _PatternKey:
    """A ``rank_pattern`` / ``alpha_pattern`` key read as PEFT reads it, the regex
    ``(.*\\.)?(key)$``, with no regex run: ``pieces`` are its literal runs at their offsets
    (a bare ``.`` matches any one character, ``\\.`` only a dot), ``width`` its length,
    ``any_parent`` a leading ``.*\\.`` (a dot must come before it) and ``last`` its text after
    its last dot, a suffix of the last name of every module path it matches."""
    pieces: tuple[tuple[int, str], ...]
    width: int
    any_parent: bool
    last: str

    def matches(self, module: str) -> bool:
        head = len(module) - self.width
        if head < 0 or (self.any_parent and head == 0) or (head > 0 and module[head - 1] != "."):
            return False
        return all(module.startswith(piece, head + at) for at, piece in self.pieces)


def _pattern_key(key: str) -> _PatternKey | None:
    """``key`` as a ``_PatternKey``, or None when it is not a module name."""
    body = key.removeprefix(_ANY_PARENT)
    text = body.replace("\\.", ".")
    if len(text) > MAX_PATTERN_KEY or not _MODULE_NAME.fullmatch(text):
        return None
    anys, at = [], 0
    for part in body.split("\\."):  # between literal dots; a bare dot in a part is any character
        anys += [at + i for i, c in enumerate(part) if c == "."]
        at += len(part) + 1
    bounds = [-1, *anys, len(text)]
    pieces = tuple((a + 1, text[a + 1 : b]) for a, b in zip(bounds, bounds[1:]))
    return _PatternKey(pieces, len(text), key != body, text.rpartition(".")[2])


class _Pattern:
    """``rank_pattern`` or ``alpha_pattern``: the value of the first key in file order that
    matches a module path, as ``peft.utils.other.get_pattern_key`` picks it. Keys are
    indexed by ``last``, and one import makes at most ``MAX_PATTERN_CHECKS`` key-against-path
    checks, so no file can hold the importer for long."""

    def __init__(self, name: str, keys: list[tuple[_PatternKey, float]]) -> None:
        self.name = name
        self.checks = 0
        self.by_last: dict[str, list[tuple[int, _PatternKey, float]]] = {}
        for i, (key, value) in enumerate(keys):
            self.by_last.setdefault(key.last, []).append((i, key, value))

    def value(self, module: str, default: float) -> float:
        name = module.rpartition(".")[2]
        candidates = [c for n in range(len(name)) for c in self.by_last.get(name[n:], ())]
        self.checks += len(candidates)
        if self.checks > MAX_PATTERN_CHECKS:
            raise InvalidAdapterError(
                f"{self.name} needs more than {MAX_PATTERN_CHECKS} key-against-module checks; "
                "list fewer keys, or keys without the layer (e.g. 'q_proj')")
        hits = [(i, value) for i, key, value in candidates if key.matches(module)]
        return min(hits)[1] if hits else default


def _pattern(config: dict, name: str, what: str, positive_int: bool) -> _Pattern:
    """``rank_pattern`` / ``alpha_pattern``. PEFT matches each key as a regex; running a
    file's regexes would let it stall the server, so only module names are accepted (and
    ``.*\\.name``, which PEFT's weight conversion writes), read as that regex reads them."""
    pattern = config.get(name) or {}
    if not isinstance(pattern, dict):
        raise InvalidAdapterError(f"{what}: {name} must be a JSON object")
    keys = []
    for key, value in pattern.items():
        parsed = _pattern_key(key)
        if parsed is None:
            raise InvalidAdapterError(
                f"{what}: {name} key {short(key)} is not a module name; list module names "
                "(e.g. 'q_proj' or 'model.layers.0.self_attn.q_proj', at most "
                f"{MAX_PATTERN_KEY} characters of letters, digits, '_' and '.'), not regular "
                "expressions: a key applies to every module whose path ends with it")
        keys.append((parsed, _check_number(value, f"{what}: {name}[{short(key)}]", positive_int)))
    return _Pattern(f"{what}: {name}", keys)


def _peft_pairs(tensors: dict[str, torch.Tensor], what: str
                ) -> dict[tuple[int, str], tuple[str, dict[str, torch.Tensor]]]:
    """Group PEFT keys into ``(layer, module) -> (module key, {"lora_A": A, "lora_B": B})``."""
    for marker, why, todo in (
        ("lora_embedding_", "LoRA on embedding layers", "retrain without the embedding "
         "in target_modules"),
        ("lora_magnitude_vector", "DoRA", "merge it into the base model or retrain without DoRA"),
        (".lora_B.bias", "lora_bias", "retrain with lora_bias=false"),
    ):
        if any(marker in k for k in tensors):
            raise InvalidAdapterError(f"{what}: {why} is not supported; {todo}")
    pairs: dict[tuple[int, str], tuple[str, dict[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        m = _PEFT_FACTOR.fullmatch(name.removeprefix(_PEFT_PREFIX))
        if not m:
            raise InvalidAdapterError(
                f"{what}: tensor {short(name)} is not a LoRA factor (full weights from "
                "modules_to_save, trained biases or tokens are not supported); save only LoRA"
            )
        key, part = m[1], m[2]
        layer = _DECODER_LAYER.search(key)
        if not layer:
            raise InvalidAdapterError(
                f"{what}: LoRA on {short(key)}, outside the decoder layers (e.g. lm_head), is not "
                "supported; retrain without it in target_modules"
            )
        i = int(layer[1])
        if i >= MAX_LAYERS:
            raise InvalidAdapterError(f"{what}: {short(name)} has layer index {i} >= {MAX_LAYERS}")
        entry = pairs.setdefault((i, layer[2]), (key, {}))
        if entry[0] != key or part in entry[1]:
            raise InvalidAdapterError(f"{what}: {short(name)} duplicates layer {i} {layer[2]!r}")
        entry[1][part] = t
    if not pairs:
        raise InvalidAdapterError(f"{what}: adapter_model.safetensors holds no LoRA factors")
    return pairs


def _peft_module(key: str, ab: dict[str, torch.Tensor], cfg: _PeftConfig,
                 what: str) -> ModuleFactors:
    """One module's factors; ``key`` is its name in the base model (``model.layers.0...``)."""
    for part in ("lora_A", "lora_B"):
        t = ab.get(part)
        if t is None or t.dim() != 2 or not t.is_floating_point():
            raise InvalidAdapterError(
                f"{what}: {key}.{part}.weight is missing, not 2-D or not floating point"
            )
        ab[part] = t.detach().to("cpu", torch.float32, copy=True).contiguous()
        if not bool(torch.isfinite(ab[part]).all()):
            raise InvalidAdapterError(f"{what}: {key}.{part}.weight contains NaN or Inf")
    r = check_rank(ab["lora_A"].shape[0], ab["lora_B"].shape[1], key, what)
    expected = cfg.rank_pattern.value(key, cfg.r)
    if r != expected:
        raise InvalidAdapterError(
            f"{what}: {key} has rank {r} but adapter_config.json (r / rank_pattern) says "
            f"{expected}"
        )
    alpha = cfg.alpha_pattern.value(key, cfg.lora_alpha)
    scale = alpha / (math.sqrt(r) if cfg.use_rslora else r)
    # Rounded to float32, as stored, so that to_bytes/from_bytes is exact.
    return ModuleFactors(A=ab["lora_A"], B=ab["lora_B"],
                         scale=float(torch.tensor(scale, dtype=torch.float32)))
