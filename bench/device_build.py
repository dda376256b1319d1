"""What a split device holds while it builds its model: loading only the embeddings and its k blocks
from disk against loading the whole model and pruning it.

    .venv/bin/python bench/device_build.py                 # Llama-shaped, 16 blocks, hidden 1024, k=2
    .venv/bin/python bench/device_build.py --k 4 --hidden 2048
    .venv/bin/python bench/device_build.py --dtype float32    # weights kept as on disk (memory-mapped)

Saves a Llama-shaped model (float32, MiniLM's tokenizer) to a temporary directory once, then in a
fresh process each (so peaks do not mix) builds the device's model as the device role does,
`build_model(..., blocks=k)`, and the whole model loaded and then pruned (`prune_for_device`). Prints the peak resident
memory of each process (VmHWM, see high_water), what the
pruned model holds, the build time, and the ratios to the whole-model build. Linux only (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def high_water() -> int:
    """This process's peak resident memory (VmHWM). Not resource.getrusage's ru_maxrss (which
    hierfed's ranks use): the children here are started by a Python parent that holds a whole model,
    and ru_maxrss keeps the pre-exec process's peak across fork (or vfork) + exec."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def child(path: str, k: int, blocks: int | None, dtype: str) -> None:
    """One build in this process; prints a JSON line."""
    import torch

    from hierfed.config import ModelConfig, PeftConfig
    from hierfed.model import build_model
    from hierfed.model.cut import prune_for_device

    torch.set_num_threads(1)
    base = high_water()  # after the imports
    started = time.perf_counter()
    built = build_model(ModelConfig(source="path", path=path, max_length=64, dtype=dtype), PeftConfig(r=8), "causal_lm", None, 0, "cpu", blocks=blocks)
    if blocks is None:  # the whole model loaded: what a split device did before it loaded only its part
        prune_for_device(built.model, k)
    seconds = time.perf_counter() - started
    held = sum(t.numel() * t.element_size() for t in list(built.model.parameters()) + list(built.model.buffers()))
    peak = high_water()
    print(json.dumps({"peak_rss": peak, "imports_rss": base, "held": held, "seconds": seconds}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="model.dtype of the run: the frozen weights converted on load (float32: kept as on disk)")
    p.add_argument("--child", nargs=4, metavar=("PATH", "K", "BLOCKS", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        path, k, blocks, dtype = args.child
        child(path, int(k), None if blocks == "none" else int(blocks), dtype)
        return
    import torch

    from hierfed.config import ModelConfig
    from hierfed.model import load_tokenizer
    from hierfed.model.build import _base_model

    conf = ModelConfig(source="llama", config_overrides={"num_hidden_layers": args.layers, "hidden_size": args.hidden,
                                                         "intermediate_size": int(2.75 * args.hidden), "num_attention_heads": args.hidden // 64,
                                                         "num_key_value_heads": max(1, args.hidden // 256)})
    with tempfile.TemporaryDirectory() as tmp:
        tok = load_tokenizer(conf)
        torch.manual_seed(0)
        model = _base_model(conf, "causal_lm", None, tok)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del model
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        out = {}
        for name, blocks in (("whole, then pruned", "none"), (f"embeddings + {args.k} blocks only", str(args.k))):
            proc = subprocess.run([sys.executable, __file__, "--child", tmp, str(args.k), blocks, args.dtype], cwd=ROOT, env=env,
                                  capture_output=True, text=True, check=True)
            out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"Llama-shaped, {args.layers} blocks, hidden {args.hidden}, {params / 1e6:.0f} M parameters float32 "
          f"({params * 4 / 1e9:.2f} GB on disk), loaded as {args.dtype}; the device keeps the embeddings and {args.k} blocks\n")
    print(f"{'build':<28} {'peak RSS':>10} {'above imports':>14} {'held after':>11} {'seconds':>8}")
    for name, r in out.items():
        print(f"{name:<28} {r['peak_rss'] / 1e9:>8.2f} GB {(r['peak_rss'] - r['imports_rss']) / 1e9:>11.2f} GB "
              f"{r['held'] / 1e9:>8.2f} GB {r['seconds']:>8.1f}")
    a, b = out.values()
    print(f"\nratio (k blocks only / whole then pruned): peak above imports "
          f"{(b['peak_rss'] - b['imports_rss']) / (a['peak_rss'] - a['imports_rss']):.2f}x, build time {b['seconds'] / a['seconds']:.2f}x; "
          f"held after pruning equal: {a['held'] == b['held']}")


if __name__ == "__main__":
    main()
