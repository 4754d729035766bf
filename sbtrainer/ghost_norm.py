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

The method is exact only when every trainable parameter gets its gradient from ONE call of its own module per
forward: ``G_j`` is then that call's ``sum_p g_jp a_jp^T``. When a parameter is used twice (two modules sharing one
weight, a module called twice, a weight also used functionally elsewhere such as ``F.linear(h, emb.weight)``), its
gradient is the sum of the uses and ``||G_j||^2`` has cross terms between them that per-call norms miss (a shared
Linear weight in a small MLP: up to 15% off the loop). This is checked by STRUCTURE on every batch, never by
comparing a few samples, and anything that fails raises ``NotImplementedError`` (``score_method="auto"`` then falls
back to vmap / the loop):

- every trainable parameter lives in an ``nn.Conv2d`` (groups = 1, zero padding), ``nn.Linear`` or eval-mode
  ``BatchNorm`` with running statistics whose class keeps torch's own ``forward``, is registered under one name in
  one module (no sharing), and is the module's own ``weight`` / ``bias`` attribute (a weight computed from other
  tensors, as ``torch.nn.utils.prune`` or ``parametrize`` do, is refused);
- those modules carry no forward/backward hooks (nor are global module hooks installed) and the parameters no
  tensor hooks, so the module's output is exactly its own op;
- after the forward, the autograd graph from the loss is walked (``grad_fn.next_functions``): each parameter's
  ``AccumulateGrad`` node must be reached by exactly one edge (or none: an unused parameter has zero gradient),
  and that edge must come from the ops of its owner module's single call;
- every call of those modules sees the samples along its leading dimension (``B`` rows in and out; a learned
  branch applied to a ``(1, d)`` constant and broadcast over the batch sums its gradient over the samples).

The loss is the sum over rows of the per-sample loss (``loss_fn`` on each 1-row slice of the logits), which is
what the loop differentiates. Samples must be independent (eval mode: no batch statistics); a parameter-free
module that mixes or permutes rows of the batch without changing their number is not detected here (``"auto"`` also compares the first two samples with the
loop as a secondary guard).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

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


def _stock_forward(mod: nn.Module) -> bool:
    """Whether ``mod`` runs torch's own forward for its supported base class (no override in a subclass or instance)."""
    cls = type(mod)
    if "forward" in vars(mod) or "_conv_forward" in vars(mod):
        return False
    if isinstance(mod, nn.Conv2d):
        return cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward
    if isinstance(mod, nn.Linear):
        return cls.forward is nn.Linear.forward
    return cls.forward is _BatchNorm.forward


def _global_module_hooks() -> bool:
    from torch.nn.modules import module as module_lib

    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks")
    return any(getattr(module_lib, name, None) for name in names)


def _own_trainable(mod: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in mod._parameters.items() if p is not None and p.requires_grad]


def _check(member: nn.Module) -> list[nn.Module]:
    """The modules owning trainable parameters, after the structural checks that need no forward.

    Raises:
        NotImplementedError: an unsupported module, a shared or derived parameter, or hooks (see the module doc).
    """
    if _global_module_hooks():
        raise NotImplementedError("hooks scoring: global module hooks are installed (they may change the outputs)")
    names: dict[int, list[str]] = {}
    for name, p in member.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            names.setdefault(id(p), []).append(name)
    shared = [n for n in names.values() if len(n) > 1]
    if shared:
        raise NotImplementedError(f"hooks scoring: parameter shared by {' and '.join(shared[0])} (shared weights get "
                                  "gradient from several uses; per-use norms miss the cross terms)")
    owners = []
    for mod in member.modules():
        trainable = [p for p in mod.parameters(recurse=False) if p.requires_grad]
        if not trainable:
            continue
        kind = type(mod).__name__
        bad_conv = isinstance(mod, nn.Conv2d) and (mod.groups != 1 or isinstance(mod.padding, str)
                                                   or mod.padding_mode != "zeros")
        if not isinstance(mod, SUPPORTED) or bad_conv:
            raise NotImplementedError(f"hooks scoring: unsupported parametrised module {kind}")
        if not _stock_forward(mod):
            raise NotImplementedError(f"hooks scoring: {kind} overrides torch's forward of its base class")
        if parametrize.is_parametrized(mod) or mod._forward_pre_hooks:
            raise NotImplementedError(f"hooks scoring: {kind} computes its weight from other tensors (parametrization "
                                      "or forward pre-hook, e.g. torch.nn.utils.prune)")
        own = dict(_own_trainable(mod))
        if set(own) - {"weight", "bias"} or any(getattr(mod, n) is not p for n, p in own.items()):
            raise NotImplementedError(f"hooks scoring: {kind}'s trainable parameters {sorted(own)} are not its own "
                                      "weight/bias attributes (a derived weight, e.g. torch.nn.utils.prune)")
        if mod._forward_hooks or mod._backward_hooks or mod._backward_pre_hooks:
            raise NotImplementedError(f"hooks scoring: {kind} carries module hooks (they may change its output)")
        if any(p._backward_hooks for p in own.values()):
            raise NotImplementedError(f"hooks scoring: a parameter of {kind} carries tensor hooks")
        if isinstance(mod, _BatchNorm) and (mod.training or mod.running_mean is None):
            raise NotImplementedError("hooks scoring: BatchNorm must be in eval mode with running statistics")
        owners.append(mod)
    return owners


