"""Split job vs whole model on one GPU: what the cut and the edge engine cost (issue 4's GPU check).

    python bench/gpu_split.py --out results/gpu              # on a GPU node (Open MPI or MPICH)
    python bench/gpu_split.py --tiny --device cpu --out /tmp/g   # a dry run of the same code path

Model: a ~1B Llama-shaped config (hidden 2048, 16 layers, 32 heads, 4 KV heads, FFN 5632), bf16
frozen weights, LoRA r=16 on q,k,v,o (float32), causal LM on sequences of T=1024 tokens, batch 8.
A ladder of runs, each step adding one cost, so the gap between the split job and the whole model
is attributed rather than guessed:
1. whole: the model in one process, plain PyTorch + peft, AdamW, tokens/s over timed steps.
2. whole-micro: the same, the batch in the split job's 4 micro-batches (gradient accumulation):
   what micro-batching alone costs.
3. inproc-split: the same micro-batches through hierfed's DeviceStage (embeddings + 2 blocks) and
   EdgeStage (14 blocks + head) in one process, the boundary tensor detached and its gradient handed
   back as over the wire: what the cut costs without processes or MPI.
4. split-plain / split-zero2: `hierfed run` with 1 cloud + 1 edge + 2 split devices (4 processes
   on the same GPU), pipelined micro-batches, bf16 on the link, the edge as plain torch, then under
   DeepSpeed ZeRO-2 (NCCL); `split-zero3` runs ZeRO-3 (the edge partitioned from the CPU).
   tokens/s = tokens the devices trained in an edge round / that edge round's wall time (the first
   edge round is warm-up). The edge's and devices' phase times (metrics.jsonl) say where each
   second went; every rank's peak memory (summary.json's `peak_memory`: host high-water mark,
   torch's CUDA peak) says what each process held.
Prints one JSON line per run and a final JSON with every figure and its ratio to `whole`.
A run may name its micro-batch count after a colon (`split-zero2:1`, `whole-micro:2`); without one it
uses --micro-batches. `inproc` stands for whole, whole-micro and inproc-split.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import yaml

from common import read_run, run_hierfed

ROOT = Path(__file__).resolve().parent.parent
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 4}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}


def run_config(args) -> dict:
    return {
        "model": {"source": "llama", "config_overrides": TINY if args.tiny else LLAMA_1B, "dtype": "float32" if args.device == "cpu" else "bfloat16",
                  "max_length": args.seq, "tokenizer": args.tokenizer},
        "peft": {"method": "lora", "r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {"source": "jsonl", "path": str(args.out / "data.jsonl"), "eval_fraction": 0.05},
        "train": {"lr": 1e-4, "batch_size": args.batch},
        "schedule": {"rounds": 1, "tau1": args.steps, "tau2": 3, "eval_batch_size": 4},
        "split": {"micro_batches": 4, "activation_codec": "bf16" if args.device != "cpu" else "fp32",
                  "gradient_codec": "bf16" if args.device != "cpu" else "fp32"},
        "deepspeed": {"enabled": True, "zero_stage": 2},  # split(): enabled per run
        "runtime": {"device": args.device, "progress": False},
        "checkpoint": {"keep": 1},
    }


def write_data(path: Path, lines: int, words: int) -> None:
    """Long texts of common words: every example fills the T tokens (truncated there)."""
    rng = np.random.default_rng(0)
    vocab = "the of and to in is was for on that with as by at from his her they be this are have an which one all were there".split()
    vocab += "river mountain city market station garden winter summer engine signal forest harbor valley window".split()
    with path.open("w") as f:
        for _ in range(lines):
            f.write(json.dumps({"text": " ".join(rng.choice(vocab, size=words))}) + "\n")


def _timed(args, device, step) -> dict:
    """tokens/s of `step` (one optimiser step on a batch) over args.steps steps after 3 warm-up ones."""
    import torch

    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"tokens_per_s": args.steps * args.batch * args.seq / seconds, "seconds": seconds, "peak_bytes": peak}


def in_process(args, cfg: dict, runs: list[tuple[str, int]]) -> dict:
    """Runs 1-3 of the ladder in one process on one model: whole, whole-micro, inproc-split
    (each with its own micro-batch count)."""
    import torch

    from hierfed.config import RunConfig
    from hierfed.model import build_model
    from hierfed.model.cut import DeviceStage, EdgeStage
    from hierfed.training import make_optimizer

    rc = RunConfig.model_validate(cfg)
    device = torch.device("cuda" if args.device != "cpu" else "cpu")
    model = build_model(rc.model, rc.peft, "causal_lm", None, 0, device).model
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(trainable, rc.train)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    mask = torch.ones_like(ids)
    lower, upper = DeviceStage(model, args.k), EdgeStage(model, "causal_lm", args.k)

    def finish() -> None:
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def whole() -> None:
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        finish()

    def whole_micro(micro: int) -> None:
        for i, m in zip(ids.chunk(micro), mask.chunk(micro)):
            (model(input_ids=i, attention_mask=m, labels=i).loss / micro).backward()
        finish()

    def inproc_split(micro: int) -> None:
        for i, m in zip(ids.chunk(micro), mask.chunk(micro)):
            h = lower(i, m)
            wire = h.detach().to(torch.bfloat16 if args.device != "cpu" else torch.float32).to(h.dtype).requires_grad_()
            loss, _ = upper(wire, m, i)
            (loss / micro).backward()
            h.backward(wire.grad)
        finish()

    steps = {"whole": lambda micro: whole, "whole-micro": lambda micro: lambda: whole_micro(micro),
             "inproc-split": lambda micro: lambda: inproc_split(micro)}
    out = {}
    for name, micro in runs:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        key = name if name == "whole" else f"{name}:{micro}"
        out[key] = _timed(args, device, steps[name](micro))
        print(json.dumps({key: out[key]}), flush=True)
    return out


def split(args, cfg: dict, name: str, deepspeed: bool) -> dict:
    """The split job through hierfed's own launcher: cloud + edge (plain or ZeRO-2) + 2 split devices."""
    topo = {"name": "gpu-split", "edges": [{"name": "edge0", "devices": [{"ranks": 2, "split_layers": args.k}]}]}
    (args.out / "topology.yaml").write_text("# 1 cloud + 1 edge × (1 + 2 devices) = 4 ranks\n" + yaml.safe_dump(topo))
    cfg = {**cfg, "deepspeed": {**cfg["deepspeed"], "enabled": deepspeed}}
    (args.out / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = args.out / name
    job = run_hierfed(["run", str(args.out / "topology.yaml"), "--config", str(args.out / f"{name}.yaml"), "--out", str(run_dir)],
                      args.out / f"{name}.log", timeout=args.timeout)
    if job.timed_out:
        return {"error": f"timed out after {args.timeout} s", "tail": job.output[-3000:]}
    if job.returncode != 0:
        return {"error": f"exit {job.returncode}", "tail": job.output[-3000:]}
    summary, rows = read_run(run_dir)
    edge = [r for r in rows if r["tier"] == "edge" and r["edge_round"] > 1]  # edge round 1: warm-up
    tokens = sum(args.steps * args.batch * args.seq * r["clients"] for r in edge)
    wall = sum(r["seconds"]["wall"] for r in edge)
    busy = sum(r["seconds"]["edge_busy"] for r in edge)

    def phases(key: str) -> dict:  # seconds per timed edge round, by phase
        names = sorted({k for r in edge for k in r["seconds"][key]})
        return {k: round(sum(r["seconds"][key].get(k, 0.0) for r in edge) / len(edge), 4) for k in names}

    return {"tokens_per_s": tokens / wall, "edge_busy_fraction": busy / wall, "edge_rounds_timed": len(edge),
            "edge_round_s": wall / len(edge), "edge_phases_s": phases("edge_phases"), "device_phases_s": phases("device_phases"),
            "wait": summary.get("wait"), "job_seconds": job.wall_s, "bytes": summary["bytes"],
            "eval_loss": summary["final"]["eval_loss"], "peak_memory": summary.get("peak_memory")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="a tiny Llama and short sequences (dry run)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--k", type=int, default=2, help="blocks on each device")
    p.add_argument("--timeout", type=int, default=240, help="seconds per hierfed job")
    p.add_argument("--tokenizer", default=str(ROOT / ".gpu" / "tokenizer"))
    p.add_argument("--micro-batches", type=int, default=4, help="split.micro_batches of runs that name none")
    p.add_argument("--runs", default="whole,whole-micro:4,inproc-split:1,split-zero2:1,split-plain:1,split-zero2:4,split-zero3:1",
                   help="comma-separated, each optionally NAME:MICRO_BATCHES: whole, whole-micro, inproc-split (inproc = all three), "
                        "split-plain, split-zero2, split-zero2-profile, split-zero3")
    args = p.parse_args()
    args.seq, args.batch = (32, 8) if args.tiny else (1024, 8)
    args.out.mkdir(parents=True, exist_ok=True)
    write_data(args.out / "data.jsonl", 64, 40 if args.tiny else 1100)
    cfg = run_config(args)
    result: dict = {"config": {"seq": args.seq, "batch": args.batch, "steps": args.steps, "k": args.k, "tiny": args.tiny}}
    try:
        import torch

        result["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - the name is informational
        result["gpu"] = None
    jobs = {"split-plain": (False, False, 2), "split-zero2": (True, False, 2), "split-zero2-profile": (True, True, 2),
            "split-zero3": (True, False, 3)}
    runs = []
    for token in args.runs.split(","):
        name, _, micro = token.partition(":")
        for n in ("whole", "whole-micro", "inproc-split") if name == "inproc" else (name,):
            if n not in jobs and n not in ("whole", "whole-micro", "inproc-split"):
                p.error(f"--runs: unknown run {n!r}")
            runs.append((n, int(micro) if micro else args.micro_batches))
    inproc = [r for r in runs if r[0] not in jobs]
    if inproc:
        result.update(in_process(args, cfg, inproc))
    for name, micro in (r for r in runs if r[0] in jobs):
        deepspeed, profile, stage = jobs[name]
        label = f"{name}:{micro}"
        job_cfg = {**cfg, "runtime": {**cfg["runtime"], "profile": profile}, "split": {**cfg["split"], "micro_batches": micro},
                   "deepspeed": {**cfg["deepspeed"], "zero_stage": stage}}
        result[label] = split(args, job_cfg, label.replace(":", "-mb"), deepspeed)
        print(json.dumps({label: result[label]}), flush=True)
    if "whole" in result:
        base = result["whole"]["tokens_per_s"]
        result["ratios"] = {k: v["tokens_per_s"] / base for k, v in result.items() if isinstance(v, dict) and "tokens_per_s" in v}
    (args.out / "gpu_split.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
