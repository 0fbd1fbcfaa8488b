"""Mask generators for conditional MatNets (paper section 3) and the imputation protocols.

Convention: a mask is a float32 tensor [B, 1, H, W], broadcastable over channels, with
1 = missing pixel and 0 = known pixel.

Every generator is a callable ``gen(batch_size, height, width, generator=None, device=None)``.
Random draws come from ``generator`` (a ``torch.Generator``; the global RNG when None) and are
made on the generator's device, so a CPU generator gives the same masks for any target device.

Protocols:
- ``occluders(3, 20)`` on 64x64: the paper's three 20x20 occluders (CelebA / LSUN, Fig. 5);
- ``occluders(3, 12)`` on 28x28: the original code's MNIST three 12x12;
- ``quadrant(14)`` on 28x28: one of the four 14x14 MNIST quadrants;
- ``centre(d)``: a fixed centre square; ``random_drop(p)``: each pixel missing with probability p.

``parse_mask_spec`` reads the CLI form (``--mask occluders:3x12``) and ``fixed_masks`` gives the
same masks on every call, for test-set evaluation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "MaskGenerator",
    "Occluders",
    "Quadrant",
    "Centre",
    "RandomDrop",
    "occluders",
    "quadrant",
    "centre",
    "random_drop",
    "parse_mask_spec",
    "fixed_masks",
    "SPEC_FORMS",
]

SPEC_FORMS = "occluders:KxD, quadrant[:SIZE], centre:D (or center:D), drop:P"
_UINT = re.compile("[0-9]+")  # ASCII only: str.isdigit also accepts e.g. superscripts


def _check_int(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass; True as a size is always a bug
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_call(batch_size: int, height: int, width: int) -> None:
    _check_int("batch_size", batch_size, 0)
    _check_int("height", height, 1)
    _check_int("width", width, 1)


def _fits(what: str, d: int, height: int, width: int) -> None:
    if d > height or d > width:
        raise ValueError(f"{what}: a {d}x{d} square does not fit in a {height}x{width} image")


Gen = torch.Generator | None
Device = torch.device | str | None


def _draw_device(generator: Gen, device: Device) -> torch.device:
    return generator.device if generator is not None else torch.device(device or "cpu")


def _boxes(top: torch.Tensor, left: torch.Tensor, d: int, height: int, width: int) -> torch.Tensor:
    """Union of d x d squares with top-left corners (top, left), each [B, k] -> mask [B, 1, H, W]."""
    ys = torch.arange(height, device=top.device).view(1, 1, height, 1)
    xs = torch.arange(width, device=top.device).view(1, 1, 1, width)
    top, left = top[..., None, None], left[..., None, None]
    rows = (ys >= top) & (ys < top + d)  # [B, k, H, 1]
    cols = (xs >= left) & (xs < left + d)  # [B, k, 1, W]
    return (rows & cols).any(dim=1, keepdim=True).float()


class MaskGenerator:
    """Base class: ``__call__(batch_size, height, width, generator=None, device=None) -> [B, 1, H, W]``."""

    @property
    def spec(self) -> str:
        """The CLI form; ``parse_mask_spec(gen.spec) == gen``."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.spec

    def check(self, height: int, width: int) -> MaskGenerator:
        """Raise ValueError unless masks can be made for H x W images (e.g. the square fits)."""
        self(0, height, width, generator=torch.Generator())  # a private generator: no RNG state used
        return self

    def _make(self, batch_size: int, height: int, width: int, generator: Gen, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, batch_size: int, height: int, width: int, generator: Gen = None,
                 device: Device = None) -> torch.Tensor:
        _check_call(batch_size, height, width)
        draw = _draw_device(generator, device)
        out = self._make(batch_size, height, width, generator, draw)
        return out.to(draw if device is None else device)


