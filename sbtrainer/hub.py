"""Ensembles as one folder or one Hub repo: save, load, push.

Layout (``FORMAT_VERSION`` 1)::

    ensemble_config.json    format, method (null if saved without a config), member seeds (null if not
                            known), reduction, input_name, number and kinds of members, how to rebuild
                            each member, and the training config's hyper-parameters ({} without a
                            config; the fields that describe the ensemble itself, num_members and
                            ensemble_reduction, are taken from the ensemble, not the config)
    README.md               model card: what the ensemble is (members, kinds, reduction, seeds), the
                            method and hyper-parameters, metrics, usage, the paper's citation
    member_<i>/             one folder per member:
        transformers  ->    ``save_pretrained`` output: loads alone with
                            ``AutoModelForSequenceClassification.from_pretrained(dir, subfolder="member_0")``
        timm          ->    model.safetensors + sbtrainer_member.json (timm architecture, model args and,
                            for models built by `sbtrainer.models`, the build recipe, e.g. the CIFAR stem
                            that timm's own format cannot express); a plain timm model also gets timm's
                            config.json, so ``timm.create_model("local-dir:<dir>", pretrained=True)`` loads it
        module        ->    model.safetensors + sbtrainer_member.json; rebuilt from its build recipe when
                            it has one, else by ``factory(seed)`` given to `EnsembleModel.from_pretrained`

Everything recorded about a member describes it as it is when saved, not as it was built: the
recipe and timm arguments are read from the live model (so ``reset_classifier(3)`` after building
with 10 classes saves 3), and a module rebuilt from them must have the member's tensors, shapes and
settings, else the save is refused with a ``ValueError`` that lists the differences. Tied weights
(several ``state_dict`` names for one tensor) are written once, recorded in ``sbtrainer_member.json``
(``tied``) and tied again on load.

:func:`save_ensemble` writes a temporary sibling folder and renames it into place, so a failed save
leaves no half-written folder (and an existing ensemble folder is only replaced once the new one is
complete). :func:`push_ensemble_to_hub` saves to a temporary folder and uploads it in one commit.
`EnsembleModel.from_pretrained` takes a local folder or a Hub repo id; offline, a repo id fails at once with
:class:`HubUnreachableError`, which says how to pass a local path instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import importlib
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .member_adapter import is_hf_model
from .models import (
    BUILDERS,
    architecture_differences,
    architecture_summary,
    build_from_recipe,
    build_on_meta,
    current_recipe,
    is_timm_model,
    tied_groups,
    timm_model_args,
)

logger = logging.getLogger(__name__)

FORMAT_NAME = "sbtrainer-ensemble"
FORMAT_VERSION = 1
CONFIG_NAME = "ensemble_config.json"
MEMBER_CONFIG_NAME = "sbtrainer_member.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
MEMBER_KINDS = ("transformers", "timm", "module")
# TrainingArguments fields worth recording beside SharpBalanceConfig's own fields.
TRAINING_FIELDS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "weight_decay", "optim", "optim_args", "lr_scheduler_type", "warmup_steps", "max_grad_norm", "seed",
)

Factory = Callable[[int], nn.Module]


class HubUnreachableError(ConnectionError):
    """A Hub repo id was given, the Hub cannot be reached (offline mode or no network) and nothing is cached."""


class HubUploadError(RuntimeError):
    """Creating the repo or uploading the ensemble folder failed."""


# ----------------------------------------------------------------------------- what is recorded


def _jsonable(value: Any) -> Any:
    """``value`` as strict JSON data (non-finite floats become None, tensors/arrays lists, others str)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    return str(value)


