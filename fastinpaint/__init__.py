"""fastinpaint: fast kernels for image-inpainting networks, behind PyTorch autograd."""

from . import _extension
from ._backend import BACKENDS, BackendUnavailableError, backends, use_backend
from ._debug import poison_outputs
from . import functional, nn

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailableError", "backends", "functional", "nn", "poison_outputs",
           "use_backend", "__version__"]

# A prebuilt extension that matches this torch is loaded now (cheap); a JIT build,
# if one is needed, waits for the first op that asks for the cpu or cuda backend.
_extension.library(build=False)
