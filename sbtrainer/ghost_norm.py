"""Exact per-sample squared gradient norms from ONE batched forward/backward (``score_method="hooks"`` / ``"ghost"``).

Two entry points: `batch_scores_hooks` (plain Conv2d/Linear/BatchNorm modules, described here) and
`batch_scores_ghost` (transformer members: sequences, LayerNorm, Embedding, bare parameters, layers shared across
depth; described in its docstring, same principle and the same kind of structural checks).

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
    if not m.weight.requires_grad:  # a frozen weight (trainable bias only) is not scored, as in the loop
        out = torch.zeros(n, dtype=torch.float32, device=g.device)
    elif p * (c_out + d_in) < 0.5 * c_out * d_in:  # ghost norm: few positions, many channels (late layers)
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
    if not m.weight.requires_grad:  # a frozen weight (trainable bias only) is not scored, as in the loop
        out = torch.zeros(n, dtype=torch.float32, device=g.device)
    elif a.shape[1] == 1:
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


def _refuse_global_hooks_and_shared(member: nn.Module, method: str, why_shared: str) -> None:
    """``NotImplementedError`` for global module hooks or a trainable parameter registered under two names."""
    if _global_module_hooks():
        raise NotImplementedError(f"{method} scoring: global module hooks are installed (they may change the outputs)")
    names: dict[int, list[str]] = {}
    for name, p in member.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            names.setdefault(id(p), []).append(name)
    shared = [n for n in names.values() if len(n) > 1]
    if shared:
        raise NotImplementedError(f"{method} scoring: parameter shared by {' and '.join(shared[0])} ({why_shared})")


def _refuse_derived_or_hooked(mod: nn.Module, own: dict[str, torch.Tensor], method: str) -> None:
    """``NotImplementedError`` when ``mod``'s weight is derived (parametrization, pre-hook) or a hook can change it."""
    kind = type(mod).__name__
    if parametrize.is_parametrized(mod) or mod._forward_pre_hooks:
        raise NotImplementedError(f"{method} scoring: {kind} computes its weight from other tensors (parametrization "
                                  "or forward pre-hook, e.g. torch.nn.utils.prune)")
    if mod._forward_hooks or mod._backward_hooks or mod._backward_pre_hooks:
        raise NotImplementedError(f"{method} scoring: {kind} carries module hooks (they may change its output)")
    if any(p._backward_hooks for p in own.values()):
        raise NotImplementedError(f"{method} scoring: a parameter of {kind} carries tensor hooks")


def _check(member: nn.Module) -> list[nn.Module]:
    """The modules owning trainable parameters, after the structural checks that need no forward.

    Raises:
        NotImplementedError: an unsupported module, a shared or derived parameter, or hooks (see the module doc).
    """
    _refuse_global_hooks_and_shared(member, "hooks", "shared weights get gradient from several uses; per-use "
                                    "norms miss the cross terms")
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
        own = dict(_own_trainable(mod))
        _refuse_derived_or_hooked(mod, own, "hooks")
        if set(own) - {"weight", "bias"} or any(getattr(mod, n) is not p for n, p in own.items()):
            raise NotImplementedError(f"hooks scoring: {kind}'s trainable parameters {sorted(own)} are not its own "
                                      "weight/bias attributes (a derived weight, e.g. torch.nn.utils.prune)")
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


# ---------------------------------------------------------------------------------------------------------------------
# score_method="ghost": transformer members (sequence inputs, LayerNorm, Embedding, bare parameters, shared layers)
# ---------------------------------------------------------------------------------------------------------------------
GHOST_MODULES = (nn.Conv2d, nn.Linear, nn.LayerNorm, nn.Embedding, _BatchNorm)
_MATERIALISE_FLOATS = 1 << 24  # per-sample Linear weight gradients held at once when they are materialised (64 MiB)


