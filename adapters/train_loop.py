"""Training data and a plain torch loop for NOLA adapters (``nolaserve train-nola``).

An example is a prompt and a completion, tokenized the way the server tokenizes a request
(``server/convert.py``): the prompt alone, or chat messages rendered with the chat template
and a generation prompt, then the completion's tokens appended (and EOS, so the served
adapter stops). The loss covers the completion tokens only.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

IGNORE = -100  # label of tokens without loss (prompt, padding)


@dataclass
class Example:
    """``input_ids = prompt + completion``; ``labels`` is ``IGNORE`` over the prompt."""

    input_ids: list[int]
    labels: list[int]


def encode(tokenizer, prompt: str | None = None, completion: str = "", *,
           messages: list[dict] | None = None, add_eos: bool = True) -> Example:
    """One example from a prompt and completion, or from chat ``messages`` whose last one is
    the assistant's answer (the completion). Raises ``ValueError`` on a bad record."""
    if messages is not None:
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("messages must end with the assistant's answer")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template: use prompt/completion")
        text = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                             tokenize=False)
        prompt_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        completion = messages[-1].get("content", "")
    elif prompt is None:
        raise ValueError("an example needs prompt and completion, or messages")
    else:
        prompt_ids = list(tokenizer(prompt)["input_ids"])
    target = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        target.append(tokenizer.eos_token_id)
    if not target:
        raise ValueError("the completion is empty")
    return Example(prompt_ids + target, [IGNORE] * len(prompt_ids) + target)


def load_jsonl(path: str | Path, tokenizer, add_eos: bool = True
               ) -> list[Example]:
    """Examples from a JSONL file of ``{"prompt", "completion"}`` or ``{"messages"}``
    records. Raises ``ValueError`` naming the line of a bad record."""
    examples = []
    for where, (prompt, completion, messages) in read_records(path):
        try:
            examples.append(encode(tokenizer, prompt, completion, messages=messages,
                                   add_eos=add_eos))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return examples


def read_records(path: str | Path) -> list[tuple[str, tuple[str | None, str, list | None]]]:
    """Each record of a JSONL file, where it is (``path:line``) and its prompt, completion
    and messages; ``ValueError`` naming the line of one that is not a record (no tokenizer
    needed: ``train-nola`` reads them before the model loads)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((f"{path}:{n}", _fields(json.loads(line))))
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {e}") from None
    if not records:
        raise ValueError(f"{path}: no examples")
    return records


def _fields(record: object) -> tuple[str | None, str, list[dict] | None]:
    """A record's prompt, completion and messages; ``ValueError`` saying what it lacks."""
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        if not (isinstance(messages, list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages)):
            raise ValueError('"messages" must be a list of {"role": ..., "content": ...} '
                             "with string values")
        return None, "", messages
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) \
            and isinstance(record.get("completion"), str):
        return record["prompt"], record["completion"], None
    keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
    raise ValueError('an example needs "prompt" and "completion" (strings), or "messages"; '
                     f"got {keys}")


def collate(examples: list[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` ``[B, S]``."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = (
            torch.tensor(e.input_ids), torch.tensor(e.labels), 1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(examples: list[Example], batch_size: int, seed: int = 0
            ) -> Iterable[list[Example]]:
    """Endless shuffled batches, each epoch in a new order drawn from ``seed``."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield [examples[j] for j in order[i:i + batch_size]]


def fit(model: nn.Module, examples: list[Example], *, steps: int, lr: float = 1e-2,
        batch_size: int = 8, seed: int = 0, pad_id: int = 0,
        on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW on the model's trainable parameters for ``steps`` batches; returns the loss
    of each step. ``on_step(step, loss)`` is called after each (a progress bar)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: call make_trainable first")
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be positive")
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    was_training = model.training
    model.train()
    losses = []
    try:
        for step, batch in zip(range(steps), batches(examples, batch_size, seed)):
            inputs = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
            loss = model(**inputs).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        model.train(was_training)
    return losses
