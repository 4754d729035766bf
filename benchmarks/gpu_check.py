"""One prepared GPU check (<= 5 minutes): steps/s per method, scoring throughput, projected paper wall time.

Runs the real `SharpBalanceTrainer.training_step` (every member's passes, the SAM ascent/restore) plus
``optimizer.step()`` / ``zero_grad`` on prepared device-resident batches (CIFAR-shaped random data, no
DataLoader, so neither ``datasets`` nor ``evaluate`` is needed: the lent GPU machines have neither), for the
CIFAR-stem ResNet18 (width 64, 11.17M parameters), batch 128 per member, m = 3, bf16 autocast and
channels_last by default on CUDA. Methods are interleaved in blocks; the time per step is the block's
wall time (``torch.cuda.synchronize`` at both ends) over its steps, median over the blocks after warm-up.
Then per-sample scoring throughput (``per_sample_sharpness`` vmap / loop and the hooks method of
sbtrainer/ghost_norm.py) against a plain forward+backward, and the projected wall time of the paper's CIFAR-10 run
(200 epochs x 390 steps, Td = 100, k = 0.4, one scoring of 50k x 3). ``--compile`` wraps every member in
``torch.compile`` (compile time reported separately). Writes ``gpu_check[_compile].json`` to ``$OUT``
when set, else to benchmarks/results.

    bash benchmarks/gpu_check.sh                                            # on the GPU machine
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny            # the CPU path, seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import traceback

PAPER = {"epochs": 200, "rows": 50_000, "members": 3, "td": 100, "k": 0.4, "batch": 128}


def hide_packages(names: tuple[str, ...] = ("datasets", "evaluate")) -> None:
    """Make ``names`` look uninstalled (as on the GPU machines): ``find_spec`` says None, ``import`` raises."""
    original = importlib.util.find_spec

    def find_spec(name, package=None):
        return None if name.split(".")[0] in names else original(name, package)

    class Blocker:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] in names:
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by gpu_check --hide-datasets)")
            return None

    importlib.util.find_spec = find_spec
    sys.meta_path.insert(0, Blocker())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny sizes (width 4, batch 8), for the CPU smoke test")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=128, help="per-member batch")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--ks", default="0.3,0.4", help="sharpbalance fractions k (0.4: the paper's CIFAR-10)")
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--methods", default="deep_ensemble,sam,sharpbalance")
    p.add_argument("--bf16", default="auto", choices=["auto", "on", "off"], help="auto: on for CUDA")
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"], help="auto: on for CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile every member")
    p.add_argument("--block", type=int, default=10, help="steps per method per round")
    p.add_argument("--rounds", type=int, default=4, help="rounds after one warm-up round")
    p.add_argument("--score-samples", type=int, default=1024)
    p.add_argument("--score-methods", default="plain,vmap/64,vmap/256,loop,hooks/64,hooks/256")
    p.add_argument("--transformers", default="bert:256:512:4,albert:256:512:4,vit:192:512:12",
                   help="transformer scoring: name:width:samples:layers (benchmarks/scoring.py's specs)")
    p.add_argument("--loop-samples", type=int, default=128, help="rows the one-sample loop scores (reference)")
    p.add_argument("--data-images", type=int, default=8192, help="images per data-path measurement")
    p.add_argument("--budget-s", type=float, default=240, help="skip what would start after this many seconds")
    p.add_argument("--hide-datasets", action="store_true", help="simulate a machine without datasets/evaluate")
    p.add_argument("--out-dir", default=None, help="JSON folder (default $OUT, else benchmarks/results)")
    args = p.parse_args(argv)
    if args.tiny:
        args.width, args.batch, args.block, args.rounds, args.score_samples = 4, 8, 2, 1, 8
        args.score_methods = "plain,vmap/4,loop,hooks/4"
        args.transformers, args.loop_samples, args.data_images = "bert:32:8:1,albert:32:8:1,vit:32:8:1", 8, 96
        args.budget_s = float("inf")  # every section runs: the smoke test checks them all
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.hide_datasets:
        hide_packages()
    t_start = time.perf_counter()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C
    import torch

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cuda = device.type == "cuda"
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and cuda)
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and cuda)
    torch.backends.cuda.matmul.allow_tf32 = True  # what a GPU user sets; convs use TF32 by default
    name = "gpu_check_compile" if args.compile else "gpu_check"
    out_dir = args.out_dir or os.environ.get("OUT") or None
    payload: dict = {"config": vars(args), "device": str(device), "bf16": bf16, "channels_last": channels_last,
                     "errors": {}, "steps": {}, "scoring": {}, "scoring_transformers": {}, "data_path": {},
                     "concurrent_members": {},
                     "projection": {}}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.budget_s

    # -- trainers and prepared batches -----------------------------------------------------------------
    m, b, n_rows = args.members, args.batch, PAPER["rows"]
    factory = C.model_factory("resnet18", args.width)
    configs = [(meth, None) for meth in args.methods.split(",") if meth != "sharpbalance"]
    if "sharpbalance" in args.methods:
        configs += [("sharpbalance", float(k)) for k in args.ks.split(",")]
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        rows = torch.cat([torch.randperm(n_rows, generator=gen)[:b] for _ in range(m)])
        x = torch.randn(m * b, 3, 32, 32, generator=gen).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append({"pixel_values": x, "labels": torch.randint(0, 10, (m * b,), generator=gen).to(device),
                        "sample_index": rows, "member_index": torch.arange(m).repeat_interleave(b)})
    trainers, fractions = {}, {}
    for meth, k in configs:
        label = meth if k is None else f"sharpbalance_k{k:g}"
        try:
            tr = C.make_trainer(meth, factory, C.TensorDictDataset(torch.zeros(n_rows), torch.zeros(n_rows, dtype=torch.long)), members=m,
                                batch_size=b, rho=args.rho, bf16=bf16, use_cpu=not cuda)
            if channels_last:
                tr.model.to(memory_format=torch.channels_last)
            if args.compile:
                for i, member in enumerate(tr.ensemble.members):
                    tr.ensemble.members[i] = torch.compile(member)
            tr.create_optimizer()
            tr.current_gradient_accumulation_steps = 1
            f = 1.0 if meth == "sam" else 0.0
            if k is not None:
                masks = C.random_masks(m, n_rows, k)
                tr.set_sam_masks(masks)
                f = sum(masks[i, bt["sample_index"][i * b:(i + 1) * b]].float().mean().item()
                        for bt in batches for i in range(m)) / (len(batches) * m)
            trainers[label], fractions[label] = tr, f
        except Exception as err:  # record and go on: a partial result beats none
            payload["errors"][f"build {label}"] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"

    def run_block(tr, steps: int) -> float:
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            tr.training_step(tr.model, dict(batches[tr.state.global_step % len(batches)]))
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
            tr.state.global_step += 1
        sync()
        return (time.perf_counter() - t) / steps

    # -- step timing: warm-up round (compile happens here), then interleaved rounds ------------------------
    times: dict[str, list[float]] = {label: [] for label in trainers}
    for r in range(1 + args.rounds):
        if r > 0 and over_budget():
            payload["errors"]["steps"] = f"stopped after {r - 1} timed rounds (budget {args.budget_s} s)"
            break
        for label, tr in list(trainers.items()):
            try:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                per = run_block(tr, args.block if r else 2)
                if r == 0:
                    payload["steps"].setdefault(label, {})["first_steps_s"] = time.perf_counter() - t
                else:
                    times[label].append(per)
                if cuda:
                    payload["steps"][label]["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
            except Exception as err:
                payload["errors"][f"steps {label}"] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}"
                trainers.pop(label)
        print(f"round {r}/{args.rounds} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    sgd = C.median(times.get("deep_ensemble", [])) if times.get("deep_ensemble") else float("nan")
    sam = C.median(times.get("sam", [])) if times.get("sam") else float("nan")
    rows = []
    for label, ts in times.items():
        if not ts:
            continue
        t, f = C.median(ts), fractions[label]
        payload["steps"][label].update({"ms_per_step": 1e3 * t, "steps_per_s": 1 / t, "f": f,
                                        "images_per_s": m * b / t, "vs_sgd": t / sgd, "vs_sam": t / sam,
                                        "ideal_vs_sgd": 1 + f})
        rows.append({"method": label, **payload["steps"][label]})
    C.print_table(rows, ["method", "f", "ms_per_step", "steps_per_s", "images_per_s", "vs_sgd", "ideal_vs_sgd",
                         "vs_sam", "first_steps_s", "peak_gpu_gib"],
                  title=f"{device} resnet18 w{args.width}, m={m}, batch {b}/member, bf16={bf16}, "
                        f"channels_last={channels_last}, compile={args.compile}")
    C.write_result(name, payload, out_dir)

    # -- scoring throughput ----------------------------------------------------------------------------
    if not args.compile and not over_budget():
        try:
            payload["scoring"] = score_throughput(args, factory, device, C, sync, over_budget)
        except Exception as err:
            payload["errors"]["scoring"] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}"
        srows = [{"method": k_, **v} for k_, v in payload["scoring"].items()]
        C.print_table(srows, ["method", "samples_per_s", "vs_plain", "max_rel_err_vs_loop"],
                      title=f"per-sample scoring on {device} (fp32, eval mode)")

    # -- transformer scoring: ghost norms vs the one-sample loop vs a batched forward+backward ----------------
    if not args.compile and not over_budget():
        try:
            payload["scoring_transformers"] = transformer_scoring(args, device, C, sync, over_budget)
        except Exception as err:
            payload["errors"]["scoring_transformers"] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}"
        trows = [{"model": k_, **v} for k_, v in payload["scoring_transformers"].items()]
        C.print_table(trows, ["model", "params", "plain_samples_per_s", "ghost_samples_per_s", "loop_samples_per_s",
                              "ghost_vs_plain", "loop_vs_plain", "ghost_max_rel_err_vs_loop"],
                      title=f"transformer per-sample scoring on {device} (fp32, eval mode)")
        C.write_result(name, payload, out_dir)

    # -- data path: the CPU loader (decode + augment per row) vs the device-side pipeline --------------------
    if not args.compile and not over_budget():
        try:
            payload["data_path"] = data_path(args, device, C)
        except Exception as err:
            payload["errors"]["data_path"] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}"
        print("data path images/s:", payload["data_path"])
        C.write_result(name, payload, out_dir)

    # -- small members at the same time: torch.func vmap over stacked members vs the member loop ------------
    if not args.compile and not over_budget():
        try:
            payload["concurrent_members"] = concurrent_members(args, device, C, sync)
        except Exception as err:
            payload["errors"]["concurrent_members"] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}"
        print("members at the same time:", payload["concurrent_members"])
        C.write_result(name, payload, out_dir)

    # -- projection of the paper's run -----------------------------------------------------------------
    steps = payload["steps"]
    per_epoch = PAPER["rows"] // b  # the paper's 390 steps at b = 128
    sb_key = f"sharpbalance_k{PAPER['k']:g}"
    scorers = {k_: v["samples_per_s"] for k_, v in payload["scoring"].items() if k_ != "plain"}
    best_score = max(scorers.values()) if scorers else float("nan")
    proj = {}
    if "ms_per_step" in steps.get("deep_ensemble", {}):
        proj["deep_ensemble_h"] = PAPER["epochs"] * per_epoch * steps["deep_ensemble"]["ms_per_step"] / 3.6e6
    if "ms_per_step" in steps.get("sam", {}):
        proj["sam_h"] = PAPER["epochs"] * per_epoch * steps["sam"]["ms_per_step"] / 3.6e6
        if "ms_per_step" in steps.get(sb_key, {}):
            score_h = PAPER["rows"] * PAPER["members"] / best_score / 3600
            proj["sharpbalance_h"] = (PAPER["td"] * steps["sam"]["ms_per_step"] + (PAPER["epochs"] - PAPER["td"])
                                      * steps[sb_key]["ms_per_step"]) * per_epoch / 3.6e6 + score_h
            proj["scoring_once_h_best"] = score_h
            proj["best_scorer"] = max(scorers, key=scorers.get) if scorers else None
    payload["projection"] = proj
    payload["wall_s"] = time.perf_counter() - t_start
    print(f"\nprojected paper run ({PAPER}, at batch {b}, data loading excluded): "
          + ", ".join(f"{k_} {v:.3g}" if isinstance(v, float) else f"{k_} {v}" for k_, v in proj.items()))
    if payload["errors"]:
        print("errors:", *payload["errors"].items(), sep="\n  ")
    C.write_result(name, payload, out_dir)
    return payload


def transformer_scoring(args, device, common, sync, over_budget) -> dict:
    """Samples/s of ``ghost`` scoring, the one-sample ``loop`` and a plain batched forward+backward per transformer."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import scoring as bench

    out: dict = {}
    for spec in args.transformers.split(","):
        if over_budget():
            break
        name, width, model, data, _ = bench.build(spec, real=False)
        out[f"{name}:{width}"] = _score_transformer(model.to(device).eval(), data, args, device, common, sync)
    return out


