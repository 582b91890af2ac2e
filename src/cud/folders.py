"""Output folders shared by every stage: one writer at a time, files replaced atomically, and an
``--out`` that never holds what the command reads.

- :func:`folder_lock`: an exclusive ``flock`` on ``<folder>/.lock`` held while a stage writes
  into the folder. A second process asking for it is refused at once (:class:`StoreError`, one
  line naming the folder), so two runs into one folder never mix or overwrite each other's
  results. The kernel frees the lock when its process ends, however it ends, so a killed run
  never leaves a stale lock behind; the ``.lock`` file itself stays (removing it would let a
  third process lock a new file while the second still holds the old one). A process may take
  the lock of a folder it already holds (nested stages, one folder given twice).
- :func:`replacing`: a unique temporary file beside the target (``tempfile``), renamed over it
  when the block succeeds and removed when it fails: a killed write never leaves half a file,
  and two writers never share a temporary name.
- :func:`check_out`: refuses an ``--out`` that is, or holds, one of the command's inputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

from cud.errors import ConfigError, StoreError

LOCK = ".lock"

#: folders this process holds: resolved path -> [open lock file, depth]
_held: dict[str, list] = {}


@contextlib.contextmanager
def folder_lock(root: str | Path, *, wait: bool = False) -> Iterator[Path]:
    """Hold the exclusive lock of the folder ``root`` (created if missing) for the block.
    Another process holding it: refused at once (:class:`StoreError`), or with ``wait`` waited
    for (a short critical section, e.g. a manifest's check and write)."""
    import fcntl

    root = Path(root)
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root}: output path exists and is not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(root)
    except OSError as e:
        raise StoreError(f"{root}: cannot create the output folder ({e.strerror or e})") from None
    if key in _held:
        _held[key][1] += 1
        try:
            yield root
        finally:
            _held[key][1] -= 1
        return
    try:
        handle = open(root / LOCK, "a")
    except OSError as e:
        raise StoreError(f"{root}: cannot lock the folder ({e.strerror or e})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"{root}: another cud run is writing into this folder (it holds "
                             f"{root / LOCK}); wait for it to end or use another --out "
                             f"folder") from None
        _held[key] = [handle, 1]
        try:
            yield root
        finally:
            del _held[key]
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def folder_locks(*roots: str | Path | None) -> Iterator[None]:
    """:func:`folder_lock` of each folder given (None skipped), all held for the block."""
    with contextlib.ExitStack() as stack:
        for root in roots:
            if root is not None:
                stack.enter_context(folder_lock(root))
        yield


@contextlib.contextmanager
def replacing(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A unique temporary path in ``path``'s folder for the block to write; renamed to ``path``
    when the block ends normally, removed otherwise. ``suffix`` ends the temporary name (e.g.
    ``.npz`` for writers that add their own)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would make it (mkstemp makes it 0600)
        os.close(fd)
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temporary_folder(path: str | Path) -> Path:
    """A new uniquely named folder beside ``path`` to build it in before renaming it into
    place (with the permissions ``mkdir`` gives, not ``mkdtemp``'s 0700)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def write_bytes(path: str | Path, data: bytes, *, sync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (:func:`replacing`); ``sync``: fsync it first."""
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def stored_request(path: str | Path, request: dict, folder: str | Path, what: str
                   ) -> dict | None:
    """The JSON record at ``path`` made with ``request`` (None when there is none); refuses, in
    one line naming ``folder``, a record of another request (``what`` says what it holds, e.g.
    "a ga pilot"), so old and new results never mix."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: unreadable ({e}); use another --out folder") from None
    if stored.get("request") != request:
        old = stored.get("request", {})
        differ = sorted(k for k in set(old) | set(request) if old.get(k) != request.get(k))
        raise StoreError(f"{folder}: holds {what} of other settings (differs in: "
                         f"{', '.join(differ)}); use another --out folder so old and new "
                         f"results do not mix")
    return stored


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out(out: str | Path, inputs: Mapping[str, str | Path | None],
              option: str = "--out", writes: tuple[str, ...] = ()) -> None:
    """Refuse an output folder that is one of the ``inputs`` (``{option: path}``; None and
    what is not a path, e.g. ``builtin:20``, skipped) or holds one where the command writes
    (``writes``: the files and folders it writes inside ``out`` besides its own tables, e.g.
    ``anchors``): the command would overwrite or mix what it reads. Inputs in other folders
    under ``out`` (``--circuits cud-out/circuits --out cud-out``) are left alone, as the
    command never writes there."""
    target = Path(os.path.realpath(Path(out).expanduser()))
    for name, value in inputs.items():
        if value is None or not str(value).strip() or not Path(str(value)).expanduser().exists():
            continue  # not a path (builtin:20, a bundled model's name): nothing to overwrite
        source = Path(os.path.realpath(Path(str(value)).expanduser()))
        if source == target or any(_inside(source, target / w) for w in writes):
            raise ConfigError(f"{option} {out} holds the input {name} {value}: the command "
                              f"would overwrite what it reads; give another {option} folder")
