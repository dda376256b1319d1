"""Split placement: what a weak device holds when it keeps only the first k blocks, and how busy its edge is.

    .venv/bin/python bench/split.py [--only memory,throughput] [--quick] [--ks 1,2,4] [--devices 1,2,4]
                                    [--rounds 3] [--tau1 4] [--warmup-rounds 1] [--repeats 1] [--balanced-k 12]
                                    [--no-packed] [--results bench/results]

On 2 shared cores the defaults took 4 minutes at load average ~5 and 10 minutes at ~9 (the
throughput jobs twice with --repeats 2); --quick is about half of that.

Model: a Llama-shaped causal LM built from a config (`model.source: llama` with `config_overrides`:
16 layers, hidden 256, MLP 688, 8 heads, 4 KV heads; MiniLM's 30522-token vocabulary, untied LM
head), LoRA r=8 (hierfed's default targets), AdamW, batch 16 in 4 micro-batches, `model.max_length`
64, causal LM on the built-in `corpus` data (seed 0).

1. Device memory, k in {1, 2, 4} and the whole model (all 16 blocks), in this one process. The model
   is built as hierfed builds it (`hierfed.model.build_model`), pruned for the device
   (`hierfed.model.cut.prune_for_device`; the whole model is left unpruned), and driven through one real
   local step by the runtime's own trainer: `hierfed.placement.link.SplitClient.train` for a split device
   (all micro-batches forward and kept alive, then each finishes backward when its boundary gradient
   "returns", then clip + AdamW step) over an in-process stand-in for the MPI communicator that
   answers every posted gradient receive with a random gradient of the right shape; and
   `hierfed.training.LocalTrainer.train` (the batch at once) for the whole model. One unmeasured
   step first (lazy initialisation), then the measured step, each with a fresh optimiser as every
   edge round has. Measured:
     - params+buffers: bytes of every parameter and buffer the (pruned) model still holds;
     - step peak: the CPU allocator's peak of live bytes allocated during the step, above what was
       live before it, from torch.profiler (profile_memory=True: every c10 CPU allocation and free is
       recorded with the running total of live profiled bytes; we take its maximum). It contains the
       activations of all micro-batches, transient buffers, adapter gradients and AdamW state;
     - link buffers: the numpy buffers the device keeps per micro-batch in flight (mask+labels,
       gradient and loss receive buffers, and encoded activations where they are a copy: all M at
       once when pipelined). numpy allocates them outside torch's allocator, so they are summed from
       their sizes (a buffer that is a view of a torch tensor is not counted twice);
     - device peak = params+buffers + step peak + link buffers;
     - saved for backward: the bytes autograd saves (saved-tensor hooks, each storage counted once,
       parameters excluded): the quantity `hierfed.placement.memory`'s activation term models.
   Beside it, `hierfed.placement.memory.estimate(...).total` for the same config and k, priced at the measured
   sequence length T (and, where T < max_length, also at max_length, as `hierfed topology plan`
   prices it). The built-in corpus has short lines: tokenised, its longest line is ~17 tokens, so
   the device pads to that, not to 64. The memory table is therefore also measured on "packed"
   sequences (corpus lines joined to fill exactly 64 tokens; --no-packed skips them).
   Bytes per local step across the cut: the SplitClient's real messages (activations + mask +
   labels up, gradients + loss down), `hierfed.placement.memory.link_bytes`, and from the MPI runs below the
   device-edge ledger (which also holds the per-edge-round adapter exchange, amortised over tau1).

2. Edge throughput: real MPI jobs (`python -m hierfed run`, which launches mpiexec) of 1 cloud +
   1 edge + N split devices (split_layers: 2), N in {1, 2, 4} (3, 4, 6 ranks), each pipelined
   (split.micro_batches=4, split.pipeline=true) and stop-and-wait (split.pipeline=false), one after
   the other (with --repeats R, R jobs each, alternating which mode goes first). tau2=1, `--rounds`
   cloud rounds of `--tau1` local steps; each job's first `--warmup-rounds` edge rounds are
   dropped. From metrics.jsonl's edge rows: throughput = samples processed (devices x tau1 x batch)
   / sum of seconds.wall, busy fraction = sum of seconds.edge_busy / sum of seconds.wall; also the
   best single edge round (contention only ever slows a round down). (The rows' `samples` field is
   the FedAvg weight, i.e. the clients' local data sizes, not the samples processed; it is in the
   JSON too.) The 1-minute load average is recorded before and after each job: the machine is shared.
   Diagnostic beyond the issue's configuration (--balanced-k, default 12; 0 skips it): 1 device
   split at k=12, where the device's share of the compute is close to the edge's.
   Beside it, in this process: the compute time of one micro-batch on each side of the cut
   (`split_model` stages, one thread, best of 5 steps), and from it the pipelined / stop-and-wait
   ratio an ideal run on dedicated cores would show (`ideal_ratio`).

Results: <results>/split.md and <results>/split.json (--reprint rewrites the .md from the .json);
the MPI runs in <results>/split/.
--quick: k in {2}, N in {1, 4}, 2 rounds of 4 steps, no packed sequences, no k=12 diagnostic.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from common import fmt_bytes, git_state, read_run, run_hierfed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LAYERS = 16
MODEL = {
    "source": "llama",
    "size": "small",
    "max_length": 64,
    "config_overrides": {"num_hidden_layers": LAYERS, "hidden_size": 256, "intermediate_size": 688,
                         "num_attention_heads": 8, "num_key_value_heads": 4},
}
BATCH, MICRO = 16, 4
SPLIT_K = 2  # the throughput runs' split point


def run_config(rounds: int, tau1: int) -> dict:
    return {
        "seed": 0,
        "model": MODEL,
        "data": {"source": "corpus", "eval_samples": 64},
        "train": {"batch_size": BATCH},
        "schedule": {"rounds": rounds, "tau1": tau1, "tau2": 1},
        "split": {"micro_batches": MICRO},
        "runtime": {"progress": False},
    }


def log(msg: str) -> None:
    print(f"[split] {msg}", file=sys.stderr, flush=True)


# ---- 1. device memory ------------------------------------------------------------------------

class _Done:
    """A completed MPI request (the stand-in communicator completes everything at once)."""

    def Test(self) -> bool:  # noqa: N802 (mpi4py's names)
        return True

    def Wait(self) -> None:  # noqa: N802
        return None


class LoopbackComm:
    """Stands in for the device's MPI communicator to its edge in one process.

    Isend records the message; Irecv of a boundary gradient fills the buffer with a random gradient
    (values ~1e-3) encoded by the trainer's own gradient wire format (`wire`: the SplitClient's
    `grad`), as the edge would have sent it; Irecv of the loss fills 1.0. Per micro-batch it records
    the bytes on the link (both directions) and the bytes of the buffers the device holds for them
    that numpy allocated (a buffer that is a view of a torch tensor, e.g. fp32 activations sent as
    the tensor's own bytes, is already counted by the allocator).
    """

    def __init__(self) -> None:
        from hierfed.placement import link
        from hierfed.placement.link import TAG_ACT, TAG_GRAD, TAG_LOSS, TAG_META

        self.tags = TAG_ACT, TAG_META, TAG_GRAD, TAG_LOSS
        # the clip's 8-byte norm exchange (newer hierfed): answered with 0, not the priced traffic
        self.norm_tag = getattr(link, "TAG_NORM", None)
        self.wire = None
        self.rng = np.random.default_rng(0)
        self.reset()

    def reset(self) -> None:
        self.up = self.down = 0
        self.groups: list[dict[int, int]] = []  # per micro-batch: tag -> bytes of the buffer the device holds

    @property
    def micro(self) -> list[int]:
        """Held buffer bytes per micro-batch."""
        return [sum(g.values()) for g in self.groups]

    def _hold(self, tag: int, buf) -> None:
        # one message of each tag per micro-batch, in whatever order the client posts them
        if not self.groups or tag in self.groups[-1]:
            self.groups.append({})
        owned = buf.base is None or isinstance(buf.base, np.ndarray)
        self.groups[-1][tag] = buf.nbytes if owned else 0

    def Isend(self, buf, dest, tag):  # noqa: N802 (mpi4py's names)
        if tag == self.norm_tag:
            return _Done()
        self.up += buf.nbytes
        self._hold(tag, buf)
        return _Done()

    def Irecv(self, buf, source, tag):  # noqa: N802
        if tag == self.norm_tag:
            buf[:] = 0.0
            return _Done()
        if tag == self.tags[2]:
            buf[:] = self._gradient(buf.nbytes)
        elif tag == self.tags[3]:
            buf[:] = 1.0
        self.down += buf.nbytes
        self._hold(tag, buf)
        return _Done()

    def _gradient(self, nbytes: int) -> np.ndarray:
        import torch

        w = self.wire
        size = w.nbytes if hasattr(w, "nbytes") else w.encoded_size  # TensorWire, or a codec (older hierfed)
        lo, hi = 0, nbytes + 8
        while lo < hi:  # the number of values whose encoding fills nbytes (sizes grow with n)
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if size(mid) < nbytes else (lo, mid)
        values = (1e-3 * self.rng.standard_normal(lo)).astype(np.float32)
        if hasattr(w, "nbytes"):
            return w.encode(torch.from_numpy(values), 0)
        return w.encode(values, self.rng)


class SavedBytes:
    """Bytes autograd saves for backward during a block of code (each storage once, parameters excluded)."""

    def __init__(self, model) -> None:
        import torch

        self.torch = torch
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        self.seen: dict[int, int] = {}

    def __enter__(self):
        def pack(t):
            try:
                s = t.untyped_storage()
                ptr = s.data_ptr()
                if ptr not in self.params:
                    self.seen[ptr] = max(self.seen.get(ptr, 0), s.nbytes())
            except (RuntimeError, NotImplementedError):
                pass
            return t

        self._hooks = self.torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def allocator_peak(prof) -> tuple[int, int]:
    """(peak, baseline) of live profiled CPU bytes over the profiled window, from its allocation events."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            f = e.extra_fields
            events.append((e.start_time_ns, f.total_allocated, f.alloc_size))
        stack.extend(e.children)
    if not events:
        raise RuntimeError("torch.profiler recorded no CPU allocations (profile_memory not supported here?)")
    events.sort()
    baseline = events[0][1] - events[0][2]  # live profiled bytes just before the first event
    return max(t for _, t, _ in events) - baseline, baseline


def packed_examples(n: int, tok, length: int):
    """Corpus lines joined with spaces until each text fills `length` tokens ([CLS] ... [SEP])."""
    from hierfed.data import DataConfig, load_data
    from hierfed.data.schema import Example

    lines = [e.text for e in load_data(DataConfig(source="corpus", train_samples=n * 8)).train]
    out, cur, cur_len = [], [], 0
    for line in lines:
        cur.append(line)
        cur_len += len(tok(line, add_special_tokens=False)["input_ids"])
        if cur_len >= length - 2:
            out.append(Example(text=" ".join(cur)))
            cur, cur_len = [], 0
            if len(out) == n:
                break
    return tuple(out)


def measure_device(cfg, k: int | None, data, kind: str) -> dict:
    """One local step of a device holding blocks [0, k) (None: the whole model), measured."""
    from torch.profiler import ProfilerActivity, profile

    from hierfed.comm.ledger import Ledger
    from hierfed.model import build_model
    from hierfed.model.cut import prune_for_device
    from hierfed.placement.link import SplitClient
    from hierfed.training import LocalTrainer

    built = build_model(cfg.model, cfg.peft, kind, None, cfg.seed)
    model = built.model
    comm = None
    if k is None:
        trainer = LocalTrainer(model, cfg.train)
    else:
        prune_for_device(model, k)
        comm = LoopbackComm()
        # the edge's rank in the device's communicator: 0 (newer SplitClients take it as `server`)
        server = (0,) if "server" in inspect.signature(SplitClient.__init__).parameters else ()
        trainer = SplitClient(comm, *server, model, k, cfg, Ledger(), poll=False)
        comm.wire = trainer.grad
    held = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() lists tied ones once
    held += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    trainer.train(data, 1, 1)  # warm-up: lazy initialisation outside the measured step
    gc.collect()
    if comm is not None:
        comm.reset()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, SavedBytes(model) as saved:
        trainer.train(data, 1, 2)
    seconds = time.perf_counter() - started
    peak, _ = allocator_peak(prof)
    row = {
        "k": k, "seq_len": int(data.input_ids.shape[1]), "params_buffers": held, "trainable_params": trainable,
        "step_peak": peak, "saved_for_backward": saved.total, "step_seconds_profiled": seconds,
    }
    if comm is None:
        row.update(link_buffers=0, up_per_step=0, down_per_step=0, micro_batches=1)
    else:
        pipelined = cfg.split.pipeline
        row.update(link_buffers=sum(comm.micro) if pipelined else max(comm.micro),
                   up_per_step=comm.up, down_per_step=comm.down, micro_batches=len(comm.micro))
    row["device_peak"] = row["params_buffers"] + row["step_peak"] + row["link_buffers"]
    del trainer, model, built, prof
    gc.collect()
    return row


def memory_part(ks: list[int], packed: bool, threads: int) -> dict:
    import torch

    from hierfed.config import RunConfig
    from hierfed.data import load_data
    from hierfed.model import load_tokenizer
    from hierfed.placement.memory import estimate, link_bytes
    from hierfed.training import configure_threads, tokenize

    configure_threads(threads)
    torch.manual_seed(0)
    base = RunConfig.model_validate(run_config(1, 1))
    kind = "causal_lm"
    task = load_data(base.data)
    tok = load_tokenizer(base.model)
    sets = {"corpus": tokenize(tok, task.train, kind, base.model.max_length)}
    if packed:
        sets["packed"] = tokenize(tok, packed_examples(64, tok, base.model.max_length), kind, base.model.max_length)
    out = {}
    for name, data in sets.items():
        t = int(data.input_ids.shape[1])
        at_t = base.model_copy(update={"model": base.model.model_copy(update={"max_length": t})})
        rows = []
        for k in [*ks, None]:
            log(f"memory: {name} sequences (T={t}), {'whole model' if k is None else f'k={k}'}")
            r = measure_device(base, k, data, kind)
            e = estimate(at_t, kind, None, k)
            r["estimate"] = e.total
            r["estimate_parts"] = {"frozen": e.frozen, "adapter": e.adapter, "optimizer": e.optimizer,
                                   "gradients": e.gradients, "activations": e.activations}
            r["estimate_at_max_length"] = estimate(base, kind, None, k).total
            r["link_bytes"] = list(link_bytes(at_t, k, kind, None))
            r["link_bytes_at_max_length"] = list(link_bytes(base, k, kind, None))
            rows.append(r)
        whole = rows[-1]["device_peak"]
        for r in rows:
            r["vs_whole"] = r["device_peak"] / whole
        out[name] = {"seq_len": t, "examples": len(data), "rows": rows}
    return out


def memory_tables(mem: dict, max_length: int) -> str:
    parts = []
    for name, m in mem.items():
        t = m["seq_len"]
        at_max = t < max_length
        head = (f"**{name} sequences** (T = {t} tokens{'' if name == 'packed' else ': the corpus lines are short; padded to the longest'}"
                f", batch {BATCH} = {MICRO} micro-batches of {BATCH // MICRO} for split devices, the whole batch at once for the whole model)")
        cols = ["device holds", "params+buffers", "step peak (allocator)", "link buffers", "**device peak**", "vs whole",
                f"estimate at T={t}", "estimate / measured"]
        if at_max:
            cols.append(f"plan at max_length {max_length}")
        cols += ["saved for backward", "est. activations"]
        lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["--:"] * (len(cols) - 1)) + "|"]
        for r in m["rows"]:
            label = f"embeddings + blocks 0..{r['k'] - 1} (k={r['k']})" if r["k"] else f"whole model ({LAYERS} blocks)"
            cells = [label, fmt_bytes(r["params_buffers"]), fmt_bytes(r["step_peak"]), fmt_bytes(r["link_buffers"]),
                     f"**{fmt_bytes(r['device_peak'])}**", f"{r['vs_whole']:.3f}", fmt_bytes(r["estimate"]),
                     f"{r['estimate'] / r['device_peak']:.2f}"]
            if at_max:
                cells.append(fmt_bytes(r["estimate_at_max_length"]))
            cells += [fmt_bytes(r["saved_for_backward"]), fmt_bytes(r["estimate_parts"]["activations"])]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def bytes_table(mem: dict) -> str:
    lines = ["| sequences | k | up / step (the SplitClient's messages) | down / step | `memory.link_bytes` up | `memory.link_bytes` down |",
             "|---|--:|--:|--:|--:|--:|"]
    for name, m in mem.items():
        for r in m["rows"]:
            if r["k"] is not None:
                lines.append(f"| {name} (T={m['seq_len']}) | {r['k']} | {r['up_per_step']:,} B | {r['down_per_step']:,} B | "
                             f"{r['link_bytes'][0]:,} B | {r['link_bytes'][1]:,} B |")
    return "\n".join(lines)


