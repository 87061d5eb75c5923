"""The library's one error class, and the warning for inversion drift."""

from __future__ import annotations

__all__ = ["InertiaError", "InversionError", "InversionWarning"]


class InertiaError(RuntimeError):
    """A momentum network was used in a way it cannot support; the message says what to change."""


class InversionError(InertiaError):
    """The memory-free backward reconstructed the stack's input with more drift than allowed."""


class InversionWarning(UserWarning):
    """Like `InversionError`, issued instead when ``check_inversion="warn"``."""