class _Call:
    """One call of an owner module: its input, autograd nodes and output edge (captured before any in-place op)."""

    __slots__ = ("broadcast", "edge", "in_node", "inp", "out_node", "saved", "shape")

    def __init__(self, inp: torch.Tensor, in_node: object | None, output: torch.Tensor, broadcast: bool) -> None:
        self.inp, self.in_node, self.out_node, self.shape = inp, in_node, output.grad_fn, output.shape
        self.edge = torch.autograd.graph.get_gradient_edge(output)
        self.broadcast = broadcast  # leading dimension 1 in a batch of n > 1: per-sample g comes from the consumers
        self.saved: tuple[torch.Tensor, ...] = ()  # LayerNorm: (input, mean, rstd) saved by the op itself


def _stock_ghost_forward(mod: nn.Module) -> bool:
    """Whether ``mod`` runs torch's own forward (LayerNorm is checked on its op instead, see `_check_layer_norm_call`)."""
    if isinstance(mod, nn.LayerNorm):
        return True
    if isinstance(mod, nn.Embedding):
        return "forward" not in vars(mod) and type(mod).forward is nn.Embedding.forward
    return _stock_forward(mod)


def _check_ghost(member: nn.Module) -> tuple[list[nn.Module], list[tuple[str, nn.Parameter]]]:
    """The owner modules and the bare parameters of ``member``, after the checks that need no forward.

    Bare parameters are trainable parameters of modules that are not one of `GHOST_MODULES` (e.g. a ViT's
    ``cls_token`` and ``pos_embed``); their uses are checked on the autograd graph (`_broadcast_terms`).

    Raises:
        NotImplementedError: global hooks, a parameter registered under two names, an unsupported configuration of
            a supported module (grouped/padded-by-name Conv2d, Embedding with ``max_norm``/``scale_grad_by_freq``,
            train-mode BatchNorm), a derived weight, module or tensor hooks.
    """
    _refuse_global_hooks_and_shared(member, "ghost", "registered in two modules; a module called several times "
                                    "is supported, two modules sharing a weight are not")
    owners, bare = [], []
    for prefix, mod in member.named_modules(remove_duplicate=False):
        own = dict(_own_trainable(mod))
        if not own:
            continue
        kind = type(mod).__name__
        _refuse_derived_or_hooked(mod, own, "ghost")
        if not isinstance(mod, GHOST_MODULES):
            bare += [(f"{prefix}.{n}" if prefix else n, p) for n, p in own.items()]
            continue
        if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or isinstance(mod.padding, str)
                                           or mod.padding_mode != "zeros"):
            raise NotImplementedError(f"ghost scoring: {kind} with groups/padding mode it does not support")
        if isinstance(mod, nn.Embedding) and (mod.max_norm is not None or mod.scale_grad_by_freq):
            raise NotImplementedError(f"ghost scoring: {kind} with max_norm or scale_grad_by_freq")
        if isinstance(mod, _BatchNorm) and (mod.training or mod.running_mean is None):
            raise NotImplementedError("ghost scoring: BatchNorm must be in eval mode with running statistics")
        if not _stock_ghost_forward(mod):
            raise NotImplementedError(f"ghost scoring: {kind} overrides torch's forward of its base class")
        if set(own) - {"weight", "bias"} or any(getattr(mod, n) is not p for n, p in own.items()):
            raise NotImplementedError(f"ghost scoring: {kind}'s trainable parameters {sorted(own)} are not its own "
                                      "weight/bias attributes (a derived weight, e.g. torch.nn.utils.prune)")
        if mod not in owners:
            owners.append(mod)
    return owners, bare


def _broadcast_terms(node: object, nr: int, graph: _Graph, what: str) -> list[tuple[object, float]]:
    """The consumers of a tensor broadcast over the batch (output ``nr`` of ``node``) and their gradient factors.

    Each consumer must be an ``expand`` (grad factor 1) or an ``add``/``sub`` (1 for the first operand, ``alpha`` /
    ``-alpha`` for the second): the gradient reaching the tensor through it is then the consumer's output gradient
    summed over the broadcast dimensions, so sample ``j``'s share is that sum over row ``j`` alone.

    Raises:
        NotImplementedError: any other consumer (a product, a matmul, a reduction: its share is not a plain sum).
    """
    terms = []
    for consumer in {id(c): c for c in graph.parents.get(id(node), ())}.values():
        kind = type(consumer).__name__
        for k, (child, child_nr) in enumerate(consumer.next_functions):
            if child is not node or child_nr != nr:
                continue
            if kind == "ExpandBackward0" or (kind in ("AddBackward0", "SubBackward0") and k == 0):
                terms.append((consumer, 1.0))
            elif kind == "AddBackward0":
                terms.append((consumer, float(consumer._saved_alpha)))
            elif kind == "SubBackward0":
                terms.append((consumer, -float(consumer._saved_alpha)))
            else:
                raise NotImplementedError(f"ghost scoring: {what} is broadcast over the batch and used by {kind} "
                                          "(only expand, add and sub are supported for such tensors)")
    return terms