@dataclass(frozen=True)
class Occluders(MaskGenerator):
    """k random d x d squares per image, each placed uniformly among the positions where it fits
    entirely inside the image (squares may overlap, as in the paper's uniform placement)."""

    k: int
    d: int

    def __post_init__(self) -> None:
        _check_int("occluders: k", self.k, 1)
        _check_int("occluders: d", self.d, 1)

    @property
    def spec(self) -> str:
        return f"occluders:{self.k}x{self.d}"

    def _make(self, batch_size: int, height: int, width: int, generator: Gen, device: torch.device) -> torch.Tensor:
        _fits("occluders", self.d, height, width)
        cols = width - self.d + 1
        # one draw per square (not all tops, then all lefts): image i's squares do not depend on the batch size
        pos = torch.randint(0, (height - self.d + 1) * cols, (batch_size, self.k), generator=generator, device=device)
        return _boxes(pos // cols, pos % cols, self.d, height, width)


@dataclass(frozen=True)
class Quadrant(MaskGenerator):
    """One size x size square at a uniformly chosen corner of the image: for 28x28 MNIST and
    size 14, exactly one of the four quadrants."""

    size: int = 14

    def __post_init__(self) -> None:
        _check_int("quadrant: size", self.size, 1)

    @property
    def spec(self) -> str:
        return f"quadrant:{self.size}"

    def _make(self, batch_size: int, height: int, width: int, generator: Gen, device: torch.device) -> torch.Tensor:
        _fits("quadrant", self.size, height, width)
        corner = torch.randint(0, 4, (batch_size, 1), generator=generator, device=device)
        top = (corner // 2) * (height - self.size)  # corners 0, 1: top; 2, 3: bottom
        left = (corner % 2) * (width - self.size)  # corners 0, 2: left; 1, 3: right
        return _boxes(top, left, self.size, height, width)


@dataclass(frozen=True)
class Centre(MaskGenerator):
    """A fixed d x d square at the centre; when (H - d) or (W - d) is odd, it sits half a pixel
    up / left of the exact centre. No randomness."""

    d: int

    def __post_init__(self) -> None:
        _check_int("centre: d", self.d, 1)

    @property
    def spec(self) -> str:
        return f"centre:{self.d}"

    def _make(self, batch_size: int, height: int, width: int, generator: Gen, device: torch.device) -> torch.Tensor:
        _fits("centre", self.d, height, width)
        top = torch.full((batch_size, 1), (height - self.d) // 2, device=device)
        left = torch.full((batch_size, 1), (width - self.d) // 2, device=device)
        return _boxes(top, left, self.d, height, width)


@dataclass(frozen=True)
class RandomDrop(MaskGenerator):
    """Each pixel missing independently with probability p (p = 1: all missing)."""

    p: float

    def __post_init__(self) -> None:
        # `not 0 <= p <= 1` is also true for NaN
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not 0 <= self.p <= 1:
            raise ValueError(f"drop: p must be a number in [0, 1], got {self.p!r}")

    @property
    def spec(self) -> str:
        return f"drop:{float(self.p)!r}"

    def _make(self, batch_size: int, height: int, width: int, generator: Gen, device: torch.device) -> torch.Tensor:
        u = torch.rand((batch_size, 1, height, width), generator=generator, device=device)
        return (u < self.p).float()  # u in [0, 1): p = 0 never drops, p = 1 always does


def occluders(k: int, d: int) -> Occluders:
    """k random d x d occluders, each fully inside the image."""
    return Occluders(k, d)


def quadrant(size: int = 14) -> Quadrant:
    """One random size x size corner square (a quadrant of a 2*size x 2*size image)."""
    return Quadrant(size)


def centre(d: int) -> Centre:
    """The centre d x d square."""
    return Centre(d)


def random_drop(p: float) -> RandomDrop:
    """Each pixel missing with probability p."""
    return RandomDrop(p)


def parse_mask_spec(spec: str, image_size: tuple[int, int] | None = None) -> MaskGenerator:
    """Read a ``--mask`` spec: ``occluders:KxD``, ``quadrant[:SIZE]`` (default 14), ``centre:D``
    (or ``center:D``), ``drop:P``. With ``image_size`` = (H, W) it also checks that the masks fit.
    Raises ValueError with one line naming the problem and the accepted forms."""

    def bad(problem: str) -> ValueError:
        return ValueError(f"bad mask spec {spec!r}: {problem}; accepted forms: {SPEC_FORMS}")

    if not isinstance(spec, str):
        raise bad("not a string")
    kind, _, arg = spec.strip().partition(":")
    kind, arg = kind.strip().lower(), arg.strip()
    try:
        gen = _parse(kind, arg, bad)
        return gen if image_size is None else gen.check(*image_size)
    except ValueError as e:
        if str(e).startswith("bad mask spec"):
            raise
        raise bad(str(e)) from None  # argument checks of the generators, e.g. k >= 1


def _parse(kind: str, arg: str, bad: Callable[[str], ValueError]) -> MaskGenerator:
    if kind == "occluders":
        m = re.fullmatch(r"([0-9]+)\s*[xX]\s*([0-9]+)", arg)
        if m is None:
            raise bad("occluders needs KxD, e.g. occluders:3x12")
        return Occluders(int(m[1]), int(m[2]))
    if kind == "quadrant":
        if arg and not _UINT.fullmatch(arg):
            raise bad("quadrant size must be a positive integer")
        return Quadrant(int(arg) if arg else 14)
    if kind in ("centre", "center"):
        if not _UINT.fullmatch(arg):
            raise bad("centre needs a positive integer size, e.g. centre:16")
        return Centre(int(arg))
    if kind == "drop":
        try:
            p = float(arg)
        except ValueError:
            raise bad("drop needs a probability, e.g. drop:0.5") from None
        if not math.isfinite(p):
            raise bad("drop probability must be finite")
        if not 0 < p <= 1:  # p = 0, a task with nothing missing: Eq. 6 would score no pixel
            raise bad(f"drop probability must be in (0, 1], got {arg}" + (": drop:0 hides no pixel" if p == 0 else ""))
        return RandomDrop(p)
    raise bad(f"unknown kind {kind!r}" if kind else "empty spec")


def fixed_masks(spec: str | MaskGenerator, n: int, height: int, width: int, seed: int = 0,
                device: Device = None) -> torch.Tensor:
    """n masks [n, 1, H, W] drawn from a private CPU generator seeded with ``seed``: the same on
    every call and every device, and the global RNG is left untouched (test-set evaluation). Mask i
    does not depend on n: the first n masks of a larger draw are these."""
    gen = parse_mask_spec(spec) if isinstance(spec, str) else spec
    if not isinstance(gen, MaskGenerator):
        raise TypeError(f"spec must be a str or a MaskGenerator, got {type(spec).__name__}")
    g = torch.Generator(device="cpu").manual_seed(_check_int("seed", seed, 0))
    return gen(n, height, width, generator=g).to(device or "cpu")
