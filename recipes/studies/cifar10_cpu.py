"""Study: deep ensemble vs SAM ensemble vs SharpBalance on real CIFAR-10 at CPU scale (issue 14, items 2 and 4).

    .venv/bin/python recipes/studies/cifar10_cpu.py                       # select rho, k; then the main table
    .venv/bin/python recipes/studies/cifar10_cpu.py --phase main --rho 0.05 --k 0.2   # the table at given rho, k
    .venv/bin/python recipes/studies/cifar10_cpu.py --tiny --out /tmp/s   # the smoke-test size (a few minutes)

Each run is `recipes/cifar_resnet.py` with the paper's CIFAR-10 config of its method
(``recipes/configs/cifar10_<method>.yaml``: SGD 0.1 momentum 0.9 wd 5e-4, step decay x0.1 at 1/2 and 3/4 of
training, SAM to Td then the subset phase) scaled down to what 2 CPU cores do in about 1.5 hours: ``--rows``
real training rows (``../shared/data/cifar10``, drawn at random with ``--subset_seed``), a CIFAR-stem ResNet18
of width ``--width`` (stem and stages ``w, 2w, 4w, 8w``; 176,402 parameters at 8), batch ``--batch``,
``--epochs`` epochs with Td = epochs / 2, m = 3 members with seeds ``(s, s+1, s+2)`` for study seed ``s``.

The regime is the paper's: members that fit their training rows (near interpolation). Measured before the
study (one member, 40 epochs, batch 64): with crop 32 pad 4 + flip, 1,000 rows reach 63% training accuracy
(2,000 rows at batch 128 for 30 epochs: 51%), the under-fitted regime where the flat methods were already
known not to help; with flip only (``--crop-padding 0``, the default here) 1,000 rows reach 99.5%. Hence the
default: flip only. Pass ``--crop-padding 4`` (and many more epochs) for the paper's augmentation.

Evaluated: member and ensemble accuracy, EIR, DER, variance, KL, NLL, ECE on ``--eval-rows`` random test rows
and on the 15 generated corruptions x 5 severities of ``--corrupt-rows`` of them; accuracy on the training
rows without augmentation (eval mode); the members' sharpness on ``--sharpness-batches`` training batches of 5:
adaptive worst case (the paper's, ρ0 0.5, 20 ascent steps), non-adaptive worst case at ``--plain-rho`` (what
plain SAM minimises; README, "Is the sharpness measured right?") and adaptive average case at ``--average-rho0``.

Phases. ``select`` (App. D.3, one seed, held-out 10% of the training rows, no corrupted sets): SAM ensembles
over ``--rhos`` and the deep ensemble, then SharpBalance over ``--ks`` with the best ρ (best = the ensemble
accuracy on the held-out rows; ties to the smaller value); writes ``select/selected.json`` and the trade-off
(Fig. 4) of these ensembles with `recipes/tradeoff.py`'s report into ``select/tradeoff/`` (x: adaptive
worst case), ``select/tradeoff_plain/`` and ``select/tradeoff_average/`` (x: the other two measures). ``main``: the three
methods x ``--seeds`` at the selected (``all``) or the given (``main``) ρ and k. ``all`` (default) runs both,
``--jobs`` runs at once in three waves: (ρ grid, deep-ensemble runs), (k grid, SAM runs), (SharpBalance runs).

Resumable: one JSON per run in ``--out`` (``<phase>/<method>[_rho<ρ>][_k<k>]_seed<s>.json``: the recipe's
results, the run's wall seconds and its own CPU seconds); a rerun skips every run whose JSON exists.
``summary.json``/``summary.md`` (mean ± half-range over seeds) are rewritten from the JSONs on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _runs
from _runs import ROOT, run_recorded

DATA = Path(os.environ.get("SBTRAINER_CIFAR10", ROOT.parent / "shared" / "data" / "cifar10"))
METHODS = ("deep_ensemble", "sam", "sharpbalance")
KEYS = ("eval_ensemble_accuracy", "eval_member_accuracy", "eval_eir", "eval_der", "eval_variance", "eval_kl",
        "eval_ensemble_nll", "eval_ensemble_ece", "cifar10c_all_ensemble_accuracy", "cifar10c_all_member_accuracy",
        "cifar10c_all_eir", "cifar10c_all_der", "cifar10c_all_ensemble_nll", "cifar10c_all_ensemble_ece",
        "cifar10c_all_variance", "cifar10c_all_kl", "train_ensemble_accuracy", "train_member_accuracy",
        "train_ensemble_nll", "sharpness", "plain_sharpness", "average_sharpness")
TABLES = {  # the README's tables: (title, [(column, key, percent?)])
    "in distribution": [("ensemble acc", "eval_ensemble_accuracy", True), ("member acc", "eval_member_accuracy", True),
                        ("EIR", "eval_eir", False), ("DER", "eval_der", False), ("variance", "eval_variance", False),
                        ("KL", "eval_kl", False), ("NLL", "eval_ensemble_nll", False),
                        ("ECE", "eval_ensemble_ece", False), ("train acc (members)", "train_member_accuracy", True)],
    "CIFAR-10-C (15 corruptions x 5 severities)": [
        ("ensemble acc", "cifar10c_all_ensemble_accuracy", True), ("member acc", "cifar10c_all_member_accuracy", True),
        ("EIR", "cifar10c_all_eir", False), ("DER", "cifar10c_all_der", False),
        ("variance", "cifar10c_all_variance", False), ("KL", "cifar10c_all_kl", False),
        ("NLL", "cifar10c_all_ensemble_nll", False), ("ECE", "cifar10c_all_ensemble_ece", False)],
    "members' sharpness (training batches)": [
        ("adaptive worst case (paper)", "sharpness", False), ("plain worst case", "plain_sharpness", False),
        ("adaptive average case", "average_sharpness", False)],
}
SUMMARIES = ("summary.json", "selected.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=("all", "main", "select"), default="all",
                   help="all: select rho then k on the held-out rows, then the main table with the selected ones")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "studies" / "cifar10_cpu"))
    p.add_argument("--work", default=str(ROOT / "outputs" / "studies" / "cifar10_cpu"), help="run folders (ignored)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--eval-rows", type=int, default=1000)
    p.add_argument("--corrupt-rows", type=int, default=500)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--crop-padding", type=int, default=0,
                   help="random-crop padding (paper: 4); 0 = flip only, so that members fit the rows in budget")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="on")
    p.add_argument("--device-augment", choices=("auto", "on", "off"), default="on")
    p.add_argument("--rho", type=float, default=0.05, help="--phase main: SAM/SharpBalance rho")
    p.add_argument("--k", type=float, default=0.2, help="--phase main: SharpBalance k")
    p.add_argument("--rhos", default="0.01,0.02,0.05,0.1,0.2", help="paper: also 0.5")
    p.add_argument("--ks", default="0.2,0.5", help="paper: 0.2,0.3,0.4,0.5,0.6 (two of them fit the budget)")
    p.add_argument("--sharpness-batches", type=int, default=20)
    p.add_argument("--plain-rho", type=float, default=0.05,
                   help="radius of the non-adaptive worst-case sharpness measured beside the paper's adaptive one")
    p.add_argument("--average-rho0", type=float, default=0.1, help="rho0 of the adaptive average-case sharpness")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=1,
                   help="torch threads per run (1: reproducible, and no OpenMP spin-waiting beside other jobs)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one per core with --num-threads 1)")
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    p.add_argument("--corruptions", default=None, help="comma-separated subset of the 15 (default: all)")
    p.add_argument("--severities", default="1,2,3,4,5")
    args = p.parse_args(argv)
    if args.tiny:
        args.rows, args.eval_rows, args.corrupt_rows, args.width, args.epochs, args.batch = 48, 24, 8, 4, 2, 16
        args.seeds, args.sharpness_batches, args.rhos, args.ks = "0", 2, "0.05,0.1", "0.4"
        args.corruptions, args.severities = args.corruptions or "gaussian_noise", "5"
        args.channels_last = "off"  # width 4: channels_last crashes torch's CPU conv backward (see the recipe)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1; got {args.jobs}")
    return args


def run_name(method: str, rho: float, k: float, seed: int | None = None) -> str:
    """``deep_ensemble``, ``sam_rho<ρ>``, ``sharpbalance_rho<ρ>_k<k>``, with ``_seed<s>`` when a seed is given."""
    name = {"deep_ensemble": method, "sam": f"sam_rho{rho:g}"}.get(method, f"{method}_rho{rho:g}_k{k:g}")
    return name if seed is None else f"{name}_seed{seed}"


def recipe_argv(args: argparse.Namespace, method: str, rho: float, k: float, seed: int, out_dir: Path,
                heldout: bool) -> list[str]:
    td = max(1, args.epochs // 2)
    argv = [str(ROOT / "recipes" / "configs" / f"cifar10_{method}.yaml"), "--dataset_name", str(DATA),
            "--output_dir", str(out_dir), "--max_train_samples", str(args.rows), "--model_width", str(args.width),
            "--num_train_epochs", str(args.epochs), "--lr_milestones", str(args.epochs // 2), str(3 * args.epochs // 4),
            "--per_device_train_batch_size", str(args.batch), "--per_device_eval_batch_size", "500",
            "--seed", str(seed), "--member_seeds", str(seed), str(seed + 1), str(seed + 2),
            "--subset_seed", str(args.subset_seed), "--sharpness_batches", str(args.sharpness_batches),
            "--sharpness_plain_rho", str(args.plain_rho), "--sharpness_average_rho0", str(args.average_rho0),
            "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", "20", "--disable_tqdm", "true",
            "--dataloader_num_workers", "0", "--report_to", "none", "--num_threads", str(args.num_threads),
            "--crop_padding", str(args.crop_padding), "--channels_last", args.channels_last,
            "--device_augment", args.device_augment]
    if method != "deep_ensemble":
        argv += ["--rho", str(rho)]
    if method == "sharpbalance":
        argv += ["--sam_fraction", str(k), "--scoring_start_epoch", str(td)]
    if heldout:  # App. D.3: select on 10% of the training rows; no corrupted sets
        argv += ["--validation_fraction", "0.1", "--corrupt_offline", "false", "--max_eval_samples", str(args.eval_rows)]
    else:
        argv += ["--max_eval_samples", str(args.eval_rows), "--corrupt_offline", "true",
                 "--corrupt_samples", str(args.corrupt_rows), "--severities", *args.severities.split(",")]
        if args.corruptions:
            argv += ["--corruptions", *args.corruptions.split(",")]
    return argv


def run_one(args: argparse.Namespace, phase: str, method: str, rho: float, k: float, seed: int) -> dict:
    """Run one (method, rho, k, seed) unless its JSON exists; returns its record."""
    name = run_name(method, rho, k, seed)
    out_dir = Path(args.work) / phase / name
    meta = {"phase": phase, "method": method, "rho": rho if method != "deep_ensemble" else None,
            "k": k if method == "sharpbalance" else None, "seed": seed,
            "setting": {"rows": args.rows, "width": args.width, "epochs": args.epochs, "batch": args.batch,
                        "td": max(1, args.epochs // 2), "crop_padding": args.crop_padding,
                        "eval_rows": args.eval_rows, "corrupt_rows": args.corrupt_rows,
                        "subset_seed": args.subset_seed, "num_threads": args.num_threads}}
    return run_recorded("cifar_resnet.py", recipe_argv(args, method, rho, k, seed, out_dir, heldout=phase == "select"),
                        out_dir, Path(args.out) / phase / f"{name}.json", meta)


def records_on_disk(args: argparse.Namespace, phase: str) -> list[dict]:
    """Every finished run's record of ``phase`` in ``--out`` (also those of other invocations), by file name."""
    folder = Path(args.out) / phase
    return [json.loads(f.read_text()) for f in sorted(folder.glob("*.json")) if f.name not in SUMMARIES]


