"""The one exception type for a sample that cannot be used, with a short machine-readable reason."""

from __future__ import annotations


class BadSampleError(ValueError):
    """A sample (or one of its images) that the pipeline skips, logs and counts under `reason`.

    `reason` is a short stable key used in counters and metrics (e.g. "image_missing",
    "image_corrupt", "image_path_escape", "image_too_large", "bad_conversation",
    "image_count_mismatch"); `detail` is the human-readable explanation. The loader adds the sample id.
    """

    def __init__(self, reason: str, detail: str, sample_id: str | None = None):
        self.reason = reason
        self.detail = detail
        self.sample_id = sample_id
        where = f"sample {sample_id!r}: " if sample_id is not None else ""
        super().__init__(f"{where}{reason}: {detail}")

    def with_sample_id(self, sample_id: str) -> "BadSampleError":
        return BadSampleError(self.reason, self.detail, sample_id)