def _score_transformer(model, data, args, device, common, sync) -> dict:
    import torch.nn.functional as F

    from sbtrainer.member_adapter import call_member, model_inputs
    from sbtrainer.scoring import per_sample_sharpness

    n = len(data)

    def plain() -> None:
        for lo in range(0, n, 64):
            batch = {k: v.to(device) for k, v in data.rows(lo, lo + 64).items()}
            F.cross_entropy(call_member(model, model_inputs(batch, model)), batch["labels"]).backward()
        model.zero_grad(set_to_none=True)

    def timed(fn) -> tuple[float, object]:
        best, res = float("inf"), None
        for _ in range(2):  # warm-up, then timed
            sync()
            t = time.perf_counter()
            res = fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return best, res

    loop_rows = list(range(min(n, args.loop_samples)))
    t_plain, _ = timed(plain)
    t_ghost, ghost = timed(lambda: per_sample_sharpness(model, data, batch_size=64, device=device, method="ghost",
                                                        progress=False))
    t_loop, loop = timed(lambda: per_sample_sharpness(model, data, rows=loop_rows, batch_size=64, device=device,
                                                      method="loop", progress=False))
    rows = {"params": sum(p.numel() for p in model.parameters()), "samples": n, "plain_samples_per_s": n / t_plain,
            "ghost_samples_per_s": n / t_ghost, "loop_samples_per_s": len(loop_rows) / t_loop}
    rows["ghost_vs_plain"] = rows["plain_samples_per_s"] / rows["ghost_samples_per_s"]
    rows["loop_vs_plain"] = rows["plain_samples_per_s"] / rows["loop_samples_per_s"]
    rows["ghost_max_rel_err_vs_loop"] = common.max_rel_err(ghost[: len(loop_rows)], loop)
    return rows


