"""Errors that are the user's to fix: a wrong argument, a missing or unreadable file, a run
folder that already holds a run, an output that exists.

``UserError`` carries the ``argument`` it concerns (a parameter or config key such as
``"mask"``, ``"data"`` or ``"checkpoint"``, the name of the ``fastinpaint`` option too) and the
``fix``. The ``fastinpaint`` command prints it as one line, ``fastinpaint <command>: --<argument>:
<message>; <fix>``, and exits with status 2, with no traceback (``--debug`` or
``FASTINPAINT_DEBUG=1`` shows it). Library callers catch it, or the builtin type each subclass
also is (``ValueError``, ``FileNotFoundError``, ...).

Standard library only: every layer of the package may raise these.
"""

from __future__ import annotations

import inspect
from pathlib import Path

__all__ = ["InvalidInputError", "InputNotFoundError", "OutputExistsError", "RunExistsError", "UnreadableInputError",
           "UserError", "check_folder", "check_keywords"]


class UserError(Exception):
    """A mistake in what the user gave, with the argument it concerns and how to fix it."""

    def __init__(self, message: str, *, argument: str | None = None, fix: str | None = None):
        self.message, self.argument, self.fix = str(message), argument, fix
        super().__init__(self.describe())

    def describe(self, argument: str | None = None) -> str:
        """One line: ``<argument>: <message>; <fix>`` (``argument`` as the caller spells it)."""
        name = argument or self.argument
        text = f"{name}: {self.message}" if name else self.message
        if self.fix:
            text += f"; {self.fix}"
        return " ".join(text.split())   # one line, whatever the parts hold

    def __reduce__(self):   # picklable across DataLoader workers and processes
        return (_rebuild, (type(self), self.message, self.argument, self.fix))


def _rebuild(cls, message, argument, fix):
    return cls(message, argument=argument, fix=fix)


class InvalidInputError(UserError, ValueError):
    """A value that cannot be used: an unknown model or mask kind, a mask with no hole, ..."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or folder that does not exist, or holds nothing usable."""


class UnreadableInputError(UserError, OSError):
    """A file that exists but cannot be decoded (truncated, not an image, not a checkpoint)."""


class OutputExistsError(UserError, FileExistsError):
    """An output that exists already (a report, a weights file), without overwrite."""


class RunExistsError(OutputExistsError):
    """``train`` pointed at a folder that already holds a run, without resume or overwrite."""


def check_folder(path, *, argument: str, what: str = "the outputs") -> None:
    """Raise :class:`InvalidInputError` naming ``argument`` when ``path`` cannot be (or become) a
    folder: it is a file, or a folder above it is one (``notes.txt/run``). Nothing is created."""
    path = Path(path)
    for above in (path, *path.parents):
        if above.is_dir():
            return
        if above.exists() or above.is_symlink():
            kind = "a file" if above.is_file() else "not a folder"
            where = f"{path} is {kind}" if above == path else f"{path} is inside {above}, which is {kind}"
            raise InvalidInputError(where, argument=argument, fix=f"give a folder for {what}")


def check_keywords(target, options, *, what: str, argument: str, prefix: str = "") -> None:
    """Raise :class:`InvalidInputError` when ``options`` holds a keyword that ``target`` (a
    class or function) does not take, naming it and listing the ones it does take.
    ``what`` names the target in the message ("model 'tiny_gated'"); ``prefix`` is how the
    user spells a keyword (``"model_options."``)."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):   # no signature to check against
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    takes = [name for name, p in params.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    unknown = [k for k in options if k not in takes]
    if unknown:
        raise InvalidInputError(
            f"{what} has no option {', '.join(prefix + k for k in unknown)}", argument=argument,
            fix=f"its options: {', '.join(prefix + k for k in takes)}" if takes else f"{what} takes no options")
