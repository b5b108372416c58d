"""fastinpaint: fast kernels for image-inpainting networks, behind PyTorch autograd.

``import fastinpaint`` loads the ops (``functional``, ``nn``); the heavier parts are loaded
at their first use as attributes (``fastinpaint.models``, ``.losses``, ``.data``,
``.metrics``, ``.train``, ``.inpaint``, ``.weights``, ``.evaluation``, ``.export``), so importing the package stays fast.
"""

import importlib as _importlib

from . import _extension
from ._backend import BACKENDS, BackendUnavailableError, backends, use_backend
from ._debug import poison_outputs
from .errors import UserError
from . import functional, nn

__version__ = "0.1.0"

# submodules imported at their first access as attributes (PEP 562)
_LAZY = ("data", "evaluation", "export", "inpaint", "losses", "metrics", "models", "train", "weights")

__all__ = ["BACKENDS", "BackendUnavailableError", "UserError", "backends", "functional", "nn", "poison_outputs",
           "use_backend", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return _importlib.import_module(f".{name}", __name__)   # also binds it on the package
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


# A prebuilt extension that matches this torch is loaded now (cheap); a JIT build,
# if one is needed, waits for the first op that asks for the cpu or cuda backend.
_extension.library(build=False)
