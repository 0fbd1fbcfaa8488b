"""Evaluation-time fine-tuning of the inference network, as the original code did before its IWAE bounds.

The generator p(x, z) is left exactly as trained; only q(z | x) (`matnet.regularizers.inference_parameters`)
is trained further, on the evaluation images, by minimising their negative ELBO. Each importance-sampled
bound stays a valid bound on -log p(x) for any q, so this only tightens the bound of the same model; a result
after fine-tuning must be reported as such (`matnet eval` names it `iwae_finetuned`).
"""

from __future__ import annotations

import copy

import torch

from .data import ImageDataset
from .model import MatNet
from .regularizers import inference_parameters
from .train import progress_bar

__all__ = ["finetune_inference", "ORIGINAL_EPOCHS", "ORIGINAL_LR"]

ORIGINAL_EPOCHS = 199  # the original evaluation scripts' fine-tuning length
ORIGINAL_LR = 3e-5  # their Adam learning rate (1e-5 to 3e-5)


def finetune_inference(model: MatNet, data: ImageDataset, n_images: int | None = None,
                       epochs: int = ORIGINAL_EPOCHS, lr: float = ORIGINAL_LR, batch_size: int = 100,
                       seed: int = 0, device: torch.device | None = None, inplace: bool = False,
                       progress: bool = False) -> MatNet:
    """A copy of `model` (the model itself with `inplace=True`) whose inference parameters were trained for
    `epochs` epochs on the first `n_images` images of `data` (default: all): Adam (the config's betas and
    eps, learning rate `lr`), gradients clipped at the config's grad_clip, shuffled batches of `batch_size`.
    Generator parameters are never updated (bitwise unchanged). Dynamically binarized data gets a fresh draw
    per use, fixed-binarized data is the same each epoch. Runs under a forked RNG seeded with `seed`, so the
    caller's random stream is untouched. Returned in eval mode, with every parameter's requires_grad as before."""
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"finetune_inference needs epochs >= 0, batch_size >= 1 and lr > 0; "
                         f"got {epochs}, {batch_size}, {lr}")
    tuned = model if inplace else copy.deepcopy(model)
    device = device or next(tuned.parameters()).device
    params = inference_parameters(tuned)
    ids = {id(p) for p in params}
    flags = [p.requires_grad for p in tuned.parameters()]
    for p in tuned.parameters():
        p.requires_grad_(id(p) in ids)
    cfg = tuned.cfg
    opt = torch.optim.Adam(params, lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    n = min(n_images or len(data), len(data))
    gen = torch.Generator().manual_seed(seed)
    tuned.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for _ in progress_bar(iterable=range(epochs), desc="fine-tune q", disable=not progress, leave=False):
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, batch_size):
                x = data.to_float(data.images[order[i:i + batch_size]], generator=gen).to(device)
                opt.zero_grad(set_to_none=True)
                tuned(x).nll_bound.mean().backward()  # the bound itself: no KL warm-up, no entropy penalty
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
    for p, flag in zip(tuned.parameters(), flags):
        p.requires_grad_(flag)
    return tuned.eval()
