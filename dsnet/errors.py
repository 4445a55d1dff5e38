"""The one user-error type of dsnet.

``UserError`` is raised for anything the user can fix: a bad config key or value, a missing or
unusable dataset, checkpoint or output folder, a command-line value out of range. Its message is
one sentence naming what was wrong and what is accepted. The ``dsnet`` command prints it on one
line and exits with status 2; any other exception is a bug in dsnet and keeps its traceback.

It subclasses ``ValueError`` so that callers catching ``ValueError`` keep working.
"""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """An error caused by the user's input; the message is one sentence naming it."""
