"""Peak memory of training an m-member ensemble per method, against one member, on CPU.

Each configuration runs in a fresh Python: it builds the trainer (model, data, config), records the RSS,
resets the RSS high-water mark (Linux ``/proc/self/clear_refs``), runs ``trainer.train()`` for ``--steps``
optimizer steps and reports the high-water mark above the after-setup RSS ("train peak"). That peak holds
activations, gradients, the optimizer's momentum, SAM's weight backup and perturbation, and the batch.
Members run one after the other in ``training_step``, so activations should not grow with m; parameters,
gradients and optimizer state do. SharpBalance masks are installed by hand (k = ``--k``). Two longer runs
(``--long-steps``) show whether the peak keeps growing: SharpBalance's sub-batch sizes change every step.

    .venv/bin/python benchmarks/memory.py            # default sizes (~4 min on 2 cores)
    .venv/bin/python benchmarks/memory.py --smoke    # seconds; for the tests
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common as C


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18:16:128,resnet18:64:32",
                   help="comma list of model:width:batch ('cnn' or 'resnet18'; batch per member)")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--k", type=float, default=0.3, help="sharpbalance fraction k")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--long-steps", type=int, default=30,
                   help="also run sam and sharpbalance (m members) this long on the first model (0: skip): "
                        "varying sub-batch sizes can grow the CPU heap")
    p.add_argument("--configs", default="deep_ensemble:1,sam:1,deep_ensemble:m,sam:m,sharpbalance:m",
                   help="comma list of method:members ('m' = --members)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON: one configuration
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.steps, args.members, args.configs = "cnn:4:8", 1, 2, "deep_ensemble:1,sharpbalance:m"
        args.long_steps = 0
    return args


def worker(job: dict) -> dict:
    """Train one configuration in this fresh process; return its RSS numbers (MiB)."""
    import torch

    name, width, batch = job["model"].split(":")
    batch = int(batch)
    rows = 4 * batch
    g = torch.Generator().manual_seed(0)
    train = C.TensorDictDataset(torch.randn(rows, 3, 32, 32, generator=g), torch.randint(0, 10, (rows,), generator=g))
    factory = C.model_factory(name, int(width))
    trainer = C.make_trainer(job["method"], factory, train, members=job["members"], batch_size=batch,
                             max_steps=job["steps"])
    if job["method"] == "sharpbalance":
        trainer.set_sam_masks(C.random_masks(job["members"], rows, job["k"]))
    base = C.rss_mib()
    ok = C.reset_peak_rss()
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    params = sum(p.numel() * p.element_size() for p in trainer.ensemble.parameters()) / 2**20
    return {"base_mib": base, "train_peak_mib": C.peak_rss_mib() - base if ok else float("nan"),
            "total_peak_mib": C.peak_rss_mib(), "params_mib": params, "seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    configs = [(meth, args.members if n == "m" else int(n)) for meth, n in (c.split(":") for c in args.configs.split(","))]
    results = []
    for n_spec, spec in enumerate(args.models.split(",")):
        rows = []
        runs = [(meth, members, args.steps) for meth, members in configs]
        if n_spec == 0 and args.long_steps:
            runs += [("sam", args.members, args.long_steps), ("sharpbalance", args.members, args.long_steps)]
        for method, members, steps in runs:
            job = {"model": spec, "method": method, "members": members, "k": args.k, "steps": steps}
            out = C.run_worker(Path(__file__), ["--worker", json.dumps(job)])
            label = f"{method} m={members}" + (f" ({steps} steps)" if steps != args.steps else "")
            rows.append({"config": label, "method": method, "members": members, "steps": steps, **out})
            print(f"  {spec}: {method} m={members}: {out['train_peak_mib']:.0f} MiB ({out['seconds']:.1f} s)", flush=True)
        one = rows[0]["train_peak_mib"]
        for row in rows:
            row["vs_one_member_sgd"] = row["train_peak_mib"] / one
        name, width, batch = spec.split(":")
        C.print_table(rows, ["config", "params_mib", "base_mib", "train_peak_mib", "total_peak_mib", "vs_one_member_sgd"],
                      title=f"{name} width {width}, batch {batch}/member, {args.steps} steps unless named: "
                            "peak RSS above setup (MiB)")
        results.append({"model": name, "width": int(width), "batch": int(batch), "rows": rows})
    payload = {"config": vars(args), "results": results}
    C.write_result("memory", payload, args.out_dir)
    return payload


if __name__ == "__main__":
    main()
