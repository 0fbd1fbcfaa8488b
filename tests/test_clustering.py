"""`matnet.clustering`: Hungarian / majority matching, against hand-computed cases, brute force and
a toy Gaussian mixture."""

import itertools
import math

import numpy as np
import pytest
import torch

from matnet.clustering import cluster_accuracy, confusion, match_clusters


def brute_force_one_to_one(conf: np.ndarray) -> int:
    """Best number of correct examples over all injective cluster -> class maps (K <= C)."""
    k, c = conf.shape
    return max(sum(conf[i, p[i]] for i in range(k)) for p in itertools.permutations(range(c), k))


def toy_mixture(n_per: int, n_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-separated 2-D Gaussians: centres on a circle of radius 10 (neighbours >= 2 * 10 *
    sin(pi / C) apart), unit-variance noise scaled by 0.3, so the nearest centre is the true one
    except with probability far below 1e-9 per point."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.arange(n_classes, dtype=torch.float64) * 2 * math.pi / n_classes
    centres = 10 * torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.arange(n_classes).repeat_interleave(n_per)
    x = centres[labels] + 0.3 * torch.randn(len(labels), 2, generator=g, dtype=torch.float64)
    nearest = torch.cdist(x, centres).argmin(1)
    return nearest, labels


def test_toy_mixture_with_permuted_ids():
    nearest, labels = toy_mixture(100, 6, seed=0)
    assert torch.equal(nearest, labels)  # the toy is separated as claimed
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    assign = perm[nearest]
    assert cluster_accuracy(assign, labels) == 1.0
    assert np.array_equal(match_clusters(assign, labels)[perm.numpy()], np.arange(6))  # undoes perm

    # m errors (fewer than half a class): the identity matching stays optimal, accuracy (N - m) / N
    wrong = assign.clone()
    idx = torch.arange(0, 600, 50)
    wrong[idx] = perm[(labels[idx] + 1) % 6]
    assert cluster_accuracy(wrong, labels) == (600 - len(idx)) / 600


def test_toy_mixture_over_clustered_uses_majority():
    nearest, labels = toy_mixture(50, 4, seed=2)
    split = nearest * 3 + torch.arange(len(nearest)) % 3  # each class split into 3 clusters
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    assign = perm[split]
    assert cluster_accuracy(assign, labels) == 1.0
    assert cluster_accuracy(assign, labels, n_clusters=20) == 1.0  # empty components are harmless
    assert np.array_equal(match_clusters(assign, labels)[perm.numpy()], np.arange(12) // 3)


def test_hand_computed_hungarian_vs_majority():
    # cluster 0 = {0, 0, 0}; cluster 1 = {0, 0, 1}; both clusters have majority class 0
    assign, labels = [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1]
    assert np.array_equal(confusion(assign, labels), [[3, 0], [2, 1]])
    assert cluster_accuracy(assign, labels) == 4 / 6  # K = C: one-to-one, 0 -> 0 and 1 -> 1
    assert cluster_accuracy(assign, labels, n_clusters=3) == 5 / 6  # K > C: majority, both -> 0


def test_the_class_count_is_the_datasets_not_the_subsets():
    """Five images of a ten-class dataset hold two classes: K = 3 clusters are still K <= C = 10 (one-to-one),
    not K > 2 (majority), so clusters 0 and 2 cannot both be matched to class 0."""
    assign, labels = [0, 0, 1, 2, 2], [0, 0, 1, 0, 0]
    assert cluster_accuracy(assign, labels) == 5 / 5  # C = 2 from the subset: majority, 0 -> 0, 1 -> 1, 2 -> 0
    assert cluster_accuracy(assign, labels, n_classes=10) == 3 / 5  # one-to-one: 0 -> 0, 1 -> 1, 2 -> another
    assert confusion(assign, labels, n_classes=10).shape == (3, 10)


def test_fewer_clusters_than_classes_is_one_to_one():
    # cluster 0 = {0, 1}, cluster 1 = {2, 2}: 1 + 2 correct, class 0 or 1 is left unmatched
    assert cluster_accuracy([0, 0, 1, 1], [0, 1, 2, 2]) == 3 / 4
    assert cluster_accuracy([0, 0, 0, 0], [1, 1, 2, 0]) == 2 / 4


@pytest.mark.parametrize("k, c", [(4, 4), (3, 5), (5, 5)])
def test_hungarian_matches_brute_force(k, c):
    rng = np.random.default_rng(k * 10 + c)
    for _ in range(20):
        n = 60
        assign, labels = rng.integers(0, k, n), rng.integers(0, c, n)
        conf = confusion(assign, labels, n_clusters=k)
        n_classes = labels.max() + 1
        assert cluster_accuracy(assign, labels, n_clusters=k) == brute_force_one_to_one(conf) / n
        mapping = match_clusters(assign, labels, n_clusters=k)
        assert len(set(mapping.tolist())) == k and mapping.max() < n_classes  # injective


def test_majority_matches_column_max():
    rng = np.random.default_rng(5)
    assign, labels = rng.integers(0, 30, 500), rng.integers(0, 10, 500)
    conf = confusion(assign, labels, n_clusters=30)
    assert conf.sum() == 500 and conf.shape == (30, 10)
    assert cluster_accuracy(assign, labels, n_clusters=30) == conf.max(1).sum() / 500


def test_input_types_agree():
    assign, labels = [2, 2, 0, 1, 1, 0, 0], [1, 1, 0, 2, 2, 2, 0]
    ref = cluster_accuracy(assign, labels)
    assert ref == 6 / 7
    assert cluster_accuracy(np.array(assign, dtype=np.int32), np.array(labels)) == ref
    assert cluster_accuracy(torch.tensor(assign), torch.tensor(labels, dtype=torch.uint8)) == ref
    assert isinstance(ref, float)


@pytest.mark.parametrize(
    "assign, labels, kwargs, match",
    [
        ([0, 1], [0], {}, "differ in length"),
        ([], [], {}, "empty"),
        ([0, -1], [0, 1], {}, "assign must be non-negative"),
        ([0, 1], [0, -2], {}, "labels must be non-negative"),
        ([0.0, 1.0], [0, 1], {}, "integer ids"),
        ([[0, 1]], [[0, 1]], {}, "1-D"),
        ([0, 3], [0, 1], {"n_clusters": 3}, r"n_clusters must be an integer >= max\(assign\) \+ 1 = 4"),
        ([0, 1], [0, 1], {"n_clusters": True}, "n_clusters"),
        ([0, 1], [0, 4], {"n_classes": 3}, r"n_classes must be an integer >= max\(labels\) \+ 1 = 5"),
    ],
)
def test_bad_inputs(assign, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cluster_accuracy(assign, labels, **kwargs)
