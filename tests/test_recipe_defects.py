"""Recipe defects of issue 8, each as the right value (items 13-16), on data made here (CPU, offline).

- 13, a subset chosen by position: ``--max_train_samples``/``--max_eval_samples``/``--corrupt_samples``
  draw rows at random with ``--subset_seed`` (not the first N); on a class-sorted copy the class counts
  are those of that draw, the same for every method and member seed, and are written to results.json.
- 14, numbers that depend on the launcher: the thread count is logged and recorded; the same process
  and thread count give the same numbers under ``python`` and ``accelerate launch``.
- 15, errors raised deep inside a dependency: one line naming the option and what to do.
- 16, long work with no sign of life: each phase is logged; ``disable_tqdm`` writes no bar.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
ACCELERATE = Path(sys.executable).with_name("accelerate")
sys.path.insert(0, str(RECIPES))

import recipe_utils  # noqa: E402
from cifar_data import CifarDataArgs, corrupted_sets, load_cifar  # noqa: E402
from recipe_utils import RecipeError  # noqa: E402

N_TRAIN, N_TEST, CLASSES = 200, 100, 10
# A subset of 50 of the 200 class-sorted training rows (20 per class) drawn with seed 0: rows
# sort(default_rng(0).permutation(200)[:50]), labels row // 20. The first 50 rows would be 20, 20, 10, 0, ...
TRAIN_COUNTS_SEED0 = {"0": 5, "1": 2, "2": 1, "3": 5, "4": 8, "5": 5, "6": 6, "7": 8, "8": 7, "9": 3}
TRAIN_COUNTS_SEED1 = {"0": 7, "1": 6, "2": 4, "3": 6, "4": 6, "5": 8, "6": 5, "7": 4, "8": 2, "9": 2}
# 30 of the 100 class-sorted test rows (10 per class), seed 0: class 6 is not drawn.
TEST_COUNTS_SEED0 = {"0": 4, "1": 5, "2": 4, "3": 2, "4": 1, "5": 2, "7": 3, "8": 4, "9": 5}
# 12 of those 30 rows, seed 0, for --corrupt_samples 12.
CORRUPT_COUNTS_SEED0 = {"0": 1, "1": 2, "2": 2, "5": 1, "7": 1, "8": 2, "9": 3}
BAR = re.compile(r"\d+%\||it/s\]|s/it\]")  # what a tqdm bar writes


def _draw(n: int, k: int, seed: int) -> np.ndarray:
    """The rows the recipes keep: k of n, uniformly without replacement with ``seed``, in dataset order."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def _sorted_split(n: int, seed: int, label_col: str = "label", with_label: bool = True) -> datasets.Dataset:
    """``n`` 32x32 RGB images stored in class order (n // 10 per class, class 0 first), colour by class."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(CLASSES), n // CLASSES)
    palette = np.random.default_rng(99).integers(30, 226, (CLASSES, 1, 1, 3))
    x = np.clip(palette[y] + rng.normal(0, 30, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    cols = {"img": list(x)}
    feats = {"img": datasets.Image()}
    if with_label:
        cols[label_col] = y.tolist()
        feats[label_col] = datasets.ClassLabel(num_classes=CLASSES)
    else:
        cols["caption"] = [f"image {i}" for i in range(n)]
        feats["caption"] = datasets.Value("string")
    return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))


def _write_folder(root: Path, splits: dict[str, datasets.Dataset]) -> str:
    (root / "data").mkdir(parents=True)
    for name, ds in splits.items():
        ds.to_parquet(str(root / "data" / f"{name}-00000-of-00001.parquet"))
    return str(root)


@pytest.fixture(scope="module")
def sorted_dir(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp("sorted"), {"train": _sorted_split(N_TRAIN, 0),
                                                             "test": _sorted_split(N_TEST, 1)})


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in recipe_utils.THREAD_ENV_VARS}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


TINY = ["--model_width", "4", "--num_train_epochs", "1", "--per_device_train_batch_size", "25", "--num_members", "2",
        "--member_seeds", "1", "2", "--seed", "1", "--learning_rate", "0.05", "--sharpness_batches", "1",
        "--sharpness_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--dataloader_num_workers", "0", "--logging_steps", "1", "--max_train_samples", "50",
        "--max_eval_samples", "30", "--corrupt_offline", "true", "--corrupt_samples", "12", "--corruptions",
        "contrast", "--severities", "1"]


# ----------------------------------------------------------------------------- 13: random subsets


def test_subset_of_a_class_sorted_copy_is_random_not_the_first_rows(sorted_dir):
    data = load_cifar(CifarDataArgs(dataset_name=sorted_dir), max_train=50, max_eval=30, seed=0)
    assert data["subsets"]["train_class_counts"] == TRAIN_COUNTS_SEED0  # not {"0": 20, "1": 20, "2": 10}
    assert data["subsets"]["test_class_counts"] == TEST_COUNTS_SEED0
    assert (data["subsets"]["train_rows"], data["subsets"]["test_rows"]) == (50, 30)
    # the contract, checked on the labels themselves: rows sort(permutation(seed)[:k]) of the stored order
    assert data["train"]["label"] == (_draw(N_TRAIN, 50, 0) // 20).tolist()
    other = load_cifar(CifarDataArgs(dataset_name=sorted_dir), max_train=50, seed=1)
    assert other["subsets"]["train_class_counts"] == TRAIN_COUNTS_SEED1
    whole = load_cifar(CifarDataArgs(dataset_name=sorted_dir), max_train=10_000, seed=0)
    assert whole["subsets"]["train_class_counts"] == {str(c): 20 for c in range(CLASSES)}


def test_corrupt_samples_is_a_random_subset_with_its_counts(sorted_dir):
    args = CifarDataArgs(dataset_name=sorted_dir, corrupt_offline=True, corrupt_samples=12, corruptions=["contrast"],
                         severities=[1])
    data = load_cifar(args, max_eval=30, seed=0)
    sets, facts = corrupted_sets(args, data, seed=0)
    (name, severity, ds), = list(sets)
    assert (name, severity, len(ds)) == ("contrast", 1, 12)
    test_labels = _draw(N_TEST, 30, 0) // 10
    expected = test_labels[_draw(30, 12, 0)]
    assert ds["label"] == expected.tolist()
    assert facts == {"corrupt_rows": 12, "corrupt_class_counts": {str(c): int((expected == c).sum())
                                                                  for c in np.unique(expected)}}
    assert facts["corrupt_class_counts"] == CORRUPT_COUNTS_SEED0


def test_quickstart_ood_rows_are_random_and_independent_of_the_member_seed():
    import quickstart

    assert quickstart.ood_rows(30, 12, 0).tolist() == _draw(30, 12, 0).tolist()
    assert quickstart.ood_rows(30, 40, 0).tolist() == list(range(30))
    args = quickstart.parse_args(["--seed", "5"])
    assert args.subset_seed == 0  # --seed changes the members only


def test_same_rows_for_every_method_and_member_seed_in_process(sorted_dir, tmp_path, monkeypatch):
    """Two tiny cifar_resnet runs in this process, different method, --seed and member_seeds: same subsets."""
    import cifar_resnet

    runs = []
    for k, extra in enumerate([["--ensemble_method", "deep_ensemble"],
                               ["--ensemble_method", "sam", "--rho", "0.05", "--seed", "7", "--member_seeds", "7", "8"]]):
        argv = ["cifar_resnet.py", "--dataset_name", sorted_dir, "--output_dir", str(tmp_path / str(k)), *TINY,
                "--disable_tqdm", "true", *extra]
        monkeypatch.setattr(sys, "argv", argv)
        runs.append(cifar_resnet.main())
    for results in runs:
        assert results["train_class_counts"] == TRAIN_COUNTS_SEED0
        assert results["test_class_counts"] == TEST_COUNTS_SEED0
        assert results["corrupt_class_counts"] == CORRUPT_COUNTS_SEED0
        assert results["subset_seed"] == 0 and results["num_train_rows"] == 50
    assert runs[0]["method"] == "deep_ensemble" and runs[1]["method"] == "sam"
    saved = json.loads((tmp_path / "1" / "results.json").read_text())
    assert saved["train_class_counts"] == TRAIN_COUNTS_SEED0 and saved["corrupt_rows"] == 12


def test_mrpc_subset_is_random(tmp_path):
    import albert_mrpc

    n = 40
    rows = {"sentence1": [f"a {i}" for i in range(n)], "sentence2": [f"b {i}" for i in range(n)],
            "label": [0] * 20 + [1] * 20, "idx": list(range(n))}
    folder = _write_folder(tmp_path / "mrpc", {"train": datasets.Dataset.from_dict(rows),
                                               "validation": datasets.Dataset.from_dict(rows)})
    args = albert_mrpc.MrpcArgs(dataset_name=folder, max_train_samples=10, max_eval_samples=10, subset_seed=3)
    raw, subsets = albert_mrpc.load_mrpc(args)
    expected = (_draw(n, 10, 3) >= 20).astype(int)
    assert raw["train"]["label"] == expected.tolist()
    assert subsets["train_class_counts"] == {"0": int((expected == 0).sum()), "1": int((expected == 1).sum())}
    assert subsets["train_class_counts"] == {"0": 5, "1": 5}  # the first 10 rows would be {"0": 10}


# ----------------------------------------------------------------------------- 15: errors that say what to fix


def test_dataset_without_a_label_column(tmp_path):
    folder = _write_folder(tmp_path / "nolabel", {"train": _sorted_split(20, 0, with_label=False),
                                                  "test": _sorted_split(10, 1, with_label=False)})
    with pytest.raises(RecipeError) as err:
        load_cifar(CifarDataArgs(dataset_name=folder))
    assert str(err.value) == (f"{folder} has no label column named label, fine_label or labels (columns: "
                              f"['img', 'caption']); pass --label_column")
    with pytest.raises(RecipeError) as err:
        load_cifar(CifarDataArgs(dataset_name=folder, label_column="target"))
    assert str(err.value) == ("--label_column 'target' is not a column of " + folder + " (columns: ['img', "
                              "'caption']); pass the column that holds the integer class labels")
    with pytest.raises(RecipeError) as err:  # one more of the kind: a text column given as the labels
        load_cifar(CifarDataArgs(dataset_name=folder, label_column="caption"))
    assert str(err.value) == ("--label_column 'caption' holds Value('string'), not integer class labels; pass the "
                              "column that does")


def test_missing_dataset_folder_and_bad_subset_sizes(sorted_dir, tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(RecipeError) as err:
        load_cifar(CifarDataArgs(dataset_name=missing))
    assert str(err.value) == (f"--dataset_name {missing}: no such folder; pass a Hub id (uoft-cs/cifar10) or a "
                              "local folder that datasets.load_dataset reads")
    with pytest.raises(RecipeError, match=r"^--max_train_samples must be >= 1 \(or left unset for every row\); got 0$"):
        load_cifar(CifarDataArgs(dataset_name=sorted_dir), max_train=0)


@pytest.mark.parametrize("field,value,rule", [("sharpness_batches", -1, ">= 0 (0 skips the measurement)"),
                                              ("sharpness_steps", 0, ">= 1"), ("sharpness_rho0", 0.0, "> 0"),
                                              ("sharpness_plain_rho", -0.1, "> 0 (or unset)"),
                                              ("sharpness_average_rho0", 0.0, "> 0 (or unset)"),
                                              ("sharpness_average_samples", 0, ">= 1")])
def test_sharpness_settings_are_refused_before_any_work(tmp_path, field, value, rule):
    """Checked in start_run (before data and training), not when the measurement runs after training."""
    from sbtrainer import SharpBalanceConfig

    config = SharpBalanceConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    args = recipe_utils.CommonArgs(**{field: value})
    with pytest.raises(RecipeError) as err:
        recipe_utils.start_run(args, config)
    assert str(err.value) == f"--{field} must be {rule}; got {value}"


def test_sharpness_batches_zero_skips_the_measurement(caplog):
    args = recipe_utils.CommonArgs(sharpness_batches=0)
    with caplog.at_level(logging.INFO, logger="sbtrainer.recipes"):
        assert recipe_utils.member_sharpness(None, None, args) == {}
    assert "--sharpness_batches 0: the members' sharpness is not measured" in caplog.text


def test_output_dir_that_is_a_file_through_the_recipe(tmp_path, sorted_dir):
    """The whole recipe: one line on stderr, exit status 2, no traceback (transformers' FileExistsError before)."""
    target = tmp_path / "results"
    target.write_text("not a folder")
    proc = subprocess.run([sys.executable, str(RECIPES / "cifar_resnet.py"), "--dataset_name", sorted_dir,
                           "--output_dir", str(target), *TINY], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"cifar_resnet.py: error: --output_dir {target} is a file, not a folder: pass a folder path (it is created "
        "if missing) or move the file away")


def _checkpoint(tmp_path: Path, width: int) -> Path:
    """A real Trainer checkpoint (checkpoint-1) of a 2-member CIFAR ResNet of ``width``, after one step."""
    from cifar_resnet import CifarArgs, build_member
    from helpers import DictDataset, make_args

    from sbtrainer import EnsembleModel, SharpBalanceTrainer

    args = make_args(tmp_path, num_members=2, member_seeds=[1, 2], max_steps=1, save_strategy="steps", save_steps=1,
                     ensemble_method="deep_ensemble", per_device_train_batch_size=2)
    ensemble = EnsembleModel.from_factory(build_member(CifarArgs(model_width=width, arch="resnet18"), 3), 2, [1, 2])
    g = torch.Generator().manual_seed(0)
    data = DictDataset(torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0]))
    SharpBalanceTrainer(model=ensemble, args=args, train_dataset=data).train()
    return Path(args.output_dir) / "checkpoint-1"


