"""Manifests: the JSON file that says what a directory the workbench wrote holds, and how it is checked.

Both formats (run directories, `rundir`; packed exports, `packed`) use this module:

* `files`: every other file of the directory by relative name, with its byte size and sha256. A name must
  stay inside the directory (no absolute path, no `..`, no link out of it); that is checked before the
  file system is touched, so a crafted entry learns nothing about files outside the directory.
* `digest`: the sha256 of the canonical JSON of every other field, plus one hash per top-level field, so
  an edit anywhere in the manifest is an error naming the field that changed (and, through the file
  hashes, an edit of any listed file is an error naming the file). The digest has no secret: it catches
  edits and corruption; what a file may name is bounded by allow-lists, never by trust in the digest.
* `written_by`: the command that wrote the directory and the files it owns, so `--force` replaces only those.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

HASH_CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 64 * 2**20  # a manifest larger than this is not one of ours


class ManifestError(ValueError):
    """A directory whose manifest or files cannot be trusted; the message names the file or field and the fix."""


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def canonical(value: Any) -> bytes:
    """The canonical JSON bytes of plain data (sorted keys, no spaces) that digests are taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def digest_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """{"sha256": hash of all fields but `digest`, "fields": {field: hash}}."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return {"sha256": hashlib.sha256(canonical(body)).hexdigest(),
            "fields": {k: hashlib.sha256(canonical(v)).hexdigest()[:16] for k, v in sorted(body.items())}}


REDO = "re-create the directory with the command that wrote it"


def check_digest(manifest: dict[str, Any], where: Path, fix: str = REDO) -> None:
    """Raise ManifestError naming the changed field(s) when the manifest does not match its digest."""
    saved = manifest.get("digest")
    if not isinstance(saved, dict) or not isinstance(saved.get("fields"), dict):
        raise ManifestError(f"{where} has no digest: it was not written by this workbench or was modified; {fix}")
    now = digest_of(manifest)
    if now["sha256"] == saved.get("sha256"):
        return
    changed = sorted(k for k in set(now["fields"]) | set(saved["fields"])
                     if now["fields"].get(k) != saved["fields"].get(k))
    raise ManifestError(
        f"{where} was modified after it was written (changed: {', '.join(changed) or 'the digest itself'}); "
        f"the directory cannot be trusted: {fix}")


def safe_name(name: Any, where: Path, fix: str = REDO) -> PurePosixPath:
    """A listed file name as a relative POSIX path inside the directory, or ManifestError (checked as text)."""
    if not isinstance(name, str) or not name or len(name) > 255 or "\\" in name or "\x00" in name:
        raise ManifestError(f"{where} lists an invalid file name {str(name)[:80]!r}: {fix}")
    p = PurePosixPath(name)
    if p.is_absolute() or any(part in ("..", ".", "") for part in p.parts) or name.startswith("~"):
        raise ManifestError(f"{where} lists {name[:80]!r}, which is outside its directory: a manifest may only "
                            f"list files inside the directory it describes; the directory was modified: {fix}")
    return p


def inside(directory: Path, rel: PurePosixPath, fix: str = REDO) -> Path:
    """The real path of `rel` under `directory`; ManifestError when a link leads out of the directory."""
    root = directory.resolve()
    path = (root / Path(*rel.parts)).resolve()
    if path != root and root not in path.parents:
        raise ManifestError(f"{directory}: {rel} leads outside the directory (a link); the directory was modified: {fix}")
    return path


def verify_files(directory: Path, files: dict[str, dict[str, Any]], manifest_name: str, fix: str = REDO) -> None:
    """Every listed file exists inside `directory` with its recorded byte size and sha256."""
    where = directory / manifest_name
    if not isinstance(files, dict):
        raise ManifestError(f"{where}: 'files' must map file names to {{bytes, sha256}}: {fix}")
    for name, meta in files.items():
        rel = safe_name(name, where, fix)
        if not isinstance(meta, dict):
            raise ManifestError(f"{where}: entry {name!r} must be {{bytes, sha256}}: {fix}")
        if not (directory / Path(*rel.parts)).is_file():
            raise ManifestError(f"{directory / name} is missing (listed in {manifest_name}): the directory is "
                                f"incomplete: {fix}")
        path = inside(directory, rel, fix)
        size = path.stat().st_size
        if size != meta.get("bytes"):
            raise ManifestError(f"{directory / name} is truncated or corrupt ({size} bytes, {manifest_name} "
                                f"says {meta.get('bytes')}): {fix}")
        if file_sha256(path) != meta.get("sha256"):
            raise ManifestError(f"{directory / name} is corrupt or was modified (its sha256 does not match "
                                f"{manifest_name}): {fix}")


def file_entries(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """{name: {bytes, sha256}} of files written into `directory`."""
    return {n: {"bytes": (directory / n).stat().st_size, "sha256": file_sha256(directory / n)} for n in names}


def read_json_manifest(path: Path) -> dict[str, Any]:
    """A manifest file as a JSON object (size bounded, UTF-8); ManifestError naming the file otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path} is {path.stat().st_size} bytes, larger than any manifest this workbench "
                            "writes: it is not one of ours")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ManifestError(f"{path} is not UTF-8 text (a binary file?): it is not a workbench manifest") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is corrupt or truncated (not valid JSON: {e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is corrupt: expected a JSON object")
    return data


def write_manifest(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add the digest and write the manifest atomically (a temporary file renamed into place)."""
    manifest = {k: v for k, v in manifest.items() if k != "digest"}
    manifest["digest"] = digest_of(manifest)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, allow_nan=False))
    os.replace(tmp, path)
    return manifest


__all__ = ["ManifestError", "canonical", "check_digest", "digest_of", "file_entries", "file_sha256", "inside",
           "read_json_manifest", "safe_name", "verify_files", "write_manifest"]
