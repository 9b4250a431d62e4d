"""Packing efficiency on LLaVA-NeXT-shaped sample lengths: padding, tokens per sample, buffer.

No model and no images: the sample lengths come from `synthetic_data.make_records` (the same
distribution the throughput benchmark trains on; template text + AnyRes image tokens, truncated to
max_seq_len) in a seeded shuffled order, and `titan_llava.data.packing.simulate_packing` plans
the rows with the packer's own `best_fit_rows` and buffer rule. For each setting it prints:

- padding: the share of the batch's row slots (rows x padded width) that hold no sample token;
- slots/sample: row slots per sample (the tokens the LLM runs per sample, padding included;
  the throughput proxy, lower is better) and its ratio to no packing;
- fill: sample tokens per micro-batch over its budget (rows x row length): below 1 means more,
  smaller micro-batches per epoch;
- samples/row, and the peak number of samples the packer holds (memory, and what a resume
  processes again);
- max delay: the most batches a sample waits beyond its position in a straight order.

    python benchmarks/packing_efficiency.py [--samples 20000] [--stage 1 2] [--rows 4 2]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from synthetic_data import make_records, token_lengths  # noqa: E402

from titan_llava.data.packing import simulate_packing as simulate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--stage", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[4, 2], help="rows per micro-batch, per stage")
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--lookahead", type=int, nargs="+", default=[1, 4, 8, 16, 64])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if len(args.rows) == 1:
        args.rows = args.rows * len(args.stage)
    for stage, rows in zip(args.stage, args.rows):
        t0 = time.perf_counter()
        records, sizes = make_records(stage, args.samples, seed=args.seed)
        lengths = token_lengths(records, sizes, stage, args.max_seq_len)
        random.Random(args.seed).shuffle(lengths)
        mean = sum(lengths) / len(lengths)
        budget = rows * args.max_seq_len
        print(
            f"\nstage {stage}: {len(lengths)} samples, mean {mean:.0f} tokens (min {min(lengths)}, "
            f"max {max(lengths)}), max_seq_len {args.max_seq_len}, {budget} tokens per micro-batch  "
            f"[lengths in {time.perf_counter() - t0:.1f} s]"
        )
        print(f"{'setting':<46} {'padding':>8} {'fill':>6} {'slots/sample':>13} {'vs no pack':>11} "
              f"{'samples/row':>12} {'peak buffer':>12} {'max delay':>10}")
        base = simulate(lengths, rows, args.max_seq_len, None)
        settings: list[tuple[str, int, int, int | None, bool]] = [
            (f"no packing, {rows} rows (pad to longest row)", rows, args.max_seq_len, None, False),
            (f"greedy {rows}x{args.max_seq_len}, fixed width (before)", rows, args.max_seq_len, 1, True),
        ]
        for r, row_len in ((rows, args.max_seq_len), (1, budget)):
            if r == rows and row_len == args.max_seq_len or r == 1:
                settings += [
                    (f"packing {r}x{row_len}, lookahead {k}", r, row_len, k, False)
                    for k in args.lookahead
                ]
        for name, r, row_len, k, fixed in settings:
            x = base if k is None else simulate(lengths, r, row_len, k, fixed)
            print(
                f"{name:<46} {x['padding']:>7.1%} {x['fill']:>6.1%} {x['slots_per_sample']:>13.0f} "
                f"{base['slots_per_sample'] / x['slots_per_sample']:>10.2f}x "
                f"{x['samples_per_row']:>12.2f} {x['peak_buffer']:>12d} {x['max_delay']:>9.1f}b"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
