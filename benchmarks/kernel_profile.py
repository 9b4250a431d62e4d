"""Where the device time of the measured steps goes: a torch.profiler window over those steps,
summarised per kernel category (matmul, attention, convolution, compiled triton kernels,
collectives, copies, optimizer, eager elementwise) and per kernel, plus a Chrome trace for Perfetto / chrome://tracing.

On CUDA the figures are kernel (device) self time; on CPU, operator self time (there are no
kernels). Categories come from kernel/operator names, so they are a guide, not an exact split.

Phases (CUDA): `install_phase_markers` puts a zero-length profiler annotation ("phase: fwd X",
"phase: bwd X") at the start of each block's forward and backward, the projector, the final norm,
the head (whose forward phase also holds the loss), and the optimizer step; the benchmark adds
"data" (the next batch) and "step start". From the trace, each kernel is attributed to the last marker
before the host call that launched it, and each gap in the device timeline (the device idle) to
the phase of the kernel that ends it: which part of the step the GPU waits on the host in.
"""

from __future__ import annotations

import bisect
import gzip
import json
import os
import re
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile

# First match wins: attention before matmul (flash kernels), copies before the eager catch-all.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("collective", ("nccl", "c10d::", "all_gather", "allgather", "reduce_scatter", "allreduce",
                    "all_reduce", "gloo")),
    ("attention", ("flash", "fmha", "attention", "varlen", "sdpa", "flex")),
    # cuDNN convolution kernels (CLIP's patch embedding) before matmul: they are xmma/gemm too.
    # Not a bare "conv": inductor's kernel names are full of "convert_element_type".
    ("convolution", ("convolution", "convolve", "conv2d", "fprop", "wgrad", "dgrad",
                     "implicit_gemm")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "aten::mm", "aten::addmm",
                "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    ("optimizer", ("multi_tensor", "adam", "_foreach")),
    ("compiled (inductor)", ("triton_", "cpp_fused", "compiledfunction", "compiledfxgraph", "torch-compiled")),
    ("copy/memset", ("memcpy", "memset", "copy_", "aten::to", "_to_copy", "aten::cat",
                     "aten::index", "aten::contiguous", "aten::clone", "aten::fill_",
                     "aten::zero_")),
    ("elementwise/reduce (eager)", ("elementwise", "vectorized", "reduce_kernel", "aten::")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, needles in CATEGORIES:
        if any(n in low for n in needles):
            return cat
    return "other"


@dataclass
class KernelSummary:
    device: str  # "cuda" (kernel self time) or "cpu" (operator self time)
    steps: int
    wall_ms_per_step: float
    categories: dict[str, float] = field(default_factory=dict)  # ms per step
    top: list[dict] = field(default_factory=list)  # name, category, ms_per_step, calls_per_step
    trace: str | None = None
    busy_ms_per_step: float | None = None  # CUDA: time any kernel/copy runs (the union of them)
    phases: dict | None = None  # CUDA with phase markers: phase_table()

    @property
    def total_ms_per_step(self) -> float:
        return sum(self.categories.values())

    def report(self, top_n: int = 20) -> str:
        total = self.total_ms_per_step or 1e-9
        unit = "kernel (device) self time" if self.device == "cuda" else "CPU operator self time"
        lines = [f"kernel profile: {self.steps} measured steps, {unit} per step"
                 + (f"; trace {self.trace}" if self.trace else "")]
        for cat, ms in sorted(self.categories.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {cat:28s} {ms:10.2f} ms  {100 * ms / total:5.1f}%")
        lines.append(
            f"  {'total':28s} {self.total_ms_per_step:10.2f} ms = "
            f"{100 * self.total_ms_per_step / max(self.wall_ms_per_step, 1e-9):.1f}% of the "
            f"{self.wall_ms_per_step:.1f} ms step (streams and threads may overlap)"
        )
        if self.busy_ms_per_step is not None:
            busy = 100 * self.busy_ms_per_step / max(self.wall_ms_per_step, 1e-9)
            lines.append(
                f"  device busy (any kernel or copy running) {self.busy_ms_per_step:.2f} ms = "
                f"{busy:.1f}% of the step; idle {100 - busy:.1f}% (waiting on the host)"
            )
        if self.phases:
            lines.append(format_phases(self.phases))
        lines.append(f"top {min(top_n, len(self.top))} by time: ms/step, calls/step, category, name")
        for k in self.top[:top_n]:
            name = k["name"] if len(k["name"]) <= 100 else k["name"][:97] + "..."
            lines.append(
                f"  {k['ms_per_step']:9.2f} {k['calls_per_step']:8.1f}  {k['category']:26s} {name}"
            )
        return "\n".join(lines)

    def to_json(self, top_n: int | None = None) -> dict:
        return {
            "device": self.device,
            "steps": self.steps,
            "wall_ms_per_step": self.wall_ms_per_step,
            "total_ms_per_step": self.total_ms_per_step,
            "busy_ms_per_step": self.busy_ms_per_step,
            "categories_ms_per_step": self.categories,
            "top": self.top if top_n is None else self.top[:top_n],
            "trace": self.trace,
            "phases": self.phases,
        }


class StepProfiler:
    """start() before the first measured step, stop(...) after the last one (device idle)."""

    def __init__(self, out_dir: str, cuda: bool) -> None:
        self.out_dir, self.cuda = out_dir, cuda
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.prof = profile(activities=activities, record_shapes=False, with_stack=False)
        self.started = False

    def start(self) -> None:
        if not self.started:
            self.prof.start()
            self.started = True

    def stop(self, steps: int, wall_s: float, trace: bool = True) -> KernelSummary:
        if self.cuda:
            torch.cuda.synchronize()
        self.prof.stop()
        os.makedirs(self.out_dir, exist_ok=True)
        summary = summarise(self.prof.key_averages(), self.cuda, steps, wall_s)
        if self.cuda:
            spans = [
                (e.time_range.start, e.time_range.end)
                for e in self.prof.events()
                if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
                and getattr(e, "time_range", None) is not None
            ]
            # None, not 0, if this torch lists no device events (no "100% idle" from missing data).
            summary.busy_ms_per_step = union_length(spans) / 1e3 / steps if spans else None
        if trace:
            summary.trace = os.path.join(self.out_dir, "trace.json.gz")
            self.prof.export_chrome_trace(summary.trace)
            if self.cuda:
                with gzip.open(summary.trace, "rt") as f:
                    summary.phases = phase_table(json.load(f).get("traceEvents", []), steps)
        with open(os.path.join(self.out_dir, "kernel_profile.json"), "w") as f:
            json.dump(summary.to_json(), f, indent=1)
        return summary


def union_length(spans: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping [start, end) spans (kernels on several streams
    overlap: their sum overstates how long the device is busy)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarise(averages, cuda: bool, steps: int, wall_s: float) -> KernelSummary:
    """Per-category and per-name self time per step from `prof.key_averages()`."""
    rows = []
    for evt in averages:
        if cuda:
            # Kernels, memcpys and memsets are the events that run on the device.
            if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            us = evt.self_device_time_total
        else:
            us = evt.self_cpu_time_total
        if us <= 0:
            continue
        rows.append((evt.key, us / 1e3 / steps, evt.count / steps))
    rows.sort(key=lambda r: -r[1])
    summary = KernelSummary("cuda" if cuda else "cpu", steps, 1e3 * wall_s / steps)
    for name, ms, calls in rows:
        cat = category(name)
        summary.categories[cat] = summary.categories.get(cat, 0.0) + ms
        summary.top.append(
            {"name": name, "category": cat, "ms_per_step": ms, "calls_per_step": calls}
        )
    return summary


PHASE_PREFIX = "phase: "


def phase_marker(name: str) -> None:
    """A zero-length annotation in the profiler's trace (cheap when no profiler runs)."""
    with torch.profiler.record_function(PHASE_PREFIX + name):
        pass


def install_phase_markers(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Markers at the start of the forward and (through a hook on the output's gradient) the
    backward of each vision and LLM block, the vision tower, the projector, the LLM's final
    norm, and at the optimizer step. Public module / tensor / optimizer hooks only: the model is
    unchanged, and compiled blocks stay compiled (module hooks run outside the compiled forward)."""

    def mark(module: torch.nn.Module, name: str) -> None:
        def pre(_m, _args):
            phase_marker(f"fwd {name}")

        def post(_m, _args, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda _g: phase_marker(f"bwd {name}"))

        # prepend: before FSDP2's own hooks (its unshard in the pre-forward, its pre-backward
        # tensor hook registered in its post-forward), so that a block's all-gather wait and
        # copies count for that block, not for the one before it.
        module.register_forward_pre_hook(pre, prepend=True)
        module.register_forward_hook(post, prepend=True)

    mark(model.vision_tower, "vision_tower")
    for i, block in enumerate(model.vision_tower.layers.values()):
        mark(block, f"vision_tower.layers.{i}")
    mark(model.projector, "projector")
    llm = model.language_model
    for i, block in enumerate(llm.layers.values()):
        mark(block, f"language_model.layers.{i}")
    mark(llm.norm, "language_model.norm")
    # The head: its forward phase also holds the loss's forward and backward (no module of its
    # own), up to the gradient of the logits, where "bwd language_model.output" begins.
    mark(llm.output, "language_model.output")
    optimizer.register_step_pre_hook(lambda *_: phase_marker("optimizer"))


def phase_table(events: list[dict], steps: int, top_gaps: int = 5) -> dict | None:
    """Device time per phase from a Chrome trace's events (see the module docstring): kernel ms
    and idle ms per step by phase group (block indices folded into N), and the largest gaps.
    None when the trace has no phase markers or no device events."""
    launch_ts = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    marks = sorted(
        (e["ts"], e["name"][len(PHASE_PREFIX):])
        for e in events
        if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith(PHASE_PREFIX)
    )
    device = sorted(
        (e for e in events
         if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
        key=lambda e: e["ts"],
    )
    if not marks or not device:
        return None
    mark_ts = [m[0] for m in marks]
    groups: dict[str, dict[str, float]] = {}
    gaps: list[tuple[float, str, str]] = []
    end = None
    for e in device:
        t = launch_ts.get(e.get("args", {}).get("correlation"))
        if t is None:
            phase = "(no launch record)"
        else:
            i = bisect.bisect_right(mark_ts, t) - 1
            phase = marks[i][1] if i >= 0 else "(before the first marker)"
        g = groups.setdefault(re.sub(r"\.\d+(?=$|\b)", ".N", phase), {"kernel_ms": 0.0, "idle_ms": 0.0})
        g["kernel_ms"] += e["dur"] / 1e3 / steps
        if end is not None and e["ts"] > end:
            gap = e["ts"] - end
            g["idle_ms"] += gap / 1e3 / steps
            gaps.append((gap / 1e3, phase, e["name"]))
        end = e["ts"] + e["dur"] if end is None else max(end, e["ts"] + e["dur"])
    gaps.sort(key=lambda x: -x[0])
    return {
        "groups": dict(sorted(groups.items(), key=lambda kv: -(kv[1]["kernel_ms"] + kv[1]["idle_ms"]))),
        "largest_gaps": [{"ms": ms, "phase": ph, "next_kernel": k} for ms, ph, k in gaps[:top_gaps]],
    }


def format_phases(phases: dict) -> str:
    lines = ["device time by phase (kernels by the phase that launched them; idle = the gaps that "
             "end in that phase), ms/step:",
             f"  {'phase':50s} {'kernels':>9s} {'idle':>8s}"]
    for name, g in phases["groups"].items():
        lines.append(f"  {name:50s} {g['kernel_ms']:9.2f} {g['idle_ms']:8.2f}")
    for g in phases["largest_gaps"]:
        k = g["next_kernel"] if len(g["next_kernel"]) <= 50 else g["next_kernel"][:47] + "..."
        lines.append(f"  gap {g['ms']:8.2f} ms in {g['phase']} before {k}")
    return "\n".join(lines)
