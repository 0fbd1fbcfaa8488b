"""Unsupervised clustering accuracy (paper Fig. 3; the mixture prior's components as clusters).

Clusters are matched to classes, then accuracy = fraction of examples whose cluster's class is
their label:
- K <= C clusters (K == C is the usual protocol, e.g. MNIST with K = 10): a one-to-one matching
  that maximises the number of correct examples (Hungarian, ``scipy.optimize.linear_sum_assignment``);
- K > C: each cluster takes its majority label (several clusters may share a class), the usual rule
  for over-clustering, e.g. K = 50 on Omniglot.
Class ids are 0..C-1 with C = `n_classes` (the dataset's: a subset may lack some classes), by default
max(label) + 1; cluster ids are 0..K-1.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["cluster_accuracy", "match_clusters", "confusion", "cluster_report", "kmeans"]

IntArray = np.ndarray | torch.Tensor | Sequence[int]


def _ids(name: str, x: IntArray) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(a.shape)}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer ids, got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError(f"{name} must be non-negative, got {int(a.min())}")
    return a.astype(np.int64)


def _count(name: str, n: int | None, low: int, what: str) -> int:
    if n is None:
        return low
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < low:
        raise ValueError(f"{name} must be an integer >= {what} = {low}, got {n!r}")
    return int(n)


def confusion(assign: IntArray, labels: IntArray, n_clusters: int | None = None,
              n_classes: int | None = None) -> np.ndarray:
    """Counts [K, C]: entry (k, c) is the number of examples in cluster k with label c."""
    a, y = _ids("assign", assign), _ids("labels", labels)
    if len(a) != len(y):
        raise ValueError(f"assign and labels differ in length: {len(a)} vs {len(y)}")
    if len(a) == 0:
        raise ValueError("assign and labels are empty")
    n_clusters = _count("n_clusters", n_clusters, int(a.max()) + 1, "max(assign) + 1")
    n_classes = _count("n_classes", n_classes, int(y.max()) + 1, "max(labels) + 1")
    return np.bincount(a * n_classes + y, minlength=n_clusters * n_classes).reshape(n_clusters, n_classes)


def _match(conf: np.ndarray) -> np.ndarray:
    n_k, n_c = conf.shape
    if n_k > n_c:
        return conf.argmax(axis=1)  # an empty cluster gets class 0 but holds no examples
    rows, cols = linear_sum_assignment(conf, maximize=True)  # K <= C: every cluster gets a distinct class
    out = np.empty(n_k, dtype=np.int64)
    out[rows] = cols
    return out


def match_clusters(assign: IntArray, labels: IntArray, n_clusters: int | None = None,
                   n_classes: int | None = None) -> np.ndarray:
    """The class of each cluster, [K] int64: a one-to-one (Hungarian) matching when K <= C, the
    majority label of each cluster when K > C."""
    return _match(confusion(assign, labels, n_clusters, n_classes))


def cluster_accuracy(assign: IntArray, labels: IntArray, n_clusters: int | None = None,
                     n_classes: int | None = None) -> float:
    """Fraction of examples whose cluster is matched to their label (see the module docstring for
    the matching rule). ``assign`` and ``labels`` are 1-D non-negative integer ids of equal length
    (tensors, arrays or lists); ``n_clusters`` defaults to max(assign) + 1 and should be the
    model's K, so that empty components still count when choosing the rule; ``n_classes`` likewise
    defaults to max(labels) + 1 and should be the dataset's class count."""
    conf = confusion(assign, labels, n_clusters, n_classes)
    return float(conf[np.arange(conf.shape[0]), _match(conf)].sum() / conf.sum())


class KMeansStopped(Exception):
    """k-means gave up because its `stop` callback asked it to."""