def test_resume_with_another_model_width(tmp_path):
    from cifar_resnet import CifarArgs, build_member
    from helpers import make_args

    from sbtrainer import EnsembleModel

    ckpt = _checkpoint(tmp_path / "a", width=4)
    config = make_args(tmp_path / "b", num_members=2, member_seeds=[1, 2], resume_from_checkpoint=str(ckpt))
    wider = EnsembleModel.from_factory(build_member(CifarArgs(model_width=8), 3), 2, [1, 2])
    with pytest.raises(RecipeError) as err:
        recipe_utils.check_resume(wider, config)
    message = str(err.value)
    assert "\n" not in message
    same = EnsembleModel.from_factory(build_member(CifarArgs(model_width=4), 3), 2, [1, 2])
    small, wide = same.state_dict(), wider.state_dict()
    differ = [k for k in wide if small[k].shape != wide[k].shape]
    assert len(differ) > 100  # every conv and norm past the stem, in both members
    first = differ[0]
    assert message == (
        f"--resume_from_checkpoint {ckpt} holds a different model ({len(differ)} shapes differ, 0 tensors missing, 0 "
        f"extra; {first} is {list(small[first].shape)} there and {list(wide[first].shape)} here): pass the model "
        "options of the run that wrote it (e.g. --model_width, --arch, --num_members) or start a new run without "
        "--resume_from_checkpoint")
    recipe_utils.check_resume(same, config)  # the same model: no error
    # one more of the kind: a checkpoint folder that does not exist, and `true` with no checkpoint in output_dir
    config.resume_from_checkpoint = str(tmp_path / "checkpoint-9")
    with pytest.raises(RecipeError, match=r"^--resume_from_checkpoint \S+checkpoint-9 is not a folder: pass a "
                                          r"checkpoint-<step> folder written by an earlier run"):
        recipe_utils.check_resume(same, config)
    config.resume_from_checkpoint = "true"
    with pytest.raises(RecipeError, match=r"^--resume_from_checkpoint true: no checkpoint-<step> folder in "
                                          r"--output_dir"):
        recipe_utils.check_resume(same, config)


