"""Building blocks of the job file's schema, shared by config.py, the methods and the defences.

Kept apart from config.py so that a method or a defence can declare its own config class (beside its
code, in its own file) without importing the job config that collects them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict

DataFormat = Literal["alpaca", "chat", "text", "tokenized"]

# Path markers, read by distrib_ft.job.resolve: an ``InputPath`` must exist and becomes absolute (relative
# paths resolve against the job file, then the working directory, then the project); an ``OutputPath``
# becomes absolute against the working directory; a ``StorePath`` resolves like an input when it exists,
# like an output otherwise. URLs (``scheme://...``) are left as they are.


@dataclass(frozen=True)
class PathKind:
    """Marks a config field as a path: ``input`` (must exist), ``output`` (relative to the working directory;
    may not exist yet) or ``store`` (a folder that may exist already, e.g. a replay buffer, or a URL)."""

    kind: Literal["input", "output", "store"]


InputPath = Annotated[str, PathKind("input")]
OutputPath = Annotated[str, PathKind("output")]
StorePath = Annotated[str, PathKind("store")]


class Strict(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    """A job config that cannot run; the message is one line naming the file and the key."""
