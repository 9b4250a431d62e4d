"""The text report of benchmarks/train_throughput.py, and its full-depth estimate by step time."""

from __future__ import annotations


def depth_scaled_rate(samples_per_s: float, step_s: float, breakdown_ms: dict, scale: float) -> float:
    """samples/s if the LLM were `scale` times deeper: the step's LLM, grad-norm and optimizer time
    (which grow with the LLM's blocks; the LLM bucket's projector, embedding and head do not, so
    this errs low) times `scale`; vision tower, data wait and other host time unchanged."""
    deep = ("llm", "grad_norm_clip", "optimizer")
    ms = sum(v * (scale if k in deep else 1.0) for k, v in breakdown_ms.items())
    return samples_per_s * step_s / (ms / 1e3)


class NewShapes:
    """Counts the measured micro-batches whose vision batch (its tile count) no earlier
    micro-batch had, warm-up included. cuDNN's attention plans are cached per shape: each new
    tile count costs a plan build on the host (48 ms in round 7's stage-1 trace), once per
    process, which a short measured window does not amortise."""

    def __init__(self):
        self.seen: set[int] = set()
        self.measured = 0
        self.new = 0
        self.new_per_step: list[bool] = []  # per measured step: did a micro-batch bring one?

    def add(self, tiles: int, measured: bool) -> bool:
        new = bool(tiles) and tiles not in self.seen
        if tiles and measured:
            self.measured += 1
            self.new += new
        self.seen.add(tiles)
        return new

    def add_step(self, tiles: list[int], measured: bool) -> None:
        """A step's micro-batches, in order."""
        news = [self.add(t, measured) for t in tiles]
        if measured:
            self.new_per_step.append(any(news))


