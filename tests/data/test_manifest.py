"""Manifest: a crash + resume from an earlier checkpoint leaves every step once, no id twice."""

from __future__ import annotations

from titan_llava.data.manifest import ManifestWriter, check_manifest


def test_resume_drops_replayed_steps(tmp_path) -> None:
    path = str(tmp_path / "m" / "rank0.jsonl")
    w = ManifestWriter(path, rank=0)
    for step in range(1, 8):  # crash after step 7; last checkpoint at step 5
        w.write(step, [f"s{step}a", f"s{step}b"])
    w.close()
    with open(path, "a") as fh:
        fh.write('{"step": 8, "ra')  # torn line
    broken = ManifestWriter(path, rank=0)
    broken.resume(5)
    for step in range(6, 10):  # replay 6, 7 and continue
        broken.write(step, [f"s{step}a", f"s{step}b"])
    broken.close()
    report = check_manifest(path)
    assert report.ok and report.steps == list(range(1, 10))


def test_check_manifest_detects_problems(tmp_path) -> None:
    path = str(tmp_path / "r.jsonl")
    w = ManifestWriter(path, rank=1)
    w.write(1, ["a"])
    w.write(2, ["b"])
    w.write(2, ["c"])  # replayed without resume
    w.write(4, ["a"])  # step 3 lost, id a twice
    w.close()
    report = check_manifest(path)
    assert report.duplicate_steps == [2] and report.missing_steps == [3] and report.duplicate_ids == ["a"]
    assert not report.ok