def _per_sample_from_terms(terms: list[tuple[object, float]], grads: dict, shape: torch.Size, n: int,
                           what: str) -> torch.Tensor:
    """Each sample's gradient ``(n, numel)`` of a tensor of ``shape`` broadcast over the batch, from its consumers.

    A consumer's output gradient ``go (n, ...)`` is summed, row by row, to the tensor's shape: without its leading
    dimension when the tensor has as many dimensions as ``go`` (that dimension must be 1), whole otherwise.

    Raises:
        NotImplementedError: a consumer output whose leading dimension is not the ``n`` samples.
    """
    out = None
    for consumer, factor in terms:
        go = grads[(id(consumer), 0)].float()
        if type(consumer).__name__ == "ExpandBackward0" and len(shape) != go.dim():
            per = None  # an expand must only turn the leading 1 into the samples (cls_token.expand(B, -1, -1))
        elif len(shape) == go.dim() and shape[0] == 1:
            per = tuple(shape[1:])
        elif len(shape) < go.dim():
            per = tuple(shape)
        else:
            per = None
        if per is None or go.shape[0] != n:
            raise NotImplementedError(f"ghost scoring: {what} {tuple(shape)} reaches an output of shape "
                                      f"{tuple(go.shape)} whose leading dimension is not the {n} samples")
        keep = (n,) + (1,) * (go.dim() - 1 - len(per)) + per
        share = factor * go.sum_to_size(keep).reshape(n, -1)
        out = share if out is None else out + share
    return out


def _check_layer_norm_call(mod: nn.LayerNorm, call: _Call) -> None:
    """A LayerNorm call must BE ``native_layer_norm(input, weight, bias)``: its own parameters, nothing after it.

    Raises:
        NotImplementedError: the call's output is made by another op, or the op does not take the module's own
            weight and bias directly (a cast, a scale, a derived weight between them).
    """
    node = call.out_node
    if type(node).__name__ != "NativeLayerNormBackward0":
        raise NotImplementedError(f"ghost scoring: {type(mod).__name__}'s output is made by "
                                  f"{type(node).__name__}, not by layer_norm on its own parameters")
    for k, name in ((1, "weight"), (2, "bias")):
        p = getattr(mod, name)
        if p is not None and p.requires_grad and getattr(node.next_functions[k][0], "variable", None) is not p:
            raise NotImplementedError(f"ghost scoring: {type(mod).__name__}'s layer_norm does not take its own {name}")
    call.saved = (node._saved_input.detach(), node._saved_result1.detach(), node._saved_result2.detach())