class _Graph:
    """The autograd graph reachable from one node: its nodes and the edges into each leaf's ``AccumulateGrad``."""

    def __init__(self, root: object | None) -> None:
        self.nodes: dict[int, object] = {}  # id -> node (the references keep the ids valid)
        self.uses: dict[int, int] = {}  # id(leaf tensor) -> number of edges into its AccumulateGrad node
        self.leaf_nodes: dict[int, tuple[object, torch.Tensor]] = {}  # id(leaf tensor) -> (node, tensor)
        self.parents: dict[int, list[object]] = {}
        stack = [] if root is None else [root]
        while stack:
            fn = stack.pop()
            if id(fn) in self.nodes:
                continue
            self.nodes[id(fn)] = fn
            for child, _ in fn.next_functions:
                if child is None:
                    continue
                self.parents.setdefault(id(child), []).append(fn)
                leaf = getattr(child, "variable", None)  # only AccumulateGrad nodes have one
                if leaf is not None:
                    self.uses[id(leaf)] = self.uses.get(id(leaf), 0) + 1
                    self.leaf_nodes[id(leaf)] = (child, leaf)
                stack.append(child)

    def ancestors(self, node: object) -> set[int]:
        """Ids of the nodes (``node`` included) from which ``node`` is reached: the nodes a backward to it runs."""
        seen, stack = {id(node)}, [node]
        while stack:
            for parent in self.parents.get(id(stack.pop()), ()):
                if id(parent) not in seen:
                    seen.add(id(parent))
                    stack.append(parent)
        return seen


def _local_leaves(out_node: object, in_node: object | None, limit: int = 32) -> list[int]:
    """Ids of the leaves reached from one module call's output node without passing its input's node."""
    found, seen, stack = [], set(), [out_node]
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        if len(seen) > limit:
            raise NotImplementedError("hooks scoring: a module's own ops form an unexpectedly large graph")
        for child, _ in fn.next_functions:
            if child is None or child is in_node:
                continue
            leaf = getattr(child, "variable", None)
            if leaf is not None:
                found.append(id(leaf))
            else:
                stack.append(child)
    return found


def _check_uses(member: nn.Module, owners: list[nn.Module], calls: dict, graph: _Graph) -> list[nn.Module]:
    """The owners whose call is on the loss's graph, after checking that each parameter has exactly that one use.

    Raises:
        NotImplementedError: a parameter reached from the loss by more than one edge, or not through its own module.
    """
    names = {id(p): n for n, p in member.named_parameters()}
    reached = []
    for mod in owners:
        own = [p for _, p in _own_trainable(mod)]
        call = calls.get(mod)
        if call is None or id(call[2]) not in graph.nodes:  # the module's output does not reach the loss
            used = [names[id(p)] for p in own if graph.uses.get(id(p), 0)]
            if used:
                raise NotImplementedError(f"hooks scoring: parameter {used[0]} gets gradient outside its module's "
                                          "forward (used functionally elsewhere, e.g. F.linear(h, layer.weight))")
            continue
        local = _local_leaves(call[2], call[1])
        for p in own:
            uses = graph.uses.get(id(p), 0)
            if uses != 1 or local.count(id(p)) != 1:
                raise NotImplementedError(
                    f"hooks scoring: parameter {names[id(p)]} gets gradient from {uses} uses per forward, "
                    f"{local.count(id(p))} of them in its module's call (exact only for exactly one, the module's own)")
        foreign = {i for i in local if i in names} - {id(p) for p in own}
        if foreign:
            raise NotImplementedError(f"hooks scoring: {type(mod).__name__}'s op also uses {names[foreign.pop()]}")
        reached.append(mod)
    return reached


