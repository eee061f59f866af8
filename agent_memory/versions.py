"""Adapter versions on disk: one delta per bake, and the live versions composed from them.

    adapters/zero/              the all-zero adapter `base` is served as
    adapters/deltas/bake-0007/  the delta trained by bake 7 (peft format, with its bake.json)
    adapters/live/v0003/        a composed adapter = the sum of some deltas; manifest.json says which
    adapters/live/CURRENT       the version `memory` serves (survives restarts)
    models/merged/v0003/        the base checkpoint with v0003's deltas added (merged serving, serving.py);
                                derived from the deltas, so it is rebuilt when missing and old ones pruned

A version directory is never rewritten: vLLM's prefix cache is keyed on the adapter path, so new
weights always get a new path. Rollback and forget make CURRENT point at an old version or at a
new composition without some delta.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path


class Version(str):
    """A version's name, "v0003": its directory under live/, what CURRENT holds, and, as the number
    3, the `version` column of the bake that made it. A str, so it is the plain name in JSON and SQL.

    `Version(3)` and `Version("v0003")` are the same name; anything else is a ValueError."""

    PATTERN = r"^v\d{4,}$"

    def __new__(cls, name: str | int) -> Version:
        if isinstance(name, int) and not isinstance(name, bool) and name >= 0:
            name = f"v{name:04d}"
        if not isinstance(name, str) or not re.fullmatch(cls.PATTERN, name):
            raise ValueError(f"not a version name (v0001, v0002, ...): {name!r}")
        return super().__new__(cls, name)

    @property
    def number(self) -> int:
        return int(self[1:])


EMPTY_VERSION = Version(0)  # no delta: `memory` is the base model


class Versions:
    def __init__(self, adapters_dir: Path, model_dir: Path, max_rank: int, merged_dir: Path | None = None,
                 dtype: str = "bfloat16"):
        self.root = adapters_dir
        self.model_dir = model_dir
        self.max_rank = max_rank
        self.merged_dir = merged_dir or adapters_dir.parent / "models" / "merged"
        self.dtype = dtype  # of merged checkpoints: the dtype vLLM serves in
        self.zero_dir = adapters_dir / "zero"
        self.deltas_dir = adapters_dir / "deltas"
        self.live_dir = adapters_dir / "live"
        self.pointer = self.live_dir / "CURRENT"

    # -- the zero adapter and the empty version --------------------------------------------

    def zero(self) -> Path:
        if not (self.zero_dir / "adapter_config.json").exists():
            from .adapters import write_zero_adapter

            write_zero_adapter(self.model_dir, self.zero_dir)
        return self.zero_dir

    # -- deltas ----------------------------------------------------------------------------

    def delta_dir(self, bake_id: int) -> Path:
        return self.deltas_dir / f"bake-{bake_id:04d}"

    # -- live versions ---------------------------------------------------------------------

    def path(self, version: str) -> Path:
        return self.live_dir / version

    def current(self) -> Version:
        try:
            return Version(self.pointer.read_text().strip() or EMPTY_VERSION)
        except FileNotFoundError:
            return EMPTY_VERSION

    def current_path(self) -> Path:
        return self.ensure(self.current())

    def ensure(self, version: str) -> Path:
        """The directory of `version`; the empty version is made on first use."""
        path = self.path(version)
        if version == EMPTY_VERSION and not (path / "adapter_config.json").exists():
            self.live_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(self.zero(), path, dirs_exist_ok=True)
        return path

    def manifest(self, version: str) -> dict:
        if version == EMPTY_VERSION:
            return {"version": EMPTY_VERSION, "deltas": []}
        return json.loads((self.path(version) / "manifest.json").read_text())

    # -- merged checkpoints ----------------------------------------------------------------

    def merged(self, version: str) -> Path:
        """The dense checkpoint of `version` (base + the exact sum of its deltas, no compaction),
        built on first use; the empty version is the base checkpoint itself."""
        if version == EMPTY_VERSION:
            return self.model_dir
        path = self.merged_dir / version
        if not (path / "config.json").exists():
            from .adapters import write_merged_checkpoint

            deltas = [self.delta_dir(b) for b in self.manifest(version)["deltas"]]
            write_merged_checkpoint(self.model_dir, deltas, path, self.dtype)
        return path

    def prune_merged(self, keep_newest: int = 3) -> list[str]:
        """Delete the merged checkpoints of all but the current version and the `keep_newest`
        newest others (a rollback to a pruned one rebuilds it from the deltas); returns the pruned."""
        found = [v for v in (_version_of(p.name) for p in self.merged_dir.glob("v[0-9]*")) if v]
        others = sorted((v for v in found if v != self.current()), key=lambda v: v.number, reverse=True)
        for version in others[keep_newest:]:
            shutil.rmtree(self.merged_dir / version, ignore_errors=True)
        return sorted(others[keep_newest:])

    def build(self, bake_ids: list[int], note: str) -> Version:
        """Compose the deltas of `bake_ids` into a new version directory; return its name."""
        from .adapters import compose

        version = self._next_name()
        target = self.path(version)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        started = time.monotonic()
        if bake_ids:
            report = compose([self.delta_dir(b) for b in bake_ids], partial, self.max_rank)
        else:
            shutil.copytree(self.zero(), partial)
            report = {"rank": 0}
        manifest = {
            "version": version, "deltas": list(bake_ids), "note": note,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "compose_seconds": round(time.monotonic() - started, 3), "compose": report,
        }
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=2))
        partial.rename(target)
        return version

    def set_current(self, version: str) -> None:
        """Atomically point CURRENT at `version` (write + fsync + rename)."""
        self.live_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.pointer.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.pointer)

    def _next_name(self) -> Version:
        # Counting every directory, finished or not (v0004.partial), so a name is never reused.
        found = [_version_of(p.name.split(".")[0]) for p in self.live_dir.glob("v[0-9]*")]
        self.live_dir.mkdir(parents=True, exist_ok=True)
        return Version(max((v.number for v in found if v), default=0) + 1)


def _version_of(name: str) -> Version | None:
    try:
        return Version(name)
    except ValueError:
        return None
