"""Output directories the workbench writes: checked before any work, staged, moved into place at the end.

    out = check_output("runs/w4a8", "workbench-run", force=False, sources=[])   # before the long work
    with staged_output(out, "workbench-run") as tmp:                             # write everything into tmp,
        ...                                                                       # manifest.json last
    # on success tmp's files are in `out`; on an exception `out` is as it was

Rules (what a user can rely on):
* a non-empty `out` is refused unless it holds an earlier output of the same kind (its manifest's
  `format`) and `force` is given; then only the files that output's manifest lists (and the manifest) are
  replaced: anything else the user put there stays;
* `out` equal to, inside or around one of the `sources` (the directory a command reads) is refused;
* an unwritable location is found before the work starts;
* files are written to a staging directory next to `out`; only when all are written are they moved in
  (a new `out` is one rename; an existing one loses its old manifest first, so a crash mid-way never leaves
  a directory that reads as a valid output).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from workbench.io.manifest import ManifestError, read_json_manifest, safe_name

MANIFEST = "manifest.json"
STAGING_PREFIX = ".workbench-staging-"


class OutputError(ValueError):
    """An output location the command will not write to; the message says why and what to do."""


def _owned_files(out: Path, kind: str) -> list[str] | None:
    """Files an earlier output of `kind` in `out` lists (manifest first), or None when `out` holds none."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_json_manifest(path)
    except (ManifestError, OSError):
        return None
    if manifest.get("format") != kind:
        return None
    files = manifest.get("files")
    names = list(files) if isinstance(files, dict) else [f.get("name") for f in files or [] if isinstance(f, dict)]
    try:
        return [MANIFEST, *(str(safe_name(n, path)) for n in names)]
    except ManifestError:
        return None


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_writable(path: Path) -> None:
    """Raise OutputError unless a file can be created in `path` or (when it does not exist yet) in its
    nearest existing parent."""
    probe_dir = path
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OutputError(f"{probe_dir} is a file, so {path} cannot be created there: choose another --out")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe_dir, prefix=".workbench-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"cannot write to {probe_dir} ({e.strerror or e}): choose a writable --out") from None


def check_output(out: str | Path, kind: str, force: bool = False, sources: Iterable[str | Path] = (),
                 what: str = "--out", own: Iterable[str] = ()) -> Path:
    """`out` as a Path after the checks of the module docstring (nothing is written). `own`: names of entries
    of `out` the command itself manages (e.g. its checkpoint folder), which do not make `out` "not empty"."""
    out = Path(out).expanduser()
    resolved = out.resolve()
    for src in sources:
        s = Path(src).expanduser().resolve()
        if _related(resolved, s):
            raise OutputError(f"{what} {out} is the same as, inside or around {src}, which this command reads: "
                              f"choose a {what} outside it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory: choose another {what}")
    own = set(own)
    if out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(STAGING_PREFIX) and p.name not in own):
        owned = _owned_files(out, kind)
        if owned is None:
            raise OutputError(
                f"{out} is not empty and holds no earlier output of this command ({kind}): choose an empty or new "
                f"{what} (--force only replaces an earlier output of the same command, never other files)")
        if not force:
            raise FileExistsError(f"{out} holds an earlier output ({kind}): choose another {what}, or pass --force "
                                  f"to replace it (only the {len(owned)} files its manifest lists are replaced)")
    check_writable(out)
    return out


def _staging_dir(out: Path) -> Path:
    parent = out.parent if out.parent != Path("") else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    return parent / f"{STAGING_PREFIX}{out.name}-{uuid.uuid4().hex[:8]}"


@contextmanager
def staged_output(out: str | Path, kind: str) -> Iterator[Path]:
    """A fresh staging directory to write the whole output into; moved into `out` when the block ends
    without an exception, removed otherwise (see module docstring)."""
    out = Path(out)
    tmp = _staging_dir(out)
    tmp.mkdir()
    try:
        yield tmp
        commit(tmp, out, kind)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def commit(tmp: Path, out: Path, kind: str) -> None:
    """Move the staged files of `tmp` into `out`, replacing only an earlier output of `kind` there."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = _owned_files(out, kind) or []
    for name in old:  # the manifest first: from here on `out` does not read as a valid output
        p = out / name
        if p.is_file() or p.is_symlink():
            p.unlink()
    for name in old[1:]:  # now-empty folders the old output created
        parent = (out / name).parent
        while parent != out and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    new = sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: p.name == MANIFEST)
    for src in new:  # the manifest last
        dst = out / src.relative_to(tmp)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


__all__ = ["OutputError", "check_output", "check_writable", "commit", "staged_output"]