def concurrent_members(args, device, common, sync) -> dict:
    """Forward+backward of m small CNNs, each on its own batch: the member loop vs one vmapped call.

    ``torch.func.stack_module_state`` stacks the members' weights; ``vmap(grad(loss))`` runs the m plain passes
    as one batched call (BatchNorm with batch statistics only, as vmap needs: ``replace_all_batch_norm_modules_``
    on copies; the loop side uses the same copies). Returns images/s of both and their ratio, per width.
    """
    import copy

    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, replace_all_batch_norm_modules_, stack_module_state, vmap

    m, b = args.members, args.batch
    out: dict = {}
    for width in (8, 32):
        torch.manual_seed(0)
        members = [replace_all_batch_norm_modules_(copy.deepcopy(common.small_cnn(width=width))).to(device)
                   for _ in range(m)]
        x = torch.randn(m, b, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (m, b), device=device)
        params, buffers = stack_module_state(members)
        base = copy.deepcopy(members[0]).to("meta")

        def loss(p, bu, xi, yi, base=base):
            return F.cross_entropy(functional_call(base, (p, bu), (xi,)), yi)

        batched = vmap(grad(loss), in_dims=(0, 0, 0, 0))

        def loop(members=members, x=x, y=y):
            for i, member in enumerate(members):
                F.cross_entropy(member(x[i]), y[i]).backward()
                member.zero_grad(set_to_none=True)

        def stacked(params=params, buffers=buffers, x=x, y=y, batched=batched):
            batched(params, buffers, x, y)

        rates = {}
        for label, fn in (("loop", loop), ("vmap", stacked)):
            best = float("inf")
            for _ in range(3):
                sync()
                t = time.perf_counter()
                for _ in range(args.block):
                    fn()
                sync()
                best = min(best, (time.perf_counter() - t) / args.block)
            rates[f"{label}_images_per_s"] = m * b / best
        rates["vmap_over_loop"] = rates["vmap_images_per_s"] / rates["loop_images_per_s"]
        out[f"cnn_w{width}"] = rates
    return out