def config_fields(config: Any) -> dict[str, Any]:
    """The hyper-parameters recorded for ``config``: SharpBalanceConfig's own fields and key training fields.

    ``config`` is a `SharpBalanceConfig` (or any `TrainingArguments`), a dict (kept as is) or None (``{}``).
    :func:`save_ensemble` then drops :data:`ENSEMBLE_FIELDS`, which the ensemble itself states.
    """
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(_jsonable(config))
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config must be a SharpBalanceConfig, a dict or None; got {type(config).__name__}")
    from transformers import TrainingArguments

    base = {f.name for f in dataclasses.fields(TrainingArguments)} if isinstance(config, TrainingArguments) else set()
    names = [f.name for f in dataclasses.fields(config) if f.name not in base] + [n for n in TRAINING_FIELDS if n in base]
    values = {n: getattr(config, n) for n in names}
    return dict(_jsonable({n: v.value if isinstance(v, enum.Enum) else v for n, v in values.items()}))


ENSEMBLE_FIELDS = ("num_members", "ensemble_reduction")
"""Config fields that describe the ensemble itself: the saved ensemble is their one source (its
``num_members`` and ``reduction``), so they are left out of the recorded config."""


def _ensemble_fields_dropped(ensemble: EnsembleHubMixin, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` without :data:`ENSEMBLE_FIELDS`; a value that disagrees with the ensemble is logged."""
    truth = {"num_members": ensemble.num_members, "ensemble_reduction": ensemble.reduction}
    for name in ENSEMBLE_FIELDS:
        if name in fields and fields[name] != truth[name]:
            logger.warning("save_ensemble: config.%s=%r differs from the ensemble being saved (%r); the saved "
                           "folder records and uses the ensemble's value", name, fields[name], truth[name])
    return {k: v for k, v in fields.items() if k not in ENSEMBLE_FIELDS}


def _member_seeds(ensemble: EnsembleHubMixin, fields: Mapping[str, Any]) -> list[int] | None:
    """The members' seeds: the ensemble's, else the config's ``member_seeds``, else None (not recorded)."""
    if ensemble.seeds is not None:
        return [int(s) for s in ensemble.seeds]
    seeds = fields.get("member_seeds")
    if isinstance(seeds, list) and len(seeds) == ensemble.num_members:
        return [int(s) for s in seeds]
    return None


def member_kind(member: nn.Module) -> str:
    """``"transformers"`` (a PreTrainedModel), ``"timm"`` (built by timm) or ``"module"`` (any other nn.Module)."""
    if is_hf_model(member):
        return "transformers"
    return "timm" if is_timm_model(member) else "module"


# ----------------------------------------------------------------------------- save


def _save_member(member: nn.Module, folder: Path, index: int, seed: int | None) -> dict[str, Any]:
    """Write member ``index`` into ``folder``; return its entry of ``ensemble_config.json["members"]``.

    What is recorded describes the member as it is now, not as it was built: the build recipe is
    refreshed (:func:`sbtrainer.models.current_recipe`) and timm's arguments are read from the live
    model, then a module rebuilt from them (on the meta device) is compared with the member; if
    they differ (a change no recipe records, e.g. a hand-replaced head), the save is refused with a
    ``ValueError`` that lists the differences, instead of writing a folder that does not load.
    Names that share one tensor (tied weights) are recorded as ``tied`` and tied again on load.
    """
    kind = member_kind(member)
    info: dict[str, Any] = {"index": index, "subfolder": folder.name, "seed": seed, "kind": kind,
                            "class": f"{type(member).__module__}.{type(member).__qualname__}"}
    if kind == "transformers":
        _check_transformers_config(member, folder.name)
        member.save_pretrained(str(folder))
        info["architecture"] = type(member).__name__
        info["model_type"] = getattr(member.config, "model_type", None)
        return info
    import safetensors.torch

    info["builder"] = current_recipe(member)
    if kind == "timm":
        info["architecture"] = member.pretrained_cfg["architecture"]
        info["model_args"] = timm_model_args(member)
    info["tied"] = tied_groups(member)
    if info["builder"] is not None or kind == "timm":
        _check_rebuilds(member, info)
    folder.mkdir(parents=True)
    safetensors.torch.save_model(member, str(folder / WEIGHTS_NAME))
    if kind == "timm" and (info["builder"] is None or info["builder"]["builder"] == "timm_model"):
        _write_timm_config(member, folder)
    (folder / MEMBER_CONFIG_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _check_rebuilds(member: nn.Module, info: Mapping[str, Any]) -> None:
    """Refuse to save ``member`` if what ``info`` records does not rebuild its architecture."""
    recipe = info.get("builder")
    if recipe and recipe.get("builder") not in BUILDERS:
        logger.warning("save_ensemble: %s was built by %r, which is not registered here, so the saved recipe is not "
                       "checked; loading needs that builder registered (sbtrainer.models.register_builder) or factory=",
                       info["subfolder"], recipe.get("builder"))
        return
    keys = ("kind", "builder", "architecture", "model_args", "tied")
    try:
        rebuilt = _rebuilt_summary(json.dumps({k: info.get(k) for k in keys}, sort_keys=True))
    except Exception as err:
        raise ValueError(f"save_ensemble: {info['subfolder']} ({info['class']}) cannot be rebuilt from what the folder "
                         f"would record ({recipe or info.get('model_args')}), so it would not load back: "
                         f"{type(err).__name__}: {err}") from err
    diffs = architecture_differences(member, rebuilt)
    if diffs:
        how = (f"build recipe {info['builder']}" if info.get("builder") else
               f"timm.create_model({info['architecture']!r}, **{info.get('model_args', {})})")
        raise ValueError(
            f"save_ensemble: {info['subfolder']} ({info['class']}) was changed after it was built, and what the "
            f"folder would record ({how}) rebuilds a different module, so it would not load back: "
            + "; ".join(diffs) + ". "
            "Make the change with the model's own API (timm: reset_classifier(n), set_input_size(...)), or "
            "build the member with the new arguments and load the trained weights into it, or register a "
            "builder (sbtrainer.models.register_builder) that builds this architecture."
        )


@functools.lru_cache(maxsize=32)
def _rebuilt_summary(info_json: str) -> dict[str, Any]:
    """`architecture_summary` of the module the member entry ``info_json`` rebuilds (meta device; cached:
    members of one ensemble usually share one recipe). Read only."""
    info = {**json.loads(info_json), "subfolder": "", "class": "", "seed": 0}
    rebuilt = build_on_meta(lambda: _rebuild_member(info, None))
    _apply_ties(rebuilt, info.get("tied") or [])
    return architecture_summary(rebuilt)


def _check_transformers_config(member: nn.Module, name: str) -> None:
    """Refuse to save a transformers member whose ``config`` no longer builds its tensors (e.g. a replaced head)."""
    try:
        rebuilt = build_on_meta(lambda: type(member)(member.config))
    except Exception as err:  # a model class that cannot be built from its config alone: nothing to compare
        logger.debug("%s: %s(config) failed (%s); config not checked", name, type(member).__name__, err)
        return
    diffs = architecture_differences(member, rebuilt, settings=False)
    if diffs:
        raise ValueError(
            f"save_ensemble: {name} ({type(member).__name__}) no longer matches its config, so "
            f"from_pretrained would not load it back: " + "; ".join(diffs) + ". Update member.config to "
            "describe the model (e.g. config.num_labels, id2label and label2id after replacing the classifier) "
            "and save again."
        )


def _write_timm_config(member: nn.Module, folder: Path) -> None:
    """timm's own config.json, so ``timm.create_model("local-dir:<folder>", pretrained=True)`` loads the member."""
    try:
        from timm.models import save_config_for_hf
    except ImportError:  # older timm: the member still loads through sbtrainer
        from timm.models._hub import save_config_for_hf
    try:
        save_config_for_hf(member, str(folder / "config.json"))
    except (ValueError, TypeError, KeyError, AssertionError) as err:
        logger.warning("timm config.json not written for %s (%s); the member still loads with sbtrainer", folder.name, err)


def _member_description(info: Mapping[str, Any]) -> str:
    """One line saying what member ``info`` (an entry of ``ensemble_config.json["members"]``) is."""
    if info["kind"] == "transformers":
        text = f"transformers `{info['architecture']}`" + (f" ({info['model_type']})" if info.get("model_type") else "")
    elif info["kind"] == "timm":
        text = f"timm `{info['architecture']}`"
    else:
        text = f"`{info['class']}`"
    recipe = info.get("builder")
    if recipe:
        args = ", ".join(f"{k}={v!r}" for k, v in recipe.get("kwargs", {}).items())
        text += f", built by `sbtrainer.models.{recipe['builder']}({args})`"
    elif info["kind"] == "timm":
        args = ", ".join(f"{k}={v!r}" for k, v in info.get("model_args", {}).items())
        text += f", `timm.create_model({info['architecture']!r}, {args})`"
    return text


def _card(method: str | None, fields: Mapping[str, Any], meta: Mapping[str, Any],
          metrics: Mapping[str, Any] | None) -> str:
    """The model card: `sbtrainer.report.model_card` with the ensemble's own facts, plus a usage section."""
    from .report import model_card

    seeds = meta["member_seeds"]
    ensemble = {
        "reduction": meta["reduction"],
        "input_name": meta["input_name"] if any(k != "transformers" for k in meta["member_kinds"]) else None,
        "members": [{"name": info["subfolder"], "kind": info["kind"], "architecture": _member_description(info),
                     "seed": None if seeds is None else seeds[i]} for i, info in enumerate(meta["members"])],
    }
    name = f"{method} ensemble" if method else "sbtrainer ensemble"
    card = model_card(method, fields, metrics=metrics or None, base_model=meta["base_model"], model_name=name,
                      ensemble=ensemble)
    kinds = meta["member_kinds"]
    usage = (
        "## Usage\n\n```python\nfrom sbtrainer import EnsembleModel\n\n"
        'ensemble = EnsembleModel.from_pretrained("<this repo id or folder>")'
        + ("  # factory=lambda seed: MyNet() for plain-module members" if "module" in kinds else "")
        + "\nout = ensemble(**batch)  # out.logits (B, C), out.member_logits (B, m, C)\n```\n\n"
        f"The loaded ensemble combines its members with `reduction=\"{meta['reduction']}\"`, as saved. "
        "Each member is a folder `member_<i>/`.\n"
    )
    head, sep, tail = card.partition("## Citation")
    return head + usage + "\n" + sep + tail if sep else card + "\n" + usage