def ledger_table(tp: dict) -> str:
    """The MPI runs' device-edge ledger per device and local step: all of it, and the cut's part."""
    hidden = MODEL["config_overrides"]["hidden_size"]
    mb = BATCH // MICRO
    lines = ["| run | device-edge up / device / step (ledger, all kinds) | down | of which the cut: up | down | T this implies |",
             "|---|--:|--:|--:|--:|--:|"]
    for r in tp["results"]:
        if not r["pipelined"]:
            continue
        cut = r["cut_per_device_step"]
        # up per step = M x (mb*T*H float32 + mb*T mask + mb*T labels, int64), + a 40-byte header with older hierfed
        t = cut["up"] / MICRO / (mb * (4 * hidden + 16))
        lines.append(f"| {r['devices']} devices, k={r['k']} | {r['device_edge_per_device_step']['up']:,.0f} B | "
                     f"{r['device_edge_per_device_step']['down']:,.0f} B | {cut['up']:,.0f} B | {cut['down']:,.0f} B | {t:.1f} |")
    return "\n".join(lines)


# ---- 2. edge throughput ----------------------------------------------------------------------

def topology(n: int, k: int) -> dict:
    return {"name": f"split-bench-{n}-k{k}", "description": f"1 cloud, 1 edge, {n} split devices (k={k})",
            "edges": [{"name": "edge0", "devices": [{"ranks": n, "split_layers": k}]}]}