def data_path(args, device, common) -> dict:
    """Images/s of the CPU member loader (decode + crop/flip per row) and of the device pipeline, CIFAR-10 rows.

    Real images from ``$SBTRAINER_CIFAR10`` (parquet, read with pyarrow: no ``datasets`` needed) or random
    uint8 images when absent.
    """
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import data_pipeline

    images, labels, source = common.cifar_uint8(args.data_images)
    res = data_pipeline.device_vs_cpu_images_per_s(images, labels, args.batch, args.members, device)
    res["source"] = source
    return res


def score_throughput(args, factory, device, common, sync, over_budget) -> dict:
    """Samples/s of each scoring implementation (fp32, eval mode) and of a plain forward+backward."""
    import torch
    import torch.nn.functional as F

    from sbtrainer.scoring import per_sample_sharpness

    torch.manual_seed(0)
    model = factory().to(device).eval()
    n = args.score_samples
    g = torch.Generator().manual_seed(1)
    data = common.TensorDictDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    out: dict = {}
    scores = {}
    for meth in args.score_methods.split(","):
        if over_budget():
            break
        kind, _, chunk = meth.partition("/")
        best = float("inf")
        for _ in range(2):  # the first run warms up (cuDNN plans, vmap), the second is timed
            sync()
            t = time.perf_counter()
            if kind == "plain":
                x, y = data.x.to(device), data.y.to(device)
                for lo in range(0, n, args.batch):
                    F.cross_entropy(model(x[lo:lo + args.batch]), y[lo:lo + args.batch]).backward()
                model.zero_grad(set_to_none=True)
            else:
                scores[meth] = per_sample_sharpness(model, data, batch_size=int(chunk or 64), device=device,
                                                    method=kind, progress=False)
            sync()
            best = min(best, time.perf_counter() - t)
        out[meth] = {"samples_per_s": n / best}
    if "plain" in out:
        for v in out.values():
            v["vs_plain"] = out["plain"]["samples_per_s"] / v["samples_per_s"]
    ref = scores.get("loop")
    for meth, s in scores.items():
        if ref is not None:
            out[meth]["max_rel_err_vs_loop"] = common.max_rel_err(s, ref)
    return out


if __name__ == "__main__":
    main()
