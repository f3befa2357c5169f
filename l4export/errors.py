"""One error hierarchy. Every error the CLI can show is an L4ExportError: one line, with an exit code.

Exit codes: 2 for usage errors (the user asked for something wrong), 1 for bad data (the files are wrong)
and for parity failures.
"""

from __future__ import annotations


class L4ExportError(Exception):
    """Base class. ``str(err)`` is the whole one-line message shown to the user."""

    exit_code = 1


class UsageError(L4ExportError):
    """The request cannot be honoured as asked (bad path, bad option combination)."""

    exit_code = 2


class SpecError(L4ExportError):
    """config.json is missing a value or has one that is not Llama 4."""


class NotLlama4Error(UsageError):
    """The checkpoint is another architecture."""


class CheckpointError(L4ExportError):
    """A safetensors file, index or tensor is broken or missing."""


class MappingError(CheckpointError):
    """Tensor names or shapes do not match the Llama 4 name table."""


class RecipeError(UsageError):
    """A quantization recipe is malformed."""


class CapabilityError(UsageError):
    """The target cannot run what was asked (dtype, op, device)."""


class ParityError(L4ExportError):
    """An export disagrees with the reference beyond its thresholds."""


class ExportError(L4ExportError):
    """An export folder is damaged or incomplete (a file missing, truncated or not what l4export wrote)."""


class ImageError(L4ExportError):
    """An image cannot be read, or does not fit the prompt or the export (exit 1: the input data is wrong)."""
