"""Per-step JSONL files (metrics.jsonl, the data manifest) across a resume: the steps after the
resumed checkpoint are replayed, so their earlier records leave the file and each step stays once."""

from __future__ import annotations

import json
import os


def drop_records_after(path: str, step: int) -> list[str]:
    """Rewrite the JSONL file `path` (atomically) with only the records of steps <= `step`; returns
    the dropped lines. Blank lines and a torn line (a crash mid-write: always the last) go too."""
    if not os.path.exists(path):
        return []
    kept, dropped = [], []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            line = line if line.endswith("\n") else line + "\n"
            (kept if record["step"] <= step else dropped).append(line)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(kept)
    os.replace(tmp, path)
    return dropped
