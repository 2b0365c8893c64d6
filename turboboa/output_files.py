"""Safe output files: a writable location and enough free space checked before large writes, and every file
written under a temporary name in its target folder, then renamed into place (nothing half-written is ever
left under the final name). The temporaries of ``target`` are named ``.<target name>.<random>.tmp`` (files)
and ``.<target name>.tmp-<random>`` / ``.<target name>.old-<random>`` (folders); a write that was killed
leaves them, and the next write of ``target`` removes them (:func:`remove_stale_temporaries`).

:func:`kill_point` is the one test hook: with ``TURBOBOA_KILL_AT=<point>`` the process SIGKILLs itself at that
named point of a write, so tests see what a real kill leaves behind.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

# free space kept beyond the estimate of a write (file system metadata, temporary copies, rounding)
SPACE_MARGIN_BYTES = 16 * 2**20
SPACE_MARGIN_SHARE = 0.05
KILL_ENV = "TURBOBOA_KILL_AT"


def kill_point(name: str, flush: Callable[[], object] | None = None) -> None:
    """Test hook: when the environment variable :data:`KILL_ENV` equals ``name``, call ``flush`` (so what was
    written so far reaches the file) and kill this process with SIGKILL: nothing runs after it (no
    ``finally``, no ``atexit``). Otherwise one environment lookup. The points: ``solve:<block>`` (the block's
    layers solved, its state not yet committed), ``state-write:<block>`` (half of the resume state's
    temporary file written), ``qdir-write`` (the QDIR's tensors written into its temporary folder) and
    ``export:gguf`` (the GGUF file's header and metadata written under its temporary name)."""
    if name and os.environ.get(KILL_ENV) == name:
        if flush is not None:
            flush()
        os.kill(os.getpid(), signal.SIGKILL)


def existing_ancestor(path: Path) -> Path:
    """The nearest path at or above ``path`` that exists (where new folders would be created)."""
    probe = Path(os.path.abspath(path))
    while not probe.exists():
        probe = probe.parent
    return probe


def check_writable(output: str | os.PathLike[str]) -> None:
    """A UserError unless ``output`` can be created or replaced: its nearest existing ancestor must be a
    writable folder."""
    folder = existing_ancestor(Path(output).parent)
    if not folder.is_dir():
        raise UserError(f"cannot write {output}: {folder} is a file, not a folder; choose another -o location")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {output}: {folder} is not writable (permission denied); choose another "
                        f"-o location")


def check_free_space(output: str | os.PathLike[str], needed: int, what: str = "the output") -> None:
    """A UserError when the file system of ``output`` has less free space than ``needed`` bytes plus a
    margin (:data:`SPACE_MARGIN_BYTES`, :data:`SPACE_MARGIN_SHARE`); checked before a large write."""
    folder = existing_ancestor(Path(output).parent)
    if not folder.is_dir():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    want = int(needed * (1 + SPACE_MARGIN_SHARE)) + SPACE_MARGIN_BYTES
    if free < want:
        raise UserError(f"not enough free space in {folder} for {what}: {_mib(free)} free, about {_mib(want)} "
                        f"needed; free some space or choose another -o location")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def prepare_output(output: str | os.PathLike[str], needed: int, what: str = "the output") -> None:
    """Both checks of a large write into ``output``: writable location, then free space for ``needed`` bytes."""
    check_writable(output)
    check_free_space(output, needed, what)


def os_error_message(e: OSError, target: str | os.PathLike[str]) -> str:
    """One line for an OSError met while writing ``target`` (disk full, permission, read-only file system)."""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device while writing {target}; free some space or choose another location"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {target} ({e.strerror}); choose another -o location"
    return f"cannot write {target} ({e.strerror or e}); check the output location"


@contextmanager
def write_errors_as_user_errors(target: str | os.PathLike[str]) -> Iterator[None]:
    """Turn the OSErrors of a write (disk full, permission denied, ...) into one-line UserErrors."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT):
            raise UserError(os_error_message(e, target)) from None
        raise


@contextmanager
def atomic_file(path: str | os.PathLike[str], mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it is renamed to ``path`` (one atomic
    rename), otherwise removed. Write errors of the file system become one-line UserErrors."""
    path = Path(path)
    with write_errors_as_user_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str, kill_at: str = "") -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_file`; ``kill_at`` names the
    :func:`kill_point` met when half of it is written."""
    data = text.encode("utf-8")
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
        kill_point(kill_at, f.flush)
        f.write(data[len(data) // 2 :])
    return Path(path)


def remove_stale_temporaries(target: str | os.PathLike[str]) -> None:
    """Remove what killed writes of ``target`` left beside it: its temporary files (``.<name>.*.tmp``) and
    temporary or set-aside folders (``.<name>.tmp-*``, ``.<name>.old-*``). Called before ``target`` is written
    again."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    name = glob.escape(target.name)
    for pattern in (f".{name}.*.tmp", f".{name}.tmp-*", f".{name}.old-*"):
        for stale in target.parent.glob(pattern):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def replace_folder(tmp: Path, path: Path) -> None:
    """Move the complete folder ``tmp`` to ``path``; an existing ``path`` is first renamed aside (so the name
    never holds a mix of old and new files) and removed once the new folder is in place."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / path.name)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old / path.name, path)  # put the previous folder back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