def _check_ghost_uses(member: nn.Module, owners: list[nn.Module], calls: dict, bare: list, graph: _Graph,
                      n: int) -> tuple[dict, dict]:
    """The reached calls of each owner and the broadcast terms of each bare parameter / broadcast call.

    Every edge from the loss's graph into a parameter's ``AccumulateGrad`` must be accounted for: one per reached call
    of its module (the call's own ops use it exactly once), or one per expand/add/sub consumer of a bare parameter.

    Raises:
        NotImplementedError: a parameter with a use outside its module's calls, a call using a foreign parameter,
            a Conv2d called more than once or broadcast, a LayerNorm that is not ``layer_norm`` on its own parameters.
    """
    names = {id(p): n_ for n_, p in member.named_parameters()}
    reached: dict[nn.Module, list[_Call]] = {}
    terms: dict[object, list] = {}  # _Call (broadcast) or parameter name -> [(consumer, factor)]
    for mod in owners:
        own = [p for _, p in _own_trainable(mod)]
        hits = [c for c in calls.get(mod, ()) if id(c.out_node) in graph.nodes]
        for call in hits:
            local = _local_leaves(call.out_node, call.in_node)
            for p in own:
                if local.count(id(p)) != 1:
                    raise NotImplementedError(f"ghost scoring: parameter {names[id(p)]} is used {local.count(id(p))} "
                                              "times by one call of its module (exact only for once)")
            foreign = {i for i in local if i in names} - {id(p) for p in own}
            if foreign:
                raise NotImplementedError(f"ghost scoring: {type(mod).__name__}'s op also uses {names[foreign.pop()]}")
            if isinstance(mod, nn.LayerNorm):
                _check_layer_norm_call(mod, call)
            if call.broadcast:
                terms[call] = _broadcast_terms(call.out_node, call.edge.output_nr, graph,
                                               f"the output of {type(mod).__name__}")
        for p in own:
            if graph.uses.get(id(p), 0) != len(hits):
                raise NotImplementedError(f"ghost scoring: parameter {names[id(p)]} gets gradient from "
                                          f"{graph.uses.get(id(p), 0)} uses per forward but its module has "
                                          f"{len(hits)} calls on the loss's graph (used functionally elsewhere)")
        if isinstance(mod, nn.Conv2d) and (len(hits) > 1 or any(c.broadcast for c in hits)):
            raise NotImplementedError("ghost scoring: a Conv2d called more than once or on a broadcast input")
        if hits:
            reached[mod] = hits
    for name, p in bare:
        if not graph.uses.get(id(p), 0):
            continue
        node = graph.leaf_nodes[id(p)][0]
        found = _broadcast_terms(node, 0, graph, f"parameter {name}")
        if len(found) != graph.uses[id(p)]:
            raise NotImplementedError(f"ghost scoring: parameter {name} has uses it cannot account for")
        terms[name] = found
    return reached, terms


