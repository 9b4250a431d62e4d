"""LLaVA JSON / JSONL sources behind a compact byte-offset index (no per-sample Python objects).

The index is built once per process by a streaming scan (C-speed `json` raw decoding over fixed-size
chunks); a record is read back with one `pread` + `json.loads`, so workers share only numpy arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from titan_llava.data.errors import BadSampleError

_CHUNK_BYTES = 16 << 20
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_BOM = "\xef\xbb\xbf"  # UTF-8 byte-order mark, as it reads when bytes are decoded as latin-1


@dataclass
class SampleStats:
    """What the sampler and `inspect` need about a record without reading it again."""

    has_image: bool
    num_words: int


def record_stats(record: Any) -> SampleStats:
    """The reference's cheap length estimate: whitespace words over all turns; image = key present.

    Malformed records get zero words here; they are reported (and skipped) when processed.
    """
    if not isinstance(record, dict):
        return SampleStats(False, 0)
    words = 0
    conversations = record.get("conversations")
    if isinstance(conversations, list):
        for turn in conversations:
            value = turn.get("value") if isinstance(turn, dict) else None
            if isinstance(value, str):
                words += len(value.split())
    return SampleStats("image" in record, words)


def modality_length(stats: SampleStats) -> int:
    """LLaVA's `modality_lengths` entry: +words for samples with an image, -words for text-only.

    The reference asserts that no entry is 0; a zero-word record (always malformed) maps to +-1 so
    it keeps its modality instead of crashing the sampler.
    """
    words = max(stats.num_words, 1)
    return words if stats.has_image else -words


def _scan_json_list(path: str) -> Iterator[tuple[int, int, Any]]:
    """Yield (byte offset, byte length, parsed record) for each element of a top-level JSON list.

    The bytes are decoded as latin-1 (one char per byte), so the decoder's char positions ARE byte
    offsets; UTF-8 multi-byte sequences only use bytes >= 0x80 and can never look like JSON
    structure. Records with non-ASCII bytes are re-parsed from their UTF-8 bytes for correct text.
    """
    decoder = json.JSONDecoder()
    with open(path, "rb") as fh:
        buf, base, pos, eof = "", 0, 0, False
        state = "start"  # start -> first (element or ']') -> sep (',' or ']') -> element -> ... -> done

        def refill() -> None:
            nonlocal buf, base, pos, eof
            chunk = fh.read(_CHUNK_BYTES)
            eof = not chunk
            base += pos
            buf = buf[pos:] + chunk.decode("latin-1")
            pos = 0

        while True:
            pos = _WHITESPACE.match(buf, pos).end()
            if pos >= len(buf):
                if eof:
                    break
                refill()
                continue
            if state == "start":
                if buf.startswith(_BOM, pos):
                    pos += len(_BOM)
                    continue
                if buf[pos] != "[":
                    raise ValueError(f"{path}: expected a JSON list ('[') at byte {base + pos}")
                pos += 1
                state = "first"
            elif state in ("first", "element"):
                if state == "first" and buf[pos] == "]":
                    pos += 1
                    state = "done"
                    continue
                try:
                    record, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    if not eof:
                        refill()
                        continue
                    raise ValueError(
                        f"{path}: malformed JSON in the element starting at byte {base + pos}: {e.msg}"
                    ) from None
                # A number can continue past the chunk by up to 2 characters that do not parse
                # on their own ("1" + ".5", "1.5" + "e-3"): re-decode with more bytes.
                if len(buf) - end < 3 and not eof:
                    refill()
                    continue
                raw = buf[pos:end]
                if not raw.isascii():
                    record = json.loads(raw.encode("latin-1"))
                yield base + pos, end - pos, record
                pos = end
                state = "sep"
            elif state == "sep":
                if buf[pos] == ",":
                    state = "element"
                elif buf[pos] == "]":
                    state = "done"
                else:
                    raise ValueError(f"{path}: expected ',' or ']' at byte {base + pos}")
                pos += 1
            else:
                raise ValueError(f"{path}: unexpected data after the top-level list at byte {base + pos}")
        if state != "done":
            raise ValueError(f"{path}: the top-level JSON list is not closed (truncated file?)")


def _scan_jsonl(path: str) -> Iterator[tuple[int, int, Any]]:
    """Yield (byte offset, byte length, parsed record or None if unparseable) per non-blank line."""
    offset = 0
    with open(path, "rb") as fh:
        for line in fh:
            stripped = line.strip()
            if stripped:
                start = offset + line.index(stripped[:1])
                try:
                    record = json.loads(stripped)
                except ValueError:
                    record = None  # kept in the index: processing reports it as one bad sample
                yield start, len(stripped), record
            offset += len(line)


def _detect_format(path: str) -> str:
    if path.endswith(".jsonl"):
        return "jsonl"
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        return "json"
    if head.startswith(b"{"):
        return "jsonl"
    raise ValueError(f"{path}: neither a JSON list nor JSON lines (starts with {head[:20]!r})")


class LlavaDataset:
    """Random access to the records of one LLaVA JSON (top-level list) or JSONL file.

    Holds three numpy arrays (16 bytes per sample): byte offset, byte length, modality length.
    Thread-safe (`os.pread`) and fork/pickle-safe (the file descriptor is reopened per process).
    """

    def __init__(self, path: str, progress: bool = False):
        if not os.path.isfile(path):
            raise ValueError(f"data path {path!r} does not exist or is not a file")
        self.path = path
        self.format = _detect_format(path)
        scan = _scan_jsonl if self.format == "jsonl" else _scan_json_list
        offsets: list[int] = []
        sizes: list[int] = []
        lengths: list[int] = []
        ids = hashlib.sha256()  # the records' ids in file order: what a resume position refers to
        total = os.path.getsize(path)
        t0 = last = time.monotonic()
        for offset, size, record in scan(path):
            offsets.append(offset)
            sizes.append(size)
            lengths.append(modality_length(record_stats(record)))
            ids.update(repr(record.get("id") if isinstance(record, dict) else None).encode() + b"\0")
            if progress and len(offsets) % 100_000 == 0 and time.monotonic() - last > 1.0:
                last = time.monotonic()
                print(
                    f"indexing {path}: {len(offsets)} samples, {offset / max(total, 1):.0%} "
                    f"({last - t0:.0f}s)",
                    file=sys.stderr,
                )
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.uint32)
        self.modality_lengths = np.asarray(lengths, dtype=np.int32)
        self.ids_digest = ids.hexdigest()[:16]
        self._fd: int | None = None
        self._fd_pid = -1

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    @property
    def index_nbytes(self) -> int:
        return self.offsets.nbytes + self.sizes.nbytes + self.modality_lengths.nbytes

    @property
    def has_image(self) -> np.ndarray:
        return self.modality_lengths > 0

    def _file(self) -> int:
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._fd_pid = os.getpid()
        return self._fd

    def read_bytes(self, i: int) -> bytes:
        return os.pread(self._file(), int(self.sizes[i]), int(self.offsets[i]))

    def read_record(self, i: int) -> dict:
        """The parsed record `i`; BadSampleError("malformed_record") if it is not a JSON object."""
        raw = self.read_bytes(i)
        try:
            record = json.loads(raw)
        except ValueError as e:
            raise BadSampleError("malformed_record", f"invalid JSON: {e}", str(i)) from None
        if not isinstance(record, dict):
            raise BadSampleError("malformed_record", f"expected an object, got {type(record).__name__}", str(i))
        return record

    @staticmethod
    def sample_id(record: dict, i: int) -> str:
        """The record's `id` as a string, or its index in the file when it has none."""
        rid = record.get("id")
        return str(i) if rid is None else str(rid)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"], state["_fd_pid"] = None, -1
        return state

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
