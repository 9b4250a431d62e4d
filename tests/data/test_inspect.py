"""inspect: counts, problems by reason, lengths (checked against the loader's rows) and --config."""

from __future__ import annotations

import json
import math
import re
import os

import pytest

from titan_llava.data import inspect as inspect_mod
from titan_llava.data.loader import build_data_loader

ASSETS = os.path.join(os.path.dirname(__file__), "..", "assets")
DATA = os.path.join(ASSETS, "sample_data")
TOKENIZER = os.path.join(ASSETS, "tokenizer", "tokenizer.model")


def test_inspect_counts_and_lengths(tmp_path, capsys) -> None:
    with open(os.path.join(DATA, "finetune.json")) as fh:
        records = json.load(fh)
    records.append({"id": "bad", "image": "images/none.jpg", "conversations": records[2]["conversations"]})
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    assert inspect_mod.main([
        "--data-path", str(path), "--image-folder", DATA, "--tokenizer", TOKENIZER,
        "--template", "vicuna_v1", "--max-seq-len", "3000",
    ]) == 0
    out = capsys.readouterr().out
    assert "samples: 21  usable: 20  images: 15  text-only samples: 6" in out
    assert "problems: image_missing=1" in out

    # The lengths agree with what the loader actually produces (unpacked rows, no truncation).
    loader = build_data_loader(
        str(path), DATA, TOKENIZER, "vicuna_v1", max_seq_len=100000, local_batch_size=1, shuffle=False, prefetch=0,
    )
    it = iter(loader)
    lengths = [next(it).input_ids.shape[1] for _ in range(20)]
    line = [l for l in out.splitlines() if l.startswith("total tokens")][0]
    assert f"min {min(lengths)} " in line and line.endswith(f"max {max(lengths)}")
    assert f"(truncated): {sum(n > 3000 for n in lengths)}" in out


def test_inspect_reads_config_and_flags_override(tmp_path, capsys) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        f'[model]\ntokenizer_path = "{TOKENIZER}"\n'
        f'[data]\npath = "{os.path.join(DATA, "finetune.json")}"\nimage_folder = "{DATA}"\n'
        'template = "vicuna_v1"\nmax_seq_len = 4096\n'
    )
    assert inspect_mod.main(["--config", str(config), "--limit", "5", "--max-seq-len", "100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("samples: 5 ")
    assert "longer than max_seq_len 100" in out


def test_inspect_estimates_packed_rows(capsys) -> None:
    argv = ["--data-path", os.path.join(DATA, "finetune.json"), "--image-folder", DATA,
            "--tokenizer", TOKENIZER, "--template", "vicuna_v1", "--max-seq-len", "4096"]
    assert inspect_mod.main(argv) == 0
    assert "packing" not in capsys.readouterr().out  # only on request
    assert inspect_mod.main(argv + ["--packing", "--packing-row-len", "8192", "--global-batch-size", "2"]) == 0
    out = capsys.readouterr().out
    line = [l for l in out.splitlines() if l.startswith("packing (rows of 8192 tokens, lookahead 8)")][0]
    rows = int(re.search(r"~([\d,]+) rows per epoch", line).group(1))
    total = [l for l in out.splitlines() if l.startswith("total tokens")][0]
    mean = float(re.search(r"mean ([\d.]+)", total).group(1))
    # Between a perfect fill of 8192-token rows and one sample per row.
    assert math.ceil(20 * mean / 8192) <= rows < 20
    assert f"~{math.ceil(rows / 2)} steps per epoch" in out
    with pytest.raises(SystemExit):
        inspect_mod.main(argv + ["--packing", "--packing-row-len", "1000"])


def test_inspect_loads_its_config_as_the_trainer_does(tmp_path, capsys) -> None:
    """--config goes through the trainer's loading: a misspelt key is an error (not silently
    ignored while the trainer would refuse it), and so are a missing data file and a bad --limit."""
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\ntokenizer_path = "{TOKENIZER}"\n[data]\nmax_seq_length = 2048\n')
    with pytest.raises(SystemExit):
        inspect_mod.main(["--config", str(config)])
    assert "data.max_seq_length" in capsys.readouterr().err
    config.write_text(f'[model]\ntokenizer_path = "{TOKENIZER}"\n[data]\npath = "/nonexistent.json"\n')
    with pytest.raises(SystemExit):
        inspect_mod.main(["--config", str(config)])
    assert "/nonexistent.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        inspect_mod.main(["--config", str(config), "--limit", "-5"])
    assert "--limit must be >= 1" in capsys.readouterr().err


def test_inspect_counts_image_tokens_with_the_architecture_the_trainer_resolves(tmp_path, capsys) -> None:
    """--config resolves the architecture as the trainer does: a run starting from an earlier
    run's checkpoint that was trained with "pad" counts 576 tokens an image (one tile, no
    newline), not AnyRes's. A starting checkpoint that is not on this machine falls back to the
    flavor's settings with a warning."""
    from titan_llava.architecture import resolve_model_args
    from titan_llava.config import load_config
    from titan_llava.models.args import llava_args_to_dict

    run = tmp_path / "stage1"
    (run / "checkpoint" / "step-1").mkdir(parents=True)
    recorded = resolve_model_args(load_config(["--model.image_aspect_ratio", "pad"]))
    (run / "model_args.json").write_text(json.dumps(llava_args_to_dict(recorded)))
    config = tmp_path / "c.toml"
    body = (
        f'[model]\ntokenizer_path = "{TOKENIZER}"\n'
        f'[data]\npath = "{os.path.join(DATA, "finetune.json")}"\nimage_folder = "{DATA}"\n'
        'template = "vicuna_v1"\n[checkpoint]\ninitial_load_in_hf = false\n'
    )
    config.write_text(body + f'initial_load_path = "{run / "checkpoint" / "step-1"}"\n')
    assert inspect_mod.main(["--config", str(config)]) == 0
    image_line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("image tokens")][0]
    low, high = (int(re.search(rf"{k} (\d+)", image_line).group(1)) for k in ("min", "max"))
    assert low == 576 and high % 576 == 0  # pad: 576 an image (some samples have two)

    config.write_text(body.replace("initial_load_in_hf = false", "initial_load_in_hf = true")
                      + 'initial_load_path = "/nonexistent/llava-next"\n')
    assert inspect_mod.main(["--config", str(config)]) == 0
    captured = capsys.readouterr()
    assert "could not resolve the architecture" in captured.err and "/nonexistent/llava-next" in captured.err
    image_line = [l for l in captured.out.splitlines() if l.startswith("image tokens")][0]
    assert int(re.search(r"min (\d+)", image_line).group(1)) > 576  # AnyRes: base + tiles + newlines
