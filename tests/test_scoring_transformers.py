"""score_method='ghost': exact per-sample squared gradient norms of transformer members from one batched pass.

Every member is compared with a naive per-sample backward (one ``loss.backward()`` per row, eval mode): tiny BERT
(padding tokens at ``padding_idx``, broadcast position embeddings), tiny ALBERT (layers shared across depth, so the
cross terms between calls matter) and a tiny timm ViT (Conv2d patch embedding, bare ``cls_token``/``pos_embed``,
timm's LayerNorm subclass). Members ghost cannot prove exact by structure are refused, and ``auto`` then equals the
naive loop through its fallback.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import DictDataset, TokenDataset, image_data, tiny_albert_factory
from test_scoring_structure import REFUSED, _vector_rows
from torch import nn

import sbtrainer.scoring as scoring
from sbtrainer.scoring import per_sample_sharpness, score_members


def naive(model: nn.Module, data, call, loss_fn=F.cross_entropy) -> torch.Tensor:
    """||grad||^2 per row from one ordinary backward per row (unique parameters, eval mode)."""
    model.eval()
    out = []
    for i in range(len(data)):
        row = {k: v.unsqueeze(0) for k, v in data[i].items()}
        model.zero_grad()
        loss_fn(call(model, row), row["labels"]).backward()
        out.append(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None).item())
    model.zero_grad()
    return torch.tensor(out, dtype=torch.float32)


def hf_call(model, row):
    return model(**{k: v for k, v in row.items() if k != "labels"}).logits


def pixel_call(model, row):
    return model(row["pixel_values"])


class PaddedTokens(TokenDataset):
    """TokenDataset whose padded positions hold the pad id 0 (BERT's padding_idx: no gradient for those rows)."""

    def __init__(self, n: int = 9, **kw) -> None:
        super().__init__(n=n, **kw)
        self.ids[self.mask == 0] = 0


def tiny_bert(vocab: int = 40):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=32, num_labels=3, type_vocab_size=2,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def tiny_albert(layers: int = 2):
    torch.manual_seed(0)
    model = tiny_albert_factory()()
    model.config.num_hidden_layers = layers
    return model


def tiny_vit(**kw):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, num_classes=3,
                              embed_dim=16, depth=2, num_heads=2, **kw)
    with torch.no_grad():  # non-zero cls token / position embeddings, as after training
        model.cls_token.normal_()
        model.pos_embed.normal_()
    return model


@pytest.fixture
def calls(monkeypatch):
    """Count the batches each fast path returned (``ghost`` successful) and the attempts of ``vmap`` and the loop."""
    counts = {"ghost": 0, "vmap": 0, "loop": 0}
    real = {k: getattr(scoring, f"batch_scores_{k}") for k in counts}

    def wrap(kind):
        def fn(*args, **kw):
            if kind != "ghost":
                counts[kind] += 1
            out = real[kind](*args, **kw)
            if kind == "ghost":
                counts[kind] += 1
            return out
        return fn

    for kind in counts:
        monkeypatch.setattr(scoring, f"batch_scores_{kind}", wrap(kind))
    return counts