def run_job(n: int, k: int, pipelined: bool, rounds: int, tau1: int, work: Path, rep: int = 0) -> dict:
    import yaml

    name = f"n{n}-k{k}-{'pipelined' if pipelined else 'stop-and-wait'}" + (f"-rep{rep}" if rep else "")
    out = work / name
    if out.exists():
        shutil.rmtree(out)
    work.mkdir(parents=True, exist_ok=True)
    topo, conf = work / f"topology-n{n}-k{k}.yaml", work / "config.yaml"
    topo.write_text(yaml.safe_dump(topology(n, k), sort_keys=False))
    conf.write_text(yaml.safe_dump(run_config(rounds, tau1), sort_keys=False))
    args = ["run", str(topo), "--config", str(conf), "--out", str(out), "--set", f"split.pipeline={'true' if pipelined else 'false'}"]
    load_before = os.getloadavg()[0]
    log(f"throughput: {name} ({n + 2} ranks): {' '.join(args)}")
    job = run_hierfed(args, work / f"{name}.log")
    if job.returncode != 0:
        raise SystemExit(f"bench/split.py: {name} failed (exit {job.returncode}):\n  {job.tail()}")
    job_s = job.wall_s
    log(f"throughput: {name} done in {job_s:.0f} s")
    summary, rows = read_run(out)
    return {"name": name, "devices": n, "k": k, "ranks": n + 2, "pipelined": pipelined, "job_s": job_s,
            "load_before": load_before, "load_after": os.getloadavg()[0], "bytes": summary["bytes"],
            "edge_rows": [r for r in rows if r["tier"] == "edge"]}


