"""The inpainting task (paper section 3) around the trainer and the CLI: which task a run or checkpoint is,
masks drawn per training batch, the training mean as the fill of missing pixels, the imputation NLL on
fixed seeded masks, and the Fig. 5 grids.

A checkpoint records ``task`` ("density" or "inpaint") and, for inpainting, ``mask`` (the spec it was trained
with, in `matnet.masks.parse_mask_spec`'s grammar) and ``mask_rng`` (the state of the training masks' generator,
so a resumed run draws the same masks as an uninterrupted one). Checkpoints without ``task`` are density models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from . import plots
from .checkpoint import CheckpointError, brief, config_errors_name, load_checkpoint
from .conditional import ConditionalMatNet, FastConditionalMatNet
from .config import MatNetConfig
from .data import ImageDataset
from .distributed import Rows
from .masks import SPEC_FORMS, MaskGenerator, fixed_masks, parse_mask_spec

TASKS = ("density", "inpaint")
MASK_RNG_OFFSET = 0x6D61736B  # the training masks' generator is seeded with seed + this (apart from the data order)
GRID_IMAGES, GRID_IMPUTATIONS = 8, 6  # the grid a training run writes at its end


def checkpoint_task(state: dict) -> str:
    """The task a loaded checkpoint was trained for (checkpoints from before tasks: density)."""
    task = state.get("task", "density")
    if task not in TASKS:
        raise CheckpointError(f"checkpoint has unknown task {task!r}; this matnet knows {', '.join(TASKS)}")
    return task


def data_mean(data: ImageDataset) -> tuple[float, ...]:
    """Per-channel mean of `data` in the model's data space: the expected pixel value under its binarization
    (k / 255 for dynamic or fixed binarization, the share of k >= 128 for threshold) or 2k/255 - 1 for 8-bit."""
    imgs = data.images
    per_channel = imgs.numel() // imgs.shape[1]
    if data.binarize == "threshold":
        return tuple(((imgs >= 128).sum(dim=(0, 2, 3), dtype=torch.float64) / per_channel).tolist())
    mean = imgs.sum(dim=(0, 2, 3), dtype=torch.float64) / (255.0 * per_channel)
    return tuple((mean if data.binarize else 2 * mean - 1).tolist())


def build_model(cfg: MatNetConfig, fast: bool) -> ConditionalMatNet:
    return FastConditionalMatNet(cfg) if fast else ConditionalMatNet(cfg)


def load_inpaint_model(path: str | os.PathLike, device: str | torch.device = "cpu", fast: bool = False,
                       ema: bool = True) -> tuple[ConditionalMatNet, dict]:
    """Rebuild a (Fast)ConditionalMatNet from an inpainting checkpoint, in eval mode, with the checkpoint's
    metadata {"mask": spec, "step": step}. A density checkpoint is refused by name."""
    state = load_checkpoint(path)
    if checkpoint_task(state) != "inpaint":
        raise ValueError(f"{path} is a density model (trained with --task density); "
                         "this needs a model trained with --task inpaint --mask SPEC")
    with config_errors_name(path):
        model = build_model(MatNetConfig.from_dict(state["config"]), fast)
    weights = state["ema"] if ema and state.get("ema") is not None else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match its config: {brief(e)}") from e
    return model.to(device).eval(), {"mask": state.get("mask"), "step": state.get("step")}


def resolve(opts_task: str | None, opts_mask: str | None, resume: dict | None, out: Path,
            started_from: Path | None = None) -> tuple[str, str | None]:
    """(task, mask spec) of a run: the ones given, else a resumed run's own (or --from's), else density. A run
    keeps its task and masks: asking for others is an error, not a silent switch."""
    saved_task = checkpoint_task(resume) if resume is not None else None
    saved_mask = resume.get("mask") if resume is not None else None
    run = f"--from {started_from}" if started_from else f"the run in {out}"
    again = ("start from a checkpoint of that task" if started_from else
             f"use another --out than {out}, or --no-resume to start over")
    if opts_task is not None and saved_task is not None and opts_task != saved_task:
        raise ValueError(f"--task {opts_task}: {run} was trained with --task {saved_task}; {again}")
    if opts_mask is not None and saved_mask is not None and parse_mask_spec(opts_mask) != parse_mask_spec(saved_mask):
        raise ValueError(f"--mask {opts_mask}: {run} trains with --mask {saved_mask}; {again}")
    task = opts_task or saved_task or "density"
    mask = opts_mask or saved_mask
    if task == "density" and mask is not None:
        raise ValueError(f"--mask {mask} needs --task inpaint")
    if task == "inpaint" and mask is None:
        raise ValueError(f"--task inpaint needs --mask SPEC ({SPEC_FORMS})")
    return task, mask


class InpaintTask:
    """What the trainer does differently for --task inpaint: build a conditional MatNet filled with the training
    mean, draw a mask for every batch from its own seeded generator, score on fixed seeded masks, and draw
    imputation grids in place of samples."""

    name = "inpaint"

    def __init__(self, spec: str, image_size: int, seed: int):
        self.gen: MaskGenerator = parse_mask_spec(spec, (image_size, image_size))
        self.rng = torch.Generator().manual_seed(seed + MASK_RNG_OFFSET)

    def build(self, cfg: MatNetConfig, fast: bool, train_data: ImageDataset) -> ConditionalMatNet:
        model = build_model(cfg, fast)
        if not cfg.cond_fill:  # an explicit cond_fill in the config wins over the computed mean
            model.set_fill(data_mean(train_data))
        return model

    def inputs(self, x: torch.Tensor, rows: Rows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, a fresh mask batch); masks are drawn on the CPU so they do not depend on the device. `rows`: x is
        these rows of a global batch (one rank's share); masks are drawn for the whole batch and these rows kept."""
        B, _, H, W = x.shape
        m = self.gen(B if rows is None else rows.total, H, W, generator=self.rng)
        return x, (m if rows is None else m[rows.slice]).to(x.device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.name, "mask": self.gen.spec, "mask_rng": self.rng.get_state()}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        if st.get("mask_rng") is not None:
            self.rng.set_state(st["mask_rng"])

    def evaluate(self, model: ConditionalMatNet, data: ImageDataset, n_images: int, iwae_k: int = 0,
                 iwae_images: int = 0, **kw: Any) -> dict:
        return evaluate_inpaint(model, data, self.gen, n_images, iwae_k, iwae_images, **kw)

    def save_grid(self, model: ConditionalMatNet, data: ImageDataset, path: str | os.PathLike, seed: int) -> None:
        n = min(GRID_IMAGES, len(data))
        x = data.to_float(data.images[:n], generator=torch.Generator().manual_seed(seed)).to(model.fill.device)
        m = fixed_masks(self.gen, n, x.shape[2], x.shape[3], seed=seed, device=x.device)
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed)
            imp = model.impute(x, m, GRID_IMPUTATIONS)
        plots.save_inpaint_grid(x, m, imp, path, signed=not model.dist.binary)