def test_model_kwargs_that_are_not_json():
    import vit_cifar100

    with pytest.raises(RecipeError) as err:
        vit_cifar100.model_kwargs("{depth: 1}")
    assert str(err.value) == ("--model_kwargs '{depth: 1}' is not JSON (Expecting property name enclosed in double "
                              "quotes at character 1); write it as '{\"depth\": 1}' (double quotes around keys and "
                              "strings)")
    with pytest.raises(RecipeError, match=r"^--model_kwargs must be a JSON object"):
        vit_cifar100.model_kwargs("[1, 2]")


def test_model_config_overrides_with_an_unknown_key(tmp_path):
    import albert_mrpc

    train = datasets.Dataset.from_dict({"sentence1": ["a b"], "sentence2": ["b c"], "label": [1]})
    args = albert_mrpc.MrpcArgs(tiny=True, model_config_overrides="hiden_size=8")
    with pytest.raises(RecipeError, match=r"^--model_config_overrides 'hiden_size=8': .*hiden_size.*; write "
                                          r"'key=value' pairs separated by commas, with keys of AlbertConfig$"):
        albert_mrpc.tokenizer_and_factory(args, train)


# ----------------------------------------------------------------------------- 16: progress and phases


def test_evaluate_corruptions_bar_and_log(caplog, capsys):
    from sbtrainer.data import evaluate_corruptions

    sets = [("contrast", 1, [1]), ("contrast", 2, [1, 2])]

    def evaluate(ds, prefix):
        return {f"{prefix}_accuracy": 1.0 / len(ds)}

    with caplog.at_level(logging.INFO, logger="sbtrainer"):
        out = evaluate_corruptions(evaluate, sets, prefix="t", disable_tqdm=True)
    assert out["t_all_accuracy"] == pytest.approx(0.75)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("sbtrainer.data")] == [
        "evaluated t_contrast_1", "evaluated t_contrast_2"]
    assert capsys.readouterr().err == ""
    evaluate_corruptions(evaluate, sets, prefix="t", disable_tqdm=False)
    err = capsys.readouterr().err
    assert "evaluating t sets" in err and "2/2" in err