def summarise(jobs: list[dict], tau1: int, warmup: int) -> dict:
    """One (devices, k, mode) over its jobs (repeats): each job's first `warmup` edge rounds dropped."""
    used, all_rows = [], []
    for job in jobs:
        rows = sorted(job["edge_rows"], key=lambda r: (r["round"], r["edge_round"]))
        used += rows[warmup:] if len(rows) > warmup else rows
        all_rows += rows
    wall = sum(r["seconds"]["wall"] for r in used)
    busy = sum(r["seconds"]["edge_busy"] for r in used)
    processed = sum(r["clients"] for r in used) * tau1 * BATCH
    per_round = [r["clients"] * tau1 * BATCH / r["seconds"]["wall"] for r in used]  # samples/s of each edge round
    # The device-edge ledger holds the cut's traffic plus, per edge round and device, the adapter
    # exchange: the same vector the edge sends the cloud (edge-cloud up/down; one edge here), and
    # each split device's 64-byte shape handshake. What remains is the activations and gradients.
    job, n = jobs[0], jobs[0]["devices"]
    de, ec = job["bytes"]["device-edge"], job["bytes"]["edge-cloud"]
    steps = sum(r["clients"] for r in job["edge_rows"]) * tau1  # device-steps over the first job's edge rounds
    return {
        "name": job["name"], "devices": n, "k": job["k"], "ranks": job["ranks"], "pipelined": job["pipelined"],
        "jobs": len(jobs), "edge_rounds_used": len(used), "edge_rounds_dropped": len(all_rows) - len(used),
        "samples_processed": processed, "samples_field": sum(r["samples"] for r in used),
        "wall_s": wall, "edge_busy_s": busy, "throughput": processed / wall, "busy_fraction": busy / wall,
        "throughput_best_round": max(per_round), "throughput_per_round": per_round,
        "wall_per_round": [r["seconds"]["wall"] for r in all_rows], "busy_per_round": [r["seconds"]["edge_busy"] for r in all_rows],
        "device_edge_per_device_step": {"up": de["up"] / steps, "down": de["down"] / steps},
        "cut_per_device_step": {"up": (de["up"] - n * ec["up"] - 64 * n) / steps, "down": (de["down"] - n * ec["down"]) / steps},
        "job_s": [j["job_s"] for j in jobs], "load_before": [j["load_before"] for j in jobs], "load_after": [j["load_after"] for j in jobs],
    }