@torch.no_grad()
def evaluate_inpaint(model: ConditionalMatNet, data: ImageDataset, mask: str | MaskGenerator, n_images: int,
                     iwae_k: int = 0, iwae_images: int = 0, batch_size: int = 100, seed: int = 1234,
                     mask_seed: int = 0, device: torch.device | None = None, progress: bool = False,
                     chunk: int | None = None) -> dict:
    """Imputation NLL in nats per image over the missing pixels: the Eq. 6 bound ("elbo") on the first `n_images`
    of `data` and the IWAE bound on -log p(x^u | x^k) ("iwae") on the first `iwae_images`, each image with the
    same fixed mask (`fixed_masks(mask, ..., seed=mask_seed)`, whatever the batch size), with the mean number of
    missing pixels of each bound's images. Like `train.evaluate`, it runs under a forked RNG seeded with `seed`."""
    from .train import evaluate

    n = min(n_images, len(data))
    _, H, W = data.shape
    masks = fixed_masks(mask, max(n, min(iwae_images if iwae_k else 0, len(data))), H, W, seed=mask_seed)
    dev = device or next(model.parameters()).device
    res = evaluate(model, data, n_images, iwae_k, iwae_images, batch_size, seed, device, progress, chunk,
                   extra_inputs=lambda i, j: (masks[i:j].to(dev),))
    out = {"mask": masks_spec(mask), "mask_seed": mask_seed, "missing_pixels_per_image": masks[:n].sum().item() / n}
    if "iwae" in res:  # the IWAE images are a prefix of their own length: their masks miss other pixel counts
        out["iwae_missing_pixels_per_image"] = masks[:res["iwae_images"]].sum().item() / res["iwae_images"]
    return {**out, **res}


def masks_spec(mask: str | MaskGenerator) -> str:
    return mask.spec if isinstance(mask, MaskGenerator) else parse_mask_spec(mask).spec
