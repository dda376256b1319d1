"""A few generations from the final model of a causal-LM task, written to samples.txt: a look at
what the numbers mean (greedy decoding, so the file is the same for the same model)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from transformers import GenerationMixin

from hierfed.data import Example
from hierfed.training.instruct import render

PROMPT_TOKENS = 12  # plain text: the record's first tokens are the prompt
NEW_TOKENS = 32


def pick(examples: Sequence[Example], n: int) -> list[Example]:
    """Up to n eval examples, one group after another (the first of each group, then the second...)."""
    by_group: dict[str | None, list[Example]] = {}
    for e in examples:
        by_group.setdefault(e.group, []).append(e)
    out: list[Example] = []
    for i in range(max(map(len, by_group.values()), default=0)):
        out += [g[i] for g in by_group.values() if i < len(g)]
    return out[:n]


@torch.no_grad()
def write_samples(model: torch.nn.Module, tokenizer, examples: Sequence[Example], path: Path, n: int = 4) -> None:
    """Per sample: the prompt (an instruction record's rendered prompt, or a record's first
    PROMPT_TOKENS tokens), the model's greedy continuation and the reference (response or rest)."""
    if not isinstance(model, (PeftModel, GenerationMixin)):
        raise TypeError(f"write_samples needs a generative model (a causal LM, optionally PEFT-wrapped); got {type(model).__name__}")
    model.eval()
    device = next(model.parameters()).device
    blocks = []
    for k, e in enumerate(pick(examples, n), start=1):
        if e.messages is not None:
            prompt_text, reference, _ = render(tokenizer, e.messages)
            ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(e.text, add_special_tokens=False)["input_ids"]
            ids, rest = ids[:PROMPT_TOKENS], ids[PROMPT_TOKENS:]
            prompt_text, reference = tokenizer.decode(ids), tokenizer.decode(rest[:NEW_TOKENS])
        x = torch.tensor([ids or [tokenizer.pad_token_id]], device=device)
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        generated = tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True)
        blocks.append(f"### sample {k}" + (f" (group {e.group})" if e.group else "") +
                      f"\nprompt:    {prompt_text.strip()}\nmodel:     {generated.strip()}\nreference: {reference.strip()}\n")
    path.write_text("\n".join(blocks))
