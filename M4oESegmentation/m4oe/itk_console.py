"""ITK's console output and SimpleITK's exceptions, made into one-line messages.

ITK's C++ code prints warnings (and some errors) on the process's stderr, past Python;
:func:`_itk_warnings` catches them around a read so that each becomes one line of the reader's
warnings, and :func:`_sitk_reason` turns a SimpleITK exception into its one-line reason.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _sitk_reason(error: RuntimeError) -> str:
    """The last line of a SimpleITK exception, without its C++ source location (one line)."""
    # MetaImage adds "Reason: <errno text>", which is misleading ("No such file or directory" for a
    # truncated file); the line before it says what failed.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Reason:")]
    reason = lines[-1] if lines else "unknown error"
    for prefix in ("sitk::ERROR:", "ITK ERROR:", "[nrrd]"):
        reason = reason.removeprefix(prefix).strip()
    return re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", reason)[:300]


def _read_failure(console: list[str], error: RuntimeError) -> str:
    """Why a read failed: what the reader printed (MetaIO says which data were short, where
    SimpleITK's exception says only "File cannot be read"), else the exception's last line."""
    return "; ".join(console) or _sitk_reason(error)


# ITK's console warning: "WARNING: In FILE, line N\nClass (0xADDRESS): message...\n\n".
_ITK_WARNING = re.compile(r"WARNING: In [^\n]*, line \d+\n(.*?)(?:\n[ \t]*\n|\Z)", re.DOTALL)
# ITK warnings that the checks here already report in their own words.
_ITK_WARNINGS_REPORTED = ("unexpected scales in sform", "Non uniform sampling or missing slices")


@contextlib.contextmanager
def _itk_warnings(path: Path, warnings: list[str], *, keep_other: bool = False) -> Iterator[list[str]]:
    """Catch what ITK prints on the process's stderr during the block (file descriptor 2: its C++
    output goes there, past Python) and add each multi-line ITK warning to ``warnings`` as one
    line, ``"PATH: ITK: message"``, once. Anything else it caught is written back to stderr, unless
    the block raised or ``keep_other`` is set: then it goes, as one line, into the list the block
    received (``with _itk_warnings(path, warnings) as console:``), for the caller's error message.
    A failed read must print one line, the error, not first what the reader printed (MetaIO:
    "MetaImage: M_ReadElementsData: data not read completely" and the byte counts on a line of
    their own)."""
    console: list[str] = []
    if sys.stderr is not None:
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (a process without a console): nothing reaches a terminal
        yield console
        return
    failed = False
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield console
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
            for match in _ITK_WARNING.finditer(text):
                message = " ".join(match.group(1).split())
                message = re.sub(r"^\w+ \(0x[0-9a-fA-F]+\):\s*", "", message)
                line = f"{path}: ITK: {message[:300]}"
                if not any(known in message for known in _ITK_WARNINGS_REPORTED) and line not in warnings:
                    warnings.append(line)
            rest = _ITK_WARNING.sub("", text).strip()
            if rest and (failed or keep_other):
                console.append(" ".join(rest.split())[:300])
            elif rest and sys.stderr is not None:
                sys.stderr.write(rest + "\n")
