"""matnet: Matryoshka Networks (Bachman, NIPS 2016), deep hierarchical VAEs on fast kernels."""

from . import ops
from .config import PRESETS, MatNetConfig
from .fast_model import FastMatNet
from .model import MatNet, MatNetOutput

__all__ = ["MatNetConfig", "PRESETS", "MatNet", "FastMatNet", "MatNetOutput", "ops"]
__version__ = "0.1.0"
