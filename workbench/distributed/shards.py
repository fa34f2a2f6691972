"""A folder the ranks share for one collective result: each rank writes its part files and an index, all ranks
read every index afterwards and assemble the same whole.

    folder = ShardFolder.open(directory, key)        # collective; stale files of an earlier attempt are removed
    folder.part("b00003-c0001")                      # a path for one part file of this rank
    indexes = folder.exchange({"parts": [...]})      # collective: every rank's index, in rank order
    folder.cleanup(keep=[...])                       # collective: rank 0 deletes the parts nobody still needs

Indexes are `workbench.io.checkpoint` files (JSON + safetensors, never executed when read) under the fingerprint
of `key` plus the world size, so an index from another run or another number of ranks is refused rather than
merged. Under several hosts `directory` must be on a filesystem all of them see (the run's --out folder).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.distributed.group import DistributedError, barrier, broadcast_object, is_main, rank, world

INDEX = "shard"
PART = "part"
SUFFIXES = (".json", ".safetensors", ".json.tmp", ".safetensors.tmp")


@dataclass
class ShardFolder:
    root: Path
    fp: str
    what: str = "shards"
    temporary: bool = False  # a folder rank 0 made (removed by cleanup when nothing in it is still needed)

    @classmethod
    def open(cls, directory: str | Path | None, key: dict[str, Any], what: str = "shards") -> ShardFolder:
        """The shared folder (`directory`, or a new temporary folder chosen by rank 0) with earlier index and
        part files removed; collective."""
        from workbench.io.checkpoint import fingerprint

        temporary = directory is None
        if temporary:
            directory = broadcast_object(tempfile.mkdtemp(prefix="workbench-shards-") if is_main() else None)
        root = Path(directory)
        if is_main():
            root.mkdir(parents=True, exist_ok=True)
            for f in root.iterdir():
                if f.is_file() and f.name.startswith((INDEX + "-", PART + "-")) and f.name.endswith(SUFFIXES):
                    f.unlink()
        barrier(f"{what}: shared folder {root} ready")
        return cls(root, fingerprint({**key, "world": world()}), what, temporary)

    def part(self, name: str) -> Path:
        """Where this rank writes one part (`name` unique over all ranks; no suffix)."""
        return self.root / f"{PART}-{name}"

    def _index_path(self, r: int) -> Path:
        return self.root / f"{INDEX}-{r:05d}-of-{world():05d}"

    def exchange(self, index: dict[str, Any]) -> list[dict[str, Any]]:
        """Write this rank's index, wait for all, return every rank's index in rank order; collective."""
        from workbench.io.checkpoint import load_checkpoint, save_checkpoint

        save_checkpoint(self._index_path(rank()), self.fp, index)
        barrier(f"{self.what}: every rank wrote its part")
        out = []
        for r in range(world()):
            saved = load_checkpoint(self._index_path(r), self.fp)
            if saved is None:
                raise DistributedError(f"rank {r} wrote no index {self._index_path(r)}.json for {self.what}; is "
                                       f"{self.root} on a filesystem every host sees?")
            out.append(saved)
        return out

    def cleanup(self, keep: set[str]) -> None:
        """After every rank read what it needs (collective): rank 0 deletes the indexes and the part files whose
        paths (without suffix) are not in `keep`."""
        from workbench.io.checkpoint import remove_checkpoint

        barrier(f"{self.what}: every rank read the parts")
        if not is_main():
            return
        for r in range(world()):
            remove_checkpoint(self._index_path(r))
        for f in self.root.glob(f"{PART}-*.json"):
            stem = f.with_suffix("")
            if str(stem) not in keep:
                remove_checkpoint(stem)
        if self.temporary and not any(self.root.iterdir()):
            self.root.rmdir()


__all__ = ["ShardFolder"]
