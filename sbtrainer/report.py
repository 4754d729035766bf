"""Tables, figures and model cards from results dictionaries.

The layouts follow the SharpBalance paper (Lu et al., "Sharpness-diversity tradeoff: improving flat
ensembles with SharpBalance", NeurIPS 2024):

- :func:`markdown_severity_table`: rows = methods, columns = corruption severities 1–5 and all
  (App. F.1, Tables 2–4);
- :func:`markdown_member_vs_ensemble` and :func:`plot_member_vs_ensemble`: individual-member accuracy
  and the ensembling gain on top of it (Fig. 7);
- :func:`plot_sharpness_diversity`: sharpness (x) against diversity (y), coloured by the ensemble
  improvement rate (Fig. 3–4);
- :func:`model_card`: a Hugging Face Hub README with the paper's citation.

Results are flat dicts as returned by ``Trainer.evaluate`` and
:func:`sbtrainer.data.corrupted_sets.evaluate_corruptions`: keys ``f"{prefix}_{metric}"``, e.g.
``cifar10c_severity_3_ensemble_accuracy`` or ``eval_member_accuracy``. Accuracies are fractions;
tables show them ×100 (``scale``), like the paper. Figures use matplotlib's Agg canvas directly (no
pyplot, no global backend change) and are saved at exactly ``figsize × dpi`` pixels.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CITATION_BIBTEX = """@inproceedings{lu2024sharpness,
  title={Sharpness-Diversity Tradeoff: Improving Flat Ensembles with SharpBalance},
  author={Lu, Haiquan and Liu, Xiaotian and Zhou, Yefan and Li, Qunli and Keutzer, Kurt and Mahoney, Michael W. and Yan, Yujun and Yang, Huanrui and Yang, Yaoqing},
  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
  year={2024}
}"""

METHOD_DESCRIPTIONS: dict[str, str] = {
    "deep_ensemble": "every member trains with the plain loss on all data (the SGD deep-ensemble baseline)",
    "sam": "every member trains with sharpness-aware minimisation (SAM) on all data",
    "sharpbalance": (
        "SharpBalance: each member trains with SAM on the samples that the other members find sharpest "
        "and with the plain loss on the rest, which keeps the members flat and diverse"
    ),
}

DIVERSITY_LABELS: dict[str, str] = {"der": "DER", "variance": "Variance", "kl": "KL"}
MISSING = "–"
"""Cell text for a value absent from a results dict."""

Format = str | Callable[[float], str]


# ----------------------------------------------------------------------------- formatting helpers


def _escape(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |"]
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _format_value(value: Any, fmt: Format) -> str:
    if value is None:
        return MISSING
    if callable(fmt):
        return fmt(value)
    return fmt.format(value) if "{" in fmt else format(value, fmt)


def _number(results: Mapping[str, Any], key: str, scale: float = 1.0) -> float | None:
    value = results.get(key)
    if value is None or isinstance(value, (bool, str)):
        return None
    return float(value) * scale


def _cell(value: float | None, digits: int) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _check_methods(results_by_method: Mapping[str, Mapping[str, Any]]) -> None:
    if not isinstance(results_by_method, Mapping) or not results_by_method:
        raise ValueError("results_by_method must be a non-empty dict {method name: results dict}")
    for method, results in results_by_method.items():
        if not isinstance(results, Mapping):
            raise ValueError(f"results for method {method!r} must be a dict, got {type(results).__name__}")


# ----------------------------------------------------------------------------- results files


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def _value_cell(value: Any) -> str:
    """Integers and strings as they are, other numbers to 4 decimals, the rest as JSON."""
    if isinstance(value, (str, bool, int)) or (hasattr(value, "dtype") and "int" in str(value.dtype)):
        return str(value)
    if _is_float_like(value):
        return f"{float(value):.4f}"
    return json.dumps(_jsonable(value))


def _results_markdown(results: Mapping[str, Any], title: str) -> str:
    rows = [[str(key), _value_cell(value)] for key, value in results.items()]
    return f"# {title}\n\n" + _markdown_table(["metric", "value"], rows)


def write_results(
    results: Mapping[str, Any], output_dir: str | os.PathLike, name: str = "results"
) -> tuple[Path, Path]:
    """Write ``results`` to ``output_dir/name.json`` and ``output_dir/name.md``; return both paths.

    The JSON keeps the dict's order; non-finite floats (e.g. an undefined EIR) are written as
    ``null`` so that the file is strict JSON. The Markdown is a two-column table (floats to 4 decimals, integers as they are).
    """
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a dict, got {type(results).__name__}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n")
    md_path.write_text(_results_markdown(results, name))
    logger.info("wrote %s and %s", json_path, md_path)
    return json_path, md_path


# ----------------------------------------------------------------------------- Markdown tables


def markdown_severity_table(
    results_by_method: Mapping[str, Mapping[str, Any]],
    prefix: str,
    metric: str = "ensemble_accuracy",
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    include_all: bool = True,
    scale: float = 100.0,
    digits: int = 2,
    delta_vs: str | None = None,
) -> str:
    """Rows = methods, columns = severities and "all" (paper App. F.1, Tables 2–4).

    Cell ``(method, s)`` is ``results[f"{prefix}_severity_{s}_{metric}"] * scale`` and the "all"
    column ``results[f"{prefix}_all_{metric}"] * scale``, with ``digits`` decimals; a missing key
    shows ``–``. With ``delta_vs`` (a method name), the other methods' cells get the difference to
    it in brackets, e.g. ``89.75 (+0.31)``, as the paper's SharpBalance row does.
    """
    _check_methods(results_by_method)
    if delta_vs is not None and delta_vs not in results_by_method:
        raise ValueError(f"delta_vs={delta_vs!r} is not a method of the table: {list(results_by_method)}")
    keys = [f"{prefix}_severity_{s}_{metric}" for s in severities]
    header = ["method"] + [f"severity {s}" for s in severities]
    if include_all:
        keys.append(f"{prefix}_all_{metric}")
        header.append("all")
    reference = results_by_method[delta_vs] if delta_vs is not None else None
    rows = []
    for method, results in results_by_method.items():
        row = [method]
        for key in keys:
            value = _number(results, key, scale)
            cell = _cell(value, digits)
            ref = _number(reference, key, scale) if reference is not None and method != delta_vs else None
            if value is not None and ref is not None:
                cell += f" ({value - ref:+.{digits}f})"
            row.append(cell)
        rows.append(row)
    return _markdown_table(header, rows)


def markdown_member_vs_ensemble(
    results_by_method: Mapping[str, Mapping[str, Any]],
    prefix: str = "eval",
    member_metric: str = "member_accuracy",
    ensemble_metric: str = "ensemble_accuracy",
    scale: float = 100.0,
    digits: int = 2,
) -> str:
    """Member vs ensemble accuracy per method (paper Fig. 7), as a Markdown table.

    Columns: method, member accuracy (``f"{prefix}_{member_metric}"``, the members' mean), ensemble
    accuracy (``f"{prefix}_{ensemble_metric}"``) and the gain (ensemble − member), all ×``scale``.
    Fig. 7's OOD row is ``prefix="cifar10c_all"`` (pooled by ``evaluate_corruptions``), its ID row
    ``prefix="eval"``.
    """
    _check_methods(results_by_method)
    rows = []
    for method, results in results_by_method.items():
        member = _number(results, f"{prefix}_{member_metric}", scale)
        ensemble = _number(results, f"{prefix}_{ensemble_metric}", scale)
        gain = None if member is None or ensemble is None else ensemble - member
        gain_cell = MISSING if gain is None else f"{gain:+.{digits}f}"
        rows.append([method, _cell(member, digits), _cell(ensemble, digits), gain_cell])
    return _markdown_table(["method", "member accuracy", "ensemble accuracy", "ensemble gain"], rows)


def markdown_comparison_table(
    results_by_method: Mapping[str, Mapping[str, Any]],
    columns: Sequence[tuple[str, str, Format]],
    method_header: str = "method",
) -> str:
    """A generic table: one row per method, one column per ``(header, key, format)``.

    ``format`` is a format spec (``".4f"``, ``".2%"``), a template (``"{:.2f}"``) or a callable
    ``float -> str``; a key absent from a method's results shows ``–``.
    """
    _check_methods(results_by_method)
    if not columns:
        raise ValueError("columns must list at least one (header, key, format) tuple")
    for column in columns:
        if len(column) != 3:
            raise ValueError(f"each column must be (header, key, format), got {column!r}")
    rows = [
        [method] + [_format_value(results.get(key), fmt) for _, key, fmt in columns]
        for method, results in results_by_method.items()
    ]
    return _markdown_table([method_header] + [header for header, _, _ in columns], rows)


# ----------------------------------------------------------------------------- figures


def _new_figure(figsize: tuple[float, float], dpi: int) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike, dpi: int) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)  # no bbox_inches="tight": the image is exactly figsize × dpi pixels
    logger.info("wrote %s", out)
    return out


def plot_member_vs_ensemble(
    results_by_method: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    prefix: str = "eval",
    member_metric: str = "member_accuracy",
    ensemble_metric: str = "ensemble_accuracy",
    scale: float = 100.0,
    figsize: tuple[float, float] = (6.0, 4.0),
    dpi: int = 100,
    title: str | None = None,
) -> Path:
    """Bars of member accuracy (hatched) with the ensembling gain stacked on top (paper Fig. 7).

    Values as in :func:`markdown_member_vs_ensemble`; each bar is annotated with the member accuracy,
    the gain and the ensemble accuracy, each number written at its own height: the higher of member
    and ensemble above the top of the bars, the lower one just below its level (with a negative gain
    the gain segment hangs from the member level down to the ensemble level). Returns ``path`` (PNG
    of ``figsize × dpi`` pixels).
    """
    _check_methods(results_by_method)
    methods, members, ensembles = [], [], []
    for method, results in results_by_method.items():
        member = _number(results, f"{prefix}_{member_metric}", scale)
        ensemble = _number(results, f"{prefix}_{ensemble_metric}", scale)
        if member is None or ensemble is None:
            raise ValueError(
                f"method {method!r} lacks {prefix}_{member_metric} or {prefix}_{ensemble_metric} in its results"
            )
        methods.append(method)
        members.append(member)
        ensembles.append(ensemble)
    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot()
    xs = list(range(len(methods)))
    gains = [e - m for e, m in zip(ensembles, members)]
    ax.bar(xs, members, color="#9ecae1", edgecolor="black", hatch="//", label="member (mean)")
    ax.bar(xs, gains, bottom=members, color="#3182bd", edgecolor="black", label="ensemble gain")
    label_box = {"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}
    for x, member, gain, ensemble in zip(xs, members, gains, ensembles):
        # each number is written at the height it is: the higher of member/ensemble above its level
        # (the top of the bars), the lower one below its level (with a negative gain the member
        # bar is the taller one and the ensemble level is the bottom of the gain segment)
        (high_value, high_kind), (low_value, low_kind) = sorted(
            [(ensemble, "ensemble"), (member, "member")], key=lambda vk: vk[0], reverse=True
        )
        ax.annotate(
            f"{high_value:.2f}",
            (x, high_value),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
            gid=f"{high_kind}-{x}",
        )
        ax.annotate(
            f"{gain:+.2f}",
            (x, member + gain / 2),
            ha="center",
            va="center",
            fontsize=8,
            color="white",
            gid=f"gain-{x}",
        )
        ax.annotate(
            f"{low_value:.2f}",
            (x, low_value),
            xytext=(0, -4),
            textcoords="offset points",
            ha="center",
            va="top",
            fontsize=8,
            bbox=label_box,
            gid=f"{low_kind}-{x}",
        )
    low, high = min(members + ensembles), max(members + ensembles)
    margin = max(high - low, 1e-6 * max(abs(high), 1.0)) * 0.5
    ax.set_ylim(low - margin, high + margin)
    ax.set_xticks(xs, methods)
    quantity = ensemble_metric.removeprefix("ensemble_")
    ax.set_ylabel(f"{quantity} (×{scale:g})" if scale != 1 else quantity)
    ax.set_title(title or prefix)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path, dpi)


def _check_points(points: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    if not points:
        raise ValueError("points must hold at least one dict")
    for i, point in enumerate(points):
        missing = [k for k in keys if k not in point]
        if missing:
            raise ValueError(f"point {i} lacks {missing}; every point needs {list(keys)}")


def plot_sharpness_diversity(
    points: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    diversity_key: str = "der",
    color_key: str = "eir",
    figsize: tuple[float, float] = (5.0, 4.0),
    dpi: int = 100,
    cmap: str = "coolwarm",
    title: str | None = None,
) -> Path:
    """Scatter of sharpness (x) against diversity (y), coloured by ``color_key`` (paper Fig. 3–4).

    Args:
        points: one dict per ensemble with ``sharpness``, ``diversity_key`` (``der``, ``variance`` or
            ``kl``), ``color_key`` (default ``eir``, the ensemble improvement rate; Fig. 4's second row
            uses the members' OOD accuracy) and optionally ``label`` (one marker shape per label,
            shown in the legend).
        cmap: ``coolwarm`` runs blue (low) to red (high), as in the paper.

    Returns:
        ``path`` (PNG of ``figsize × dpi`` pixels), with a colourbar.
    """
    _check_points(points, ("sharpness", diversity_key, color_key))
    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot()
    colors = [float(p[color_key]) for p in points]
    vmin, vmax = min(colors), max(colors)
    labels = list(dict.fromkeys(str(p.get("label", "")) for p in points))
    markers = "osD^v<>ph*"
    scatter = None
    for j, label in enumerate(labels):
        group = [p for p in points if str(p.get("label", "")) == label]
        scatter = ax.scatter(
            [float(p["sharpness"]) for p in group],
            [float(p[diversity_key]) for p in group],
            c=[float(p[color_key]) for p in group],
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
            marker=markers[j % len(markers)],
            s=60,
            edgecolors="black",
        )
    colorbar = fig.colorbar(scatter, ax=ax)
    colorbar.set_label("Ensemble Improvement Rate" if color_key == "eir" else color_key)
    ax.set_xlabel("Sharpness")
    ax.set_ylabel(f"Diversity ({DIVERSITY_LABELS.get(diversity_key, diversity_key)})")
    if any(labels):  # marker shapes only: colour belongs to the colourbar
        from matplotlib.lines import Line2D

        handles = [
            Line2D(
                [],
                [],
                marker=markers[j % len(markers)],
                linestyle="",
                color="lightgray",
                markeredgecolor="black",
            )
            for j in range(len(labels))
        ]
        ax.legend(handles, labels, fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi)


# ----------------------------------------------------------------------------- model card


def _yaml_scalar(value: str) -> str:
    """``value`` as a YAML scalar: bare when safe, else double-quoted (JSON strings are valid YAML)."""
    safe = value and all(ch.isalnum() or ch in "-_./" for ch in value) and value[0] not in "-."
    return value if safe else json.dumps(value)


def _config_items(config: Any) -> list[tuple[str, Any]]:
    if hasattr(config, "to_dict") and not isinstance(config, Mapping):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a dict (or have .to_dict()), got {type(config).__name__}")
    return list(config.items())


def _config_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


REDUCTION_TEXT: dict[str, str] = {
    "logits": "the mean of the members' logits (`reduction=\"logits\"`)",
    "probs": "the mean of the members' softmax probabilities; its logits are log(mean softmax) (`reduction=\"probs\"`)",
}


def _description(method: str | None, base_model: str | None) -> str:
    if method is None:
        text = ("An ensemble saved with `sbtrainer`. How it was trained was not recorded: it was saved without "
                "its training config.")
    elif method in METHOD_DESCRIPTIONS:
        text = (f"An ensemble trained with `sbtrainer`, method `{method}`: {METHOD_DESCRIPTIONS[method]}. "
                "SharpBalance and the deep-ensemble and SAM-ensemble baselines are those of Lu et al., "
                "*Sharpness-Diversity Tradeoff: Improving Flat Ensembles with SharpBalance*, NeurIPS 2024.")
    else:
        text = f"An ensemble trained with `sbtrainer`, with the method named `{method}`."
    return text + (f" Members start from `{base_model}`." if base_model else "")


def _ensemble_section(ensemble: Mapping[str, Any]) -> list[str]:
    members = list(ensemble.get("members", []))
    reduction = ensemble.get("reduction")
    kinds = sorted({str(m.get("kind")) for m in members})
    text = f"{len(members)} member{'s' if len(members) != 1 else ''} ({', '.join(kinds)})."
    if reduction is not None:
        text += f" The ensemble's prediction is {REDUCTION_TEXT.get(reduction, f'`reduction={reduction!r}`')}."
    if ensemble.get("input_name"):
        text += f" Non-transformers members read the batch column `{ensemble['input_name']}`."
    rows = [[str(m.get("name", i)), str(m.get("kind", MISSING)), str(m.get("architecture", MISSING)),
             "not recorded" if m.get("seed") is None else str(m["seed"])] for i, m in enumerate(members)]
    return ["## Ensemble", text, _markdown_table(["member", "kind", "architecture", "seed"], rows).rstrip()]


def model_card(
    method: str | None,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    model_name: str | None = None,
    ensemble: Mapping[str, Any] | None = None,
) -> str:
    """A Hugging Face Hub README (model card) for an ensemble trained with ``method``.

    YAML front matter (``library_name: sbtrainer``, ``tags: [ensemble, sharpbalance, sam]``,
    ``base_model`` when given), a description of the method (``method=None``: says the training
    method was not recorded), the ensemble section when ``ensemble`` is given, the hyper-parameters
    table (``config`` in its order; floats as ``%g``; an empty config is said to be not recorded),
    the metrics table when ``metrics`` is given (floats to 4 decimals, integers as they are) and the
    paper's BibTeX citation (:data:`CITATION_BIBTEX`).

    ``ensemble``: what the ensemble is, ``{"reduction": "logits" | "probs", "input_name": str | None,
    "members": [{"name", "kind", "architecture", "seed"}, ...]}`` (a seed None reads "not recorded").

    Raises ``ValueError`` if ``method`` is neither None nor a non-empty string, or ``config`` is not a dict.
    """
    if method is not None and (not isinstance(method, str) or not method):
        raise ValueError(f"method must be None or a non-empty string, got {method!r}")
    items = _config_items(config)
    front = ["---", "library_name: sbtrainer", "tags:", "- ensemble", "- sharpbalance", "- sam"]
    if base_model:
        front.append(f"base_model: {_yaml_scalar(base_model)}")
    front.append("---")
    parts = ["\n".join(front), f"# {model_name or (method or 'sbtrainer') + ' ensemble'}",
             _description(method, base_model)]
    if ensemble is not None:
        parts += _ensemble_section(ensemble)
    parts.append("## Hyper-parameters")
    if items:
        parts.append(_markdown_table(["name", "value"], [[k, _config_cell(v)] for k, v in items]).rstrip())
    else:
        parts.append("Not recorded: the ensemble was saved without its training config.")
    if metrics:
        rows = [[k, _value_cell(v)] for k, v in metrics.items()]
        parts += ["## Evaluation results", _markdown_table(["metric", "value"], rows).rstrip()]
    parts += ["## Citation", f"```bibtex\n{CITATION_BIBTEX}\n```"]
    return "\n\n".join(parts) + "\n"


def _is_float_like(value: Any) -> bool:
    if isinstance(value, (bool, str)) or value is None:
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