def write_summary(args: argparse.Namespace, phase: str) -> dict:
    """``summary.json``/``summary.md`` and the README's ``tables.md`` of ``phase`` from every record on disk,
    grouped by run name without seed."""
    records = records_on_disk(args, phase)
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(run_name(r["method"], r["rho"] or 0, r["k"] or 0), []).append(r)
    payload = _runs.write_summary(Path(args.out) / phase, phase, groups, KEYS)
    setting = records[0]["setting"] if records else {}
    text = [f"Setting: {json.dumps(setting)}; {payload['runs']} runs, {payload['cpu_hours']:.2f} CPU hours.\n"]
    for title, columns in TABLES.items():  # mean ± half-range over seeds
        if any(key in row for _, key, _ in columns for row in payload["summary"].values()):
            text += [f"\n{title}:\n", _runs.markdown(payload["summary"], columns, digits=3)]
    (Path(args.out) / phase / "tables.md").write_text("\n".join(text))
    return payload


def select(args: argparse.Namespace, records: list[dict]) -> dict:
    """App. D.3: ρ = the SAM ensemble's best held-out accuracy; k = SharpBalance's best with that ρ.

    Ties go to the smaller value (the grid's order). Returns ``{"rho", "k", "criterion", "grid"}``;
    ``k`` is None until every SharpBalance run of the grid has finished.
    """
    def best(runs: list[dict], key: str) -> float:
        return max(sorted(runs, key=lambda r: r[key]), key=lambda r: r["results"]["eval_ensemble_accuracy"])[key]

    sam = [r for r in records if r["method"] == "sam"]
    rho = best(sam, "rho")
    sb = [r for r in records if r["method"] == "sharpbalance" and r["rho"] == rho]
    k = best(sb, "k") if len(sb) == len(parse_floats(args.ks)) else None
    return {"rho": rho, "k": k, "criterion": "eval_ensemble_accuracy on the held-out 10% of the training rows",
            "grid": {"rhos": parse_floats(args.rhos), "ks": parse_floats(args.ks)}}