def _write_ensemble(ensemble: EnsembleHubMixin, folder: Path, config: Any, metrics: Mapping[str, Any] | None,
                    base_model: str | None, processor: Any = None, model_card: str | None = None) -> None:
    from . import __version__

    fields = _ensemble_fields_dropped(ensemble, config_fields(config))
    method = fields.get("ensemble_method") or None
    method = str(method) if method is not None else None
    seeds = _member_seeds(ensemble, fields)
    members = [_save_member(m, folder / f"member_{i}", i, None if seeds is None else seeds[i])
               for i, m in enumerate(ensemble.members)]
    kinds = [m["kind"] for m in members]
    meta = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "sbtrainer_version": __version__,
        "method": method, "num_members": ensemble.num_members, "member_seeds": seeds,
        "reduction": ensemble.reduction, "input_name": ensemble.input_name, "member_kinds": kinds,
        "base_model": base_model, "config": fields, "metrics": _jsonable(dict(metrics or {})), "members": members,
    }
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
    (folder / CARD_NAME).write_text(model_card if model_card is not None else _card(method, fields, meta, metrics))
    if processor is not None:
        processor.save_pretrained(str(folder))


def _check_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"save_ensemble: {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / CONFIG_NAME).is_file():
        raise FileExistsError(f"save_ensemble: {target} is a non-empty folder that holds no saved ensemble "
                              f"({CONFIG_NAME}); refusing to replace it. Choose another folder or empty it.")


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is swapped out first and deleted only afterwards."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_ensemble(
    ensemble: EnsembleHubMixin,
    save_directory: str | os.PathLike,
    *,
    config: Any = None,
    metrics: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    processor: Any = None,
    model_card: str | None = None,
) -> str:
    """Save ``ensemble`` as one folder (see the module docstring); return the folder's path.

    Args:
        ensemble: the ensemble (members: transformers models, timm models, or plain modules).
        save_directory: the folder; created, or replaced if it holds a previously saved ensemble. A
            non-empty folder without ``ensemble_config.json`` is refused (``FileExistsError``).
        config: the `SharpBalanceConfig` it was trained with (or a dict of hyper-parameters, or None).
            Its ``ensemble_method`` names the method in the config and the model card.
        metrics: evaluation results for the model card and the config (flat dict).
        base_model: the pretrained checkpoint the members started from (model card metadata).
        processor: a tokenizer or image processor, saved at the folder's root with its ``save_pretrained``
            (so ``AutoTokenizer.from_pretrained(folder)`` loads it).
        model_card: the README.md text, written as given; by default it is built from the recorded data
            (`sbtrainer.report.model_card`: method, hyper-parameters, metrics, members, citation).

    The reduction saved (config, model card, and used on load) is ``ensemble.reduction``; a config
    whose ``ensemble_reduction`` or ``num_members`` differs is logged and not recorded.

    Raises:
        ValueError: a member changed after it was built in a way its recipe, timm arguments or
            transformers config cannot rebuild (the message lists the differing tensors/settings).
        FileExistsError: ``save_directory`` is a file or a non-empty folder that holds no saved ensemble.
    """
    if not isinstance(ensemble, EnsembleHubMixin):
        raise TypeError(f"save_ensemble: ensemble must be an EnsembleModel; got {type(ensemble).__name__}")
    target = Path(save_directory).expanduser().absolute()
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        _write_ensemble(ensemble, tmp, config, metrics, base_model, processor, model_card)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved a %d-member ensemble to %s", ensemble.num_members, target)
    return str(target)


