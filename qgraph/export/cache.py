"""A content-addressed cache for exports and dequantized GGUF checkpoints.

An export is a pure function of the model's files, the export options, the
library versions and qgraph's own export code, so its result is stored under
a hash of exactly those (:func:`key_of`) and a second request is a lookup.

* **Content, not names.** Model files are identified by the SHA-256 of their
  bytes, so the same checkpoint reached through another path (a re-created
  venv, a copy) hits the same entry. Hashing 500 MB takes about a second, so
  each digest is remembered under the file's ``(path, size, mtime, inode)``:
  asking again about an unchanged file costs one ``stat``.
* **Versions and code are part of the key.** A new torch, transformers or
  onnx, or an edit to ``qgraph/export``, gives new keys; stale entries are
  simply never asked for again.
* **Entries appear atomically.** An entry is built in a staging folder inside
  the cache and renamed into place, and a per-key lock makes a second process
  (a pytest-xdist worker, a parallel CLI call) wait for the first instead of
  repeating its work.

The cache root is ``$QGRAPH_CACHE``, else ``$XDG_CACHE_HOME/qgraph``, else
``~/.cache/qgraph``. Nothing is ever evicted; deleting the folder is safe
whenever no qgraph process is running.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CACHE_ENV",
    "cache_root",
    "code_digest",
    "entry_path",
    "file_digest",
    "key_of",
    "library_versions",
    "locked",
    "make_temp_folder",
    "publish",
    "remember",
    "staging_folder",
]

#: Environment variable naming the cache folder.
CACHE_ENV = "QGRAPH_CACHE"

#: Distributions whose version changes what an export produces.
_VERSIONED = ("torch", "transformers", "onnx", "onnxscript", "onnx-ir", "tokenizers", "gguf", "qgraph")

_CHUNK = 1 << 22


def cache_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``explicit``, ``$QGRAPH_CACHE``, ``$XDG_CACHE_HOME/qgraph`` or ``~/.cache/qgraph``."""
    if explicit is not None:
        return Path(explicit).expanduser().resolve()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "qgraph").resolve()


def file_digest(path: str | os.PathLike[str], root: Path, pending: list[tuple[Path, str]] | None = None) -> str:
    """SHA-256 of a file's bytes, remembered under its stat so an unchanged file is hashed once.

    With ``pending``, a new digest is not written to the cache but appended
    there as ``(memo path, digest)`` for :func:`remember` to write later, so a
    request that turns out to be bad input leaves the cache untouched.
    """
    real = os.path.realpath(path)
    info = os.stat(real)
    identity = f"{real}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_ino}\0{info.st_dev}"
    memo = root / "digests" / hashlib.sha256(identity.encode()).hexdigest()
    with contextlib.suppress(OSError):
        remembered = memo.read_text(encoding="ascii").strip()
        if len(remembered) == 64:
            return remembered
    sha = hashlib.sha256()
    with open(real, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
    digest = sha.hexdigest()
    if pending is not None:
        pending.append((memo, digest))
    else:
        remember([(memo, digest)])
    return digest


def remember(memos: list[tuple[Path, str]]) -> None:
    """Write digest memos collected by :func:`file_digest` (``pending``)."""
    # A memo is a fact about an unchanged file, never required: failing to
    # write it (read-only cache) only costs a re-hash next time.
    for memo, digest in memos:
        with contextlib.suppress(OSError):
            memo.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(memo, digest)


@functools.cache
def library_versions() -> dict[str, str]:
    """Versions of the libraries an export depends on, read from package metadata (no imports)."""
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


@functools.cache
def code_digest() -> str:
    """SHA-256 over qgraph/export's own sources: editing the export code invalidates its entries."""
    sha = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        sha.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return sha.hexdigest()


def key_of(parts: Mapping[str, Any]) -> str:
    """A stable hex key for JSON-serializable ``parts`` (dict order does not matter)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def entry_path(root: Path, kind: str, key: str) -> Path:
    """Where the entry ``key`` of ``kind`` ("exports", "gguf", ...) lives, whether or not it exists."""
    return root / kind / key


@contextlib.contextmanager
def locked(root: Path, kind: str, key: str, *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock of one entry; ``on_wait`` is called once if another process holds it."""
    folder = root / kind / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{key}.lock", "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def make_temp_folder(parent: Path, prefix: str) -> Path:
    """A new uniquely named folder in ``parent`` with the umask's permissions.

    Unlike ``tempfile.mkdtemp`` (always 0700), a folder that is renamed into
    place as a result must end up with the permissions a plain mkdir gives.
    """
    while True:
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def staging_folder(root: Path, kind: str) -> Path:
    """A fresh folder on the cache's filesystem to build an entry in (then :func:`publish` it)."""
    parent = root / kind
    parent.mkdir(parents=True, exist_ok=True)
    return make_temp_folder(parent, ".staging-")


def publish(staging: Path, final: Path) -> Path:
    """Move a finished staging folder to ``final``, replacing an older entry there.

    Call it while holding :func:`locked` for the key. The replaced entry is
    renamed aside before the new one moves in, so readers see the old or the
    new entry, never a mix.
    """
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(staging, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