def report(r: dict) -> str:
    s = r["synthetic"]
    reduced = r["llm_layers"] != r["llm_layers_full"]
    depth = f"{r['llm_layers']} of {r['llm_layers_full']} LLM layers" + (
        " (REDUCED DEPTH: real width, fewer blocks)" if reduced else ""
    )
    lines = [
        f"== titan_llava train throughput, stage {r['stage']} ==",
        f"device: {r['device']} (torch {r['torch']}); figures per GPU (one process)",
        (
            f"model: {r['flavor']}: {depth}, {r['vision_layers_built']} CLIP layers; "
            f"trainable {r['trainable']}; random weights"
        ),
        (
            f"config: {r['local_batch_size']} rows x {r['grad_accum']} micro-batches of "
            f"<= {r['row_len']} tokens (samples truncated at {r['seq_len']}), "
            f"packing {r['packing']}, AC {r['ac']}"
            + (f" ({r['ac_option']})" if r["ac"] == "selective"
               and r.get("ac_option", "op") != "op" else "")
            + ("" if set(r.get("ac_components", ("llm", "vision"))) == {"llm", "vision"}
               or r["ac"] == "none" else f" ({'+'.join(r['ac_components']) or 'no tower'} only)")
            + "".join(
                f", the last {n} {tower.replace('llm', 'LLM')} blocks without AC"
                for tower, n in r.get("ac_without", {}).items() if n and r["ac"] != "none"
            )
            + ", "
            f"compile {r['compile']}"
            + "".join(f" {k}={v!r}" for k, v in r["inductor_options"].items())
            + f", last LLM block trimmed {r['trim_last_block']}, "
            f"logits at {'every position' if r['full_logits'] else 'loss positions only'}, "
            f"attention {r['attn_backend']} (packed rows on torch varlen: {r['torch_varlen']}"
            + (f"; flash implementation {r['flash_attention_impl']}: "
               f"{r['fa4_calls_measured']['forward']} forward and "
               f"{r['fa4_calls_measured']['backward']} backward FA4 kernel calls in the measured "
               "steps" if r.get("flash_attention_impl") else "")
            + "), "
            f"step check deferred {r['deferred_check']}, {r['num_workers']} data workers"
        ),
        (
            f"data: synthetic, {s['samples']} samples, {s['text_only']} text-only; per image "
            f"{s['mean_tiles']:.2f} tiles, {s['mean_image_tokens']:.0f} image tokens; "
            f"{s['mean_text_tokens']:.0f} text tokens/sample (shipped tiny tokenizer, "
            "vocab 1000: ids are synthetic)"
        ),
        (
            f"steps: {r['warmup_steps']} warm-up + {r['measured_steps']} measured, "
            f"step time {r['step_time_s']:.3f} s"
        ),
        f"samples/s/GPU: {r['samples_per_s']:.3f}",
        f"text tokens/s/GPU: {r['text_tokens_per_s']:,.0f}",
        f"image tokens/s/GPU: {r['image_tokens_per_s']:,.0f}",
        f"tokens/s/GPU: {r['tokens_per_s']:,.0f} (padding {100 * r['padding_fraction']:.1f}% of row slots)",
        f"model TFLOP/sample: {r['tflop_per_sample']:.2f}; TFLOP/s/GPU: {r['tflops_per_s']:.2f}",
        "MFU: "
        + (
            f"{100 * r['mfu']:.1f}% of {r['peak_flops'] / 1e12:.0f} TFLOP/s bf16 dense"
            if r["mfu"] is not None
            else "n/a (no bf16 peak for this device)"
        ),
    ]
    total = sum(r["breakdown_ms"].values())
    parts = [f"{k} {v:.1f} ms ({100 * v / total:.1f}%)" for k, v in r["breakdown_ms"].items()]
    lines.append("step breakdown: " + ", ".join(parts) + (
        f" (the buckets exceed the step by {r['breakdown_overlap_ms']:.1f} ms: the data wait "
        "overlapped queued device work)" if r.get("breakdown_overlap_ms") else ""))
    mem = r["peak_memory_gib"]
    lines.append("peak memory: " + (f"{mem:.2f} GiB" if mem is not None else "n/a (CPU)"))
    lines.append(
        f"vision batches: {r['vision_new_tile_counts']} of {r['vision_micro_batches']} measured "
        "micro-batches with images had a tile count no earlier step had (on CUDA a new cuDNN "
        "attention plan each)"
    )
    per_step, flags = r.get("vision_ms_per_step") or [], r.get("vision_new_per_step") or []
    if per_step and len(flags) == len(per_step):
        cells = [f"{ms:.1f}{'*' if new else ''}" for ms, new in zip(per_step, flags)]
        lines.append("vision ms per measured step: " + " ".join(cells)
                     + " (* a new tile count in that step)")
    lines.append(
        "allocator: "
        + (f"{r['alloc_retries']} retries (cache freed, device stalled) in the measured steps"
           if r["alloc_retries"] is not None else "n/a (CPU)")
        + f"; {r['alloc_conf'] or 'settings not set'}"
    )
    lines.append(
        f"ratio to reference: {r['ratio_to_reference']:.2f}x "
        f"(reference {r['reference_samples_per_s']} samples/s/GPU on H100)"
    )
    if r["adamw_estimate_samples_per_s"] is not None:
        est = r["adamw_estimate_samples_per_s"]
        lines.append(
            f"OPTIMIZER: {r['optimizer']} in place of AdamW (its moments would not fit); with "
            f"AdamW's step estimated from SGD's by memory traffic (x7/3): {est:.3f} "
            f"samples/s/GPU, {est / r['reference_samples_per_s']:.2f}x reference (estimate)"
        )
    if r["profiled"]:
        lines.append("PROFILED run: the figures above include the profiler's overhead")
    if r["full_depth_estimate_samples_per_s"] is not None:
        est = r["full_depth_estimate_samples_per_s"]
        lines.append(
            f"full-depth estimate at the same MFU: {est:.3f} samples/s/GPU, "
            f"{est / r['reference_samples_per_s']:.2f}x reference (estimate, not measured)"
        )
        est = r["full_depth_estimate_by_time_samples_per_s"]
        lines.append(
            f"full-depth estimate by step time (LLM, clip and optimizer time x "
            f"{r['llm_layers_full']}/{r['llm_layers']}, vision and data unchanged): {est:.3f} "
            f"samples/s/GPU, {est / r['reference_samples_per_s']:.2f}x reference (estimate, not measured)"
        )
    return "\n".join(lines)
