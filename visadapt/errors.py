"""User errors: one clear line on the command line, the traceback only with ``VISADAPT_DEBUG=1``.

A *user error* is something the person running visadapt can fix (a path, a file, a config value, an adapter target);
its message names the file or setting and says what to do. :func:`report_user_errors` turns such an exception into
one line on stderr and a non-zero exit code; any other exception (a bug) keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

DEBUG_ENV = "VISADAPT_DEBUG"
EXIT_USER_ERROR = 2

T = TypeVar("T")


class UserError(Exception):
    """An error the user can fix; the message names the file or setting and what to do."""


class UnsafeCheckpointError(UserError):
    """A checkpoint asks for code to run (a pickled object, or classes to instantiate) and is refused."""


class CorruptFileError(UserError, ValueError):
    """A file is truncated or not in the expected format; the message names it."""


def debug_enabled() -> bool:
    """``VISADAPT_DEBUG`` is set to something other than ``""`` / ``0``."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


USER_ERROR_TYPES: tuple[type[BaseException], ...] = (
    UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError, KeyError,
    NotImplementedError)
"""What the package raises for bad paths, values and names (``data.base.BadImageError`` is a ``ValueError``); their
messages name the setting. A bug raising one of them still gets its traceback with ``VISADAPT_DEBUG=1``. Callers in
higher layers add their own types (the CLI adds Lightning's ``MisconfigurationException``), so this core module
imports no other layer."""


def _root_cause(err: BaseException) -> BaseException:
    """jsonargparse wraps an error raised while instantiating a class ("Does not validate against any of the Union
    subtypes ... Given value: <the whole config>"); the message worth showing is the one it wraps."""
    seen = {id(err)}
    while "Does not validate against any of the Union subtypes" in str(err) or "Problem with given class_path" \
            in str(err):
        inner = err.__cause__ or err.__context__
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        err = inner
    return err


def user_message(err: BaseException) -> str:
    """The text of ``err`` without wrappers (``KeyError`` quotes its argument; this does not)."""
    err = _root_cause(err)
    text = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    return str(text).strip() or type(err).__name__


@contextmanager
def report_user_errors(prog: str = "visadapt",
                       extra_types: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Run a block; a user error (:data:`USER_ERROR_TYPES` plus ``extra_types``) becomes ``<prog>: error:
    <message>`` on stderr and ``SystemExit(2)``.

    With ``VISADAPT_DEBUG=1`` the exception propagates unchanged (full traceback).
    """
    try:
        yield
    except USER_ERROR_TYPES + tuple(extra_types) as err:
        if debug_enabled():
            raise
        print(f"{prog}: error: {user_message(err)}", file=sys.stderr)
        print(f"(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None


def call_reporting_user_errors(fn: Callable[[], T], prog: str = "visadapt") -> T:
    """``fn()`` inside :func:`report_user_errors`."""
    with report_user_errors(prog):
        return fn()


__all__ = ["CorruptFileError", "DEBUG_ENV", "UnsafeCheckpointError", "UserError", "debug_enabled",
           "report_user_errors", "user_message"]
