"""matnet: Matryoshka Networks (Bachman, NIPS 2016), deep hierarchical VAEs on fast kernels."""

import importlib.util as _ilu
import os as _os
import sys as _sys


def _kernels_from_source_tree() -> None:
    """Run from a checkout on PYTHONPATH (not installed), `matnet.kernels` is the top-level kernels/
    folder beside this package: map it, so the Triton kernels are found as after an install."""
    init = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), _os.pardir, "kernels", "__init__.py")
    if _ilu.find_spec(__name__ + ".kernels") is None and _os.path.isfile(init):
        spec = _ilu.spec_from_file_location(__name__ + ".kernels", init,
                                            submodule_search_locations=[_os.path.dirname(init)])
        module = _ilu.module_from_spec(spec)
        _sys.modules[spec.name] = module
        spec.loader.exec_module(module)


_kernels_from_source_tree()

from . import clustering, masks, ops  # noqa: E402
from .conditional import ConditionalMatNet, FastConditionalMatNet  # noqa: E402
from .config import PRESETS, MatNetConfig  # noqa: E402
from .fast_model import FastMatNet  # noqa: E402
from .model import MatNet, MatNetOutput  # noqa: E402
from .regularizers import inference_regularizer  # noqa: E402

__all__ = ["MatNetConfig", "PRESETS", "MatNet", "FastMatNet", "MatNetOutput", "ops", "clustering", "masks"]
__all__ += ["ConditionalMatNet", "FastConditionalMatNet"]
__all__ += ["regularizers", "inference_regularizer"]
__version__ = "0.1.0"
