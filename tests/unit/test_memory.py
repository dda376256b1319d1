"""hierfed.placement.memory and .plan: exact parameter counts from the meta skeleton, the estimate by hand, `auto`
against budgets built from the estimator's own totals, and `hierfed topology plan|validate`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, hierfed, job_env, topology_cli
from hierfed.config import ModelConfig, RunConfig, SplitConfig, TrainConfig
from hierfed.data import DataConfig
from hierfed.errors import HierfedError
from hierfed.placement import memory, plan
from hierfed.topology import parse_topology

GPT2_SMALL = RunConfig(model=ModelConfig(source="gpt2", size="small"), data=DataConfig(source="corpus"))
CAUSAL = ("causal_lm", None)


def topology(*devices: dict):
    """One edge with these device groups, as a Placement."""
    return parse_topology({"edges": [{"devices": list(devices)}]}, "t.yaml").placement()


def gb_between(lo: int, hi: int) -> float:
    return (lo + hi) / 2 / memory.GB


# ------------------------------------------------------------------ exact parameter counts ---


@pytest.mark.parametrize("source, kind, num_labels", [("gpt2", "causal_lm", None), ("gpt2", "classification", 4),
                                                      ("llama", "causal_lm", None)])
def test_meta_skeleton_counts_equal_the_real_model(source: str, kind: str, num_labels: int | None) -> None:
    from hierfed.model import build_model

    cfg = RunConfig(model=ModelConfig(source=source))  # tiny
    real = build_model(cfg.model, cfg.peft, kind, num_labels, seed=0).model
    meta = memory.skeleton(cfg, kind, num_labels)
    described = lambda m: [(n, p.numel(), p.requires_grad, p.dtype) for n, p in m.named_parameters()]  # noqa: E731
    assert described(meta) == described(real)
    assert all(p.device.type == "meta" for p in meta.parameters())
    # the parts cover every parameter exactly once
    s = memory.shape(cfg, kind, num_labels)
    total = s.embed + sum(s.blocks, memory.Part()) + s.head
    assert total.frozen == sum(p.numel() for p in real.parameters() if not p.requires_grad)
    assert total.trainable == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert len(s.blocks) == 2 and len(set(s.blocks)) == 1  # identical blocks


@pytest.mark.parametrize("source, kind, num_labels, method, dtype", [
    ("gpt2", "causal_lm", None, "none", "float32"), ("minilm", "classification", 4, "none", "bfloat16"),
    ("llama", "causal_lm", None, "lora", "bfloat16")])
def test_meta_skeleton_layout_for_full_fine_tuning_and_16_bit(source, kind, num_labels, method, dtype) -> None:
    """peft.method none (every parameter trains) and 16-bit frozen weights: the skeleton is the real
    model's layout (a split device takes the vector's layout from it) and dtypes (the plan prices them)."""
    from hierfed.config import PeftConfig
    from hierfed.model import FlatView, build_model

    cfg = RunConfig(model=ModelConfig(source=source, dtype=dtype), peft=PeftConfig(method=method))
    real = build_model(cfg.model, cfg.peft, kind, num_labels, seed=0).model
    meta = memory.skeleton(cfg, kind, num_labels)
    assert FlatView(meta).manifest() == FlatView(real).manifest()
    assert [(n, p.dtype) for n, p in meta.named_parameters()] == [(n, p.dtype) for n, p in real.named_parameters()]


def test_estimate_by_hand() -> None:
    """GPT-2 tiny, causal LM, LoRA r=8 on c_attn, batch 4 in 2 micro-batches of 2 x 8 tokens, k=1."""
    cfg = RunConfig(model=ModelConfig(source="gpt2", max_length=8), data=DataConfig(source="corpus"),
                    train=TrainConfig(batch_size=4), split=SplitConfig(micro_batches=2))
    s = memory.shape(cfg, *CAUSAL)
    assert (s.hidden, s.heads, s.ffn, s.outputs) == (64, 4, 256, 30522)  # vocab: MiniLM's tokenizer
    # embeddings: wte 30522*64 = 1,953,408 + wpe 128*64 = 8,192 (n_positions = max(128, 8))
    assert s.embed.frozen == 1_961_600 and s.embed.trainable == 0
    # one block: ln_1 128 + c_attn 64*192+192 = 12,480 + attn.c_proj 64*64+64 = 4,160 + ln_2 128
    #            + c_fc 64*256+256 = 16,640 + mlp.c_proj 256*64+64 = 16,448             = 49,984
    # LoRA on c_attn: A 8*64 = 512 + B 192*8 = 1,536                                    =  2,048
    assert (s.blocks[0].frozen, s.blocks[0].trainable) == (49_984, 2_048)
    e = memory.estimate(cfg, *CAUSAL, k=1)
    assert e.frozen == (1_961_600 + 49_984) * 4 == 8_046_336
    assert e.adapter == e.gradients == 2_048 * 4 == 8_192
    assert e.optimizer == 2 * 8_192  # AdamW: m and v in fp32
    # activations, per micro-batch (b=2, t=8, h=64, a=4, f=256), Korthikanti in 16-bit:
    #   t*b*h*(15 + 4f/h) + 5*a*t*t*b = 1024*31 + 2,560 = 34,304; fp32: 68,608
    #   + boundary activations 4*2*8*64 = 4,096 -> 72,704; two micro-batches alive -> 145,408
    assert e.activations == 145_408
    assert e.total == 8_046_336 + 8_192 + 16_384 + 8_192 + 145_408 == 8_224_512

    sgd = cfg.model_copy(update={"train": TrainConfig(batch_size=4, optimizer="sgd", momentum=0.9)})
    assert memory.estimate(sgd, *CAUSAL, k=1).optimizer == 8_192
    plain = cfg.model_copy(update={"train": TrainConfig(batch_size=4, optimizer="sgd")})
    assert memory.estimate(plain, *CAUSAL, k=1).optimizer == 0


def test_link_bytes_by_hand() -> None:
    cfg = RunConfig(model=ModelConfig(source="gpt2", max_length=8), data=DataConfig(source="corpus"),
                    train=TrainConfig(batch_size=4),
                    split=SplitConfig(micro_batches=2, activation_codec="fp16", gradient_codec="int8"))
    # per micro-batch (2 x 8 tokens x 64): up = 2*8*64*2 (fp16) + mask 2*8*8 + labels 2*8*8 = 2,304
    #                                       down = 2*8*64*1 (int8) + a float32 scale per token 2*8*4 = 1,088
    assert memory.link_bytes(cfg, 1) == (2 * 2_304, 2 * 1_088)  # kind read from the data: corpus
    assert memory.link_bytes(cfg, None) == (0, 0)
    cls = cfg.model_copy(update={"data": DataConfig(source="topics")})
    assert memory.link_bytes(cls, 1)[0] == 2 * (2_048 + 128 + 2 * 8)  # labels: one int64 per sequence


def test_micro_batching_follows_torch_chunk() -> None:
    def mb(b: int, m: int) -> tuple[int, int]:
        return memory.micro_batching(RunConfig(train=TrainConfig(batch_size=b), split=SplitConfig(micro_batches=m)))

    assert mb(16, 4) == (4, 4) and mb(10, 4) == (3, 4) and mb(10, 6) == (2, 5) and mb(2, 8) == (1, 2)


# ------------------------------------------------------------------------------ auto ---


def test_auto_picks_the_largest_k_that_fits() -> None:
    est = {k: memory.estimate(GPT2_SMALL, *CAUSAL, k).total for k in (1, 2, 3, None)}
    assert est[1] < est[2] < est[3] < est[None]
    budgets = [gb_between(est[2], est[3]), gb_between(est[3], est[None]), est[2] / memory.GB,
               gb_between(est[1], est[2]), est[None] / memory.GB * 1.01]
    p = topology(*({"split_layers": "auto", "memory_gb": g} for g in budgets))
    rows = plan.plan(p, GPT2_SMALL, *CAUSAL)
    assert [r.k for r in rows] == [2, 3, 2, 1, None]  # a budget equal to the total fits
    assert all(r.fits for r in rows)
    assert rows[0].why == f"k=2: 3 blocks would need {memory.human(est[3])} > {memory.human(budgets[0] * memory.GB)}"
    assert rows[1].why.startswith("k=3: the whole model would need")
    assert rows[4].why.startswith("whole model fits") and rows[4].up == rows[4].down == 0
    assert plan.resolve_split(p, GPT2_SMALL, *CAUSAL) == {r.rank: r.k for r in rows} == {2: 2, 3: 3, 4: 2, 5: 1, 6: None}


def test_auto_impossible_budget_is_an_error() -> None:
    one = memory.estimate(GPT2_SMALL, *CAUSAL, 1).total
    p = topology({"memory_gb": 16}, {"split_layers": "auto", "memory_gb": one * 0.99 / memory.GB})
    with pytest.raises(HierfedError, match=r"^t\.yaml: edge0/d1: split_layers auto: not even 1 block fits in .*"
                                           rf"\(embeddings \+ 1 block need {memory.human(one)}\)$"):
        plan.plan(p, GPT2_SMALL, *CAUSAL)


# ------------------------------------------------------------------------- integer k ---


def test_integer_k_out_of_range_is_rejected() -> None:
    for k in (4, 9):  # gpt2 small has 4 blocks: k must be 1..3
        with pytest.raises(HierfedError, match=rf"edge0/d0: split_layers: {k} is out of range: .* 4 blocks, so k must be 1\.\.3"):
            plan.plan(topology({"split_layers": k}), GPT2_SMALL, *CAUSAL)
    with pytest.raises(HierfedError, match="must be an integer >= 1"):  # k < 1: the schema already says no
        topology({"split_layers": 0})
    with pytest.raises(HierfedError, match="out of range"):
        memory.estimate(GPT2_SMALL, *CAUSAL, 0)


def test_configured_k_that_does_not_fit_is_a_warning_row() -> None:
    rows = plan.plan(topology({"split_layers": 3, "memory_gb": 0.001}, {"split_layers": 1}), GPT2_SMALL, *CAUSAL)
    assert [r.k for r in rows] == [3, 1]
    assert not rows[0].fits and "does not fit" in rows[0].why and "(warning)" in rows[0].why
    assert rows[1].fits and rows[1].why.startswith("k=1 as configured (fits: ")


# ------------------------------------------------------------------------------- CLI ---


def test_plan_prints_k_and_why_per_device(tmp_path, write_yaml, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_yaml("run.yaml", {"model": {"source": "gpt2", "size": "small"}, "data": {"source": "corpus"}})
    est = {k: memory.estimate(GPT2_SMALL, *CAUSAL, k).total for k in (2, 3)}
    topo = write_yaml("topo.yaml", {"edges": [{"devices": [
        {"split_layers": "auto", "memory_gb": gb_between(est[2], est[3])},
        {"split_layers": 1, "memory_gb": 4}, {"memory_gb": 8}]}]})
    code, out = topology_cli(capsys, "plan", topo, "--config", run)
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("topo: 1 cloud + 1 edge")
    assert "gpt2 small (causal_lm), 4 blocks" in lines[1]
    header = lines[2].split()
    assert header == ["device", "rank", "memory", "split", "k", "estimate", "up/step", "down/step", "why"]
    devices = lines[3:6]
    rows = {line.split()[0]: line for line in devices}
    assert rows["edge0/d0"].split()[4:6] == ["auto", "2"] and "k=2: 3 blocks would need" in rows["edge0/d0"]
    assert rows["edge0/d1"].split()[4:6] == ["1", "1"] and "k=1 as configured (fits:" in rows["edge0/d1"]
    assert rows["edge0/d2"].split()[4:6] == ["all", "all"] and "whole model (" in rows["edge0/d2"]
    col = lines[2].index("why")  # aligned: every row's why starts under the header's
    assert [line[col - 1:col + 2] for line in devices] == [" k=", " k=", " wh"]
    # then the edge: it trains blocks [1, 4) + head (the smallest k of its split devices) on one rank
    assert lines[6] == "" and lines[7].split()[:6] == ["edge", "ranks", "memory", "per", "rank", "host/rank"]
    edge = memory.edge_estimate(GPT2_SMALL, *CAUSAL, 1, 1, None, 2)[0].total  # a copy of the upper stage per split device
    assert lines[8].split()[:4] == ["edge0", "1", "-", memory.human(edge).split()[0]] and lines[8].endswith("blocks 1-3 + head for 2 split devices")

    code, out = topology_cli(capsys, "validate", topo, "--config", run)
    assert code == 0 and out.strip().endswith("split: edge0/d0 k=2, edge0/d1 k=1")


def test_validate_rejects_an_impossible_budget(write_yaml) -> None:
    run = write_yaml("run.yaml", {"model": {"source": "gpt2"}, "data": {"source": "corpus"}})
    topo = write_yaml("topo.yaml", {"edges": [{"devices": [{"memory_gb": 4}, {"split_layers": "auto", "memory_gb": 0.001}]}]})
    r = hierfed("topology", "validate", topo, "--config", run, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"hierfed: error: {topo}: edge0/d1: split_layers auto: not even 1 block fits in 1.0 MB")


def test_validate_rejects_an_edge_group_whose_auto_devices_all_train_whole(write_yaml, capsys) -> None:
    """`auto` on devices the whole model fits resolves to the whole model: a 2-rank edge that would
    serve only them has nothing to train (hierfed run checks the same before launch)."""
    run = write_yaml("run.yaml", {"model": {"source": "gpt2"}, "data": {"source": "corpus"}})
    topo = write_yaml("topo.yaml", {"edges": [{"ranks": 2, "devices": [{"split_layers": "auto", "memory_gb": 16}]}]})
    with pytest.raises(HierfedError, match=r"edge 'edge0' has ranks: 2, but the whole model fits each of its split_layers: auto devices"):
        topology_cli(capsys, "validate", topo, "--config", run)
    topo = write_yaml("topo2.yaml", {"edges": [{"ranks": 2, "devices": [{"split_layers": "auto", "memory_gb": 16}, {"split_layers": 1}]}]})
    code, out = topology_cli(capsys, "validate", topo, "--config", run)
    assert code == 0 and out.strip().endswith("split: edge0/d0 k=all, edge0/d1 k=1")


def test_validate_without_split_does_not_import_torch(write_yaml) -> None:
    topo = write_yaml("topo.yaml", {"edges": [{"devices": [{"memory_gb": 0.001}, {"ranks": 2}]}]})
    run = write_yaml("run.yaml", {"model": {"source": "gpt2"}})
    code = ("import sys; from hierfed.cli import main; "
            f"rc = main(['topology', 'validate', {topo!r}, '--config', {run!r}]); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: topo: 1 cloud + 1 edge × (1 + 3 devices) = 5 ranks")


# ------------------------------------------------------------------ training edges ---


def test_edge_estimate_by_hand() -> None:
    """GPT-2 tiny, causal LM, AdamW, batch 4 in 2 micro-batches of 2 x 8 tokens: an edge training
    blocks [1, 2) + head one micro-batch at a time, and ZeRO over 2 ranks dividing what it shards."""
    cfg = RunConfig(model=ModelConfig(source="gpt2", max_length=8), data=DataConfig(source="corpus"),
                    train=TrainConfig(batch_size=4), split=SplitConfig(micro_batches=2))
    s = memory.shape(cfg, *CAUSAL)
    assert s.tied.frozen == 30522 * 64  # GPT-2's LM head is the token embedding matrix: the edge holds it too
    part = s.blocks[1] + s.head + s.tied
    act = memory.block_activation_bytes(s, 2, 8) + 4 * 2 * 8 * 64 + 2 * 4 * 2 * 8 * 30522
    plain, host = memory.edge_estimate(cfg, *CAUSAL, 1, 1, None)
    assert (plain.frozen, plain.adapter, plain.gradients, plain.optimizer, plain.activations, host) == (
        part.frozen_bytes, part.trainable_bytes, part.trainable_bytes, 8 * part.trainable, act, 0)
    from hierfed.model import build_model
    from hierfed.model.cut import prune_for_edge

    real = build_model(cfg.model, cfg.peft, "causal_lm", None, seed=0).model  # what an edge really holds
    prune_for_edge(real, 1)
    held = {id(p): p for p in real.parameters()}.values()  # a tied matrix once
    assert plain.frozen == sum(p.numel() * p.element_size() for p in held if not p.requires_grad)
    assert plain.adapter == sum(p.numel() * p.element_size() for p in held if p.requires_grad)
    state = (8 + 4) * part.trainable  # AdamW m, v and DeepSpeed's fp32 master copy
    z1, _ = memory.edge_estimate(cfg, *CAUSAL, 1, 2, (1, False))
    z2, _ = memory.edge_estimate(cfg, *CAUSAL, 1, 2, (2, False))
    z3, _ = memory.edge_estimate(cfg, *CAUSAL, 1, 2, (3, False))
    assert (z1.optimizer, z1.gradients, z1.frozen) == (state // 2, part.trainable_bytes, part.frozen_bytes)
    assert (z2.optimizer, z2.gradients, z2.frozen) == (state // 2, part.trainable_bytes // 2, part.frozen_bytes)
    assert (z3.frozen, z3.adapter) == (part.frozen_bytes // 2, part.trainable_bytes // 2)
    off, host = memory.edge_estimate(cfg, *CAUSAL, 1, 2, (2, True))
    assert (off.optimizer, host) == (0, state // 2 + 4 * part.trainable // 2)  # + the fp32 gradient partition
    # its own client: the whole model on a ceil(4 / 2) = 2-sequence slice of every batch
    whole, _ = memory.edge_estimate(cfg, *CAUSAL, None, 2, (2, False))
    assert whole.frozen == (s.embed + s.blocks[0] + s.blocks[1] + s.head).frozen_bytes
    assert whole.activations == 2 * memory.block_activation_bytes(s, 2, 8) + 2 * 4 * 2 * 8 * 30522


def test_plan_prices_zero_edge_groups(tmp_path, write_yaml, capsys: pytest.CaptureFixture[str]) -> None:
    """`topology plan` on 2-rank edges under ZeRO-3: one row per training edge, per rank below one plain rank."""
    run = write_yaml("run.yaml", {"model": {"source": "gpt2", "size": "small"}, "data": {"source": "corpus"},
                                  "train": {"batch_size": 8}, "deepspeed": {"enabled": True, "zero_stage": 3}})
    topo = write_yaml("topo.yaml", {"edges": [{"ranks": 2, "devices": [{"ranks": 2, "split_layers": 2}]},
                                              {"ranks": 2, "train_locally": True, "devices": [{"ranks": 1}]},
                                              {"devices": [{"ranks": 1}]}]})
    code, out = topology_cli(capsys, "plan", topo, "--config", run)
    edges = out.split("\n\n")[1].splitlines()
    assert code == 0 and len(edges) == 3  # the header, edge0 and edge1; edge2 only aggregates
    cfg = RunConfig.model_validate({"model": {"source": "gpt2", "size": "small"}, "data": {"source": "corpus"},
                                    "train": {"batch_size": 8}, "deepspeed": {"enabled": True, "zero_stage": 3}})
    for line, k in zip(edges[1:], (2, None)):
        # one plain rank keeps a copy of the upper stage per split device (2 here), docs/split.md
        per_rank, single = memory.edge_estimate(cfg, *CAUSAL, k, 2, (3, False))[0], memory.edge_estimate(cfg, *CAUSAL, k, 1, None, 2 if k else 1)[0]
        assert per_rank.total < single.total
        assert line.split()[2:8] == ["-", *memory.human(per_rank.total).split(), "-", *memory.human(single.total).split()]
        assert "ZeRO-3 over 2 ranks" in line
    assert edges[1].endswith("blocks 2-3 + head for 2 split devices") and edges[2].endswith("its own client (whole model)")


def test_edge_memory_budget_is_checked(write_yaml, capsys) -> None:
    """`memory_gb` on an edge: its rows say whether one rank's share fits; validate warns on stderr."""
    run = write_yaml("run.yaml", {"model": {"source": "gpt2", "size": "small"}, "data": {"source": "corpus"},
                                  "deepspeed": {"enabled": True, "zero_stage": 3}})
    cfg = RunConfig.model_validate({"model": {"source": "gpt2", "size": "small"}, "data": {"source": "corpus"}})
    need = memory.edge_estimate(cfg, *CAUSAL, None, 2, (3, False))[0].total
    topo = write_yaml("topo.yaml", {"edges": [
        {"name": "small", "ranks": 2, "memory_gb": 0.5 * need / memory.GB, "train_locally": True, "devices": [{}]},
        {"name": "large", "ranks": 2, "memory_gb": 2 * need / memory.GB, "train_locally": True, "devices": [{}]}]})
    code, out = topology_cli(capsys, "plan", topo, "--config", run)
    rows = {line.split()[0]: line for line in out.split("\n\n")[1].splitlines()[1:]}
    assert code == 0 and rows["small"].endswith(f"does not fit {0.5 * need / memory.GB:g} GB per rank (warning)")
    assert rows["large"].endswith("its own client (whole model)")
    r = hierfed("topology", "validate", topo, "--config", run, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok: ")
    assert r.stderr.count("warning") == 1 and "hierfed: warning: small: its own client (whole model) (ZeRO-3 over 2 ranks) needs" in r.stderr
