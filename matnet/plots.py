"""PNG outputs: image grids, the NLL curves, and the paper's Fig. 4 (KL per module over training)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import atomic_write


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, signed: bool | None = None) -> np.ndarray:
    """[N, C, H, W] in data space -> uint8 [rows*H, cols*W, 3] grid. signed: data in [-1, 1] (8-bit data)
    rather than [0, 1] (binary data); None guesses from the values."""
    x = images.detach().float().cpu()
    _check_finite(x)
    if signed if signed is not None else bool(x.min() < 0):
        x = (x + 1) / 2
    x = x.clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    grid = torch.ones(3, ncol * (h + pad) + pad, nrow * (w + pad) + pad) * 0.5
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = x[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


class NonFiniteImages(ValueError):
    """Images to save hold NaN or inf (a cast to uint8 would silently turn them into colours)."""


def _check_finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise NonFiniteImages("the images hold non-finite values (NaN or inf); no image written")


def image_format(path: str | os.PathLike) -> str:
    """PIL's format for the file's suffix (.png, .jpg, ...); ValueError for one it cannot write."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"{path}: not an image file name PIL can write (e.g. .png)")
    return fmt


def _save_image(img: Image.Image, path: str | os.PathLike) -> None:
    fmt = image_format(path)
    atomic_write(path, lambda f: img.save(f, format=fmt))


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None,
                    scale: int = 2, signed: bool | None = None) -> None:
    """Save a PNG grid, upscaled `scale` times with nearest-neighbour so small images stay crisp."""
    img = Image.fromarray(image_grid(images, nrow, signed=signed))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    _save_image(img, path)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines metrics log, skipping a torn last line."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kl_per_module(rows: list[dict], groups: list[tuple[str, int]], path: str | os.PathLike,
                       title: str = "KL per module") -> None:
    """Fig. 4: stacked areas of KL(q(z_i) || p(z_i)) per module over training, z0 at the bottom.
    Light lines separate modules, dark lines separate meta modules."""
    plt = _pyplot()
    rows = [r for r in rows if "kl_per_module" in r]
    if not rows:
        raise ValueError("no rows with kl_per_module in the metrics")
    steps = np.array([r["step"] for r in rows])
    kl = np.array([r["kl_per_module"] for r in rows]).T  # [modules, T]
    cum = np.vstack([np.zeros_like(steps, dtype=float), np.cumsum(kl, axis=0)])
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    i = 0
    for g, (name, count) in enumerate(groups):
        for m in range(count):
            ax.fill_between(steps, cum[i], cum[i + 1], color=cmap(g % 10), alpha=0.35 + 0.5 * (m + 1) / (count + 1),
                            linewidth=0, label=name if m == 0 else None)
            last = m == count - 1
            ax.plot(steps, cum[i + 1], color="black" if last else "white", lw=1.2 if last else 0.5)
            i += 1
    ax.set_xlabel("training step")
    ax.set_ylabel("KL (nats)")
    ax.set_title(title)
    if steps[-1] > steps[0]:  # one row: matplotlib picks a range around it
        ax.set_xlim(steps[0], steps[-1])
    ax.set_ylim(0, None)
    ax.legend(title="meta module\n(top-down)", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=Path(path).suffix[1:].lower() or "png"))
    finally:
        plt.close(fig)


