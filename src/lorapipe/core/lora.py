"""lora.target as peft's target_modules: the one rule the train stage and its precision probe share."""

from __future__ import annotations

from lorapipe.core.errors import LorapipeError


def target_modules(model, target: str | list[str]) -> str | list[str]:
    """peft target_modules for lora.target: 'all' = every nn.Linear but the output head.

    A named module that the model does not have is an error listing the names it does have
    (peft's own error does not list them).
    """
    import torch

    head = model.get_output_embeddings()
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and m is not head})
    if target == "all":
        return "all-linear"  # peft's spelling of the same rule (it skips the output layer)
    names = [t.strip() for t in target.split(",")] if isinstance(target, str) else list(target)
    missing = [n for n in names if n not in linear]
    if missing or not names:
        raise LorapipeError(
            f"lora.target: {', '.join(missing) or '(empty)'} matches no linear module of the base model; "
            f"its linear modules are: {', '.join(linear)} (or use 'all')"
        )
    return names