def _lloyd(z: torch.Tensor, k: int, g: torch.Generator, iters: int,
           stop: Callable[[], bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """One k-means++ start, then Lloyd's steps until no row moves; an emptied cluster keeps its centroid."""
    c = z.new_empty(k, z.shape[1])
    c[0] = z[torch.randint(len(z), (1,), generator=g)]
    d2 = (z - c[0]).square().sum(1)  # squared distance to the nearest centre so far: updated, not recomputed
    for j in range(1, k):  # each new centre drawn with probability ~ d2 (O(N k D) in all, not O(N k^2 D))
        if j % 256 == 0 and stop():
            raise KMeansStopped
        pick = torch.multinomial(d2, 1, generator=g) if d2.sum() > 0 else torch.randint(len(z), (1,), generator=g)
        c[j] = z[pick]
        d2 = torch.minimum(d2, (z - c[j]).square().sum(1))
    assign = torch.cdist(z, c).argmin(1)
    for _ in range(iters):
        if stop():
            raise KMeansStopped
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, assign, z)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
        new = torch.cdist(z, c).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return c, assign


@torch.no_grad()
def kmeans(z: torch.Tensor, k: int, seed: int = 0, restarts: int = 10, iters: int = 100,
           stop: Callable[[], bool] = lambda: False) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of the rows of z [N, D]: the best (least within-cluster sum of squares) of `restarts` k-means++
    starts, in fp64 on the CPU so that every process gets the same answer. Returns (centroids [k, D],
    assignments [N] int64), both on the CPU. `stop` is asked often (between Lloyd steps, every 256 k-means++
    picks): when it says True, KMeansStopped is raised."""
    if not 1 <= k <= len(z):
        raise ValueError(f"k-means needs 1 <= k <= {len(z)} rows, got k={k}")
    z = z.detach().to("cpu", torch.float64).reshape(len(z), -1)
    if not torch.isfinite(z).all():
        raise ValueError("k-means needs finite rows")
    g = torch.Generator().manual_seed(seed)
    best, best_ss = None, math.inf
    for _ in range(restarts):
        c, assign = _lloyd(z, k, g, iters, stop)
        ss = float((z - c[assign]).square().sum())
        if ss < best_ss:
            best, best_ss = (c, assign), ss
    return best


@torch.no_grad()
def cluster_report(model: torch.nn.Module, data_x: torch.Tensor, labels: IntArray | None = None,
                   out_png: str | os.PathLike | None = None, batch_size: int = 256, per_row: int = 10,
                   n_classes: int | None = None, kmeans_k: int = 0, seed: int = 0) -> dict:
    """Assign each image of data_x [N, C, H, W] (data space, any device) to a mixture component of z0 with
    `model.cluster` or, with kmeans_k, to one of kmeans_k k-means clusters (`kmeans`, seeded) of the posterior
    means E[z0 | x] (any density model: the baseline a mixture prior should beat); report the cluster sizes
    and, given labels, the clustering accuracy (Hungarian when K <= n_classes, majority label when K is
    larger; n_classes: the dataset's class count, by default max(labels) + 1); with out_png, write the Fig. 3
    grid (one row of images per non-empty cluster, `matnet.plots.save_cluster_grid`)."""
    p = next(model.parameters())
    per_batch = (lambda x: model.z0_posterior(x)[0]) if kmeans_k else model.cluster
    out = torch.cat([per_batch(data_x[i: i + batch_size].to(p.device, p.dtype)).cpu()
                     for i in range(0, len(data_x), batch_size)])
    k = kmeans_k or model.cfg.prior_components
    assign = kmeans(out, k, seed)[1] if kmeans_k else out
    counts = torch.bincount(assign, minlength=k)
    report: dict = {"n_images": len(assign), "method": "kmeans" if kmeans_k else "mixture", "n_components": k,
                    "n_used": int((counts > 0).sum()), "counts": counts.tolist()}
    if labels is not None:
        n_classes = n_classes or int(_ids("labels", labels).max()) + 1
        report["accuracy"] = cluster_accuracy(assign, labels, k, n_classes)
        report["matching"] = "hungarian" if k <= n_classes else "majority"
    if out_png is not None:
        from .plots import save_cluster_grid

        save_cluster_grid(data_x, assign, k, out_png, signed=not model.dist.binary, per_row=per_row)
        report["png"] = str(out_png)
    return report
