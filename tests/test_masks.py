"""Mask generators of `matnet.masks`: shapes, statistics, placement, seeding and the spec parser.

Statistical checks use bounds with a stated false-alarm rate (at most 1e-6 each) under the
intended distribution, never a tolerance fitted to one run."""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binom, chi2

from matnet import masks
from matnet.masks import fixed_masks, parse_mask_spec

ALPHA = 1e-6  # false-alarm rate of each statistical bound


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_binary_mask(m: torch.Tensor, b: int, h: int, w: int) -> None:
    assert m.shape == (b, 1, h, w) and m.dtype == torch.float32
    assert ((m == 0) | (m == 1)).all()


def union_of_squares(m: torch.Tensor, d: int) -> torch.Tensor:
    """The union of all d x d windows inside the image that are entirely missing, [B, 1, H, W]:
    equal to m exactly when m is a union of in-bounds d x d squares."""
    full = (F.avg_pool2d(m, d, stride=1, divisor_override=1) == d * d).float()  # exact integer sums
    return F.max_pool2d(F.pad(full, (d - 1,) * 4), d, stride=1)


def top_left(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First missing row and column of each mask [B, 1, H, W]."""
    return m.amax(3)[:, 0].argmax(1), m.amax(2)[:, 0].argmax(1)


def chi2_uniform_ok(values: torch.Tensor, n_bins: int) -> bool:
    counts = torch.bincount(values, minlength=n_bins).double()
    expected = len(values) / n_bins
    return float(((counts - expected) ** 2 / expected).sum()) < chi2.isf(ALPHA, n_bins - 1)


# ---- occluders ----------------------------------------------------------------------------------


@pytest.mark.parametrize("k, d, h, w", [(3, 12, 28, 28), (3, 20, 64, 64), (2, 5, 20, 31), (1, 7, 7, 9)])
def test_occluders_are_unions_of_k_squares_in_bounds(k, d, h, w):
    m = masks.occluders(k, d)(256, h, w, gen(0))
    assert_binary_mask(m, 256, h, w)
    area = m.sum((1, 2, 3))
    assert (area >= d * d).all() and (area <= k * d * d).all()
    assert torch.equal(union_of_squares(m, d), m)


def test_single_occluder_is_one_square():
    m = masks.occluders(1, 12)(500, 28, 28, gen(1))
    assert (m.sum((1, 2, 3)) == 144).all()
    top, left = top_left(m)
    for i in (0, 7, 499):  # the square starting at the first missing pixel is exactly the mask
        ref = torch.zeros(28, 28)
        ref[top[i] : top[i] + 12, left[i] : left[i] + 12] = 1
        assert torch.equal(m[i, 0], ref)


def test_occluder_count():
    """On a large image the k squares rarely overlap: then the area is exactly k d^2. A pair overlaps
    only if both offsets differ by < d, probability <= ((2d - 1) / n)^2 with n positions per axis."""
    k, d, size, b = 3, 5, 100, 400
    m = masks.occluders(k, d)(b, size, size, gen(2))
    area = m.sum((1, 2, 3))
    assert (area <= k * d * d).all()
    q = min(1.0, math.comb(k, 2) * ((2 * d - 1) / (size - d + 1)) ** 2)  # union bound over pairs
    assert int((area < k * d * d).sum()) <= binom.isf(ALPHA, b, q)


def test_occluder_placement_is_uniform_and_reaches_the_edges():
    h, w, d, b = 28, 30, 12, 4000
    top, left = top_left(masks.occluders(1, d)(b, h, w, gen(3)))
    assert int(top.min()) == 0 and int(top.max()) == h - d
    assert int(left.min()) == 0 and int(left.max()) == w - d
    assert chi2_uniform_ok(top, h - d + 1) and chi2_uniform_ok(left, w - d + 1)


def test_occluder_as_large_as_the_image_covers_it():
    assert (masks.occluders(2, 9)(3, 9, 9, gen(0)) == 1).all()


# ---- quadrant and centre ------------------------------------------------------------------------


def test_quadrant_is_exactly_one_mnist_quadrant():
    b = 400
    m = masks.quadrant(14)(b, 28, 28, gen(4))
    assert_binary_mask(m, b, 28, 28)
    quads = torch.zeros(4, 28, 28)
    for i, (r, c) in enumerate([(0, 0), (0, 14), (14, 0), (14, 14)]):
        quads[i, r : r + 14, c : c + 14] = 1
    hits = (m[:, 0, None] == quads).flatten(2).all(2)  # [B, 4]
    assert (hits.sum(1) == 1).all()
    assert chi2_uniform_ok(hits.float().argmax(1), 4)


def test_quadrant_on_a_non_square_image_takes_a_corner():
    m = masks.quadrant(10)(200, 20, 30, gen(5))
    top, left = top_left(m)
    assert (m.sum((1, 2, 3)) == 100).all()
    assert set(zip(top.tolist(), left.tolist())) == {(0, 0), (0, 20), (10, 0), (10, 20)}


@pytest.mark.parametrize("h, w, d, r, c", [(28, 28, 16, 6, 6), (27, 28, 16, 5, 6), (32, 32, 32, 0, 0)])
def test_centre_square(h, w, d, r, c):
    state = torch.get_rng_state()
    m = masks.centre(d)(3, h, w)
    assert torch.equal(torch.get_rng_state(), state)  # no randomness used
    ref = torch.zeros(h, w)
    ref[r : r + d, c : c + d] = 1
    assert_binary_mask(m, 3, h, w)
    assert all(torch.equal(m[i, 0], ref) for i in range(3))
    if (h - d) % 2 == 0 and (w - d) % 2 == 0:
        assert torch.equal(m, m.flip(2, 3))  # exactly centred


# ---- random drop --------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_random_drop_rate(p):
    b, h, w = 64, 28, 28
    m = masks.random_drop(p)(b, h, w, gen(6))
    assert_binary_mask(m, b, h, w)
    n = b * h * w
    missing = int(m.sum())
    assert binom.ppf(ALPHA / 2, n, p) <= missing <= binom.isf(ALPHA / 2, n, p)


def test_random_drop_extremes():
    assert (masks.random_drop(0)(4, 8, 8, gen(0)) == 0).all()
    assert (masks.random_drop(1.0)(4, 8, 8, gen(0)) == 1).all()


# ---- seeding ------------------------------------------------------------------------------------

RANDOM_SPECS = ["occluders:3x12", "quadrant:14", "drop:0.5"]


@pytest.mark.parametrize("spec", RANDOM_SPECS)
def test_same_seed_same_masks_other_seed_other_masks(spec):
    g = parse_mask_spec(spec)
    assert torch.equal(g(32, 28, 28, gen(7)), g(32, 28, 28, gen(7)))
    assert not torch.equal(g(32, 28, 28, gen(7)), g(32, 28, 28, gen(8)))
    torch.manual_seed(3)
    a = g(32, 28, 28)  # generator=None draws from the global RNG
    torch.manual_seed(3)
    assert torch.equal(a, g(32, 28, 28))


@pytest.mark.parametrize("spec", RANDOM_SPECS + ["centre:16"])
def test_fixed_masks_are_stable(spec):
    state = torch.get_rng_state()
    a = fixed_masks(spec, 50, 28, 28, seed=11)
    assert torch.equal(torch.get_rng_state(), state)  # evaluation masks leave training noise alone
    torch.rand(100)  # global RNG use in between does not matter
    assert torch.equal(a, fixed_masks(parse_mask_spec(spec), 50, 28, 28, seed=11))
    assert_binary_mask(a, 50, 28, 28)
    assert torch.equal(fixed_masks(spec, 17, 28, 28, seed=11), a[:17])  # image i's mask whatever the count
    if spec != "centre:16":
        assert not torch.equal(a, fixed_masks(spec, 50, 28, 28, seed=12))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_does_not_change_masks():
    for spec in RANDOM_SPECS + ["centre:16"]:
        g = parse_mask_spec(spec)
        cpu = g(16, 28, 28, gen(9))
        cuda = g(16, 28, 28, gen(9), device="cuda")
        assert cuda.device.type == "cuda" and torch.equal(cuda.cpu(), cpu)
        assert torch.equal(fixed_masks(spec, 16, 28, 28, 1, device="cuda").cpu(), fixed_masks(spec, 16, 28, 28, 1))
        assert g(16, 28, 28, torch.Generator("cuda").manual_seed(0)).device.type == "cuda"


# ---- specs and argument checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("occluders:3x12", masks.occluders(3, 12)),
        (" Occluders : 3 X 20 ", masks.occluders(3, 20)),
        ("quadrant:14", masks.quadrant(14)),
        ("quadrant", masks.quadrant(14)),
        ("centre:16", masks.centre(16)),
        ("center:16", masks.centre(16)),
        ("drop:0.5", masks.random_drop(0.5)),
        ("drop:1", masks.random_drop(1.0)),
    ],
)
def test_parse_mask_spec(spec, expected):
    g = parse_mask_spec(spec)
    assert g == expected and parse_mask_spec(g.spec) == g and str(g) == g.spec


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("", "empty spec"),
        ("blob:3", "unknown kind 'blob'"),
        ("occluders", "KxD"),
        ("occluders:3", "KxD"),
        ("occluders:ax12", "KxD"),
        ("occluders:0x12", "k must be an integer >= 1"),
        ("occluders:3x0", "d must be an integer >= 1"),
        ("quadrant:-1", "positive integer"),
        ("quadrant:0", "size must be an integer >= 1"),
        ("centre", "positive integer"),
        ("centre:1.5", "positive integer"),
        ("centre:²", "positive integer"),
        ("drop:abc", "probability"),
        ("drop:1.5", "must be in (0, 1], got 1.5"),
        ("drop:-0.1", "must be in (0, 1], got -0.1"),
        ("drop:nan", "finite"),
        ("drop:0", "hides no pixel"),
    ],
)
def test_bad_specs_are_rejected_in_one_line(spec, problem):
    with pytest.raises(ValueError) as e:
        parse_mask_spec(spec)
    msg = str(e.value)
    assert "\n" not in msg and problem in msg and repr(spec) in msg and masks.SPEC_FORMS in msg


def test_spec_checked_against_the_image_size():
    assert parse_mask_spec("occluders:3x12", image_size=(28, 28)) == masks.occluders(3, 12)
    with pytest.raises(ValueError, match=r"bad mask spec 'occluders:3x30': .*30x30 square does not fit in a 28x28"):
        parse_mask_spec("occluders:3x30", image_size=(28, 28))
    with pytest.raises(ValueError, match="does not fit"):
        parse_mask_spec("centre:20", image_size=(16, 32))


@pytest.mark.parametrize(
    "make",
    [
        lambda: masks.occluders(0, 3),
        lambda: masks.occluders(3, 0),
        lambda: masks.occluders(2.5, 3),
        lambda: masks.occluders(True, 3),
        lambda: masks.quadrant(0),
        lambda: masks.centre(-2),
        lambda: masks.random_drop(-0.1),
        lambda: masks.random_drop(1.1),
        lambda: masks.random_drop(float("nan")),
        lambda: masks.random_drop("0.5"),
        lambda: masks.occluders(3, 29)(1, 28, 28),
        lambda: masks.occluders(1, 12)(1, 28, 11),
        lambda: masks.quadrant(15)(1, 14, 28),
        lambda: masks.centre(5)(-1, 8, 8),
        lambda: masks.random_drop(0.5)(2, 0, 8),
        lambda: fixed_masks("drop:0.5", 4, 8, 8, seed=-1),
    ],
)
def test_bad_arguments_are_rejected(make):
    with pytest.raises(ValueError):
        make()


def test_empty_batch():
    assert masks.occluders(3, 12)(0, 28, 28, gen(0)).shape == (0, 1, 28, 28)