CASES = {
    "bert": (tiny_bert, lambda: PaddedTokens(n=9), hf_call),
    "albert": (tiny_albert, lambda: PaddedTokens(n=9), hf_call),
    "albert_4_layers": (lambda: tiny_albert(4), lambda: TokenDataset(n=7), hf_call),
    "vit": (tiny_vit, lambda: image_data(n=9, shape=(3, 16, 16), classes=3), pixel_call),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ghost_equals_the_naive_loop(case, calls):
    build, data_fn, call = CASES[case]
    model, data = build(), data_fn()
    expected = naive(model, data, call)
    model.train()
    got = per_sample_sharpness(model, data, batch_size=4, method="ghost", progress=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert calls == {"ghost": -(-len(data) // 4), "vmap": 0, "loop": 0}
    assert model.training  # mode restored


@pytest.mark.parametrize("case", sorted(CASES))
def test_auto_takes_ghost_for_transformers(case, calls):
    """auto: hooks refuses (HF model / LayerNorm), ghost scores every batch; the loop only runs its 2-row check."""
    build, data_fn, call = CASES[case]
    model, data = build(), data_fn()
    got = per_sample_sharpness(model, data, batch_size=4, method="auto", progress=False)
    torch.testing.assert_close(got, naive(model, data, call), rtol=1e-5, atol=0)
    assert calls == {"ghost": -(-len(data) // 4), "vmap": 0, "loop": 1}


def test_bert_without_token_type_ids_and_a_custom_loss():
    """Token types from BERT's buffer (B-leading), and a batch-mean loss_fn applied per row like the loop."""
    model, data = tiny_bert(), PaddedTokens(n=6)

    class NoTypes(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {k: v for k, v in data[i].items() if k != "token_type_ids"}

    def smoothed(logits, y):
        return F.cross_entropy(logits, y, label_smoothing=0.2)

    rows = NoTypes()
    got = per_sample_sharpness(model, rows, batch_size=4, method="ghost", loss_fn=smoothed, progress=False)
    torch.testing.assert_close(got, naive(model, rows, hf_call, smoothed), rtol=1e-5, atol=0)


def test_shared_layers_need_the_cross_terms():
    """A Linear called twice per forward: ghost's norm is ||G1 + G2||^2, which differs from ||G1||^2 + ||G2||^2."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.norm, self.head = nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.norm(torch.tanh(self.a(torch.tanh(self.a(x))))))

    torch.manual_seed(0)
    model, data = Twice(), _vector_rows(n=6)
    got = per_sample_sharpness(model, data, batch_size=4, method="ghost", progress=False)
    expected = naive(model, data, pixel_call)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    # the same sums without cross terms: per-call gradients of `a` from an untied copy for the second call
    second = nn.Linear(6, 6)
    second.load_state_dict(model.a.state_dict())
    no_cross = []
    for i in range(len(data)):
        x = data.x[i : i + 1]
        loss = F.cross_entropy(model.head(model.norm(torch.tanh(second(torch.tanh(model.a(x)))))), data.y[i : i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()) + list(second.parameters()))
        no_cross.append(sum(g.pow(2).sum() for g in grads).item())
    rel = ((torch.tensor(no_cross) - expected).abs() / expected).max().item()
    assert rel > 1e-2, rel  # the cross terms are not negligible


class ScaledNorm(nn.LayerNorm):
    def forward(self, x):
        return 2.0 * super().forward(x)


class MulToken(nn.Module):
    """A bare parameter used through a product (like timm's LayerScale): not a broadcast add."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.head = nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 3)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x):
        return self.head(self.norm(self.a(x)) * self.gamma)


def _with_norm(build):
    """``build()`` followed by a LayerNorm, so that auto tries ghost on it."""
    def make():
        model = nn.Sequential(build(), nn.LayerNorm(3))
        return model
    return make


GHOST_REFUSED = {  # member -> what the NotImplementedError says
    "embedding_max_norm": (lambda: nn.Sequential(nn.Embedding(10, 6, max_norm=1.0), nn.Flatten(), nn.Linear(6, 3)),
                           "max_norm"),
    "norm_subclass_scales": (lambda: nn.Sequential(nn.Linear(6, 6), ScaledNorm(6), nn.Linear(6, 3)),
                             "made by MulBackward0"),
    "bare_param_product": (MulToken, "used by MulBackward0"),
    "shared_weight": (_with_norm(REFUSED["shared_weight"][0]), "shared by"),
    "functional_reuse": (_with_norm(REFUSED["functional_reuse"][0]), "gets gradient from 2 uses"),
    "functional_only": (_with_norm(REFUSED["functional_only"][0]), "gets gradient from 1 uses"),
    "pruned": (_with_norm(REFUSED["pruned"][0]), "computes its weight from other tensors"),
    "bn_subclass_forward": (_with_norm(REFUSED["bn_subclass_forward"][0]), "overrides torch's forward"),
}


def _rows_for(case):
    if case == "embedding_max_norm":
        g = torch.Generator().manual_seed(1)
        return DictDataset(torch.randint(0, 10, (9, 1), generator=g), torch.randint(0, 3, (9,), generator=g))
    return _vector_rows()


@pytest.mark.parametrize("case", sorted(GHOST_REFUSED))
def test_ghost_refuses_by_structure_and_auto_equals_loop(case, calls):
    build, message = GHOST_REFUSED[case]
    torch.manual_seed(0)
    model, data = build(), _rows_for(case)
    expected = naive(model, data, pixel_call)
    with pytest.raises(NotImplementedError, match=message):
        per_sample_sharpness(model, data, batch_size=4, method="ghost", progress=False)
    got = per_sample_sharpness(model, data, batch_size=4, method="auto", progress=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-10)
    assert calls["ghost"] == 0


@pytest.mark.parametrize("case", ["called_twice", "broadcast_branch"])
def test_ghost_scores_exactly_what_hooks_refuses_for_calls_and_broadcasts(case):
    """A module called twice (cross terms) and a branch broadcast over the batch: exact under ghost."""
    torch.manual_seed(0)
    model, data = REFUSED[case][0](), _vector_rows()
    got = per_sample_sharpness(model, data, batch_size=4, method="ghost", progress=False)
    torch.testing.assert_close(got, naive(model, data, pixel_call), rtol=1e-5, atol=1e-10)


def test_vit_with_layer_scale_falls_back_exactly(calls):
    """timm's LayerScale multiplies by a bare parameter: ghost refuses, auto scores through vmap, equal to the loop."""
    model, data = tiny_vit(init_values=0.5), image_data(n=5, shape=(3, 16, 16), classes=3)
    with pytest.raises(NotImplementedError, match="MulBackward0"):
        per_sample_sharpness(model, data, batch_size=4, method="ghost", progress=False)
    got = per_sample_sharpness(model, data, batch_size=4, method="auto", progress=False)
    torch.testing.assert_close(got, naive(model, data, pixel_call), rtol=1e-5, atol=0)
    assert calls["ghost"] == 0 and calls["vmap"] >= 1


def test_score_members_mixes_ghost_and_hooks_members():
    """One pass over the rows scores a BERT member (ghost) with the same numbers as scoring it alone."""
    bert, data = tiny_bert(), PaddedTokens(n=5)
    both = score_members([bert, tiny_bert()], data, batch_size=2, progress=False)
    torch.testing.assert_close(both[0], naive(bert, data, hf_call), rtol=1e-5, atol=0)
    torch.testing.assert_close(both[0], both[1], rtol=0, atol=0)  # same seed, same member, same scores


@pytest.mark.parametrize("method", ["hooks", "ghost"])
def test_frozen_weight_with_trainable_bias_is_not_scored(method):
    """Only trainable parameters count, as in the loop: a frozen Linear/Conv2d weight adds nothing, its bias does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 5), nn.Tanh(),
                          nn.Linear(5, 4))
    model[0].weight.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    data = image_data(n=6)
    got = per_sample_sharpness(model, data, batch_size=4, method=method, progress=False)
    torch.testing.assert_close(got, naive(model, data, pixel_call), rtol=1e-5, atol=0)
