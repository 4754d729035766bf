"""Ensembles as one folder / Hub repo: round trips, members loaded alone, atomic saves, push, offline loading."""

import hashlib
import json
import shutil
import time
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from helpers import make_args, small_cnn, tiny_albert_factory

from sbtrainer import EnsembleModel
from sbtrainer.hub import (
    CONFIG_NAME,
    FORMAT_VERSION,
    HubUnreachableError,
    HubUploadError,
)
from sbtrainer.models import BUILD_ATTR, build_from_recipe, cifar_resnet, timm_model

SEEDS = [7, 8]


def _warm_norm_stats(ensemble: EnsembleModel, batch: dict) -> None:
    """One train-mode forward so BatchNorm running statistics differ from their init (buffers must be saved)."""
    ensemble.train()
    with torch.no_grad():
        ensemble(**batch)
    ensemble.eval()


def _images(channels=3, side=16, n=5):
    return {"pixel_values": torch.randn(n, channels, side, side, generator=torch.Generator().manual_seed(1))}


def _tokens(n=4, length=9):
    g = torch.Generator().manual_seed(2)
    return {"input_ids": torch.randint(1, 40, (n, length), generator=g),
            "attention_mask": torch.ones(n, length, dtype=torch.long)}


BUILDS = {  # name: (factory seed -> member, batch, ensemble kwargs, expected kind)
    "cifar_resnet": (lambda s: cifar_resnet("resnet18", num_classes=4, width=4), _images, {}, "timm"),
    "timm_builder": (lambda s: timm_model("resnet10t", num_classes=3), _images, {}, "timm"),
    "timm_plain": (lambda s: timm.create_model("resnet10t", pretrained=False, num_classes=3), _images, {}, "timm"),
    "vit": (lambda s: timm_model("vit_tiny_patch16_224", num_classes=5, img_size=16, patch_size=8, depth=1,
                                 embed_dim=24, num_heads=2), _images, {}, "timm"),
    "transformers": (lambda s: tiny_albert_factory(dropout=0.0)(), _tokens, {"input_name": "input_ids"}, "transformers"),
    "module_with_recipe": (lambda s: __import__("sbtrainer.models").models.small_cnn(3, 4, 4, 16), _images, {},
                           "module"),
}


def _ensemble(name, reduction="logits"):
    factory, batch_fn, kw, _ = BUILDS[name]
    ens = EnsembleModel.from_factory(factory, 2, SEEDS, reduction=reduction, **kw)
    batch = batch_fn()
    _warm_norm_stats(ens, batch)
    return ens, batch


