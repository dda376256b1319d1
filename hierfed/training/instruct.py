"""Conversations (hierfed.data.instruct) tokenised for instruction tuning: loss on the response only.

Rendering: with the tokenizer's chat template when it has one (the prompt = the conversation before
the last message with the generation prompt added, which must be a prefix of the whole rendered
conversation; the response = the rest, the template's end-of-turn tokens included); otherwise the
plain template of hierfed.data.instruct, the prompt ending in `### Assistant:` and the response
followed by the tokenizer's end token (EOS, else SEP), the sequence opened by BOS (else CLS).

Labels: -100 (no loss) on the opening token and every prompt token, the token ids on the response.
Truncation to max_length never drops the response silently: the prompt is cut from the left first
(its end, next to the response, stays); only a response longer than max_length minus half the
prompt room is cut at its end (then no end token). Both cases are counted (`truncation`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hierfed.data import Example
from hierfed.data.instruct import plain_text
from hierfed.errors import HierfedError

PLAIN_RESPONSE_HEADER = "\n\n### Assistant:\n"


def render(tokenizer, messages: Sequence[tuple[str, str]]) -> tuple[str, str, bool]:
    """(prompt text, response text, whether the tokenizer's chat template wrote them)."""
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": r, "content": c} for r, c in messages]
        prompt = tokenizer.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(chat, tokenize=False)
        if not full.startswith(prompt):
            raise HierfedError("the tokenizer's chat template does not render the prompt as a prefix of the conversation, "
                               "so the response cannot be told apart; give model.tokenizer one that does")
        return prompt, full[len(prompt):], True
    return plain_text(tuple(messages[:-1])) + PLAIN_RESPONSE_HEADER, messages[-1][1], False


def _special(tokenizer, *names: str) -> list[int]:
    ids = [getattr(tokenizer, n, None) for n in names]
    return [next(i for i in ids if i is not None)] if any(i is not None for i in ids) else []


def encode(tokenizer, messages: Sequence[tuple[str, str]], max_length: int) -> tuple[list[int], list[int], str | None]:
    """(input ids, labels, None | "prompt" | "response": which part truncation cut)."""
    prompt, response, templated = render(tokenizer, messages)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    head = [] if templated else _special(tokenizer, "bos_token_id", "cls_token_id")
    tail = [] if templated else _special(tokenizer, "eos_token_id", "sep_token_id")
    room = max_length - len(head) - len(tail)
    cut = None
    if len(p) + len(r) > room:
        if len(r) < room:  # the response fits: keep the prompt's end
            p, cut = p[len(p) - (room - len(r)):], "prompt"
        else:  # the response alone is too long: half the room for the prompt's end, the rest for the response
            keep = min(len(p), room // 2)
            p, r, tail, cut = p[len(p) - keep:] if keep else [], r[: max_length - len(head) - keep], [], "response"
    ids = head + p + r + tail
    labels = [-100] * (len(head) + len(p)) + r + tail
    return ids, labels, cut


def _conversation(e: Example) -> tuple[tuple[str, str], ...]:
    if e.messages is None:
        raise HierfedError("an instruction task's record has no conversation (messages); every record of a chat-format task needs one")
    return e.messages


def tokenize_conversations(tokenizer, examples: Sequence[Example], max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels) of conversations, right-padded to the longest (at most max_length)."""
    encoded = [encode(tokenizer, _conversation(e), max_length) for e in examples]
    width = max(len(ids) for ids, _, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for i, (ids, lab, _) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return input_ids, mask, labels


def truncation(tokenizer, examples: Sequence[Example], max_length: int) -> dict[str, int]:
    """How many conversations truncation shortened: records, prompt_truncated, response_truncated."""
    cuts = [encode(tokenizer, _conversation(e), max_length)[2] for e in examples]
    return {"records": len(cuts), "prompt_truncated": cuts.count("prompt"), "response_truncated": cuts.count("response")}
