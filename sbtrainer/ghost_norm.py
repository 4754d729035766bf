"""Exact per-sample squared gradient norms from ONE batched forward/backward (``score_method="hooks"``).

For a layer with input ``a`` and output gradient ``g`` (per sample ``j``), the per-sample weight gradient is
``G_j = sum_p g_jp a_jp^T`` over the output positions ``p`` (conv) or tokens (linear). Its squared norm is
computed without a per-sample backward, picking per layer the cheaper of

- materialise: ``G_j`` from the conv weight-gradient kernel (``aten.convolution_backward``, grouped over the
  samples for narrow layers, one call per sample for wide ones), then ``||G_j||^2`` (cost ``P * C_out * C_in k^2``
  per sample, the same as the weight-gradient part of an ordinary backward), or
- ghost norm (Goodfellow 2015; Li et al. 2022, "Large language models can be strong differentially private
  learners"): ``||G_j||^2 = sum_{p,q} (a_jp . a_jq)(g_jp . g_jq)`` (cost ``P^2 (C_out + C_in k^2)``),

plus biases (``||sum_p g_jp||^2``) and eval-mode BatchNorm affine parameters (``gamma``: ``sum_p g_jp * xhat_jp``;
``beta``: ``sum_p g_jp``). Only the activation gradients are computed by autograd (the input is made to require
grad and ``torch.autograd.grad`` asks for it alone, so no parameter gradient is formed); tensor hooks on every
parametrised module's output catch ``g`` (a hook registered before an in-place op, e.g. timm's in-place ReLU,
still sees the gradient of the value it was registered on).

Exact for models whose trainable parameters all live in ``nn.Conv2d`` (groups = 1, zero padding), ``nn.Linear`` and
eval-mode ``BatchNorm`` with running statistics, each module called once per forward. Anything else raises
``NotImplementedError`` (the caller falls back to vmap / the loop). Samples must be independent (eval mode).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

SUPPORTED = (nn.Conv2d, nn.Linear, _BatchNorm)


def _conv_sq_norm(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    n, c_out = g.shape[:2]
    d_in, p = m.in_channels * m.kernel_size[0] * m.kernel_size[1], g.shape[2] * g.shape[3]
    if p * (c_out + d_in) < 0.5 * c_out * d_in:  # ghost norm: few positions, many channels (late layers)
        u = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # (n, d_in, P)
        gf = g.reshape(n, c_out, p)
        out = (torch.bmm(u.transpose(1, 2), u) * torch.bmm(gf.transpose(1, 2), gf)).sum((1, 2))
    else:  # materialise each sample's weight gradient with the conv weight-gradient kernel
        out = _per_sample_conv_weight_sq_norm(m, a, g)
    if m.bias is not None and m.bias.requires_grad:
        out = out + g.sum((2, 3)).pow(2).sum(1)
    return out


def _per_sample_conv_weight_sq_norm(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``||G_j||^2`` with ``G_j`` from ``convolution_backward``: one grouped call (few channels) or one call per sample."""
    n = g.shape[0]
    conv = dict(bias_sizes=None, stride=list(m.stride), padding=list(m.padding), dilation=list(m.dilation),
                transposed=False, output_padding=[0, 0])
    w = m.weight.detach()
    if m.in_channels * m.out_channels <= 8192:  # grouped over samples: fast in oneDNN for narrow layers
        gw = torch.ops.aten.convolution_backward(
            g.reshape(1, -1, *g.shape[2:]), a.reshape(1, -1, *a.shape[2:]), w.repeat(n, 1, 1, 1),
            groups=n, output_mask=[False, True, False], **conv)[1]
        return gw.reshape(n, -1).pow(2).sum(1)
    return torch.stack([
        torch.ops.aten.convolution_backward(g[j : j + 1], a[j : j + 1], w, groups=1,
                                            output_mask=[False, True, False], **conv)[1].pow(2).sum()
        for j in range(n)])


def _linear_sq_norm(m: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    n = g.shape[0]
    a, g = a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])  # (n, T, d)
    if a.shape[1] == 1:
        out = a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
    else:
        out = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    if m.bias is not None and m.bias.requires_grad:
        out = out + g.sum(1).pow(2).sum(1)
    return out


def _bn_sq_norm(m: _BatchNorm, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    n, c = g.shape[:2]
    shape = (1, c) + (1,) * (a.dim() - 2)
    xhat = (a - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)
    out = torch.zeros(n, dtype=torch.float32, device=g.device)
    if m.weight is not None and m.weight.requires_grad:
        out = out + (g * xhat).reshape(n, c, -1).sum(2).pow(2).sum(1)
    if m.bias is not None and m.bias.requires_grad:
        out = out + g.reshape(n, c, -1).sum(2).pow(2).sum(1)
    return out


def _check(member: nn.Module) -> list[nn.Module]:
    owners = []
    for mod in member.modules():
        own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        bad_conv = isinstance(mod, nn.Conv2d) and (mod.groups != 1 or isinstance(mod.padding, str)
                                                   or mod.padding_mode != "zeros")
        if not isinstance(mod, SUPPORTED) or bad_conv:
            raise NotImplementedError(f"hooks scoring: unsupported parametrised module {type(mod).__name__}")
        if isinstance(mod, _BatchNorm) and (mod.training or mod.running_mean is None):
            raise NotImplementedError("hooks scoring: BatchNorm must be in eval mode with running statistics")
        owners.append(mod)
    return owners


def batch_scores_hooks(member: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                       loss_fn: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Scores ``(B,)``: ``||grad_theta loss(member(x_j), y_j)||^2`` per sample, the member in eval mode."""
    owners = _check(member)
    acts: dict[nn.Module, torch.Tensor] = {}
    grads: dict[nn.Module, torch.Tensor] = {}

    def forward_hook(mod, inputs, output):
        if mod in acts:
            raise NotImplementedError(f"hooks scoring: {type(mod).__name__} is called twice (shared weights)")
        acts[mod] = inputs[0].detach()
        output.register_hook(lambda g: grads.__setitem__(mod, g.detach()))

    handles = [mod.register_forward_hook(forward_hook) for mod in owners]
    try:
        x = x.detach().requires_grad_(True)
        logits = member(x).float()
        loss = F.cross_entropy(logits, labels, reduction="sum") if loss_fn is None else loss_fn(logits, labels)
        torch.autograd.grad(loss, x)  # activation gradients only; the hooks catch every layer's g
    finally:
        for h in handles:
            h.remove()
    total = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device)
    with torch.no_grad():
        for mod in owners:
            if mod not in grads:  # not on the path from the input to the loss: zero gradient
                continue
            a, g = acts[mod].float(), grads[mod].float()
            if isinstance(mod, nn.Conv2d):
                total += _conv_sq_norm(mod, a, g)
            elif isinstance(mod, nn.Linear):
                total += _linear_sq_norm(mod, a, g)
            else:
                total += _bn_sq_norm(mod, a, g)
    return total
