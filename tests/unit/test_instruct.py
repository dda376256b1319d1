"""Instruction tuning: the three JSONL formats, the prompt mask against a hand-built one (plain
template and a chat template), truncation that keeps the response and is counted."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hierfed.config import ModelConfig
from hierfed.data import DataConfig, Example, load_data
from hierfed.errors import HierfedError
from hierfed.model import load_tokenizer
from hierfed.training import tokenize
from hierfed.training.evaluate import per_example
from hierfed.training.instruct import encode, truncation

SAMPLE = "tests/data/instruct.jsonl"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(source="gpt2"))  # MiniLM's WordPiece, no chat template


def _write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_the_three_formats_become_conversations(tmp_path):
    task = load_data(DataConfig(source="instruct", path=_write(tmp_path, [
        {"instruction": "Add.", "input": "1 and 2", "output": "3", "client": "a"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"prompt": "p?", "response": "r."},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "x"}]},
    ]), eval_path=_write(tmp_path, [{"prompt": "q", "response": "a"}], "e.jsonl")))
    assert task.kind == "causal_lm" and task.labels is None
    assert [e.messages for e in task.train] == [
        (("user", "Add.\n\n1 and 2"), ("assistant", "3")), (("user", "Say hi."), ("assistant", "hi")),
        (("user", "p?"), ("assistant", "r.")), (("system", "s"), ("user", "u"), ("assistant", "x"))]
    assert task.train[0].client == "a" and task.train[0].text == "### User:\nAdd.\n\n1 and 2\n\n### Assistant:\n3"
    assert task.eval[0].messages == (("user", "q"), ("assistant", "a"))


@pytest.mark.parametrize("row, match", [
    ({"instruction": "x"}, "line 1: 'output' must be a non-empty string"),
    ({"prompt": "x", "response": ""}, "'response' must be a non-empty string"),
    ({"messages": [{"role": "user", "content": "x"}]}, "the last message must be the assistant's"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\] must be"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "needs a prompt"),
    ({"text": "x"}, "no 'instruction'/'output', 'prompt'/'response' or 'messages'"),
    ("[1]", "must be a JSON object"),
])
def test_bad_records_are_one_line_errors(tmp_path, row, match):
    with pytest.raises(HierfedError, match=match) as info:
        load_data(DataConfig(source="instruct", path=_write(tmp_path, [row])))
    assert "\n" not in str(info.value)


def test_plain_template_mask_matches_a_hand_built_one(tok):
    ids, labels, cut = encode(tok, (("user", "What is two plus three?"), ("assistant", "Five.")), 64)
    assert tok.convert_ids_to_tokens(ids) == [
        "[CLS]", "#", "#", "#", "user", ":", "what", "is", "two", "plus", "three", "?",
        "#", "#", "#", "assistant", ":", "five", ".", "[SEP]"]
    hand = [False] * 17 + [True] * 3  # the response "five", "." and the end token are trained
    assert labels == [i if keep else -100 for i, keep in zip(ids, hand)] and cut is None


def test_chat_template_mask_covers_exactly_the_response(tok):
    chat = copy.deepcopy(tok)
    chat.chat_template = ("{% for m in messages %}[CLS] {{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
                          "{% if add_generation_prompt %}[CLS] assistant : {% endif %}")
    ids, labels, _ = encode(chat, (("system", "be brief"), ("user", "colour?"), ("assistant", "Red.")), 64)
    tokens = chat.convert_ids_to_tokens(ids)
    assert tokens == ["[CLS]", "system", ":", "be", "brief", "[SEP]", "[CLS]", "user", ":", "colour", "?",
                      "[SEP]", "[CLS]", "assistant", ":", "red", ".", "[SEP]"]
    assert labels == [-100] * 15 + ids[15:]  # the template's own end-of-turn token is trained too


def test_truncation_keeps_the_response_and_counts(tok):
    long_prompt = " ".join(["word"] * 40)
    ids, labels, cut = encode(tok, (("user", long_prompt), ("assistant", "the answer is short .")), 16)
    assert cut == "prompt" and len(ids) == 16
    assert tok.convert_ids_to_tokens(ids)[-11:] == ["#", "#", "#", "assistant", ":", "the", "answer", "is", "short", ".", "[SEP]"]
    assert ids[0] == tok.cls_token_id and sum(x != -100 for x in labels) == 6  # 5 response tokens + [SEP]
    long_answer = " ".join(["yes"] * 40)
    ids, labels, cut = encode(tok, (("user", "q"), ("assistant", long_answer)), 16)
    assert cut == "response" and len(ids) == 16 and ids[-1] != tok.sep_token_id  # cut: no end token
    prompt_tokens = len(tok("### User:\nq\n\n### Assistant:\n", add_special_tokens=False)["input_ids"])
    assert sum(x == -100 for x in labels) == 1 + min(prompt_tokens, 15 // 2)
    examples = [Example("", messages=m) for m in ((("user", long_prompt), ("assistant", "a")),
                                                  (("user", "q"), ("assistant", long_answer)), (("user", "q"), ("assistant", "a")))]
    assert truncation(tok, examples, 16) == {"records": 3, "prompt_truncated": 1, "response_truncated": 1}


def test_sample_file_tokenises_and_scores_responses_only(tok):
    task = load_data(DataConfig(source="instruct", path=SAMPLE, eval_fraction=0.25))
    assert len(task.train) + len(task.eval) == 16
    data = tokenize(tok, task.train, task.kind, 48)
    assert data.input_ids.shape[0] == len(task.train) and data.input_ids.shape[1] <= 48
    assert (data.labels[data.attention_mask == 0] == -100).all()
    for i, e in enumerate(task.train):
        _ids, labels, _ = encode(tok, e.messages, 48)
        assert data.labels[i, : len(labels)].tolist() == labels

    vocab = len(tok)

    class Uniform(torch.nn.Module):  # every token equally likely: each scored target costs log(vocab)
        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, vocab))

    loss, count, _ = per_example(Uniform(), data, "causal_lm", 4, "cpu")
    responses = [sum(x != -100 for x in encode(tok, e.messages, 48)[1]) for e in task.train]
    assert count.tolist() == responses  # the response tokens (and end token) only, never the prompt
    assert np.allclose(loss, count * np.log(vocab))


def test_a_chat_template_that_hides_the_prompt_stops_hierfed_run(tmp_path, tok):
    bad = copy.deepcopy(tok)  # renders only the last message: the prompt is no prefix of the conversation
    bad.chat_template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %} ->{% endif %}"
    bad.save_pretrained(tmp_path / "tok")
    from conftest import hierfed

    res = hierfed("run", "--set", "model.source=gpt2", "--set", f"model.tokenizer={tmp_path / 'tok'}",
                  "--set", "data.source=instruct", "--set", f"data.path={SAMPLE}", timeout=120)
    assert res.returncode == 2 and "launching" not in res.stdout
    assert [line for line in res.stderr.splitlines() if line.strip()] == [
        ("hierfed: error: the tokenizer's chat template does not render the prompt as a prefix of the conversation, "
         "so the response cannot be told apart; give model.tokenizer one that does")]
