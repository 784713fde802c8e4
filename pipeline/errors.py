"""The project's user errors: bad input or an environment to fix, reported by ``pipeline.cli`` as one line
``error: <message>`` with exit code 2 (docs/design.md#error-handling).

Every type here derives from :class:`StudyInputError` (a ``ValueError``, so callers that catch bad values
still do). Anything else that escapes a study is a bug and keeps its traceback: an unexpected ``ValueError``
deep in a run is not turned into an input error. The few phases that only check input (building the
study's config from the flags, the driver's checks before anything is written) convert the errors of the
libraries they call with :func:`as_input_error`.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator
from typing import Any


class StudyInputError(ValueError):
    """The study cannot run with this input or environment; the message is one line saying what to fix."""


class StudyError(StudyInputError, RuntimeError):
    """The study cannot run as configured (Ray address, resources, vanished teacher data)."""


class TrackingError(StudyInputError, RuntimeError):
    """The tracking backend cannot be used; the message is one line saying what to fix."""


class CacheCorruptError(StudyInputError, RuntimeError):
    """A cached dataset's file is missing, truncated, altered or unreadable; it is never used silently."""


class TeacherGenerationError(StudyInputError, RuntimeError):
    """Generating teacher data failed; nothing was published (the chained exception says why)."""


class StudyRunningError(StudyInputError, RuntimeError):
    """Another process holds the study's lock; the message names it."""


@contextlib.contextmanager
def as_input_error(*kinds: type[BaseException]) -> Iterator[None]:
    """Inside the block, a ``ValueError`` or ``OSError`` (or ``kinds``) is bad input: re-raised as a
    StudyInputError with the first line of its message, the original chained. Use it only around code that
    checks input, never around a whole run."""
    try:
        yield
    except StudyInputError:
        raise
    except (ValueError, OSError, *kinds) as err:
        raise StudyInputError(first_line(err)) from err


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    """``owner.name`` must be an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise StudyInputError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}")