def batch_scores_hooks(member: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                       loss_fn: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Scores ``(B,)`` float32: ``||grad_theta loss(member(x_j), y_j)||^2`` per sample, the member in eval mode.

    Args:
        member: the model (eval mode), built as the module doc requires.
        x: the input batch ``(B, ...)``.
        labels: ``(B,)`` class indices.
        loss_fn: the per-sample loss ``loss_fn(logits[j:j+1], labels[j:j+1])`` (a 0-d tensor); the batch loss is its
            sum over the rows. Default: cross-entropy.

    Raises:
        NotImplementedError: the member fails a structural exactness check (see the module doc).
    """
    owners = _check(member)
    calls: dict[nn.Module, tuple[torch.Tensor, object | None, object]] = {}  # input, input node, output node
    grads: dict[nn.Module, torch.Tensor] = {}
    n = labels.shape[0]

    def forward_hook(mod, args, kwargs, output):
        if mod in calls:
            raise NotImplementedError(f"hooks scoring: {type(mod).__name__} is called twice per forward")
        inp = args[0] if args else kwargs["input"]
        if inp.shape[:1] != (n,) or output.shape[:1] != (n,):  # e.g. a (1, d) constant broadcast over the batch
            raise NotImplementedError(f"hooks scoring: {type(mod).__name__} sees a leading dimension of "
                                      f"{tuple(inp.shape[:1])} -> {tuple(output.shape[:1])}, not the {n} samples")
        calls[mod] = (inp.detach(), inp.grad_fn, output.grad_fn)  # the output node before any in-place op on it
        output.register_hook(lambda g: grads.__setitem__(mod, g.detach()))

    handles = [mod.register_forward_hook(forward_hook, with_kwargs=True) for mod in owners]
    try:
        x = x.detach().requires_grad_(True)
        logits = member(x).float()
        if loss_fn is None:
            loss = F.cross_entropy(logits, labels, reduction="sum")
        else:
            loss = torch.stack([loss_fn(logits[j : j + 1], labels[j : j + 1]).sum() for j in range(labels.shape[0])]).sum()
        graph = _Graph(loss.grad_fn)
        reached = _check_uses(member, owners, calls, graph)
        # A backward to x runs only the nodes on a path to x; an owner whose output does not lead to x (its input is
        # a constant or detached) is reached by asking for one of its own parameters' gradients as well.
        to_x = graph.ancestors(graph.leaf_nodes[id(x)][0]) if id(x) in graph.leaf_nodes else set()
        wanted = [x] if to_x else []
        wanted += [_own_trainable(mod)[0][1] for mod in reached if id(calls[mod][2]) not in to_x]
        if wanted:
            torch.autograd.grad(loss, wanted)  # activation gradients (+ those few weights); hooks catch each g
    finally:
        for h in handles:
            h.remove()
    missing = [type(mod).__name__ for mod in reached if mod not in grads]
    if missing:
        raise NotImplementedError(f"hooks scoring: no output gradient reached {missing[0]}")
    total = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device)
    with torch.no_grad():
        for mod in reached:
            a, g = calls[mod][0].float(), grads[mod].float()
            if isinstance(mod, nn.Conv2d):
                total += _conv_sq_norm(mod, a, g)
            elif isinstance(mod, nn.Linear):
                total += _linear_sq_norm(mod, a, g)
            else:
                total += _bn_sq_norm(mod, a, g)
    return total
