"""``nolaserve train-nola``: train a NOLA adapter on a JSONL file and write it (format v1),
optionally registering it on a running server. torch is imported only when it runs."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .cli_adapters import Connect, UsageError, describe, human_size
from .client import NolaserveError

if TYPE_CHECKING:
    from nolaserve.adapters.nola import NolaAdapter

DEFAULT_TARGETS = ["self_attn.q_proj", "self_attn.v_proj"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``train-nola``."""
    p.add_argument("data", metavar="DATA.jsonl",
                   help='one JSON object a line: {"prompt", "completion"} or {"messages"} '
                        "(the last message is the assistant's answer)")
    p.add_argument("--out", required=True, metavar="OUT.safetensors", help="file to write")
    p.add_argument("--model", metavar="PATH",
                   help="checkpoint directory, hub id or .gguf (default: embedded SmolLM2)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="basis, init and shuffle seed")
    p.add_argument("--rank", type=int, default=8, help="rank r of each adapted linear")
    p.add_argument("--num-basis", type=int, default=256, metavar="K",
                   help="basis size of A and of B (k = l)")
    p.add_argument("--targets", nargs="+", default=DEFAULT_TARGETS, metavar="NAME",
                   help="linears relative to a decoder layer")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="scale = lora_alpha / rank")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step")
    p.add_argument("--no-eos", action="store_true",
                   help="do not train the adapter to end its answers with EOS")
    p.add_argument("--description", default="", help="free text stored in the file")
    p.add_argument("--register", metavar="ID", help="register the adapter under ID when done "
                                                     "(on --target, with --admin-token)")
    p.add_argument("--replace", action="store_true", help="with --register: replace")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def command(args: argparse.Namespace, connect: Connect) -> int:
    """Load the model, train, write the adapter, report its size, register it if asked."""
    _check_args(args)
    if args.register:  # before the run: its end is no time to learn the id is taken
        with connect() as client:
            _check_registration(client, args)
    import torch
    from tqdm import tqdm

    from nolaserve.adapters.train import export, make_trainable
    from nolaserve.adapters.train_loop import fit, load_jsonl
    from nolaserve.server.engine.model_loader import ModelLoadError, load_model

    try:
        model, tokenizer = load_model(args.model, device=args.device, dtype="float32")
        examples = load_jsonl(args.data, tokenizer, add_eos=not args.no_eos)
        make_trainable(model, seed=args.seed, targets=args.targets, rank=args.rank,
                       num_basis=args.num_basis, lora_alpha=args.lora_alpha)
    except (ModelLoadError, ValueError) as e:
        raise UsageError(str(e)) from None
    torch.manual_seed(args.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with tqdm(total=args.steps, desc="train-nola", unit="step", disable=args.quiet,
              file=sys.stderr) as bar:
        def on_step(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")

        losses = fit(model, examples, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                     seed=args.seed, pad_id=pad_id, on_step=on_step)
    name = args.model or "SmolLM2-135M-Instruct"
    adapter = export(model, base_model=name, description=args.description)
    if not (math.isfinite(losses[-1]) and adapter.alpha.isfinite().all()
            and adapter.beta.isfinite().all()):
        raise UsageError(f"training diverged (final loss {losses[-1]:.4g}, or a coefficient "
                         f"not finite): lower --lr (was {args.lr}); nothing written")
    data = adapter.to_bytes()
    Path(args.out).write_bytes(data)
    lora_bytes = equivalent_lora_bytes(adapter)
    print(f"trained {len(examples)} examples x {args.steps} steps, final loss {losses[-1]:.4f}")
    print(f"wrote {args.out}: nola seed {args.seed}, rank {args.rank}, k=l={args.num_basis}, "
          f"{adapter.num_layers} layers x {args.targets}")
    print(f"storage: NOLA {human_size(len(data))} ({len(data)} B) vs the same-rank LoRA "
          f"{human_size(lora_bytes)} ({lora_bytes} B): {lora_bytes / len(data):.1f}x smaller")
    if args.register:
        with connect() as client:
            info = client.register_adapter(args.register, data, args.replace)
        print("registered", describe(info))
    return 0


def _check_args(args: argparse.Namespace) -> None:
    """What would fail the run, checked before the model loads and not after."""
    if args.rank < 1 or args.num_basis < 1 or args.steps < 1 or args.batch_size < 1:
        raise UsageError("--rank, --num-basis, --steps and --batch-size must be positive")
    if not 0 < args.lr <= 1:  # Adam's step is about lr: over 1 it only diverges
        raise UsageError(f"--lr must be in (0, 1], got {args.lr}")
    if not Path(args.data).is_file():
        raise UsageError(f"{args.data}: no such file (a JSONL of training examples)")
    if not Path(args.out).resolve().parent.is_dir() or Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: name a file in a folder that exists")
    if not math.isfinite(args.lora_alpha):
        raise UsageError(f"--lora-alpha must be a finite number, got {args.lora_alpha}")
    if not 0 <= args.seed < 2**63:  # the adapter's seed: the server refuses others
        raise UsageError(f"--seed must be in [0, 2^63 - 1], got {args.seed}")
    if not (args.device in ("auto", "cpu", "cuda") or args.device.startswith("cuda:")):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.register:  # the id's spelling; whether it is taken is asked of the server
        from nolaserve.adapters.errors import InvalidAdapterIdError
        from nolaserve.adapters.ids import check_new_adapter_id

        try:
            check_new_adapter_id(args.register, "")
        except InvalidAdapterIdError as e:
            raise UsageError(f"--register: {e}") from None
    from nolaserve.adapters.train_loop import read_records

    try:
        read_records(args.data)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_registration(client, args: argparse.Namespace) -> None:
    """``--register`` would be refused: the id taken (without ``--replace``), or the rank
    or the basis over the server's ``max_rank`` / ``max_num_basis``."""
    info = client.server_info()
    if args.rank > info.max_rank:
        raise UsageError(f"--rank {args.rank} is over the server's max_rank {info.max_rank}")
    if info.max_num_basis and args.num_basis > info.max_num_basis:
        raise UsageError(f"--num-basis {args.num_basis} is over the server's max_num_basis "
                         f"{info.max_num_basis}")
    if args.replace:
        return
    try:
        client.get_adapter(args.register)
    except NolaserveError as e:
        if e.code == "NOT_FOUND":
            return
        raise
    raise UsageError(f"--register {args.register}: the id is taken; pass --replace or "
                     "another id")


def equivalent_lora_bytes(adapter: NolaAdapter) -> int:
    """Bytes of the LoRA format v1 file holding the same factors (materialized, written)."""
    from nolaserve.adapters.lora import LoraAdapter

    lora = LoraAdapter(target_modules=list(adapter.target_modules),
                       module_shapes=dict(adapter.module_shapes),
                       num_layers=adapter.num_layers, factors=adapter.materialize(),
                       base_model=adapter.base_model, description=adapter.description)
    return len(lora.to_bytes())
