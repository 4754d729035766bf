"""Theorems 1-2 (paper Sec. 3, App. C): analytic sharpness-diversity curves and the Gaussian simulation.

    .venv/bin/python recipes/theory.py --figures 1b 2 9                 # stable settings, a few minutes
    .venv/bin/python recipes/theory.py --figures 10 11 --num_draws 20   # the paper's Fig. 10/11 grids
    .venv/bin/python recipes/theory.py --n_tr 60 --d_in 12 --n_te 40 --num_draws 3 --num_inits 4   # tiny

Linear students trained by SAM (unnormalised ascent, half-sum squared loss) on Gaussian data, as in
`sbtrainer.theory`. Writes into ``--output_dir``:

- ``fig1b.png``: Theorem 1 (SAM, all data) and Theorem 2 (each model on one of S blocks) as ρ varies,
  sharpness upper bound against diversity, analytic only (paper Fig. 1b).
- ``fig2.png`` / ``fig9.png``: theory against simulation for SAM / for subset training at stable settings
  (ρ sweep; Fig. 9 also a num_steps sweep).
- ``fig10.png`` / ``fig11.png``: the paper's App. C.3 grids read literally (num_steps × η panels, a ρ
  sweep each). At n_tr × d_in = 3000 × 150 most of these settings diverge (growth factor > 1).
- ``theory.md`` and ``results.json``: every point: the theory (D, sharpness bounds, growth factor), the
  simulation (D, ascent and exact sharpness, standard errors) and whether it reproduces
  (|D_sim/D − 1| <= --rel_tol and the sharpness within the bounds up to --num_sem standard errors).

The table is also printed. Sizes default to the paper's (3000 × 150 training, 1000 test rows, 50 data
draws × 50 inits, S = 10); σ, ‖θ*‖ and ρ0 are not given in the paper: σ = 1 and ‖θ*‖ = √d_in (init and
teacher outputs both of unit variance), ρ0 = 0.1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from sbtrainer.theory import agreement, sam_theory, simulate, subset_theory

logger = logging.getLogger("sbtrainer.recipes.theory")
FIGURES = ("1b", "2", "9", "10", "11")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/theory")
    p.add_argument("--figures", nargs="+", default=list(FIGURES), choices=FIGURES, help="which figures to make")
    size = p.add_argument_group("data and models (App. C.3)")
    size.add_argument("--n_tr", type=int, default=3000, help="training rows")
    size.add_argument("--d_in", type=int, default=150, help="input dimension")
    size.add_argument("--n_te", type=int, default=1000, help="test rows for the diversity")
    size.add_argument("--num_draws", type=int, default=50, help="data draws per simulated point")
    size.add_argument("--num_inits", type=int, default=50, help="inits per data draw (and per block)")
    size.add_argument("--num_subsets", type=int, default=10, help="S: row blocks for subset training (divides n_tr)")
    size.add_argument("--sigma", type=float, default=1.0, help="init standard deviation per coordinate")
    size.add_argument("--theta_star_norm", type=float, default=None, help="teacher norm (default: sqrt(d_in))")
    size.add_argument("--rho0", type=float, default=0.1, help="sharpness radius")
    size.add_argument("--mean_weights", default="exact", choices=("exact", "empirical"),
                      help="sharpness at E[theta_k] exactly or at the mean of the trained models")
    size.add_argument("--c_formula", default="paper", choices=("paper", "partition"), help="Theorem 2's C")
    size.add_argument("--no_exact_sharpness", action="store_true", help="skip the exact trust-region maximum")
    size.add_argument("--seed", type=int, default=0)
    check = p.add_argument_group("reproduction criterion")
    check.add_argument("--rel_tol", type=float, default=0.1, help="max |D_sim / D_theory - 1| (0.1 = 10%%)")
    check.add_argument("--num_sem", type=float, default=2.0, help="sharpness slack, in standard errors")
    f1 = p.add_argument_group("Fig. 1b (analytic)")
    f1.add_argument("--fig1b_rhos", type=float, nargs="+", default=[round(0.05 * i, 2) for i in range(13)])
    f1.add_argument("--fig1b_steps", type=int, default=4)
    f1.add_argument("--fig1b_sam_eta", type=float, default=0.002)
    f1.add_argument("--fig1b_subset_eta", type=float, default=0.04)
    f2 = p.add_argument_group("Fig. 2 (SAM) and Fig. 9 (subsets): stable settings")
    f2.add_argument("--fig2_eta", type=float, default=0.002)
    f2.add_argument("--fig2_steps", type=int, default=4)
    f2.add_argument("--fig2_rhos", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    f2.add_argument("--fig9_eta", type=float, default=0.04)
    f2.add_argument("--fig9_steps", type=int, default=8, help="num_steps of panel (a)")
    f2.add_argument("--fig9_rhos", type=float, nargs="+", default=[1.0, 0.8, 0.6, 0.4], help="panel (a)")
    f2.add_argument("--fig9_rho", type=float, default=0.7, help="rho of panel (b)")
    f2.add_argument("--fig9_step_list", type=int, nargs="+", default=[1, 3, 5, 8, 11, 15], help="panel (b)")
    f3 = p.add_argument_group("Fig. 10 (SAM) and Fig. 11 (subsets): the paper's grids")
    f3.add_argument("--fig10_steps", type=int, nargs="+", default=[2, 4, 8])
    f3.add_argument("--fig10_etas", type=float, nargs="+", default=[0.1, 0.05, 0.01])
    f3.add_argument("--fig10_rhos", type=float, nargs="+", default=[0.5, 0.4, 0.3])
    f3.add_argument("--fig11_steps", type=int, nargs="+", default=[4, 8, 12])
    f3.add_argument("--fig11_etas", type=float, nargs="+", default=[0.5, 0.3, 0.1])
    f3.add_argument("--fig11_rhos", type=float, nargs="+", default=[1.0, 0.7, 0.4])
    args = p.parse_args(argv)
    if args.theta_star_norm is None:
        args.theta_star_norm = math.sqrt(args.d_in)
    return args


# ----------------------------------------------------------------------------- one point


def theory_point(args: argparse.Namespace, method: str, eta: float, rho: float, steps: int):
    """Theorem 1 (``method="sam"``) or 2 (``"subset"``) at one setting."""
    common = {"eta": eta, "rho": rho, "num_steps": steps, "sigma": args.sigma, "n_tr": args.n_tr,
              "d_in": args.d_in, "rho0": args.rho0, "theta_star_norm": args.theta_star_norm}
    if method == "sam":
        return sam_theory(**common)
    return subset_theory(**common, num_subsets=args.num_subsets, c_formula=args.c_formula)


def point(args: argparse.Namespace, figure: str, panel: str, method: str, eta: float, rho: float, steps: int,
          simulated: bool = True) -> dict[str, Any]:
    """One row of the table: the theory and (``simulated``) the App. C.3 simulation at one setting."""
    th = theory_point(args, method, eta, rho, steps)
    row = {"figure": figure, "panel": panel, "method": method, "eta": eta, "rho": rho, "num_steps": steps,
           "growth_factor": th.growth_factor, "diversity_theory": th.diversity,
           "sharpness_lower": th.sharpness_lower, "sharpness_upper": th.sharpness_upper}
    if simulated:
        sim = simulate(eta=eta, rho=rho, num_steps=steps, sigma=args.sigma, n_tr=args.n_tr, d_in=args.d_in,
                       rho0=args.rho0, theta_star_norm=args.theta_star_norm,
                       num_subsets=args.num_subsets if method == "subset" else 1, num_draws=args.num_draws,
                       num_inits=args.num_inits, n_te=args.n_te, mean_weights=args.mean_weights,
                       exact_sharpness=not args.no_exact_sharpness, seed=args.seed)
        row.update({"diversity_sim": sim.diversity, "diversity_sem": sim.diversity_sem,
                    "sharpness_sim": sim.sharpness, "sharpness_sem": sim.sharpness_sem,
                    "sharpness_exact": sim.sharpness_exact, "finite": sim.finite, "seconds": sim.seconds})
        row.update(agreement(th, sim, rel_tol=args.rel_tol, num_sem=args.num_sem))
        logger.info("fig %s %s %s eta=%g rho=%g k=%d: D %.4g vs %.4g, kappa %.4g in [%s, %.4g] (%.1f s)", figure,
                    panel, method, eta, rho, steps, th.diversity, sim.diversity, sim.sharpness,
                    "-" if th.sharpness_lower is None else f"{th.sharpness_lower:.4g}", th.sharpness_upper, sim.seconds)
    return row


# ----------------------------------------------------------------------------- figures


def fig1b(args: argparse.Namespace) -> list[dict]:
    """SAM vs subset training, analytic, as ρ varies (one row per ρ and method)."""
    rows = [point(args, "1b", "", method, eta, rho, args.fig1b_steps, simulated=False)
            for method, eta in (("sam", args.fig1b_sam_eta), ("subset", args.fig1b_subset_eta))
            for rho in args.fig1b_rhos]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for method, label in (("sam", "SAM (theory)"), ("subset", "subsets / SharpBalance (theory)")):
        pts = [r for r in rows if r["method"] == method]
        ax.plot([r["sharpness_upper"] for r in pts], [r["diversity_theory"] for r in pts], "o-", label=label, ms=3)
    ax.set_xlabel("sharpness (upper bound)")
    ax.set_ylabel("diversity")
    ax.set_title(f"Thm 1-2, {args.n_tr}x{args.d_in}, S={args.num_subsets}, k={args.fig1b_steps}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(args.output_dir) / "fig1b.png")
    plt.close(fig)
    return rows


def matched_diversity_gain(rows: list[dict]) -> list[float]:
    """For each subset point inside the SAM curve's sharpness range: D_subset / D_SAM at equal upper bound.

    The SAM curve is interpolated (linearly) over its points sorted by sharpness upper bound.
    """
    sam = sorted((r["sharpness_upper"], r["diversity_theory"]) for r in rows if r["method"] == "sam")
    xs, ys = np.array([x for x, _ in sam]), np.array([y for _, y in sam])
    return [r["diversity_theory"] / float(np.interp(r["sharpness_upper"], xs, ys))
            for r in rows if r["method"] == "subset" and xs[0] <= r["sharpness_upper"] <= xs[-1]]


def panel_figure(args: argparse.Namespace, name: str, panels: list[tuple[str, str, list[tuple[float, float, int]]]],
                 ) -> list[dict]:
    """Theory-vs-simulation panels: ``panels`` = [(title, method, [(eta, rho, steps), ...]), ...]."""
    rows: list[dict] = []
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.3 * nrow), dpi=100, squeeze=False)
    for ax, (title, method, settings) in zip(axes.flat, panels, strict=False):
        pts = [point(args, name, title, method, eta, rho, steps) for eta, rho, steps in settings]
        rows += pts
        d_th = [r["diversity_theory"] for r in pts]
        ax.plot([r["sharpness_upper"] for r in pts], d_th, "s--", color="C0", ms=4, label="upper bound")
        lower = [(r["sharpness_lower"], r["diversity_theory"]) for r in pts
                 if r["sharpness_lower"] is not None and r["sharpness_lower"] > 0]  # <= 0: vacuous, not drawn
        if lower:
            ax.plot(*zip(*lower, strict=True), "^--", color="C2", ms=4, label="lower bound (> 0 only)")
        ax.errorbar([r["sharpness_sim"] for r in pts], [r["diversity_sim"] for r in pts],
                    xerr=[r["sharpness_sem"] for r in pts], yerr=[r["diversity_sem"] for r in pts],
                    fmt="o", color="C3", ms=4, label="simulation")
        xs = [r[k] for r in pts for k in ("sharpness_upper", "sharpness_sim")] + [x for x, _ in lower]
        ys = d_th + [r["diversity_sim"] for r in pts]
        if min(xs) > 0 and max(xs) / min(xs) > 100:
            ax.set_xscale("log")
        if min(ys) > 0 and max(ys) / min(ys) > 100:
            ax.set_yscale("log")
        growth = max(r["growth_factor"] for r in pts)
        ax.set_title(f"{title} (growth {growth:.3g})", fontsize=9)
        ax.set_xlabel("sharpness", fontsize=8)
        ax.set_ylabel("diversity", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(Path(args.output_dir) / f"fig{name}.png")
    plt.close(fig)
    return rows


def figure_panels(args: argparse.Namespace, name: str) -> list[tuple[str, str, list[tuple[float, float, int]]]]:
    """The panels of Fig. 2, 9, 10 or 11 from the arguments."""
    if name == "2":
        return [(f"SAM k={args.fig2_steps} eta={args.fig2_eta:g}", "sam",
                 [(args.fig2_eta, rho, args.fig2_steps) for rho in args.fig2_rhos])]
    if name == "9":
        return [(f"(a) subsets k={args.fig9_steps} eta={args.fig9_eta:g}", "subset",
                 [(args.fig9_eta, rho, args.fig9_steps) for rho in args.fig9_rhos]),
                (f"(b) subsets rho={args.fig9_rho:g} eta={args.fig9_eta:g}", "subset",
                 [(args.fig9_eta, args.fig9_rho, k) for k in args.fig9_step_list])]
    method, steps, etas, rhos = (("sam", args.fig10_steps, args.fig10_etas, args.fig10_rhos) if name == "10"
                                 else ("subset", args.fig11_steps, args.fig11_etas, args.fig11_rhos))
    return [(f"k={k} eta={eta:g}", method, [(eta, rho, k) for rho in rhos]) for k in steps for eta in etas]


# ----------------------------------------------------------------------------- table


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


COLUMNS = ("figure", "panel", "method", "eta", "rho", "num_steps", "growth_factor", "diversity_theory",
           "diversity_sim", "diversity_rel_err", "sharpness_lower", "sharpness_upper", "sharpness_sim",
           "sharpness_sem", "sharpness_exact", "in_bounds", "reproduces")


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (columns of `COLUMNS`; ``-`` where a row has no value)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows: list[dict] = []
    summary: dict[str, Any] = {}
    for name in args.figures:
        if name == "1b":
            fig_rows = fig1b(args)
            gains = matched_diversity_gain(fig_rows)
            summary["fig1b_min_diversity_gain_at_matched_sharpness"] = min(gains) if gains else None
        else:
            fig_rows = panel_figure(args, name, figure_panels(args, name))
            simulated = [r for r in fig_rows if "reproduces" in r]
            summary[f"fig{name}_reproduced"] = f"{sum(r['reproduces'] for r in simulated)}/{len(simulated)}"
        rows += fig_rows
    summary["seconds"] = time.perf_counter() - start
    table = markdown_table(rows)
    settings = {k: v for k, v in vars(args).items()}
    (out / "theory.md").write_text(f"# Theorems 1-2: theory vs simulation\n\n{table}\n{json.dumps(summary)}\n")
    (out / "results.json").write_text(json.dumps({"settings": settings, "summary": summary, "rows": rows}, indent=1))
    print(table)
    print(json.dumps(summary))
    return {"rows": rows, "summary": summary, "settings": settings}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