def test_ensemble_sharpness_bar_and_log(caplog, capsys):
    from helpers import mlp, vector_data

    from sbtrainer.sharpness import ensemble_sharpness

    torch.manual_seed(0)
    members = [mlp(), mlp()]
    data = vector_data(10)
    kw = dict(steps=1, num_batches=2, batch_size=5, input_name="pixel_values")
    with caplog.at_level(logging.INFO, logger="sbtrainer"):
        quiet = ensemble_sharpness(members, data, disable_tqdm=True, **kw)
    assert [r.getMessage() for r in caplog.records if r.name == "sbtrainer.sharpness"] == [
        "sharpness (worst_case) of member 1 of 2", "sharpness (worst_case) of member 2 of 2"]
    assert capsys.readouterr().err == ""
    loud = ensemble_sharpness(members, data, disable_tqdm=False, **kw)
    err = capsys.readouterr().err
    assert "sharpness, member 1/2" in err and "sharpness, member 2/2" in err
    assert loud == quiet  # the bar changes nothing else


def test_member_sharpness_plain_and_average_equal_the_direct_measures():
    """--sharpness_plain_rho / --sharpness_average_rho0: the same numbers as ensemble_sharpness called directly."""
    from helpers import mlp, vector_data

    from sbtrainer import EnsembleModel
    from sbtrainer.sharpness import ensemble_sharpness

    ensemble = EnsembleModel.from_factory(lambda s: mlp(), 2, [0, 1])
    data = vector_data(20)
    args = recipe_utils.CommonArgs(sharpness_batches=2, sharpness_steps=3, sharpness_plain_rho=0.05,
                                   sharpness_average_rho0=0.1, sharpness_average_samples=4, subset_seed=7)
    got = recipe_utils.member_sharpness(ensemble, data, args, disable_tqdm=True)
    kw = dict(batch_size=5, num_batches=2, seed=7, disable_tqdm=True, input_name=ensemble.input_name)
    adaptive = ensemble_sharpness(ensemble.members, data, rho0=0.5, steps=3, adaptive=True, **kw)
    plain = ensemble_sharpness(ensemble.members, data, rho0=0.05, steps=3, adaptive=False, **kw)
    average = ensemble_sharpness(ensemble.members, data, kind="average_case", rho0=0.1, num_samples=4, adaptive=True,
                                 **kw)
    assert got == {**adaptive, **{f"plain_{k}": v for k, v in plain.items()},
                   **{f"average_{k}": v for k, v in average.items()}}
    assert got["plain_sharpness"] != got["sharpness"] and "average_sharpness_member_1_stderr" in got
    unset = recipe_utils.member_sharpness(ensemble, data, recipe_utils.CommonArgs(sharpness_batches=2,
                                                                                  sharpness_steps=3, subset_seed=7))
    assert unset == adaptive


