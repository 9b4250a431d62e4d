"""Per-rank JSONL manifest of which sample ids each training step consumed, safe across resume.

A resumed run first drops the lines of steps it will replay (step > the checkpoint's step), so the
final file lists every step once: no id twice from a replay, none lost.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from titan_llava.step_records import drop_records_after


class ManifestWriter:
    """Appends {"step", "rank", "ids"} lines to the file `path_for_rank` (one file per rank)."""

    def __init__(self, path_for_rank: str, rank: int):
        self.path = path_for_rank
        self.rank = rank
        os.makedirs(os.path.dirname(os.path.abspath(path_for_rank)), exist_ok=True)
        self._fh = None

    def resume(self, step: int) -> None:
        """Keep only the lines of steps <= `step` (the checkpoint being resumed); rewrite atomically."""
        drop_records_after(self.path, step)

    def write(self, step: int, ids: list[str]) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(json.dumps({"step": step, "rank": self.rank, "ids": list(ids)}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@dataclass
class ManifestReport:
    steps: list[int] = field(default_factory=list)
    duplicate_steps: list[int] = field(default_factory=list)
    missing_steps: list[int] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.duplicate_steps or self.missing_steps or self.duplicate_ids)


def check_manifest(path: str, allow_repeated_ids: bool = False) -> ManifestReport:
    """Steps must be 1..N (or start..N) with none twice and none missing; ids must not repeat.

    Within one epoch an id never repeats on a rank (except the few wrap-around samples that make
    the epoch divisible); runs longer than an epoch pass `allow_repeated_ids=True`.
    """
    report = ManifestReport()
    seen_steps: set[int] = set()
    seen_ids: set[str] = set()
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            entry = json.loads(line)
            step = int(entry["step"])
            if step in seen_steps:
                report.duplicate_steps.append(step)
            seen_steps.add(step)
            report.steps.append(step)
            for sid in entry["ids"]:
                if sid in seen_ids and not allow_repeated_ids:
                    report.duplicate_ids.append(sid)
                seen_ids.add(sid)
    if seen_steps:
        lo, hi = min(seen_steps), max(seen_steps)
        report.missing_steps = sorted(set(range(lo, hi + 1)) - seen_steps)
    return report
