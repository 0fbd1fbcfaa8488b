"""The inference regulariser of paper section 2.3 (Eq. 13).

Eq. 13: maximise over q  E_{x ~ p(x)} [ E_{z ~ q(z|x)} log p(x | z) - KL(q(z | x) || p(z)) ]: the ELBO on the
model's own samples, raised by changing q only. Since log p(x) of those samples does not depend on q, this
shrinks KL(q(z | x) || p(z | x)), the gap between the bound and the true log-likelihood.

The parameters split into two sets (a partition of `model.parameters()`):
- inference: the BU network (stem, BU modules and their joins), the merge modules and their joins, and the
  z0 head of the FC top (`top.bu_*`);
- generator: everything else: the TD network with its prior heads, the FC top's decoder (`top.td_*`), the
  output layer, the AR decoder, the mixture prior on z0 and the latent scale (`latent_scale`, a generator
  parameter in the original code too).
`split_parameters` also splits a conditional MatNet, per stage: inference = `stages[s].inf` (the encoder of q,
Eq. 4); generator = the rest (the encoder of p(z | x^k), Eq. 3, the TD network, output layers, latent scale).
"""

from __future__ import annotations

import torch
from torch import nn

from .conditional import ConditionalMatNet
from .model import GenerationOverflow, MatNet

__all__ = ["inference_regularizer", "inference_parameters", "generator_parameters", "split_parameters"]


def _unwrap(model: nn.Module, conditional: bool = False) -> MatNet:
    m = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    m = m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m
    m = getattr(m, "_orig_mod", m)
    if not isinstance(m, (MatNet, ConditionalMatNet) if conditional else MatNet):
        raise TypeError(f"expected a MatNet (or FastMatNet), got {type(m).__name__}")
    return m


def _inference_ids(m: MatNet | ConditionalMatNet) -> set[int]:
    if isinstance(m, ConditionalMatNet):
        mods = [st.inf for st in m.stages]
    else:
        mods = [m.stem, m.bu, m.bu_down, m.top.bu_in, m.top.bu_module, m.top.bu_out, m.merge, m.merge_up]
    return {id(p) for mod in mods for p in mod.parameters()}


def inference_parameters(model: nn.Module) -> list[nn.Parameter]:
    """q's parameters (BU network, merge modules, z0 head), in `model.parameters()` order."""
    ids = _inference_ids(_unwrap(model))
    return [p for p in model.parameters() if id(p) in ids]


def generator_parameters(model: nn.Module) -> list[nn.Parameter]:
    """p's parameters (TD network and prior heads, FC-top decoder, output layer, AR decoder, mixture prior)."""
    ids = _inference_ids(_unwrap(model))
    return [p for p in model.parameters() if id(p) not in ids]


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(generator, inference) parameters, in `model.parameters()` order, of a MatNet or a conditional MatNet."""
    ids = _inference_ids(_unwrap(model, conditional=True))
    params = list(model.parameters())
    return [p for p in params if id(p) not in ids], [p for p in params if id(p) in ids]


def inference_regularizer(model: nn.Module, n: int) -> torch.Tensor:
    """Eq. 13 as a loss: the mean negative ELBO (nats per image) of n images x ~ p(x) drawn from the model.

    The draw carries no gradient, and the forward pass sees the generator's parameters detached, so a backward
    pass through the result fills the gradients of `inference_parameters(model)` only (gradients still flow
    through the generator's computations to q); the generator's `.grad` are left untouched. Add
    `weight * inference_regularizer(model, n)` to the training loss.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    m = _unwrap(model)
    with torch.no_grad():
        try:
            x = m.sample(n)  # in the parameters' dtype, also under autocast
        except GenerationOverflow:  # a non-finite term: the trainer's skip guard skips the step (or stops the run)
            return torch.full((), float("nan"), device=next(m.parameters()).device)
    ids = _inference_ids(m)
    frozen = {name: p.detach() for name, p in m.named_parameters() if id(p) not in ids}
    out = torch.func.functional_call(m, frozen, (x,), strict=False)
    return out.nll_bound.mean()