@pytest.mark.parametrize("name", list(BUILDS))
def test_round_trip_gives_identical_logits(tmp_path, name):
    ens, batch = _ensemble(name, reduction="probs")
    config = make_args(tmp_path, ensemble_method="sharpbalance", num_members=2, member_seeds=SEEDS, rho=0.2,
                       sam_fraction=0.4, num_train_epochs=4, scoring_start_epoch=2)
    path = ens.save_pretrained(tmp_path / "ens", config=config, metrics={"eval_ensemble_accuracy": 0.75})
    loaded = EnsembleModel.from_pretrained(path)
    with torch.no_grad():
        expected, got = ens(**batch), loaded(**batch)
    assert torch.equal(expected.member_logits, got.member_logits)
    assert torch.equal(expected.logits, got.logits)
    assert loaded.reduction == "probs" and loaded.seeds == SEEDS and loaded.input_name == ens.input_name
    for a, b in zip(ens.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # parameters AND buffers (BatchNorm running statistics)

    meta = json.loads((Path(path) / CONFIG_NAME).read_text())
    kind = BUILDS[name][3]
    assert meta["format_version"] == FORMAT_VERSION and meta["method"] == "sharpbalance"
    assert meta["num_members"] == 2 and meta["member_seeds"] == SEEDS and meta["member_kinds"] == [kind, kind]
    assert meta["reduction"] == "probs" and meta["input_name"] == ens.input_name
    assert meta["config"]["rho"] == 0.2 and meta["config"]["sam_fraction"] == 0.4
    assert meta["config"]["scoring_start_epoch"] == 2 and meta["config"]["optim"] == "sgd"
    assert meta["metrics"] == {"eval_ensemble_accuracy": 0.75}
    assert sorted(p.name for p in Path(path).iterdir()) == ["README.md", CONFIG_NAME, "member_0", "member_1"]


def test_cifar_stem_is_in_the_build_recipe(tmp_path):
    """timm's own format cannot express the CIFAR stem: the recipe rebuilds it (3x3/1 conv, no max-pool)."""
    ens, _ = _ensemble("cifar_resnet")
    path = ens.save_pretrained(tmp_path / "ens")
    info = json.loads((Path(path) / "member_0" / "sbtrainer_member.json").read_text())
    assert info["builder"] == {"builder": "cifar_resnet", "kwargs": {"arch": "resnet18", "num_classes": 4, "width": 4,
                                                                     "cifar_stem": True}}
    assert info["architecture"] == "resnet18"
    rebuilt = build_from_recipe(info["builder"])
    assert rebuilt.conv1.kernel_size == (3, 3) and rebuilt.conv1.stride == (1, 1)
    assert isinstance(rebuilt.maxpool, torch.nn.Identity)
    assert not (Path(path) / "member_0" / "config.json").exists()  # a timm config.json would rebuild the wrong stem


@pytest.mark.parametrize("name", ["timm_plain", "timm_builder", "vit"])
def test_plain_timm_member_loads_alone_with_timm(tmp_path, name):
    ens, batch = _ensemble(name)
    path = ens.save_pretrained(tmp_path / "ens")
    member = timm.create_model(f"local-dir:{path}/member_1", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(member(batch["pixel_values"]), ens.members[1](batch["pixel_values"]))


def test_transformers_member_loads_alone_with_auto_class(tmp_path):
    from transformers import AutoModelForSequenceClassification

    ens, batch = _ensemble("transformers")
    path = ens.save_pretrained(tmp_path / "ens")
    member = AutoModelForSequenceClassification.from_pretrained(path, subfolder="member_0").eval()
    with torch.no_grad():
        assert torch.equal(member(**batch).logits, ens.members[0](**batch).logits)


def test_plain_module_needs_a_factory(tmp_path):
    ens = EnsembleModel.from_factory(lambda s: small_cnn(classes=4, side=8), 2, SEEDS)
    assert getattr(ens.members[0], BUILD_ATTR, None) is None
    batch = _images(side=8)
    _warm_norm_stats(ens, batch)
    path = ens.save_pretrained(tmp_path / "ens")
    with pytest.raises(ValueError, match="factory=") as err:
        EnsembleModel.from_pretrained(path)
    assert "member_0" in str(err.value) and "Sequential" in str(err.value)
    seen = []
    loaded = EnsembleModel.from_pretrained(path, factory=lambda seed: seen.append(seed) or small_cnn(classes=4, side=8))
    assert seen == SEEDS
    with torch.no_grad():
        assert torch.equal(loaded(**batch).member_logits, ens(**batch).member_logits)


def test_factory_with_a_wrong_architecture_fails_clearly(tmp_path):
    ens = EnsembleModel.from_factory(lambda s: small_cnn(classes=4, side=8), 2, SEEDS)
    path = ens.save_pretrained(tmp_path / "ens")
    with pytest.raises(ValueError, match="do not fit the rebuilt module"):
        EnsembleModel.from_pretrained(path, factory=lambda seed: small_cnn(classes=5, side=8))


class _Exploding(torch.nn.Linear):
    def state_dict(self, *args, **kwargs):
        raise RuntimeError("disk full")


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_save_leaves_nothing_half_written(tmp_path):
    bad = EnsembleModel([torch.nn.Linear(3, 2), _Exploding(3, 2)], seeds=[0, 1])
    with pytest.raises(RuntimeError, match="disk full"):
        bad.save_pretrained(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary sibling

    good, _ = _ensemble("module_with_recipe")
    path = Path(good.save_pretrained(tmp_path / "ens"))
    before = _tree_digest(path)
    with pytest.raises(RuntimeError, match="disk full"):
        bad.save_pretrained(path)  # overwriting fails: the old ensemble stays as it was
    assert _tree_digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens"]


def test_save_replaces_a_saved_ensemble_but_not_other_folders(tmp_path):
    a, _ = _ensemble("module_with_recipe")
    path = a.save_pretrained(tmp_path / "ens")
    b = EnsembleModel.from_factory(BUILDS["module_with_recipe"][0], 3, [1, 2, 3])
    b.save_pretrained(path)
    assert EnsembleModel.from_pretrained(path).num_members == 3
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing"):
        a.save_pretrained(other)
    assert (other / "keep.txt").read_text() == "mine"


def test_model_card(tmp_path):
    ens, _ = _ensemble("cifar_resnet")
    config = make_args(tmp_path, ensemble_method="sam", num_members=2, member_seeds=SEEDS, rho=0.2)
    path = ens.save_pretrained(tmp_path / "ens", config=config, metrics={"eval_ensemble_accuracy": 0.9123},
                               base_model="timm/resnet18.a1_in1k")
    card = (Path(path) / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sbtrainer")
    assert "base_model: timm/resnet18.a1_in1k" in card
    assert "| rho | 0.2 |" in card and "| ensemble_method | sam |" in card
    assert "| eval_ensemble_accuracy | 0.9123 |" in card
    assert "EnsembleModel.from_pretrained" in card and "@inproceedings{lu2024sharpness" in card


# ----------------------------------------------------------------------------- push_to_hub


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Replace only the network side of HfApi: create_repo records its call, upload_folder copies the folder."""
    calls = {"create": [], "upload": []}

    def create_repo(self, repo_id, **kw):
        calls["create"].append({"repo_id": repo_id, **kw})
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kw):
        copy = tmp_path / f"uploaded_{len(calls['upload'])}"
        shutil.copytree(folder_path, copy)
        calls["upload"].append({"repo_id": repo_id, "folder": copy, **kw})
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123",
                                          commit_message=kw.get("commit_message"), commit_description="",
                                          oid="abc123", pr_url=None)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_saved_folder_in_one_commit(tmp_path, fake_hub):
    ens, batch = _ensemble("transformers")
    config = make_args(tmp_path, ensemble_method="sharpbalance", num_members=2, member_seeds=SEEDS, num_train_epochs=2)
    url = ens.push_to_hub("me/sb-ensemble", config=config, metrics={"eval_ensemble_accuracy": 0.5}, private=True,
                          commit_message="first")
    assert url == "https://huggingface.co/me/sb-ensemble/commit/abc123"
    assert fake_hub["create"] == [{"repo_id": "me/sb-ensemble", "private": True, "exist_ok": True, "repo_type": "model"}]
    (upload,) = fake_hub["upload"]
    assert upload["repo_id"] == "me/sb-ensemble" and upload["commit_message"] == "first"
    folder = upload["folder"]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG_NAME, "member_0", "member_1"]
    assert {p.name for p in (folder / "member_0").iterdir()} >= {"config.json", "model.safetensors"}
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["method"] == "sharpbalance" and meta["member_kinds"] == ["transformers"] * 2
    assert "| eval_ensemble_accuracy | 0.5000 |" in (folder / "README.md").read_text()
    loaded = EnsembleModel.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).member_logits, ens(**batch).member_logits)


def test_trainer_push_to_hub_uploads_the_ensemble_format(tmp_path, fake_hub):
    """trainer.push_to_hub() pushes the ensemble repo (not the stock Trainer's single-model layout)."""
    from helpers import image_data, make_trainer, small_cnn

    data = image_data(n=8)
    args = make_args(tmp_path, ensemble_method="sam", num_members=2, max_steps=1, hub_model_id="me/trained")
    trainer = make_trainer(args, small_cnn, data, eval_dataset=data)
    trainer.train()
    accuracy = trainer.evaluate()["eval_ensemble_accuracy"]
    trainer.push_to_hub()
    (upload,) = fake_hub["upload"]
    assert upload["repo_id"] == "me/trained"
    meta = json.loads((upload["folder"] / CONFIG_NAME).read_text())
    assert meta["method"] == "sam" and meta["member_kinds"] == ["module", "module"]
    assert f"| eval_ensemble_accuracy | {accuracy:.4f} |" in (upload["folder"] / "README.md").read_text()


def test_failed_upload_raises_clearly_and_keeps_the_local_save(tmp_path, fake_hub, monkeypatch):
    ens, _ = _ensemble("module_with_recipe")
    local = Path(ens.save_pretrained(tmp_path / "local"))
    before = _tree_digest(local)

    def refuse(self, **kw):
        try:  # huggingface_hub >= 2 ships its HTTP client as httpx2
            import httpx2 as httpx
        except ImportError:
            import httpx

        response = httpx.Response(403, request=httpx.Request("POST", "https://huggingface.co/api/models/me/sb-ensemble"))
        raise huggingface_hub.errors.HfHubHTTPError("403 Forbidden: no write access", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
    with pytest.raises(HubUploadError) as err:
        ens.push_to_hub("me/sb-ensemble")
    message = str(err.value)
    assert "'me/sb-ensemble'" in message and "403 Forbidden" in message
    assert "save_pretrained" in message and "hf upload" in message
    assert isinstance(err.value.__cause__, huggingface_hub.errors.HfHubHTTPError)
    assert _tree_digest(local) == before


# ----------------------------------------------------------------------------- loading offline


def test_hub_id_offline_fails_fast_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(HubUnreachableError) as err:
        EnsembleModel.from_pretrained("someone/sharpbalance-ensemble-that-is-not-cached")
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "unreachable" in message and "HF_HUB_OFFLINE=1" in message and "local path" in message
    assert "from_pretrained('./" in message
    assert isinstance(err.value.__cause__, huggingface_hub.errors.LocalEntryNotFoundError)


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder at"):
        EnsembleModel.from_pretrained(str(tmp_path / "nowhere" / "ensemble"))
    with pytest.raises(FileNotFoundError, match=r"no ensemble_config\.json"):
        EnsembleModel.from_pretrained(tmp_path)
