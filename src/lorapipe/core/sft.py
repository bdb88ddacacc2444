"""Supervised fine-tuning data: chat rows -> token ids with assistant-only labels -> packed batches.

Shared by `train` (and usable by `evaluate`): the loss is taken only on what the assistant says.
Every assistant turn's content plus the token that closes it (e.g. `<|im_end|>`) carry labels;
system/user turns and the template markup around turns are -100.

Why our own masking instead of `apply_chat_template(return_assistant_tokens_mask=True)`: that needs
`{% generation %}` markers in the template, which the templates shipped with SmolLM2/Qwen/Gemma lack.
We render the conversation prefix up to each assistant turn (`add_generation_prompt=True`) to learn
where the turn's content starts, and label tokens by their character offsets.

Batches are *packed*: the samples of a batch are concatenated into rows of at most cutoff_len tokens,
`position_ids` restarting at 0 for every sample and no attention mask. transformers (>= 4.54, here 5.24) detects
such packed rows from the position_ids and builds a block-diagonal causal mask for sdpa/eager, so
samples never attend to each other -- and no compute is spent on padding. The loss needs logits only
where a label follows, so the collator also passes a boolean `logits_to_keep` mask: the (large)
output head then runs on assistant positions only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorapipe.core.errors import LorapipeError
from lorapipe.core.io import iter_jsonl
from lorapipe.core.templates import END_OF_TURN_TOKENS, TEMPLATE_STOP, template_by_name

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------ template
def resolve_chat_template(tokenizer, folder: Path, fallback: str | None = None) -> str:
    """The chat template to train with: the model folder's own, else the named `fallback` template.

    Sets it on the tokenizer (so a saved tokenizer carries it) and returns it. No template at all is
    an error: without one we cannot know which tokens are the assistant's.
    """
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is what chat uses
        template = template.get("default")
    if not template and fallback:
        try:
            template = template_by_name(fallback)
        except ValueError as exc:
            raise LorapipeError(f"train.chat_template: {exc}") from None
    if not template:
        raise LorapipeError(
            f"{folder}: the base model has no chat template (no chat_template.jinja, none in tokenizer_config.json) "
            "and train.chat_template is null; set model.preset / model.chat_template for the base stage, or "
            "train.chat_template to one of: chatml, qwen, gemma"
        )
    tokenizer.chat_template = template
    return template


def stop_strings(tokenizer, generation_config=None, template_name: str | None = None) -> list[str]:
    """Strings that close an assistant turn: the template's stop token and the model's EOS token(s)."""
    stops: list[str] = []
    if template_name in TEMPLATE_STOP:
        stops.append(TEMPLATE_STOP[template_name])
    ids: list[int] = []
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(eos, int):
        ids.append(eos)
    elif isinstance(eos, (list, tuple)):
        ids.extend(eos)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    for token in tokenizer.convert_ids_to_tokens(ids):
        if token and token not in stops:
            stops.append(token)
    # Gemma's turn end is not its EOS; recognise the known turn-end markers when the vocabulary has them
    # (their order does not matter: a span ends at the nearest one).
    for marker in END_OF_TURN_TOKENS:
        if marker not in stops and marker in tokenizer.get_vocab():
            stops.append(marker)
    return stops


# ------------------------------------------------------------------------------------ encoding
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class EncodeReport:
    """What happened to the rows of one split (the counts go into metrics/train.json)."""

    path: str
    rows: int = 0
    truncated: int = 0  # longer than cutoff_len: cut at cutoff_len (still trained on)
    untrainable: int = 0  # no assistant token left inside cutoff_len: cannot train, counted here
    untrainable_lines: list[int] = field(default_factory=list)
    tokens: int = 0
    label_tokens: int = 0


def assistant_char_spans(tokenizer, messages: list[dict], stops: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages`; return the text and the (start, end) character span of each assistant turn.

    A span runs from the first character of the turn's content to the end of its closing stop token.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        if not text.startswith(prefix):
            raise LorapipeError(
                "the chat template renders a conversation prefix differently from the whole conversation, "
                "so assistant tokens cannot be located; use a prefix-stable template (train.chat_template)"
            )
        start = len(prefix)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        hits = [text.find(s, start) for s in stops]
        hits = [(h, len(s)) for h, s in zip(hits, stops) if h >= 0 and h < len(through)]
        end = min(h + n for h, n in hits) if hits else len(through)
        spans.append((start, end))
    return text, spans


def encode(tokenizer, messages: list[dict], cutoff_len: int, stops: list[str]) -> tuple[Example, bool]:
    """Token ids and assistant-only labels of one conversation, cut at cutoff_len; (example, truncated)."""
    text, spans = assistant_char_spans(tokenizer, messages, stops)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    span_i = 0
    for t, (s, e) in enumerate(enc["offset_mapping"]):
        while span_i < len(spans) and spans[span_i][1] <= s:
            span_i += 1
        if span_i == len(spans):
            break
        a, b = spans[span_i]
        if s < b and e > a and e > s:  # the token overlaps the assistant span
            labels[t] = ids[t]
    truncated = len(ids) > cutoff_len
    return Example(ids[:cutoff_len], labels[:cutoff_len]), truncated


def encode_file(path: Path, tokenizer, cutoff_len: int, stops: list[str], limit: int | None = None) -> tuple[list[Example], EncodeReport]:
    """Encode every row of a clean JSONL split. Rows that keep no assistant token are counted, not trained."""
    report = EncodeReport(path=str(path))
    examples: list[Example] = []
    for line in iter_jsonl(path):
        if limit is not None and report.rows >= limit:
            break
        if line.error:
            raise LorapipeError(f"{path}:{line.lineno}: {line.error}")
        row = line.value
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            raise LorapipeError(f"{path}:{line.lineno}: row has no 'messages' list (run the clean stage)")
        report.rows += 1
        try:
            example, truncated = encode(tokenizer, messages, cutoff_len, stops)
        except LorapipeError:
            raise
        except Exception as exc:  # a template that cannot render this row
            raise LorapipeError(f"{path}:{line.lineno}: cannot render with the chat template: {exc}") from None
        report.truncated += truncated
        n_labels = sum(1 for x in example.labels if x != IGNORE_INDEX)
        if n_labels == 0:
            report.untrainable += 1
            if len(report.untrainable_lines) < 20:
                report.untrainable_lines.append(line.lineno)
            continue
        report.tokens += len(example.input_ids)
        report.label_tokens += n_labels
        examples.append(example)
    return examples, report


# ------------------------------------------------------------------------------------ batching
class PackedCollator:
    """Pack a batch's samples into rows of at most `max_len` tokens (no cross-sample attention).

    Samples are placed longest first into the first row with room (first-fit decreasing), each
    with position_ids restarting at 0; rows are right-padded to the longest row, the padding being a
    block of its own that carries no label. Rows are capped because the attention mask is dense:
    its cost grows with the square of the row length, so one row of a whole batch of long samples
    would cost far more than it saves. Returns input_ids/labels/position_ids (rows, width) and
    `logits_to_keep`, a bool mask of the positions whose next token is labelled.
    Why not transformers' `DataCollatorWithFlattening`: one unbounded row, and no logits mask.
    """

    def __init__(self, max_len: int, pad_id: int = 0):
        self.max_len, self.pad_id = max_len, pad_id

    def __call__(self, features: list[Any]) -> dict[str, torch.Tensor]:
        samples = [(f.input_ids, f.labels) if isinstance(f, Example) else (f["input_ids"], f["labels"]) for f in features]
        rows: list[list[tuple[list[int], list[int]]]] = []
        room: list[int] = []
        for ids, labels in sorted(samples, key=lambda s: -len(s[0])):
            n = len(ids)
            r = next((i for i, free in enumerate(room) if free >= n), None)
            if r is None:
                rows.append([])
                room.append(self.max_len)
                r = len(rows) - 1
            rows[r].append((ids, labels))
            room[r] -= n
        width = max(sum(len(i) for i, _ in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        label_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for ids, labels in row:
                n = len(ids)
                input_ids[r, at : at + n] = torch.tensor(ids)
                # the first token of a sample is never a target (nothing before it in the sample)
                label_t[r, at + 1 : at + n] = torch.tensor(labels[1:], dtype=torch.long)
                pos[r, at : at + n] = torch.arange(n)
                at += n
            pos[r, at:] = torch.arange(width - at)  # padding: a block of its own
        keep = torch.zeros_like(label_t, dtype=torch.bool)
        keep[:, :-1] = label_t[:, 1:] != IGNORE_INDEX
        return {"input_ids": input_ids, "labels": label_t, "position_ids": pos, "logits_to_keep": keep}


class PaddedCollator:
    """Right-pad a batch to its longest sample, or to `pad_to` (the naive baseline pads to cutoff_len).

    Used for models whose attention does not understand packed position_ids (remote-code models).
    """

    def __init__(self, pad_id: int, pad_to: int | None = None):
        self.pad_id, self.pad_to = pad_id, pad_to

    def __call__(self, features: list[Any]) -> dict[str, torch.Tensor]:
        rows = [(f.input_ids, f.labels) if isinstance(f, Example) else (f["input_ids"], f["labels"]) for f in features]
        width = self.pad_to or max(len(i) for i, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (i, l) in enumerate(rows):
            ids[r, : len(i)] = torch.tensor(i)
            labels[r, 1 : len(l)] = torch.tensor(l[1:], dtype=torch.long)
            mask[r, : len(i)] = 1
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "logits_to_keep": keep}


# ------------------------------------------------------------------------------------ loss
def loss_sum(model, batch: dict[str, torch.Tensor], supports_keep: bool = True) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions and their count.

    With `supports_keep` the model projects only the kept positions onto the vocabulary
    (transformers' boolean `logits_to_keep` flattens them to (n, vocab)).
    """
    batch = dict(batch)
    labels = batch.pop("labels")
    keep = batch.pop("logits_to_keep")
    targets = labels[:, 1:][keep[:, :-1]]
    if supports_keep:
        logits = model(**batch, logits_to_keep=keep, use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1])
    else:
        logits = model(**batch, use_cache=False).logits[keep]
    loss = torch.nn.functional.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum")
    return loss, int(targets.numel())


@torch.no_grad()
def eval_loss(model, examples: list[Example], collator, batch_size: int, supports_keep: bool = True, device=None) -> float:
    """Token-weighted mean loss over assistant tokens of `examples` (same masking as training)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    # Longest first keeps the packed rows of similar size; order does not change a token-weighted mean.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        batch = collator([examples[i] for i in order[start : start + batch_size]])
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        loss, n = loss_sum(model, batch, supports_keep)
        total += float(loss)
        count += n
    if was_training:
        model.train()
    return total / count if count else math.nan
