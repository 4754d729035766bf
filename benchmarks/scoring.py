"""Per-sample sharpness throughput and peak memory of each implementation, against a plain forward+backward.

Implementations (all through `sbtrainer.scoring.per_sample_sharpness`, model in eval mode, rows from the
library's own DataLoader):

- ``vmap/<c>``: ``method="vmap"`` with ``batch_size=c`` (torch.func ``grad`` vmapped over a chunk of c);
- ``loop``: ``method="loop"`` (one ``autograd.grad`` per sample);
- ``hooks/<c>``: ``method="hooks"`` (`sbtrainer.ghost_norm`): exact per-sample squared
  gradient norms from one batched forward and an activation-only backward (see sbtrainer/ghost_norm.py);

against ``plain``: one batched forward+backward (eval mode, batch 128) over the same samples, and ``train``: a
training step (train mode, SGD + momentum, batch 128). Every implementation's scores are checked against
the loop's (max relative error, `_common.max_rel_err`). Times are medians over ``--repeats`` interleaved rounds after one warm-up
round; peak memory is the RSS high-water mark above the after-setup RSS, in a fresh subprocess per
measurement (Linux ``/proc/self/clear_refs``).

Last, the scoring share of the paper's CIFAR-10 schedule (200 epochs x 50k samples x 3 members, Td = 100,
k = 0.4, SAM before Td and (1 + f) after, f = 1 - (1 - k)^2), scoring once at Td or every N epochs,
projected from the measured per-sample costs.

    .venv/bin/python benchmarks/scoring.py            # default sizes (~6 min on 2 cores)
    .venv/bin/python benchmarks/scoring.py --smoke    # seconds; for the tests
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common as C
import torch
import torch.nn.functional as F

from sbtrainer import scoring as sb_scoring

PAPER = {"epochs": 200, "rows": 50_000, "members": 3, "td": 100, "k": 0.4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cnn:32:512,resnet18:16:256,resnet18:64:64",
                   help="comma list of model:width:samples (model 'cnn' or 'resnet18')")
    p.add_argument("--vmap-chunks", default="8,32,64")
    p.add_argument("--hooks-chunk", type=int, default=64)
    p.add_argument("--plain-batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds after one warm-up round")
    p.add_argument("--memory-methods", default="all",
                   help="methods whose peak memory is measured (a fresh subprocess each): 'all', 'none' or a comma list")
    p.add_argument("--rescore-every", default="1,5,10,25", help="N of the 'every N epochs' projections")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON: one memory measurement
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.vmap_chunks, args.hooks_chunk, args.plain_batch = "resnet18:4:8", "4", 4, 8
        args.repeats, args.memory_methods = 1, "hooks/4"
    return args


# -- the implementations ------------------------------------------------------------------------------
def run_method(method: str, model: torch.nn.Module, data: C.TensorDictDataset, plain_batch: int) -> torch.Tensor | None:
    """Run one implementation over all of ``data``; return its scores (None for the plain/train references)."""
    if method in ("plain", "train"):
        model.train(method == "train")
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9) if method == "train" else None
        for lo in range(0, len(data), plain_batch):
            loss = F.cross_entropy(model(data.x[lo : lo + plain_batch]), data.y[lo : lo + plain_batch])
            loss.backward()
            if opt is not None:
                opt.step()
            model.zero_grad(set_to_none=True)
        model.eval()
        return None
    kind, _, chunk = method.partition("/")
    return sb_scoring.per_sample_sharpness(model, data, batch_size=int(chunk or 64), method=kind, progress=False)


def build(spec: str, real: bool) -> tuple[str, int, torch.nn.Module, C.TensorDictDataset, str]:
    name, width, samples = spec.split(":")
    x, y, source = C.cifar_tensors(int(samples), real=real)
    torch.manual_seed(0)
    model = C.model_factory(name, int(width))()
    with torch.no_grad():  # non-trivial BatchNorm running statistics, as after some training
        model.train()
        model(x[:128])
    model.eval()
    return name, int(width), model, C.TensorDictDataset(x, y), source


def worker(spec: dict) -> dict:
    """One memory measurement in this fresh process: peak RSS above the after-setup RSS of one method."""
    _, _, model, data, _ = build(spec["model"], real=False)
    base = C.rss_mib()
    if not C.reset_peak_rss():
        return {"peak_mib": float("nan"), "base_mib": base}
    t = time.perf_counter()
    run_method(spec["method"], model, data, spec["plain_batch"])
    return {"peak_mib": C.peak_rss_mib() - base, "base_mib": base, "seconds": time.perf_counter() - t}


# -- the benchmark ------------------------------------------------------------------------------------
def bench_model(spec: str, args: argparse.Namespace) -> dict:
    name, width, model, data, source = build(spec, real=not args.smoke)
    n = len(data)
    methods = ["plain", "train", "loop"] + [f"vmap/{c}" for c in args.vmap_chunks.split(",")]
    methods.append(f"hooks/{args.hooks_chunk}")
    times: dict[str, list[float]] = {m: [] for m in methods}
    scores: dict[str, torch.Tensor] = {}
    start = time.perf_counter()
    for r in range(1 + args.repeats):
        for m in methods:
            t = time.perf_counter()
            out = run_method(m, model, data, args.plain_batch)
            if r > 0:
                times[m].append(time.perf_counter() - t)
            if out is not None:
                scores[m] = out
        print(f"  {spec}: round {r + 1}/{1 + args.repeats} done ({time.perf_counter() - start:.0f} s)", flush=True)
    memory = {}
    chosen = {"all": methods, "none": []}.get(args.memory_methods, args.memory_methods.split(","))
    for m in methods:
        if m in chosen:
            job = {"model": f"{name}:{width}:{min(n, 2 * args.plain_batch)}", "method": m,
                   "plain_batch": args.plain_batch}
            memory[m] = C.run_worker(Path(__file__), ["--worker", json.dumps(job)])["peak_mib"]
    ref = scores["loop"]
    per_plain = C.median(times["plain"]) / n
    rows = []
    for m in methods:
        per = C.median(times[m]) / n
        err = None if m not in scores else C.max_rel_err(scores[m], ref)
        rows.append({"method": m, "samples_per_s": 1 / per, "ms_per_sample": 1e3 * per, "vs_plain": per / per_plain,
                     "peak_mib": memory.get(m), "max_rel_err_vs_loop": err})
    C.print_table(rows, ["method", "samples_per_s", "ms_per_sample", "vs_plain", "peak_mib", "max_rel_err_vs_loop"],
                  title=f"{name} width {width} ({C.num_params(model):,} params), {n} samples ({source}): "
                        f"per-sample sharpness vs a plain batched forward+backward")
    return {"model": name, "width": width, "params": C.num_params(model), "samples": n, "data": source,
            "rows": rows, "wall_s": time.perf_counter() - start}


def projection(res: dict, every: list[int]) -> list[dict]:
    """Scoring share of the paper's SharpBalance run, from measured per-sample scoring and training-step costs."""
    by = {r["method"]: r["ms_per_sample"] for r in res["rows"]}
    e, td, k, n, m = PAPER["epochs"], PAPER["td"], PAPER["k"], PAPER["rows"], PAPER["members"]
    f = 1 - (1 - k) ** 2
    train_ms = by["train"] * n * m * (2 * td + (e - td) * (1 + f))  # SAM before Td, (1 + f) after (ideal)
    scorers = {"vmap/64": by.get("vmap/64"), "best vmap": min(v for k_, v in by.items() if "vmap" in k_),
               "loop": by["loop"], "hooks (auto's first choice)": next(v for k_, v in by.items() if k_.startswith("hooks"))}
    rows = []
    for label, ms in scorers.items():
        if ms is None:
            continue
        one = ms * n * m
        row = {"model": f"{res['model']}:{res['width']}", "scorer": label, "score_pass_h": one / 3.6e6,
               "train_h": train_ms / 3.6e6, "share_once": one / (one + train_ms)}
        for every_n in every:
            count = len(range(td, e, every_n))
            row[f"share_every_{every_n}"] = count * one / (count * one + train_ms)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    print(f"torch threads {torch.get_num_threads()}")
    results = [bench_model(spec, args) for spec in args.models.split(",")]
    every = [int(v) for v in args.rescore_every.split(",")]
    proj = [row for res in results for row in projection(res, every)]
    C.print_table(proj, ["model", "scorer", "score_pass_h", "train_h", "share_once"] + [f"share_every_{v}" for v in every],
                  title=f"scoring share of the paper's run on this CPU ({PAPER}; hours projected from per-sample costs)")
    checks = [{"model": f"{res['model']}:{res['width']}", "method": r["method"], "target": "scoring <= 2.5x plain f+b",
               "value": r["vs_plain"], "met": r["vs_plain"] <= 2.5}
              for res in results for r in res["rows"] if r["method"] not in ("plain", "train")]
    C.print_table(checks, ["model", "method", "target", "value", "met"], title="targets (reported, not asserted)")
    payload = {"config": vars(args), "paper_schedule": PAPER, "results": results, "projection": proj, "targets": checks}
    C.write_result("scoring", payload, args.out_dir)
    return payload


if __name__ == "__main__":
    main()