def stage_costs(ks: list[int], repeats: int = 5) -> dict:
    """Compute time of one micro-batch on each side of the cut, in this process, best of `repeats` steps.

    One thread, the corpus data, micro-batches of BATCH/MICRO sequences: device = embeddings + blocks
    [0, k) forward and backward; edge = blocks [k, L) + norm + LM head + loss forward and backward.
    The minimum over repeats is the least disturbed by other work on a shared machine.
    """
    import torch

    from hierfed.config import RunConfig
    from hierfed.data import load_data
    from hierfed.model import build_model
    from hierfed.model.cut import split_model
    from hierfed.training import configure_threads, tokenize

    configure_threads(1)
    cfg = RunConfig.model_validate(run_config(1, 1))
    task = load_data(cfg.data)
    built = build_model(cfg.model, cfg.peft, task.kind, None, cfg.seed)
    data = tokenize(built.tokenizer, task.train, task.kind, cfg.model.max_length)
    idx = np.arange(BATCH)
    batch = data.batch(idx)
    chunks = list(zip(*(batch[n].chunk(MICRO) for n in ("input_ids", "attention_mask", "labels"))))
    out = {}
    for k in ks:
        device, edge = split_model(built.model, task.kind, k)
        device.train(), edge.train()
        dev_t, edge_t = [], []
        for _ in range(repeats + 1):  # the first step warms up
            d = e = 0.0
            for ids, mask, labels in chunks:
                t0 = time.perf_counter()
                h = device(ids, mask)
                t1 = time.perf_counter()
                wire = h.detach().requires_grad_()
                loss, _ = edge(wire, mask, labels)
                loss.backward()
                t2 = time.perf_counter()
                h.backward(wire.grad)
                t3 = time.perf_counter()
                d += (t1 - t0) + (t3 - t2)
                e += t2 - t1
            built.model.zero_grad(set_to_none=True)
            dev_t.append(d / len(chunks))
            edge_t.append(e / len(chunks))
        out[str(k)] = {"device_s": min(dev_t[1:]), "edge_s": min(edge_t[1:]), "seq_len": int(data.input_ids.shape[1])}
        log(f"stage costs, k={k}: device {1e3 * out[str(k)]['device_s']:.1f} ms, edge {1e3 * out[str(k)]['edge_s']:.1f} ms per micro-batch")
    del built
    gc.collect()
    torch.set_num_threads(1)
    return out


