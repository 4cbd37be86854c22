"""All-or-nothing output: write to a temporary sibling, then rename.

A run that fails half-way must leave no partial file or folder behind, so every
writer in regsam goes through :func:`atomic_path` (files) or :func:`atomic_dir`
(folders such as a case folder or a registration output folder).

A writer killed outright (``kill -9``, power loss) cannot clean up: its temporary (a hidden sibling
named after the target and the writer's process id) stays, but the target itself is never partial.
The next writer of the same target removes the temporaries of writers that no longer run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _suffixes(path: Path) -> str:
    # Keep the full suffix (".nii.gz") so writers that pick a format by extension still work.
    return "".join(path.suffixes)


def _prefix(target: Path) -> str:
    """Start of a temporary's name: hidden, the target's name and this process's id."""
    return f".{target.name}.pid{os.getpid()}."


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` left by writers that were killed; return what was removed."""
    target = Path(path)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:pid(\d+)\..*\.tmp.*|old\.(\d+))$")
    removed = []
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or _running(int(match.group(1) or match.group(2))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp_name = tempfile.mkstemp(prefix=_prefix(target), suffix=f".tmp{_suffixes(target)}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; give the result the permissions an ordinary open() would.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; move it onto ``path`` on success.

    An existing ``path`` is replaced only once the new content is complete
    (``overwrite=False`` keeps files of an existing folder that are not rewritten).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary output folder
    try:
        yield tmp
        if target.exists():
            if overwrite:
                old = target.with_name(f".{target.name}.old.{os.getpid()}")
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                for item in tmp.iterdir():
                    os.replace(item, target / item.name)
                tmp.rmdir()
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