def tradeoff_points(records: list[dict]) -> list[dict]:
    """One point per selection-phase ensemble for `tradeoff.report`: sharpness vs diversity on the held-out rows."""
    points = []
    for r in sorted(records, key=lambda r: (METHODS.index(r["method"]), r["rho"] or 0, r["k"] or 0)):
        res = r["results"]
        if "sharpness" not in res:
            continue
        points.append({"method": r["method"] if r["method"] != "sharpbalance" else f"sharpbalance k={r['k']:g}",
                       "label": r["method"], "rho": r["rho"] or 0.0, "sharpness": res["sharpness"],
                       "plain_sharpness": res.get("plain_sharpness"), "average_sharpness": res.get("average_sharpness"),
                       **{key: res.get(f"eval_{key}") for key in ("der", "variance", "kl", "eir", "member_accuracy",
                                                                  "ensemble_accuracy")},
                       "measured_on": "held-out 10% of the training rows"})
    return points


def write_tradeoff(args: argparse.Namespace, records: list[dict]) -> None:
    """Fig. 4 at this setting: `recipes/tradeoff.py`'s report (table, β fit, scatter plots) of the selection runs."""
    sys.path.insert(0, str(ROOT / "recipes"))
    import tradeoff

    points = tradeoff_points(records)
    facts = {"setting": records[0]["setting"] if records else {}, "source": "recipes/studies/cifar10_cpu.py"}
    if len(points) >= 2:
        tradeoff.report(points, str(Path(args.out) / "select" / "tradeoff"), facts={**facts, "x": "sharpness (adaptive)"})
    for kind in ("plain", "average"):  # the same ensembles against the other two measures
        other = [{**p, "sharpness": p[f"{kind}_sharpness"]} for p in points if p.get(f"{kind}_sharpness") is not None]
        if len(other) >= 2:
            tradeoff.report(other, str(Path(args.out) / "select" / f"tradeoff_{kind}"),
                            facts={**facts, "x": f"{kind}_sharpness"})


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def run_wave(args: argparse.Namespace, jobs: list[tuple[str, str, float, float, int]]) -> list[dict]:
    """Run ``(phase, method, rho, k, seed)`` jobs, ``--jobs`` at once (each its own process); their records.

    Raises:
        RuntimeError: the first failed run's error, after the others of the wave have finished.
    """
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, args, *job) for job in jobs]
        return [f.result() for f in futures]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not (DATA / "plain_text").is_dir():
        raise SystemExit(f"CIFAR-10 not found at {DATA} (set SBTRAINER_CIFAR10): this study needs the real images")
    start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    rhos, ks = parse_floats(args.rhos), parse_floats(args.ks)
    main_runs = [("main", m, args.rho, args.k, s) for s in seeds for m in methods]
    if args.phase == "main":
        run_wave(args, main_runs)
    else:  # waves: (SAM rho grid + DE point | main DE runs), (k grid | main SAM runs), (main SharpBalance runs)
        sel_de = [("select", "deep_ensemble", 0.0, 0.0, seeds[0])]
        first = [("select", "sam", rho, 0.0, seeds[0]) for rho in rhos] + sel_de
        mains = {m: [j for j in main_runs if j[1] == m] for m in methods}
        later = args.phase == "all"
        run_wave(args, first + (mains.get("deep_ensemble", []) if later else []))
        rho = select(args, records_on_disk(args, "select"))["rho"]
        run_wave(args, [("select", "sharpbalance", rho, k, seeds[0]) for k in ks]
                 + ([("main", "sam", rho, 0.0, s) for s in seeds if "sam" in methods] if later else []))
        chosen = select(args, records_on_disk(args, "select"))
        Path(args.out, "select").mkdir(parents=True, exist_ok=True)
        Path(args.out, "select", "selected.json").write_text(json.dumps(chosen, indent=1) + "\n")
        write_summary(args, "select")
        write_tradeoff(args, records_on_disk(args, "select"))
        if later and "sharpbalance" in methods:
            run_wave(args, [("main", "sharpbalance", chosen["rho"], chosen["k"], s) for s in seeds])
    phase = "select" if args.phase == "select" else "main"
    payload = write_summary(args, phase)
    payload["driver_wall_hours"] = (time.perf_counter() - start) / 3600
    print(Path(args.out, phase, "summary.md").read_text())
    return payload


if __name__ == "__main__":
    main()