def ideal_ratio(c: dict, n: int) -> float:
    """Pipelined / stop-and-wait edge throughput with n devices in an ideal model (dedicated cores).

    Per micro-batch a device needs d (its forward + backward) and the edge e. Stop-and-wait, a device
    keeps the edge busy for e out of every d + e, so the edge serves min(1/e, n/(d+e)) micro-batches
    per second; pipelined, a device can feed it every max(d, e), so min(1/e, n/max(d, e)). Link time
    (in-process MPI, ~75 kB per message), queueing and step-boundary bubbles are left out. Over all
    d, the ratio peaks at 1 + 1/n (d = n*e): 2x for one device, 1.25x for four.
    """
    d, e = c["device_s"], c["edge_s"]
    return min(1 / e, n / max(d, e)) / min(1 / e, n / (d + e))


def throughput_part(devices: list[int], rounds: int, tau1: int, warmup: int, work: Path, balanced_k: int | None,
                    repeats: int = 1) -> dict:
    cases = [(n, SPLIT_K) for n in devices] + ([(1, balanced_k)] if balanced_k else [])
    costs = stage_costs(sorted({k for _, k in cases}))
    results = []
    for c, (n, k) in enumerate(cases):
        jobs: dict[bool, list[dict]] = {True: [], False: []}
        for rep in range(repeats):  # alternate which mode goes first, so drifting load hits both alike
            for pipelined in ((True, False) if (c + rep) % 2 == 0 else (False, True)):
                jobs[pipelined].append(run_job(n, k, pipelined, rounds, tau1, work, rep))
        results += [summarise(jobs[True], tau1, warmup), summarise(jobs[False], tau1, warmup)]
    by = {(r["devices"], r["k"], r["pipelined"]): r for r in results}
    ratios = {f"{n}" if k == SPLIT_K else f"{n}-k{k}": by[(n, k, True)]["throughput"] / by[(n, k, False)]["throughput"] for n, k in cases}
    best = {f"{n}" if k == SPLIT_K else f"{n}-k{k}": by[(n, k, True)]["throughput_best_round"] / by[(n, k, False)]["throughput_best_round"]
            for n, k in cases}
    # the cut's bytes per step from the ledger, for the devices of the k=SPLIT_K runs
    ledger = {n: by[(n, SPLIT_K, True)]["cut_per_device_step"] for n in devices}
    return {"rounds": rounds, "tau1": tau1, "warmup_rounds": warmup, "repeats": repeats, "balanced_k": balanced_k, "results": results,
            "ratio_pipelined_over_stop_and_wait": ratios, "ratio_best_rounds": best, "stage_costs": costs, "ledger_per_step": ledger}


