"""What the study drivers share: one recipe run as a subprocess recorded in its own JSON, and the summary tables.

A run's JSON (``<out>/<phase>/<name>.json``) holds the recipe's ``results.json``, the run's wall and CPU
seconds and its setting; a driver skips every run whose JSON exists, so a study resumes by running it again.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_recorded(script: str, argv: Sequence[str], out_dir: Path, record_path: Path, meta: dict) -> dict:
    """``python recipes/<script> argv`` (writing into ``out_dir``, its output in ``out_dir/run.log``) unless
    ``record_path`` exists; its record, with the run's wall seconds and its own CPU seconds (user + system).

    Raises:
        RuntimeError: the recipe failed (its last stderr lines).
    """
    if record_path.is_file():
        return json.loads(record_path.read_text())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "run.log"
    t = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, str(ROOT / "recipes" / script), *argv], cwd=ROOT, env=env,
                                stdout=sink, stderr=subprocess.STDOUT)
        # this child's own CPU time (RUSAGE_CHILDREN would also count runs of other lanes finishing meanwhile)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"{record_path.stem} failed ({proc.returncode}; log {log}):\n{tail}")
    record = {**meta, "wall_s": wall,
              "cpu_s": usage.ru_utime + usage.ru_stime,
              "results": json.loads((out_dir / "results.json").read_text())}
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def summarize(groups: dict[str, list[dict]], keys: Sequence[str]) -> dict:
    """Per group: the seeds, total CPU hours, and mean / half-range / n over seeds of every key present."""
    out = {}
    for name, runs in sorted(groups.items()):
        row: dict = {"seeds": [r["seed"] for r in runs], "cpu_hours": sum(r["cpu_s"] for r in runs) / 3600}
        for key in keys:
            vals = [r["results"][key] for r in runs if isinstance(r["results"].get(key), (int, float))]
            if vals:
                row[key] = {"mean": statistics.fmean(vals), "half_range": (max(vals) - min(vals)) / 2, "n": len(vals)}
        out[name] = row
    return out


def markdown(summary: dict, columns: Sequence[tuple[str, str, bool]], digits: int = 4) -> str:
    """A Markdown table: one row per group, ``mean ± half-range`` over its seeds per ``(title, key, percent)``
    column present in some group (percent: ×100 with one decimal; else ``digits`` decimals; ``–`` where absent)."""
    cols = [c for c in columns if any(c[1] in row for row in summary.values())]
    lines = ["| run | seeds | " + " | ".join(title for title, _, _ in cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for name, row in summary.items():
        cells = []
        for _, key, percent in cols:
            stat = row.get(key)
            if stat is None:
                cells.append("–")
            elif percent:
                cells.append(f"{100 * stat['mean']:.1f} ± {100 * stat['half_range']:.1f}")
            else:
                cells.append(f"{stat['mean']:.{digits}f} ± {stat['half_range']:.{digits}f}")
        lines.append(f"| {name} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(folder: Path, phase: str, groups: dict[str, list[dict]], keys: Sequence[str]) -> dict:
    """``summary.json`` and ``summary.md`` in ``folder``; returns the JSON payload."""
    records = [r for runs in groups.values() for r in runs]
    summary = summarize(groups, keys)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"phase": phase, "runs": len(records), "cpu_hours": sum(r["cpu_s"] for r in records) / 3600,
               "wall_hours": sum(r["wall_s"] for r in records) / 3600, "summary": summary}
    (folder / "summary.json").write_text(json.dumps(payload, indent=1) + "\n")
    columns = [(key.replace("eval_", "").replace("_all", ""), key, False) for key in keys]
    (folder / "summary.md").write_text(markdown(summary, columns))
    return payload