def plot_nll(rows: list[dict], path: str | os.PathLike, unit: str = "nats") -> None:
    """Training loss and validation bounds (ELBO, IWAE) over steps."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    train = [r for r in rows if "nll_bound" in r and r.get("split") == "train"]
    if train:
        ax.plot([r["step"] for r in train], [r["nll_bound"] for r in train], lw=0.8, alpha=0.6, label="train -ELBO")
    for key, style in (("val_elbo", "o-"), ("val_iwae", "s-")):
        ev = [r for r in rows if key in r]
        if ev:
            last = ev[-1]
            n = last.get("iwae_images" if key == "val_iwae" else "elbo_images")
            label = f"val IWAE (k={last.get('iwae_k')}" if key == "val_iwae" else "val -ELBO ("
            label += f"{', ' if key == 'val_iwae' else ''}{n} images)" if n else ")"
            ax.plot([r["step"] for r in ev], [r[key] for r in ev], style, ms=3, label=label)
    vals = [r[k] for r in rows for k in ("val_elbo", "val_iwae") if k in r]
    if vals:  # focus the y-range on the evaluated values, not the first noisy steps
        lo, hi = min(vals), max(vals)
        ax.set_ylim(lo - 0.1 * (hi - lo + 1), hi + 0.5 * (hi - lo + 1))
    ax.set_xlabel("training step")
    ax.set_ylabel(f"negative log-likelihood bound ({unit})")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no rows yet (e.g. every step so far skipped): no empty legend
        ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=Path(path).suffix[1:].lower() or "png"))
    finally:
        plt.close(fig)


MISSING_RGB = (0.2, 0.45, 1.0)  # occluded pixels in inpainting grids: a blue no grey-level image has


def to_display(images: torch.Tensor, signed: bool) -> torch.Tensor:
    """[N, C, H, W] in data space -> [N, 3, H, W] float in [0, 1] (grey images repeated over RGB)."""
    x = images.detach().float().cpu()
    x = ((x + 1) / 2 if signed else x).clamp(0, 1)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def save_image_rows(rows: list[torch.Tensor], path: str | os.PathLike, pad: int = 2, scale: int = 2,
                    background: float = 0.5) -> None:
    """A PNG with one row per entry of `rows` (each [n_i, 3, H, W] in [0, 1], display space). Rows may hold
    different numbers of images: short rows are left blank on the right."""
    if not rows or any(r.dim() != 4 or r.shape[1] != 3 for r in rows):
        raise ValueError("save_image_rows needs a non-empty list of [n, 3, H, W] tensors")
    for r in rows:
        _check_finite(r)
    h, w = rows[0].shape[2:]
    ncol = max(1, max(len(r) for r in rows))
    grid = torch.full((3, len(rows) * (h + pad) + pad, ncol * (w + pad) + pad), background)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, top: top + h, left: left + w] = img
    img = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    _save_image(img, path)


def save_inpaint_grid(x: torch.Tensor, mask: torch.Tensor, imputations: torch.Tensor, path: str | os.PathLike,
                      signed: bool, scale: int = 2) -> None:
    """Paper Fig. 5: one row per image: the original, the occluded input (missing pixels in MISSING_RGB),
    then its n imputations. x [B, C, H, W], mask [B, 1, H, W] (1 = missing), imputations [B, n, C, H, W]."""
    orig = to_display(x, signed)
    miss = mask.detach().cpu().bool().expand_as(orig)
    occluded = torch.where(miss, torch.tensor(MISSING_RGB).view(1, 3, 1, 1), orig)
    rows = [torch.cat([orig[b: b + 1], occluded[b: b + 1], to_display(imputations[b], signed)])
            for b in range(len(orig))]
    save_image_rows(rows, path, scale=scale)


def save_cluster_grid(images: torch.Tensor, assign: torch.Tensor, n_components: int, path: str | os.PathLike,
                      signed: bool, per_row: int = 10, scale: int = 2) -> list[int]:
    """Paper Fig. 3: one row per non-empty mixture component (largest first), holding up to `per_row` of the
    images assigned to it. images [N, C, H, W] in data space, assign [N] component ids. Returns the
    components shown, in row order."""
    assign = assign.detach().cpu()
    counts = torch.bincount(assign, minlength=n_components)
    order = [int(k) for k in torch.argsort(counts, descending=True, stable=True) if counts[k] > 0]
    shown = to_display(images, signed)
    save_image_rows([shown[(assign == k).nonzero()[:per_row, 0]] for k in order], path, scale=scale)
    return order