def test_corrupted_sets_generation_writes_no_bar_when_disabled(capsys):
    from sbtrainer.data import iter_corrupted_datasets

    rows = [{"image": np.full((8, 8), 100, np.uint8), "label": 0}] * 3
    list(iter_corrupted_datasets(rows, "image", ["contrast"], [1], progress=False))
    assert capsys.readouterr().err == ""
    list(iter_corrupted_datasets(rows, "image", ["contrast"], [1], progress=True))
    assert "contrast s1" in capsys.readouterr().err


def test_phase_logs_start_and_end(caplog):
    with caplog.at_level(logging.INFO, logger="sbtrainer.recipes"), recipe_utils.phase("measuring"):
        pass
    messages = [r.getMessage() for r in caplog.records if r.name == "sbtrainer.recipes"]
    assert messages[0] == "measuring..." and re.fullmatch(r"measuring: done in \d+\.\d s", messages[1])


# ----------------------------------------------------------------------------- 14 + 16 through the launchers


PHASES = ["processes: 1, torch threads: 1", "train: 50 of 200 rows", "test: 30 of 100 rows",
          "corrupt: 12 of 30 rows",  # the corrupted sets are made before training: a bad folder fails at once
          "training 2 members (deep_ensemble)...", "training 2 members (deep_ensemble): done in",
          "evaluating on the test split and on the training rows (no augmentation)...",
          "evaluating on the corrupted sets (cifar10c)...", "measuring the sharpness of 2 members",
          "writing the report and the ensemble to"]


