"""Per-sample sharpness equals a naive one-sample-at-a-time loop, for BatchNorm models and a tiny ALBERT."""

import pytest
import torch
import torch.nn.functional as F
from helpers import TokenDataset, image_data, small_cnn, tiny_albert_factory

from sbtrainer.scoring import per_sample_sharpness


def naive_scores(model, dataset, call):
    model.eval()
    out = []
    for i in range(len(dataset)):
        row = dataset[i]
        model.zero_grad()
        loss = F.cross_entropy(call(model, {k: v.unsqueeze(0) for k, v in row.items()}), row["labels"].view(1))
        loss.backward()
        out.append(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None).item())
    model.zero_grad()
    return torch.tensor(out)


def _bn_model():
    torch.manual_seed(0)
    model = small_cnn(dropout=0.3)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        model(torch.randn(16, 3, 8, 8) * 2 + 1)
    return model


@pytest.mark.parametrize("method", ["auto", "hooks", "vmap", "loop"])
def test_batchnorm_model_scores_equal_naive(method):
    model, data = _bn_model(), image_data(n=11)
    expected = naive_scores(model, data, lambda m, b: m(b["pixel_values"]))
    model.train()
    got = per_sample_sharpness(model, data, batch_size=4, method=method, progress=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert model.training and model[1].training  # mode restored


@pytest.mark.parametrize("method", ["auto", "loop"])
def test_tiny_albert_scores_equal_naive(method):
    torch.manual_seed(0)
    model = tiny_albert_factory()()
    data = TokenDataset(n=7)
    expected = naive_scores(model, data, lambda m, b: m(**{k: v for k, v in b.items() if k != "labels"}).logits)
    got = per_sample_sharpness(model, data, batch_size=3, method=method, progress=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", ["hooks", "vmap"])
def test_narrow_timm_resnet_scores_equal_naive(method):
    from sbtrainer.models import cifar_resnet

    torch.manual_seed(0)
    model = cifar_resnet("resnet18", num_classes=4, width=4)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 16, 16))
    data = image_data(n=6, shape=(3, 16, 16))
    expected = naive_scores(model, data, lambda m, b: m(b["pixel_values"]))
    got = per_sample_sharpness(model, data, batch_size=4, method=method, progress=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_hooks_refuses_what_it_cannot_score_exactly():
    with pytest.raises(NotImplementedError):
        per_sample_sharpness(tiny_albert_factory()(), TokenDataset(n=2), method="hooks", progress=False)
    layer_norm_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    from helpers import DictDataset

    data = DictDataset(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(NotImplementedError):
        per_sample_sharpness(layer_norm_model, data, method="hooks", progress=False)
    auto = per_sample_sharpness(layer_norm_model, data, method="auto", progress=False)  # falls back to vmap
    loop = per_sample_sharpness(layer_norm_model, data, method="loop", progress=False)
    torch.testing.assert_close(auto, loop, rtol=1e-5, atol=1e-12)


def test_rows_are_aligned():
    model, data = _bn_model(), image_data(n=10)
    full = per_sample_sharpness(model, data, batch_size=3, progress=False)
    part = per_sample_sharpness(model, data, rows=range(3, 8), batch_size=2, progress=False)
    torch.testing.assert_close(part, full[3:8], rtol=1e-6, atol=0)


def test_bad_method():
    with pytest.raises(ValueError, match="method"):
        per_sample_sharpness(small_cnn(), image_data(n=2), method="fast")
