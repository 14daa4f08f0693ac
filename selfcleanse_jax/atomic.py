"""Files that a kill at any moment leaves whole or absent, never half-written.

A file is written to a temporary sibling, flushed to disk and renamed over its name
(`replacing`, `write_text`; `replacing_path` for writers that take a file name), or grows by
whole lines, each flushed to disk before the call returns (`append_line`); `read_jsonl` reads
such a file back, dropping a last line that a kill tore. A folder is built in a hidden
sibling (`staging_folder`) and moved into place only when whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write (its name ends as `path`'s does, so writers that
    read the format from the suffix still can); it replaces `path`, flushed to disk, when the
    block ends without an error, and is removed on an error, `path` left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{os.getpid()}.partial.{path.name}")
    try:
        yield partial
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as error:  # a full disk, say: the message names the file it was writing
        partial.unlink(missing_ok=True)
        raise _naming(error, path) from error
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


@contextlib.contextmanager
def replacing(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file opened for writing whose content replaces `path` when the block ends without
    an error (`replacing_path`)."""
    with replacing_path(path) as partial, open(partial, mode) as f:
        yield f


@contextlib.contextmanager
def staging_folder(target: str | Path) -> Iterator[Path]:
    """A new hidden sibling folder of `target`, readable like any folder, to build `target`
    in; whatever the block leaves there is removed when it ends (move it into place first)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _naming(error: OSError, path: Path) -> OSError:
    """`error` with `path` as its file name, when it names none."""
    if error.filename:
        return error
    if error.errno is None:  # raised with a message only: keep it
        return OSError(f"{path}: {error}")
    return OSError(error.errno, error.strerror, str(path))


def write_text(path: str | Path, text: str) -> Path:
    """Replace `path` with `text` in one step (`replacing`)."""
    with replacing(path) as f:
        f.write(text)
    return Path(path)


def append_line(path: str | Path, line: str) -> None:
    """Append `line` and a newline to `path`, on disk when this returns."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        raise _naming(error, Path(path)) from error


def read_jsonl(path: str | Path) -> tuple[list[dict], str | None]:
    """The JSON objects of a JSON-lines file, and a note when its last line was torn (a kill
    cut it short while it was written, before its newline) and so dropped.

    A line that is not JSON but ends with a newline is a ValueError naming the file and line.
    """
    path = Path(path)
    *lines, tail = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number}: not JSON ({error.msg})") from None
    note = None
    if tail:
        note = f"{path}: dropped a torn last line ({len(tail)} characters after line {len(lines)})"
    return records, note
