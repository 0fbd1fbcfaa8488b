"""matnet's numeric ops. Each has a plain-torch reference in `matnet.ops.reference`; `backends()` tells
which implementation runs for a device and dtype (the rule: `matnet.ops._dispatch`)."""

from . import reference
from ._dispatch import backends
from .gaussian import gaussian_sample_kl
from .likelihood import discretized_logistic_mixture_nll, discretized_logistic_nll
from .masked_conv import masked_conv2d
from .residual import residual_conv_block

__all__ = [
    "backends",
    "reference",
    "residual_conv_block",
    "gaussian_sample_kl",
    "discretized_logistic_nll",
    "discretized_logistic_mixture_nll",
    "masked_conv2d",
]
