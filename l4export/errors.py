"""One error hierarchy. Every error the CLI can show is an L4ExportError: one line, with an exit code.

Exit codes: 2 for usage errors (the user asked for something wrong), 1 for bad data (the files are wrong)
and for parity failures.
"""

from __future__ import annotations

import re

MAX_LINE = 200  # characters of the one error line the CLI prints ("error: " included)
MORE = " (-v for the full message)"  # ends a line that was shortened; -v logs the whole message


class L4ExportError(Exception):
    """Base class. ``str(err)`` is the whole one-line message shown to the user; ``detail``, when set, the full
    message of the library error it wraps (the CLI shows it with -v)."""

    exit_code = 1
    detail: str | None = None


def one_line(text: str) -> str:
    """``text`` on one line: its lines joined, runs of blanks as one space."""
    return re.sub(r"\s+", " ", text).strip()


def shorten(text: str, width: int) -> str:
    """``text`` on one line in at most ``width`` characters: its start, " ... ", and its last few words."""
    text = one_line(text)
    if len(text) <= width:
        return text
    tail = min(width // 4, 30)
    head = max(width - tail - 5, 1)
    return text[:head].rstrip() + " ... " + text[len(text) - tail :].lstrip()


def short_path(path: object, width: int = 40) -> str:
    """A path in at most ``width`` characters: its end (the export's own folder) when it is longer."""
    text = str(path)
    return text if len(text) <= width else "..." + text[len(text) - width + 3 :]


_ORT = re.compile(r"running (?P<op>\S+) node\. Name:'(?P<node>[^']*)' Status Message: (?P<msg>.*)", re.S)


def library_message(err: BaseException) -> str:
    """The gist of a library's error on one line (ONNX Runtime's kernel failures: "OP: MESSAGE")."""
    text = one_line(str(err)) or type(err).__name__
    m = _ORT.search(text)
    return f"{m['op']}: {m['msg']}" if m else text  # the node's name is in the full message


def wrap(cls: type[L4ExportError], where: object, what: str, err: BaseException, fix: str) -> L4ExportError:
    """``cls`` with the line "WHERE: WHAT (GIST); FIX", GIST the library error ``err``'s, shortened (and the line
    ending with MORE) so that "error: " + the line fits MAX_LINE; ``detail`` keeps ``err``'s whole message."""
    head, gist, tail = f"{short_path(where)}: {what} (", library_message(err), f"); {fix}"
    room = MAX_LINE - len("error: ") - len(head) - len(tail)
    if len(gist) > room:  # its start says what failed
        gist, tail = gist[: max(room - len(MORE) - 4, 20)].rstrip() + " ...", tail + MORE
    e = cls(head + gist + tail)
    e.detail = f"{type(err).__name__}: {one_line(str(err))}"
    return e


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


class ExportError(L4ExportError):
    """An export folder is damaged or incomplete (a file missing, truncated or not what l4export wrote)."""


class ImageError(L4ExportError):
    """An image cannot be read, or does not fit the prompt or the export (exit 1: the input data is wrong)."""