def test_python_and_accelerate_launch_agree_at_the_same_thread_count(tmp_path, sorted_dir):
    """``python recipe --num_threads 1`` and ``accelerate launch --cpu recipe`` (which sets OMP_NUM_THREADS=1 when
    run with 0 processes) give bit-identical metrics; both log and record 1 thread; no progress bar is written with
    ``--disable_tqdm true`` and every phase is logged in order."""
    common = ["--dataset_name", sorted_dir, *TINY, "--ensemble_method", "deep_ensemble", "--disable_tqdm", "true"]
    runs = {}
    for name, cmd in {"python": [sys.executable, str(RECIPES / "cifar_resnet.py"), "--num_threads", "1"],
                      "accelerate": [str(ACCELERATE), "launch", "--cpu", str(RECIPES / "cifar_resnet.py")]}.items():
        out = tmp_path / name
        proc = subprocess.run([*cmd, *common, "--output_dir", str(out)], cwd=ROOT, env=_env(), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-5000:]
        assert BAR.search(proc.stderr) is None, proc.stderr[-2000:]
        at = [proc.stderr.find(p) for p in PHASES]
        assert all(i >= 0 for i in at) and at == sorted(at), dict(zip(PHASES, at))
        runs[name] = json.loads((out / "results.json").read_text())
    py, acc = runs["python"], runs["accelerate"]
    assert py["torch_num_threads"] == acc["torch_num_threads"] == 1
    assert (py["env_OMP_NUM_THREADS"], acc["env_OMP_NUM_THREADS"]) == (None, "1")
    assert py["num_processes"] == acc["num_processes"] == 1
    assert py["train_class_counts"] == acc["train_class_counts"] == TRAIN_COUNTS_SEED0
    metrics = [k for k in py if k.startswith(("eval_", "cifar10c_", "sharpness")) and "runtime" not in k
               and "per_second" not in k]
    assert len(metrics) > 20
    assert {k: py[k] for k in metrics} == {k: acc[k] for k in metrics}