# ----------------------------------------------------------------------------- load


def _looks_like_path(name: str) -> bool:
    if name.startswith((".", "/", "~", "\\")) or os.path.isabs(name) or name.count("/") > 1:
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _offline_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        # the HTTP client of huggingface_hub: httpx2 (>= 2), httpx (1.x) or requests (< 1)
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)


def _download(repo_id: str, revision: str | None, token: str | bool | None) -> Path:
    """``snapshot_download`` with its offline/connection failures turned into one clear error."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, token=token, repo_type="model"))
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as err:
        raise FileNotFoundError(
            f"from_pretrained: {repo_id!r} is not a local folder, and the Hub has no accessible model repo "
            f"{repo_id!r}{f' at revision {revision!r}' if revision else ''} ({type(err).__name__}). Check the id, "
            "log in for a private or gated repo (`hf auth login` or HF_TOKEN), or pass the local path of a folder "
            "written by EnsembleModel.save_pretrained."
        ) from err
    except _offline_errors() as err:
        why = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached from this machine"
        raise HubUnreachableError(
            f"from_pretrained: {repo_id!r} is not a local folder, and the Hugging Face Hub is unreachable ({why}; no "
            f"cached copy of {repo_id!r}). To load a saved ensemble offline, pass the local path of the folder "
            "written by save_pretrained, e.g. EnsembleModel.from_pretrained('./outputs/run/ensemble') (a path "
            "starting with ./ or / is never taken as a repo id). To download it, go online (unset HF_HUB_OFFLINE)."
        ) from err


def resolve_ensemble_folder(path_or_repo_id: str | os.PathLike, revision: str | None = None,
                            token: str | bool | None = None) -> Path:
    """The local folder of a saved ensemble: ``path_or_repo_id`` itself, or a Hub snapshot of that repo."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if path.exists():
        raise NotADirectoryError(f"from_pretrained: {name} is a file; pass the folder written by save_pretrained")
    if _looks_like_path(name):
        raise FileNotFoundError(f"from_pretrained: no folder at {name!r} (and it is not a Hub repo id 'owner/name')")
    return _download(name, revision, token)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"from_pretrained: {folder} holds no {CONFIG_NAME}; it was not written by "
                                "EnsembleModel.save_pretrained")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"from_pretrained: {path} has format {meta.get('format')!r}; expected {FORMAT_NAME!r}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"from_pretrained: {path} has format_version {meta['format_version']}, newer than this "
                         f"sbtrainer reads ({FORMAT_VERSION}); upgrade sbtrainer")
    return meta


