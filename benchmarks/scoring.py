"""Per-sample sharpness throughput and peak memory of each implementation, against a plain forward+backward.

Models (``--models``, a comma list of ``model:width:samples[:layers]``): ``cnn`` and ``resnet18`` (CIFAR-10
images, width = channels), and the transformer members ``bert`` / ``albert`` (random token ids of
``--seq-len`` tokens with some padding, vocabulary 30,522 / 30,000, width = hidden size, intermediate 4x,
64-wide heads, ALBERT's embedding size 128 and ONE layer shared across its ``layers``) and ``vit`` (timm
``vit_tiny_patch16_224`` family at 32x32 with 4x4 patches, width = embedding size, 64-wide heads).

Implementations (all through `sbtrainer.scoring.per_sample_sharpness`, model in eval mode, rows from the
library's own DataLoader):

- ``vmap/<c>``: ``method="vmap"`` with ``batch_size=c`` (torch.func ``grad`` vmapped over a chunk of c); for HF
  BERT/ALBERT it fails (data-dependent control flow in the mask handling) and the row says so;
- ``loop``: ``method="loop"`` (one ``autograd.grad`` per sample);
- ``hooks/<c>`` (CNNs) / ``ghost/<c>`` (transformers): ``method="hooks"`` / ``"ghost"`` (`sbtrainer.ghost_norm`),
  what ``method="auto"`` picks for them: exact per-sample squared gradient norms from one batched forward and an
  activation-only backward;

against ``plain``: one batched forward+backward (eval mode, batch ``--plain-batch``) over the same samples, and
``train``: a training step (train mode, SGD + momentum, batch ``--plain-batch``). Every implementation's scores are checked against
the loop's (max relative error, `_common.max_rel_err`). Times are medians over ``--repeats`` interleaved rounds after one warm-up
round; peak memory is the RSS high-water mark above the after-setup RSS, in a fresh subprocess per
measurement (Linux ``/proc/self/clear_refs``).

Last, the scoring share of the paper's CIFAR-10 schedule (200 epochs x 50k samples x 3 members, Td = 100,
k = 0.4, SAM before Td and (1 + f) after, f = 1 - (1 - k)^2), scoring once at Td or every N epochs,
projected from the measured per-sample costs.

    .venv/bin/python benchmarks/scoring.py            # default sizes (~6 min on 2 cores)
    .venv/bin/python benchmarks/scoring.py --smoke    # seconds; for the tests
    .venv/bin/python benchmarks/scoring.py --name scoring_transformers \
        --models bert:128:64:3,albert:128:64:4,vit:192:64:12 --vmap-chunks 8,32 --hooks-chunk 32 --plain-batch 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common as C
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sbtrainer import scoring as sb_scoring
from sbtrainer.member_adapter import call_member, model_inputs

TRANSFORMERS = ("bert", "albert", "vit")

PAPER = {"epochs": 200, "rows": 50_000, "members": 3, "td": 100, "k": 0.4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cnn:32:512,resnet18:16:256,resnet18:64:64",
                   help="comma list of model:width:samples[:layers] (model cnn, resnet18, bert, albert or vit)")
    p.add_argument("--vmap-chunks", default="8,32,64")
    p.add_argument("--hooks-chunk", type=int, default=64, help="chunk of the hooks (CNN) / ghost (transformer) method")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row of the bert/albert models")
    p.add_argument("--name", default="scoring", help="the JSON is written as <out-dir>/<name>.json")
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
        args.models, args.vmap_chunks, args.hooks_chunk, args.plain_batch = "resnet18:4:8,bert:16:4:2", "4", 4, 8
        args.seq_len = 12
        args.repeats, args.memory_methods = 1, "hooks/4"
    return args


# -- the implementations ------------------------------------------------------------------------------
def fast_method(name: str) -> str:
    """What ``method="auto"`` picks for this model: ``ghost`` for transformers, ``hooks`` for the CNNs."""
    return "ghost" if name in TRANSFORMERS else "hooks"


def run_method(method: str, model: torch.nn.Module, data: Dataset, plain_batch: int) -> torch.Tensor | None:
    """Run one implementation over all of ``data``; return its scores (None for the plain/train references)."""
    if method in ("plain", "train"):
        model.train(method == "train")
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9) if method == "train" else None
        for lo in range(0, len(data), plain_batch):
            batch = data.rows(lo, lo + plain_batch)
            logits = call_member(model, model_inputs(batch, model))
            F.cross_entropy(logits, batch["labels"]).backward()
            if opt is not None:
                opt.step()
            model.zero_grad(set_to_none=True)
        model.eval()
        return None
    kind, _, chunk = method.partition("/")
    return sb_scoring.per_sample_sharpness(model, data, batch_size=int(chunk or 64), method=kind, progress=False)


class ImageRows(C.TensorDictDataset):
    """`_common.TensorDictDataset` with ``rows(lo, hi)``: a batch of rows as one dict."""

    def rows(self, lo: int, hi: int) -> dict:
        return {"pixel_values": self.x[lo:hi], "labels": self.y[lo:hi]}


class TokenRows(Dataset):
    """Random token rows (``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels``); every other row padded."""

    def __init__(self, n: int, length: int, vocab: int, classes: int = 2, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        keep = torch.randint(length // 2, length + 1, (n,), generator=g)
        keep[1::2] = length
        self.mask = (torch.arange(length).unsqueeze(0) < keep.unsqueeze(1)).long()
        self.ids[self.mask == 0] = 0  # the pad id
        self.types = torch.zeros_like(self.ids)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "token_type_ids": self.types[i],
                "labels": self.y[i]}

    def rows(self, lo: int, hi: int) -> dict:
        return {"input_ids": self.ids[lo:hi], "attention_mask": self.mask[lo:hi],
                "token_type_ids": self.types[lo:hi], "labels": self.y[lo:hi]}


def transformer(name: str, width: int, layers: int) -> torch.nn.Module:
    """A random ``bert`` / ``albert`` (HF, 2 labels) or ``vit`` (timm, 10 classes, 32x32 images, 4x4 patches)."""
    heads = max(1, width // 64)
    if name == "vit":
        import timm

        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10,
                                 embed_dim=width, depth=layers, num_heads=heads)
    if name == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        return BertForSequenceClassification(BertConfig(hidden_size=width, num_hidden_layers=layers, num_labels=2,
                                                        num_attention_heads=heads, intermediate_size=4 * width))
    from transformers import AlbertConfig, AlbertForSequenceClassification

    return AlbertForSequenceClassification(AlbertConfig(embedding_size=128, hidden_size=width, num_labels=2,
                                                        num_hidden_layers=layers, num_attention_heads=heads,
                                                        intermediate_size=4 * width))


def build(spec: str, real: bool, seq_len: int = 128) -> tuple[str, int, torch.nn.Module, Dataset, str]:
    name, width, samples, *layers = spec.split(":")
    width, samples = int(width), int(samples)
    torch.manual_seed(0)
    if name in ("bert", "albert"):
        model = transformer(name, width, int(layers[0]) if layers else 3)
        vocab = model.config.vocab_size
        model.eval()
        return name, width, model, TokenRows(samples, seq_len, vocab), f"random tokens (T={seq_len})"
    x, y, source = C.cifar_tensors(samples, real=real)
    if name == "vit":
        model = transformer(name, width, int(layers[0]) if layers else 12)
        with torch.no_grad():  # trained-looking cls token and position embeddings (timm starts them near 0)
            model.cls_token.normal_(std=0.02)
        model.eval()
        return name, width, model, ImageRows(x, y), source
    model = C.model_factory(name, width)()
    with torch.no_grad():  # non-trivial BatchNorm running statistics, as after some training
        model.train()
        model(x[:128])
    model.eval()
    return name, width, model, ImageRows(x, y), source


def worker(spec: dict) -> dict:
    """One memory measurement in this fresh process: peak RSS above the after-setup RSS of one method."""
    _, _, model, data, _ = build(spec["model"], real=False, seq_len=spec.get("seq_len", 128))
    base = C.rss_mib()
    if not C.reset_peak_rss():
        return {"peak_mib": float("nan"), "base_mib": base}
    t = time.perf_counter()
    run_method(spec["method"], model, data, spec["plain_batch"])
    return {"peak_mib": C.peak_rss_mib() - base, "base_mib": base, "seconds": time.perf_counter() - t}


# -- the benchmark ------------------------------------------------------------------------------------
def bench_model(spec: str, args: argparse.Namespace) -> dict:
    name, width, model, data, source = build(spec, real=not args.smoke, seq_len=args.seq_len)
    n = len(data)
    methods = ["plain", "train", "loop"] + [f"vmap/{c}" for c in args.vmap_chunks.split(",")]
    methods.append(f"{fast_method(name)}/{args.hooks_chunk}")
    times: dict[str, list[float]] = {m: [] for m in methods}
    scores: dict[str, torch.Tensor] = {}
    failed: dict[str, str] = {}  # method -> the error it raised (vmap on HF BERT/ALBERT)
    start = time.perf_counter()
    for r in range(1 + args.repeats):
        for m in methods:
            if m in failed:
                continue
            t = time.perf_counter()
            try:
                out = run_method(m, model, data, args.plain_batch)
            except (RuntimeError, NotImplementedError) as err:
                failed[m] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                print(f"  {spec}: {m} failed: {failed[m]}", flush=True)
                continue
            if r > 0:
                times[m].append(time.perf_counter() - t)
            if out is not None:
                scores[m] = out
        print(f"  {spec}: round {r + 1}/{1 + args.repeats} done ({time.perf_counter() - start:.0f} s)", flush=True)
    memory = {}
    chosen = {"all": methods, "none": []}.get(args.memory_methods, args.memory_methods.split(","))
    layers = spec.split(":")[3:]
    for m in methods:
        if m in chosen and m not in failed:
            job = {"model": ":".join([name, str(width), str(min(n, 2 * args.plain_batch)), *layers]), "method": m,
                   "plain_batch": args.plain_batch, "seq_len": args.seq_len}
            memory[m] = C.run_worker(Path(__file__), ["--worker", json.dumps(job)])["peak_mib"]
    ref = scores["loop"]
    per_plain = C.median(times["plain"]) / n
    rows = []
    for m in methods:
        if m in failed:
            rows.append({"method": m, "samples_per_s": None, "ms_per_sample": None, "vs_plain": None, "peak_mib": None,
                         "max_rel_err_vs_loop": None, "error": failed[m]})
            continue
        per = C.median(times[m]) / n
        err = None if m not in scores else C.max_rel_err(scores[m], ref)
        rows.append({"method": m, "samples_per_s": 1 / per, "ms_per_sample": 1e3 * per, "vs_plain": per / per_plain,
                     "peak_mib": memory.get(m), "max_rel_err_vs_loop": err})
    C.print_table(rows, ["method", "samples_per_s", "ms_per_sample", "vs_plain", "peak_mib", "max_rel_err_vs_loop"],
                  title=f"{spec} ({C.num_params(model):,} params), {n} samples ({source}): "
                        f"per-sample sharpness vs a plain batched forward+backward (batch {args.plain_batch})")
    return {"model": name, "width": width, "layers": int(layers[0]) if layers else None, "params": C.num_params(model),
            "samples": n, "data": source, "rows": rows, "plain_batch_ms": 1e3 * C.median(times["plain"]) / n
            * min(n, args.plain_batch), "wall_s": time.perf_counter() - start}


def projection(res: dict, every: list[int]) -> list[dict]:
    """Scoring share of the paper's SharpBalance run, from measured per-sample scoring and training-step costs."""
    by = {r["method"]: r["ms_per_sample"] for r in res["rows"] if r["ms_per_sample"] is not None}
    e, td, k, n, m = PAPER["epochs"], PAPER["td"], PAPER["k"], PAPER["rows"], PAPER["members"]
    f = 1 - (1 - k) ** 2
    train_ms = by["train"] * n * m * (2 * td + (e - td) * (1 + f))  # SAM before Td, (1 + f) after (ideal)
    vmaps = [v for k_, v in by.items() if "vmap" in k_]
    fast = fast_method(res["model"])
    scorers = {"vmap/64": by.get("vmap/64"), "best vmap": min(vmaps) if vmaps else None,
               "loop": by["loop"], f"{fast} (auto's first choice)": next(v for k_, v in by.items() if k_.startswith(fast))}
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
    checks = []
    for res in results:  # the targets: <= 2.5x for the CNNs' hooks, <= 2x for the transformers' ghost
        limit = 2.0 if res["model"] in TRANSFORMERS else 2.5
        for r in res["rows"]:
            if r["method"] not in ("plain", "train"):
                checks.append({"model": f"{res['model']}:{res['width']}", "method": r["method"],
                               "target": f"scoring <= {limit}x plain f+b", "value": r["vs_plain"],
                               "met": r["vs_plain"] is not None and r["vs_plain"] <= limit})
    C.print_table(checks, ["model", "method", "target", "value", "met"], title="targets (reported, not asserted)")
    payload = {"config": vars(args), "paper_schedule": PAPER, "results": results, "projection": proj, "targets": checks}
    C.write_result(args.name, payload, args.out_dir)
    return payload


if __name__ == "__main__":
    main()