def throughput_table(tp: dict) -> str:
    lines = ["| split devices | ranks | mode | edge rounds | samples | wall (s) | **samples/s** | best round (samples/s) | "
             "edge busy (s) | busy fraction | **pipelined / stop-and-wait** (best rounds) | ideal model (dedicated cores) | "
             "load avg (1 min), before → after |",
             "|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    ratios, best = tp["ratio_pipelined_over_stop_and_wait"], tp["ratio_best_rounds"]
    for r in tp["results"]:
        key = f"{r['devices']}" if r["k"] == SPLIT_K else f"{r['devices']}-k{r['k']}"
        ratio = f"**{ratios[key]:.2f}×** ({best[key]:.2f}×)" if r["pipelined"] else ""
        bound = f"{ideal_ratio(tp['stage_costs'][str(r['k'])], r['devices']):.2f}×" if r["pipelined"] else ""
        who = f"{r['devices']}" if r["k"] == SPLIT_K else f"{r['devices']} (k={r['k']}, diagnostic)"
        load = ", ".join(f"{b:.1f} → {a:.1f}" for b, a in zip(r["load_before"], r["load_after"]))
        lines.append(f"| {who} | {r['ranks']} | {'pipelined' if r['pipelined'] else 'stop-and-wait'} | {r['edge_rounds_used']} | "
                     f"{r['samples_processed']} | {r['wall_s']:.1f} | **{r['throughput']:.1f}** | {r['throughput_best_round']:.1f} | "
                     f"{r['edge_busy_s']:.1f} | {r['busy_fraction']:.2f} | {ratio} | {bound} | {load} |")
    return "\n".join(lines)


def costs_table(costs: dict) -> str:
    lines = ["| k | device per micro-batch (fwd + bwd) | edge per micro-batch (fwd + bwd) | device / edge | "
             "ideal, 1 device | ideal, 2 devices | ideal, 4 devices |", "|--:|--:|--:|--:|--:|--:|--:|"]
    for k, c in costs.items():
        lines.append(f"| {k} | {1e3 * c['device_s']:.1f} ms | {1e3 * c['edge_s']:.1f} ms | {c['device_s'] / c['edge_s']:.2f} | "
                     + " | ".join(f"{ideal_ratio(c, n):.2f}×" for n in (1, 2, 4)) + " |")
    return "\n".join(lines)


# ---- report ----------------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{os.cpu_count()} CPU cores ({cpu}), no GPU used; Python {platform.python_version()}, torch {torch.__version__}"


def verdicts(mem: dict | None, tp: dict | None) -> list[str]:
    out = []
    if mem:
        for name, m in mem.items():
            r = next((r for r in m["rows"] if r["k"] == 2), None)
            if r:
                out.append(f"device peak at k=2 of {LAYERS} blocks, {name} sequences (T={m['seq_len']}): "
                           f"{r['vs_whole']:.3f} of whole-model ({fmt_bytes(r['device_peak'])} vs "
                           f"{fmt_bytes(m['rows'][-1]['device_peak'])}); aim <= 0.25: {'met' if r['vs_whole'] <= 0.25 else 'NOT met'}")
    if tp:
        ratio = tp["ratio_pipelined_over_stop_and_wait"].get("4")
        if ratio is not None:
            out.append(f"edge throughput with 4 split devices, pipelined / stop-and-wait: {ratio:.2f}x; aim >= 1.5x: "
                       f"{'met' if ratio >= 1.5 else 'NOT met'}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="memory,throughput", help="memory, throughput or both (default)")
    p.add_argument("--ks", default="1,2,4", help="device split points for the memory table (the whole model is always added)")
    p.add_argument("--devices", default="1,2,4", help="split devices per edge for the throughput runs")
    p.add_argument("--rounds", type=int, default=3, help="cloud rounds per throughput run (tau2 = 1: one edge round each)")
    p.add_argument("--tau1", type=int, default=4, help="local steps per edge round")
    p.add_argument("--warmup-rounds", type=int, default=1, help="edge rounds dropped from the throughput numbers")
    p.add_argument("--balanced-k", type=int, default=12,
                   help="also run 1 device split at this k (the device's share of the work near the edge's), pipelined "
                        "and stop-and-wait, as a diagnostic; 0 skips it")
    p.add_argument("--repeats", type=int, default=1, help="jobs per (devices, mode), alternating which mode runs first")
    p.add_argument("--no-packed", action="store_true", help="memory on the corpus' own (short) sequences only")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the memory part (runs use hierfed's 1 per rank)")
    p.add_argument("--quick", action="store_true", help="k=2 only, N in {1, 4}, 2 rounds of 4 steps, no packed sequences")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where split.md, split.json and the runs go")
    p.add_argument("--reprint", action="store_true", help="rewrite <results>/split.md from <results>/split.json and stop")
    a = p.parse_args()
    if a.reprint:
        write_report(json.loads((Path(a.results) / "split.json").read_text()), Path(a.results))
        return
    if a.quick:
        a.ks, a.devices, a.rounds, a.tau1, a.no_packed, a.balanced_k = "2", "1,4", 2, 4, True, 0
    only = set(a.only.split(","))
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    mem = memory_part([int(k) for k in a.ks.split(",")], not a.no_packed, a.threads) if "memory" in only else None
    tp = (throughput_part([int(n) for n in a.devices.split(",")], a.rounds, a.tau1, a.warmup_rounds, results / "split",
                           a.balanced_k or None, a.repeats)
          if "throughput" in only else None)
    total_s = time.monotonic() - started

    info = {"machine": machine(), "git": git_state(), "command": " ".join(["python", "bench/split.py", *sys.argv[1:]]),
            "model": MODEL, "batch_size": BATCH, "micro_batches": MICRO, "split_k_throughput": SPLIT_K,
            "seconds": total_s, "memory": mem, "throughput": tp, "verdicts": verdicts(mem, tp)}
    (results / "split.json").write_text(json.dumps(info, indent=2) + "\n")
    write_report(info, results)


def write_report(info: dict, results: Path) -> None:
    mem, tp = info["memory"], info["throughput"]
    md = ["# Split placement benchmark\n",
          f"`{info['command']}` — {info['machine']}; hierfed at {info['git']}; {info['seconds']:.0f} s.\n"]
    if mem:
        md += ["## Device memory (one local step, measured)\n", memory_tables(mem, MODEL["max_length"]), "",
               "## Bytes per local step across the cut (per device)\n", bytes_table(mem), ""]
    if tp:
        md += [f"## Edge throughput (k={SPLIT_K}, {tp['rounds']} rounds of tau1={tp['tau1']} steps, first {tp['warmup_rounds']} dropped)\n",
               throughput_table(tp), "",
               "Compute per micro-batch on each side of the cut (one process, one thread, best of 5 steps) and the "
               "pipelined / stop-and-wait ratio it gives in the ideal model (dedicated cores; see `ideal_ratio`):\n",
               costs_table(tp["stage_costs"]), "",
               "Device-edge ledger of the pipelined runs, per device and local step (the adapter exchange is "
               "the edge-cloud vector per device and edge round, plus a 64-byte handshake per device):\n", ledger_table(tp), ""]
    md += ["## Aims\n", *[f"- {v}" for v in info["verdicts"]], ""]
    (results / "split.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