def _load_transformers_member(folder: Path) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder))
    names = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else None
    cls = cls or transformers.AutoModelForSequenceClassification
    return cls.from_pretrained(str(folder))


def _rebuild_member(info: Mapping[str, Any], factory: Factory | None) -> nn.Module:
    """An un-trained module of member ``info``'s architecture: ``factory(seed)``, its build recipe, or timm."""
    if factory is not None:  # a member saved without a known seed gets its index
        return factory(int(info["seed"] if info.get("seed") is not None else info["index"]))
    if info.get("builder"):
        return build_from_recipe(info["builder"])
    if info["kind"] == "timm":
        import timm

        return timm.create_model(info["architecture"], pretrained=False, **info.get("model_args", {}))
    raise ValueError(
        f"from_pretrained: {info['subfolder']} is a plain nn.Module ({info['class']}) saved without a build recipe, "
        "so its architecture cannot be rebuilt from the folder. Pass factory=<seed -> nn.Module> that builds the "
        "same architecture, e.g. EnsembleModel.from_pretrained(path, factory=lambda seed: MyNet()), or build members "
        "with a builder of sbtrainer.models (register_builder) so the recipe is saved."
    )


def _set_tensor(module: nn.Module, name: str, tensor: Any) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, leaf, tensor)


def _apply_ties(module: nn.Module, groups: list[list[str]]) -> None:
    """Give ``module`` exactly the tied groups ``groups`` (state_dict names holding one tensor).

    A group tied in ``module`` but not in ``groups`` is untied (each name gets its own copy); each
    recorded group is tied to its first name's tensor. Tensors are not loaded here: the weights file,
    which holds one tensor per group, is loaded afterwards.
    """
    wanted = {tuple(g) for g in groups}
    tensors = module.state_dict(keep_vars=True)
    for group in tied_groups(module):
        if tuple(group) not in wanted:
            for name in group[1:]:
                old = tensors[name]
                copy = nn.Parameter(old.detach().clone(), old.requires_grad) if isinstance(old, nn.Parameter) else old.clone()
                _set_tensor(module, name, copy)
    tensors = module.state_dict(keep_vars=True)
    for group in groups:
        missing = [n for n in group if n not in tensors]
        if missing:
            raise ValueError(f"from_pretrained: tied tensors {missing} are not in the rebuilt {type(module).__name__}")
        for name in group[1:]:
            _set_tensor(module, name, tensors[group[0]])