def _linear_weight_sq_norm(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``||sum_t g_jt a_jt^T||^2`` per sample for ``a (n, T, d_in)``, ``g (n, T, d_out)``: the cheaper exact way."""
    n, t, d_in = a.shape
    d_out = g.shape[2]
    if t == 1:
        return a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
    if t * (d_in + d_out) < d_in * d_out:  # ghost norm: (a a^T) . (g g^T), cost T^2 (d_in + d_out)
        return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    step = max(1, _MATERIALISE_FLOATS // (d_in * d_out))  # materialise G_j = g_j^T a_j, cost T d_in d_out
    return torch.cat([torch.bmm(g[i : i + step].transpose(1, 2), a[i : i + step]).pow(2).sum((1, 2))
                      for i in range(0, n, step)])


def _embedding_sq_norm(mod: nn.Embedding, ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``||G_j||^2`` of an Embedding: row ``v`` of ``G_j`` is the sum of ``g_jt`` over the tokens with id ``v``.

    ``= sum_{s,t: id_s = id_t} g_js . g_jt``; tokens at ``padding_idx`` get no gradient and are left out.
    """
    if mod.padding_idx is not None:
        g = g * (ids != mod.padding_idx).unsqueeze(-1)
    if ids.shape[1] == 1:
        return g.pow(2).sum((1, 2))
    same = ids.unsqueeze(2) == ids.unsqueeze(1)  # (n, T, T)
    return (torch.bmm(g, g.transpose(1, 2)) * same).sum((1, 2))


def _cat_tokens(parts: list[torch.Tensor]) -> torch.Tensor:
    """The calls' tokens side by side along dim 1 (no copy for a single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _ghost_sq_norm(mod: nn.Module, calls: list[_Call], grads: dict, terms: dict, n: int) -> torch.Tensor:
    """``||G_j||^2`` ``(n,)`` of one owner module's parameters over all its calls (cross terms between calls included)."""
    a_list, g_list = [], []
    for call in calls:
        if call.broadcast:
            g = _per_sample_from_terms(terms[call], grads, call.shape, n, f"the output of {type(mod).__name__}")
            g = g.reshape(n, *call.shape[1:])
        else:
            g = grads[(id(call.edge.node), call.edge.output_nr)].float()
        a = call.inp.expand(n, *call.inp.shape[1:]) if call.broadcast else call.inp
        a_list.append(a)
        g_list.append(g)
    if isinstance(mod, nn.Conv2d):
        return _conv_sq_norm(mod, a_list[0].float(), g_list[0])
    if isinstance(mod, nn.Linear):
        a = _cat_tokens([a.float().reshape(n, -1, a.shape[-1]) for a in a_list])
        g = _cat_tokens([g.reshape(n, -1, g.shape[-1]) for g in g_list])
        out = _linear_weight_sq_norm(a, g) if mod.weight.requires_grad else torch.zeros(n, device=g.device)
        if mod.bias is not None and mod.bias.requires_grad:
            out = out + g.sum(1).pow(2).sum(1)
        return out
    if isinstance(mod, nn.Embedding):
        ids = _cat_tokens([a.reshape(n, -1) for a in a_list])
        g = _cat_tokens([g.reshape(n, -1, g.shape[-1]) for g in g_list])
        return _embedding_sq_norm(mod, ids, g)
    w_sum, b_sum = 0.0, 0.0  # LayerNorm / BatchNorm: per-sample vectors summed over the calls, then squared
    for call, a, g in zip(calls, a_list, g_list, strict=True):
        if isinstance(mod, nn.LayerNorm):
            x, mean, rstd = call.saved
            xhat = ((x - mean) * rstd).float()
            xhat = xhat.expand(n, *xhat.shape[1:]) if call.broadcast else xhat
            d = len(mod.normalized_shape)
            w_sum = w_sum + (g * xhat).reshape(n, -1, *g.shape[g.dim() - d :]).sum(1)
            b_sum = b_sum + g.reshape(n, -1, *g.shape[g.dim() - d :]).sum(1)
        else:
            c = g.shape[1]
            shape = (1, c) + (1,) * (a.dim() - 2)
            xhat = (a.float() - mod.running_mean.view(shape)) * torch.rsqrt(mod.running_var.view(shape) + mod.eps)
            w_sum = w_sum + (g * xhat).reshape(n, c, -1).sum(2)
            b_sum = b_sum + g.reshape(n, c, -1).sum(2)
    out = torch.zeros(n, dtype=torch.float32, device=g_list[0].device)
    if mod.weight is not None and mod.weight.requires_grad:
        out = out + w_sum.reshape(n, -1).pow(2).sum(1)
    if mod.bias is not None and mod.bias.requires_grad:
        out = out + b_sum.reshape(n, -1).pow(2).sum(1)
    return out


def transformer_like(member: nn.Module) -> bool:
    """Whether ``member`` holds a LayerNorm or an Embedding (what ``score_method="auto"`` tries ``"ghost"`` on)."""
    return any(isinstance(m, (nn.LayerNorm, nn.Embedding)) for m in member.modules())


def batch_scores_ghost(member: nn.Module, forward: Callable[[], torch.Tensor], labels: torch.Tensor,
                       loss_fn: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Scores ``(B,)`` float32 ``||grad_theta loss(member(x_j), y_j)||^2`` of a transformer member, from ONE batched pass.

    ``score_method="ghost"``: one batched forward and a backward that computes activation gradients only (it asks
    autograd for the gradients of the parametrised modules' outputs, so no weight gradient is formed and nothing
    flows into the token ids), then per parameter:

    - ``nn.Linear`` on ``(B, ..., d_in)``: ``G_j = sum_t g_jt a_jt^T`` over the tokens ``t`` of all its calls, its
      squared norm by the ghost norm ``sum_{s,t} (a_js . a_jt)(g_js . g_jt)`` (cost ``T^2 (d_in + d_out)``) or by
      materialising ``G_j`` (cost ``T d_in d_out``), whichever is cheaper; bias ``||sum_t g_jt||^2``;
    - ``nn.LayerNorm`` (any subclass whose output IS ``layer_norm`` on its own weight and bias, e.g. timm's):
      weight ``sum_t g_jt * xhat_jt`` with ``xhat`` from the mean and rstd the op saved, bias ``sum_t g_jt``;
    - ``nn.Embedding``: ``sum_{s,t: id_s = id_t} g_js . g_jt`` (tokens at ``padding_idx`` get no gradient);
    - ``nn.Conv2d`` (called once, e.g. a ViT patch embedding) and eval-mode BatchNorm as in ``"hooks"``;
    - a bare parameter (owned by another module: a ViT's ``cls_token``, ``pos_embed``) used only through
      ``expand``/``add``/``sub`` broadcast over the batch: sample ``j``'s gradient is the consumer's output gradient
      at row ``j`` summed over the broadcast dimensions; the same rule serves a module whose output has a leading
      dimension of 1 broadcast over the batch (a BERT's position embeddings).

    A module called several times per forward (ALBERT's layers, shared across depth) gets ``G_j = sum over calls``;
    concatenating the calls' tokens before the formulas above includes the cross terms between calls, so the norm
    is exact. Exactness is decided by STRUCTURE on every batch, as for ``"hooks"``: every trainable parameter is
    the ``weight``/``bias`` of one supported module (registered once; torch's own forward, LayerNorm checked on its
    op) or a bare parameter, and every edge into its ``AccumulateGrad`` node from the loss's graph is accounted for
    by one call of its module (whose ops use it exactly once and no foreign parameter) or one expand/add/sub
    consumer. Anything else raises ``NotImplementedError``. Samples must be independent (eval mode); a
    parameter-free op that mixes rows of the batch is not detected (``score_method="auto"`` compares the first two
    samples with the loop on its first batch).

    Args:
        member: the model in eval mode.
        forward: runs ``member`` on the batch and returns the logits ``(B, C)``.
        labels: ``(B,)`` class indices.
        loss_fn: the per-sample loss ``loss_fn(logits[j:j+1], labels[j:j+1])``; the batch loss is its sum over the
            rows. Default: cross-entropy.

    Raises:
        NotImplementedError: the member fails a structural exactness check.
    """
    owners, bare = _check_ghost(member)
    n = labels.shape[0]
    calls: dict[nn.Module, list[_Call]] = {}

    def forward_hook(mod, args, kwargs, output):
        inp = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
        if not torch.is_tensor(output) or output.grad_fn is None:
            raise NotImplementedError(f"ghost scoring: {type(mod).__name__}'s output is not a tensor on the graph")
        lead_in, lead_out = inp.shape[:1], output.shape[:1]
        if lead_in != lead_out or lead_out not in ((n,), (1,)):
            raise NotImplementedError(f"ghost scoring: {type(mod).__name__} sees a leading dimension of "
                                      f"{tuple(lead_in)} -> {tuple(lead_out)}, not the {n} samples (nor 1, broadcast)")
        calls.setdefault(mod, []).append(_Call(inp.detach(), inp.grad_fn, output, broadcast=lead_out[0] != n))

    handles = [mod.register_forward_hook(forward_hook, with_kwargs=True) for mod in owners]
    try:
        logits = forward().float()
    finally:
        for h in handles:
            h.remove()
    if loss_fn is None:
        loss = F.cross_entropy(logits, labels, reduction="sum")
    else:
        loss = torch.stack([loss_fn(logits[j : j + 1], labels[j : j + 1]).sum() for j in range(n)]).sum()
    graph = _Graph(loss.grad_fn)
    reached, terms = _check_ghost_uses(member, owners, calls, bare, graph, n)
    edges: dict[tuple[int, int], object] = {}
    for hits in reached.values():
        for call in hits:
            if not call.broadcast:
                edges[(id(call.edge.node), call.edge.output_nr)] = call.edge
    for found in terms.values():
        for consumer, _ in found:
            edges[(id(consumer), 0)] = torch.autograd.graph.GradientEdge(consumer, 0)
    total = torch.zeros(n, dtype=torch.float32, device=labels.device)
    if not edges:
        return total
    values = torch.autograd.grad(loss, list(edges.values()), allow_unused=True, materialize_grads=True)
    grads = {key: v.detach() for key, v in zip(edges, values, strict=True)}
    with torch.no_grad():
        for mod, hits in reached.items():
            total += _ghost_sq_norm(mod, hits, grads, terms, n)
        for name, _ in bare:
            if name in terms:
                total += _per_sample_from_terms(terms[name], grads, dict(bare)[name].shape, n,
                                                f"parameter {name}").pow(2).sum(1)
    return total
