"""Export a titan_llava checkpoint as a Hugging Face LlavaNextForConditionalGeneration directory,
then verify it against transformers (the parity gate). Entry point:
`python -m titan_llava.hf.export --checkpoint DUMP/checkpoint/step-N --output OUT`.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping

import torch

from titan_llava.hf.export_files import tokenizer_info, write_metadata_files
from titan_llava.hf.export_weights import (
    ExportReport,
    extra_vision_from_hf,
    extra_vision_from_init,
    write_weights,
)
from titan_llava.models.args import LlavaNextArgs

logger = logging.getLogger("titan_llava")

DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3


def export_state_dict(
    our_tensors: Iterable[tuple[str, torch.Tensor]],
    model_args: LlavaNextArgs,
    tokenizer_path: str,
    out_dir: str,
    dtype: torch.dtype = torch.bfloat16,
    extra_vision_tensors: Mapping[str, torch.Tensor] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    init_seed: int = 0,
) -> ExportReport:
    """Write an HF LLaVA-NeXT directory from (our key, tensor) pairs of a full LlavaNext state.

    `our_tensors` is consumed once, tensor by tensor (a generator keeps memory at one shard).
    `extra_vision_tensors`: the CLIP layers past the selected one and `post_layernorm.*` (keys
    relative to `vision_model.`), carried from the pretrained tower; None = a run from random init,
    whose stand-ins come from a seeded init (`init_seed`) and are reported in the notes.
    """
    if model_args.image_aspect_ratio != "anyres":
        raise ValueError(
            f"model.image_aspect_ratio={model_args.image_aspect_ratio!r}: LlavaNextForConditional"
            "Generation always tiles (anyres); export an anyres model"
        )
    dtype_name = str(dtype).removeprefix("torch.")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--output {out_dir} exists and is not a directory")
    single = os.path.join(out_dir, "model.safetensors")
    if os.path.exists(single):
        raise ValueError(
            f"--output {out_dir} holds model.safetensors, which transformers loads in preference "
            "to the exported shards: remove it or export into another directory"
        )
    # Checked before anything is written: a failed export leaves no half-written directory.
    sp_size = tokenizer_info(tokenizer_path).sp_size
    if sp_size > model_args.llm.vocab_size:
        raise ValueError(
            f"{tokenizer_path}: the tokenizer has {sp_size} pieces but the model only "
            f"{model_args.llm.vocab_size} vocab rows"
        )
    os.makedirs(out_dir, exist_ok=True)
    tok = write_metadata_files(out_dir, model_args, tokenizer_path, dtype_name)
    source = "given tensors"
    if extra_vision_tensors is None:
        extra_vision_tensors = extra_vision_from_init(model_args.vision, init_seed)
        source = f"seeded init (seed {init_seed}): the run started from random weights"
    report = write_weights(
        our_tensors,
        model_args,
        out_dir,
        dtype,
        tok.padded_vocab(model_args.llm.vocab_size),
        extra_vision_tensors,
        max_shard_bytes,
    )
    report.extra_vision_source = source
    rows, padded = report.vocab_rows
    report.notes.append(
        f"vocab rows {rows} -> {padded} (<image>={tok.image_token_id}, <pad>={tok.pad_token_id}); "
        + (
            f"rows {rows}..{padded - 1} are the mean of the model's rows"
            if padded > rows
            else "no rows added"
        )
    )
    return report


# ----- the command line: a DCP step folder -> HF directory -> parity gate -----


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m titan_llava.hf.export", description=__doc__
    )
    p.add_argument(
        "--checkpoint", required=True, help="DCP step folder: DUMP/checkpoint/step-N"
    )
    p.add_argument(
        "--output",
        required=True,
        help="output directory (created; shards of an earlier export there are replaced)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument(
        "--config",
        help="the run's config (TOML or dumped config.json); default: "
        "the config.json of the run that wrote the checkpoint",
    )
    p.add_argument(
        "--tokenizer", help="tokenizer.model (default: the run's model.tokenizer_path)"
    )
    p.add_argument(
        "--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1000**3
    )
    p.add_argument("--no-verify", action="store_true", help="skip the parity gate")
    p.add_argument(
        "--verify-image", help="image file for the parity gate (default: synthetic)"
    )
    p.add_argument("--verify-prompt", default="Describe this image.")
    p.add_argument(
        "--atol", type=float, default=1e-4, help="parity gate: max |logit diff|"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from titan_llava.hf.export_dcp import DcpModelReader, resolve_run

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = _parser().parse_args(argv)
    t0 = time.perf_counter()
    if not a.no_verify and importlib.util.find_spec("transformers") is None:
        print(
            "titan_llava.hf.export: error: the parity gate (on by default) needs transformers: "
            "install it, or pass --no-verify",
            file=sys.stderr,
        )
        return 2
    try:
        run = resolve_run(a.checkpoint, a.config, a.tokenizer)
        logger.info(f"run config: {run.config_path}; architecture: {run.arch_source}")
        extra = None
        if run.vision_source is not None:
            extra = extra_vision_from_hf(run.vision_source, run.args.vision)
        reader = DcpModelReader(a.checkpoint)
        report = export_state_dict(
            reader.tensors(),
            run.args,
            run.tokenizer_path,
            a.output,
            dtype=DTYPES[a.dtype],
            extra_vision_tensors=extra,
            max_shard_bytes=int(a.max_shard_gb * 1000**3),
            init_seed=run.seed,
        )
    except ValueError as e:
        # User errors (bad path, wrong config, shape mismatch) name the key or file: no traceback.
        print(f"titan_llava.hf.export: error: {e}", file=sys.stderr)
        return 2
    if run.vision_source is not None:
        report.extra_vision_source = f"carried unchanged from {run.vision_source}"
    logger.info(
        f"wrote {a.output}: {report.tensors} tensors, {report.bytes / 1e9:.3f} GB in "
        f"{len(report.shards)} shard(s), {time.perf_counter() - t0:.1f}s"
    )
    logger.info(
        f"vision layers past the selected one + post_layernorm: {report.extra_vision_source}"
    )
    for note in report.notes:
        logger.info(note)
    if a.no_verify:
        return 0
    from titan_llava.hf.export_verify import verify_export

    result = verify_export(
        a.output,
        lambda dtype: reader.build_model(run.args, dtype),
        run.tokenizer_path,
        export_dtype=DTYPES[a.dtype],
        image_path=a.verify_image,
        prompt=a.verify_prompt,
        atol=a.atol,
    )
    logger.info(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