def _load_member(folder: Path, info: Mapping[str, Any], factory: Factory | None) -> nn.Module:
    kind = info["kind"]
    if kind not in MEMBER_KINDS:
        raise ValueError(f"from_pretrained: {folder.name} has unknown member kind {kind!r}; expected {MEMBER_KINDS}")
    if kind == "transformers":
        return _load_transformers_member(folder)
    import safetensors.torch

    module = _rebuild_member(info, factory)
    _apply_ties(module, info.get("tied", []))
    try:
        missing, unexpected = safetensors.torch.load_model(module, str(folder / WEIGHTS_NAME), strict=False)
    except RuntimeError as err:  # shape mismatch
        raise ValueError(f"from_pretrained: the weights of {folder.name} do not fit the rebuilt module "
                         f"{type(module).__name__}: {err}") from err
    if missing or unexpected:
        raise ValueError(f"from_pretrained: the weights of {folder.name} do not fit the rebuilt module "
                         f"{type(module).__name__}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return module.eval()


def read_ensemble(
    path_or_repo_id: str | os.PathLike,
    *,
    factory: Factory | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> tuple[list[nn.Module], dict[str, Any]]:
    """The members (in eval mode, on the CPU) and the parsed ``ensemble_config.json`` of a saved ensemble.

    `EnsembleModel.from_pretrained` builds the ensemble from them (reduction, input_name, seeds from the config).

    Args:
        path_or_repo_id: a folder, or a Hub model repo id ``owner/name`` (downloaded with ``snapshot_download``).
        factory: ``seed -> nn.Module`` building a member's architecture (random init); required for plain
            modules saved without a build recipe, and used instead of the recipe for every non-transformers
            member when given.
        revision, token: passed to ``snapshot_download`` for a repo id.

    Raises:
        HubUnreachableError: a repo id while offline or without network (fails at once, no retries).
        FileNotFoundError: no such folder or repo; ValueError: a member that cannot be rebuilt.
    """
    folder = resolve_ensemble_folder(path_or_repo_id, revision, token)
    meta = _read_config(folder)
    members = [_load_member(folder / info["subfolder"], info, factory).eval() for info in meta["members"]]
    return members, meta


class EnsembleHubMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` of the ensemble folder format.

    Mixed into `EnsembleModel` (as transformers mixes `PushToHubMixin` into `PreTrainedModel`): the format
    knows nothing of the class it builds (``cls``), so the dependency runs one way, ensemble -> hub.
    """

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> str:
        """Save the ensemble as one folder (config, model card, ``member_<i>/``); see :func:`save_ensemble`."""
        return save_ensemble(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, factory: Factory | None = None, **kwargs):
        """Load a saved ensemble from a folder or a Hub repo (see :func:`read_ensemble`), in eval mode on the CPU.

        ``ensemble.saved_config`` holds the parsed ``ensemble_config.json``.
        """
        members, meta = read_ensemble(path_or_repo_id, factory=factory, **kwargs)
        ensemble = cls(members, reduction=meta["reduction"], input_name=meta["input_name"], seeds=meta["member_seeds"])
        ensemble.saved_config = meta
        return ensemble.eval()

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Save to a temporary folder and upload it as one commit; see :func:`push_ensemble_to_hub`."""
        return push_ensemble_to_hub(self, repo_id, **kwargs)


# ----------------------------------------------------------------------------- push


def push_ensemble_to_hub(
    ensemble: EnsembleHubMixin,
    repo_id: str,
    *,
    config: Any = None,
    metrics: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    processor: Any = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload ensemble trained with sbtrainer",
) -> str:
    """Save ``ensemble`` to a temporary folder and upload it to the Hub model repo ``repo_id`` in one commit.

    ``HfApi().create_repo(repo_id, private=private, exist_ok=True)`` then ``HfApi().upload_folder``. Nothing
    is written outside the temporary folder, so a local save made before is left as it was. Returns the
    commit URL. Raises :class:`HubUploadError` (chained to the cause) if the repo cannot be created or the
    upload fails.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="sbtrainer-push-") as tmp:
        folder = save_ensemble(ensemble, Path(tmp) / "ensemble", config=config, metrics=metrics, base_model=base_model,
                               processor=processor)
        try:
            repo = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
            repo_id = getattr(repo, "repo_id", None) or repo_id
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                     repo_type="model")
        except Exception as err:
            raise HubUploadError(
                f"push_to_hub: uploading the ensemble to the Hub repo {repo_id!r} failed ({type(err).__name__}: "
                f"{err}). Check that you are logged in with write access (`hf auth login` or HF_TOKEN) and that the "
                "Hub is reachable (HF_HUB_OFFLINE unset). Your model is untouched: save it locally with "
                f"`ensemble.save_pretrained(dir)` and upload that folder later with `hf upload {repo_id} dir`."
            ) from err
    url = getattr(info, "commit_url", None) or str(info)
    logger.info("pushed a %d-member ensemble to %s", ensemble.num_members, url)
    return url


__all__ = [
    "EnsembleHubMixin",
    "HubUnreachableError",
    "HubUploadError",
    "config_fields",
    "member_kind",
    "push_ensemble_to_hub",
    "read_ensemble",
    "resolve_ensemble_folder",
    "save_ensemble",
]
