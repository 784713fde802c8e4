"""Storage primitives of content-addressed datasets on any pyarrow filesystem.

A dataset is a folder ``<root>/<key>/`` holding data files and a ``manifest.json`` that lists every
file with its size and sha256. The manifest is written last and atomically (temporary name, then a
move), so it is the commit point: a folder without a manifest is an unfinished or crashed write and is
never read. Files are verified against the manifest on load; a mismatch raises
:class:`CacheCorruptError` naming the file.

Concurrency: on a local filesystem (also ``file://`` URIs, and NFS with working POSIX locks) writers
of one key serialise on an OS file lock ``<root>/<key>.lock`` (deleted by its holder on release), so two
requests never generate twice.
Object stores (s3://, gs://) offer no create-if-absent through pyarrow, so there is no lock there:
two concurrent writers may both compute, each into its own attempt folder, and each checks for a
published manifest just before publishing its own; readers therefore always see one complete
dataset (the data are deterministic, so either writer's files are the same rows).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from pipeline.errors import CacheCorruptError
from pipeline.fileio import exclusive_lock

MANIFEST_NAME = "manifest.json"
_REMEDY = "delete the dataset folder <root>/<key>/ (TeacherCache.delete(key)) to regenerate it"


def canonical_json(value: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace, no NaN) for hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def resolve_root(root: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` of a local folder or any pyarrow filesystem URI (``file://``, ``s3://``, ...)."""
    text = os.fspath(root)
    if "://" not in text:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))
    try:
        filesystem, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as err:
        raise ValueError(f"root {text!r} is not a filesystem URI pyarrow understands ({err}); pass a local folder or e.g. s3://bucket/prefix") from None
    return filesystem, path.rstrip("/")


def write_atomic(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` under a temporary name first, then move it into place."""
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with filesystem.open_output_stream(tmp) as out:
        out.write(data)
    try:
        filesystem.move(tmp, path)
    except BaseException:
        delete_quietly(filesystem, tmp)
        raise


def delete_quietly(filesystem: pafs.FileSystem, path: str) -> None:
    """Best-effort removal of a file or folder (cleanup after a failure must not hide the failure)."""
    with contextlib.suppress(OSError):
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            filesystem.delete_dir(path)
        elif info.type == pafs.FileType.File:
            filesystem.delete_file(path)


def write_parquet_part(filesystem: pafs.FileSystem, folder: str, name: str, table: pa.Table) -> dict[str, Any]:
    """Serialise ``table`` as Parquet into ``folder/name``; return its manifest record (name, rows, size, sha256)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    with filesystem.open_output_stream(f"{folder}/{name}") as out:
        out.write(data)
    return {"path": name, "num_rows": table.num_rows, "size": len(data), "sha256": sha256_hex(data)}


def read_verified(filesystem: pafs.FileSystem, folder: str, record: dict[str, Any]) -> bytes:
    """The bytes of a manifest-listed file, after checking its size and sha256."""
    path = f"{folder}/{record['path']}"
    try:
        with filesystem.open_input_stream(path) as stream:
            data = stream.read()
    except (FileNotFoundError, OSError) as err:
        raise CacheCorruptError(f"cached file {path} listed in the manifest cannot be read ({err}); {_REMEDY}") from None
    if len(data) != record["size"]:
        raise CacheCorruptError(
            f"cached file {path} has {len(data)} bytes, the manifest says {record['size']} (truncated or rewritten); {_REMEDY}"
        )
    if sha256_hex(data) != record["sha256"]:
        raise CacheCorruptError(f"cached file {path} does not match its sha256 checksum in the manifest (altered); {_REMEDY}")
    return data


def read_verified_parquet(filesystem: pafs.FileSystem, folder: str, record: dict[str, Any]) -> pa.Table:
    """A manifest-listed Parquet file as a table, verified (see :func:`read_verified`)."""
    data = read_verified(filesystem, folder, record)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise CacheCorruptError(f"cached file {folder}/{record['path']} is not readable Parquet ({err}); {_REMEDY}") from None
    if table.num_rows != record["num_rows"]:
        raise CacheCorruptError(f"cached file {folder}/{record['path']} has {table.num_rows} rows, the manifest says {record['num_rows']}; {_REMEDY}")
    return table


def read_manifest(filesystem: pafs.FileSystem, folder: str) -> dict[str, Any] | None:
    """The manifest of the dataset in ``folder``; None when there is none (nothing was published there)."""
    path = f"{folder}/{MANIFEST_NAME}"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with filesystem.open_input_stream(path) as stream:
            manifest = json.loads(stream.read())
    except (OSError, ValueError) as err:
        raise CacheCorruptError(f"manifest {path} is unreadable ({err}); {_REMEDY}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise CacheCorruptError(f"manifest {path} has no file list; {_REMEDY}")
    return manifest


def publish_manifest(filesystem: pafs.FileSystem, folder: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest last and atomically, making the dataset visible; return it as read back from JSON."""
    text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False)
    write_atomic(filesystem, f"{folder}/{MANIFEST_NAME}", text.encode())
    return json.loads(text)


@contextlib.contextmanager
def exclusive(filesystem: pafs.FileSystem, lock_path: str, timeout: float | None = None) -> Iterator[bool]:
    """Hold the writer lock of one dataset: an OS file lock on local filesystems, nothing elsewhere (module doc).

    Yields whether the lock is real, i.e. whether no other writer can be active, so that leftovers of
    crashed writers may be deleted.
    """
    if not isinstance(filesystem, pafs.LocalFileSystem):
        yield False
        return
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with exclusive_lock(lock_path, timeout):
        yield True
