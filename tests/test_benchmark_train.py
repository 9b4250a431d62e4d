"""The training-throughput benchmark: its synthetic data follows the stated mix, its step breakdown
charges each segment to the right part, and a 2-step debug run prints every figure, consistently.
"""

import gzip
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from kernel_profile import category, format_phases, phase_table, summarise, union_length
from step_marks import StepMarks
from synthetic_data import write_dataset
from throughput_report import NewShapes, report

from titan_llava.data.anyres import LLAVA_NEXT_GRID_PINPOINTS, num_image_tokens

FIGURES = [
    "samples/s/GPU:",
    "text tokens/s/GPU:",
    "image tokens/s/GPU:",
    "tokens/s/GPU:",
    "model TFLOP/sample:",
    "MFU:",
    # every bucket, in the breakdown line itself (bare "vision"/"llm"/"optimizer" also match the
    # config-override line)
    "step breakdown: data_wait ",
    " ms (",
    "peak memory:",
    "allocator:",
    "vision batches:",
    "vision ms per measured step:",
    "ratio to reference:",
    "shipped tiny tokenizer",
]


@pytest.mark.parametrize("stage", [1, 2])
def test_synthetic_data_follows_the_mix(tmp_path, stage):
    path, stats = write_dataset(str(tmp_path), stage, 300, seed=1, images_per_size=1)
    with open(path) as f:
        records = json.load(f)
    assert len(records) == stats.samples == 300
    tokens = []
    for r in records:
        if "image" not in r:
            assert not any("<image>" in t["value"] for t in r["conversations"])
            continue
        # The size comes from the file itself, not from its name.
        size = Image.open(os.path.join(tmp_path, r["image"])).size
        tokens.append(num_image_tokens(size, LLAVA_NEXT_GRID_PINPOINTS))
    assert stats.mean_image_tokens == pytest.approx(sum(tokens) / len(tokens))
    # The planning numbers: ~2,000 image tokens, ~4.4 tiles per image.
    assert 1800 < stats.mean_image_tokens < 2400 and 4.0 < stats.mean_tiles < 5.0
    if stage == 1:
        assert stats.text_only == 0 and 12 <= stats.mean_text_tokens <= 20
    else:
        assert 8 <= stats.text_only <= 30  # ~6% of 300
        assert 200 <= stats.mean_text_tokens <= 330


def test_new_vision_shapes_are_counted_in_the_measured_steps_only():
    shapes = NewShapes()
    for tiles in (33, 0, 29):  # warm-up: seen, not counted (0: a text-only micro-batch)
        shapes.add(tiles, measured=False)
    for tiles in (33, 40, 0, 40, 29, 12):
        shapes.add(tiles, measured=True)
    assert (shapes.measured, shapes.new) == (5, 2)  # 40 and 12; the text-only one not counted


def test_new_vision_shapes_are_flagged_per_measured_step():
    shapes = NewShapes()
    shapes.add_step([33, 29], measured=False)
    for step in ([33, 40], [0, 29], [40, 12], [12]):
        shapes.add_step(step, measured=True)
    assert shapes.new_per_step == [True, False, True, False]
    assert (shapes.measured, shapes.new) == (6, 2)


def test_breakdown_charges_segments():
    marks = StepMarks(torch.device("cpu"))
    marks.active = True
    marks.begin_step()
    t = {
        "start": 0.0,
        "vis_fwd_start": 0.001,
        "vis_fwd_end": 0.004,
        "vis_bwd_start": 0.010,
        "bwd_end": 0.012,
        "opt_start": 0.013,
        "opt_end": 0.017,
        "end": 0.018,
    }
    marks.steps[-1] = list(t.items())
    bd = marks.breakdown_ms()
    assert bd["vision"] == pytest.approx(3 + 2)
    assert bd["llm"] == pytest.approx(1 + 6)
    assert bd["grad_norm_clip"] == pytest.approx(1)
    assert bd["optimizer"] == pytest.approx(4 + 1)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_cublas", "matmul"),
        ("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN", "matmul"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", "attention"),
        ("void flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>", "attention"),
        ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "compiled (inductor)"),
        ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collective"),
        ("Memcpy DtoD (Device -> Device)", "copy/memset"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>",
         "elementwise/reduce (eager)"),
        ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "optimizer"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("aten::mm", "matmul"),
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw", "convolution"),
        ("sm90_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32", "convolution"),
        ("aten::mkldnn_convolution", "convolution"),
        ("triton_poi_fused__to_copy_convert_element_type_mul_0", "compiled (inductor)"),
        ("Memset (Device)", "copy/memset"),
        ("## Call CompiledFxGraph f5ezqmmk ##", "compiled (inductor)"),
        ("cudaLaunchKernel", "other"),
    ],
)
def test_kernel_categories(name, expected):
    assert category(name) == expected


def test_device_busy_time_is_the_union_of_kernel_spans():
    # Overlapping (two streams), nested, touching and disjoint spans.
    spans = [(10, 20), (15, 30), (16, 18), (30, 35), (50, 60), (0, 5)]
    assert union_length(spans) == 5 + 25 + 10
    assert union_length([]) == 0


class _Evt:
    def __init__(self, key, us, count, cuda=True):
        self.key, self.count = key, count
        self.self_device_time_total = us if cuda else 0
        self.self_cpu_time_total = 0 if cuda else us
        self.device_type = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU


def test_kernel_summary_per_step_and_device_events_only():
    evts = [
        _Evt("nvjet_hsh_256x128", 6000, 40),
        _Evt("flash_fwd_kernel", 3000, 8),
        _Evt("sm90_xmma_gemm", 2000, 20),
        _Evt("aten::mm", 9000, 60, cuda=False),  # host-side op: not device time
        _Evt("triton_poi_fused_mul_0", 0, 4),  # no time: dropped
    ]
    s = summarise(evts, cuda=True, steps=2, wall_s=0.010)
    assert s.categories == {"matmul": pytest.approx(4.0), "attention": pytest.approx(1.5)}
    assert [k["name"] for k in s.top] == ["nvjet_hsh_256x128", "flash_fwd_kernel", "sm90_xmma_gemm"]
    assert s.top[0]["ms_per_step"] == pytest.approx(3.0) and s.top[0]["calls_per_step"] == 20
    assert s.wall_ms_per_step == pytest.approx(5.0)
    text = s.report()
    assert "matmul" in text and "110.0% of the 5.0 ms step" in text


def _ev(cat, name, ts, dur=0.0, corr=None):
    e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {}}
    if corr is not None:
        e["args"]["correlation"] = corr
    return e


def test_phase_table_attributes_kernels_and_idle_to_the_launching_phase():
    # Times in microseconds, as in a Chrome trace. Host: marker "fwd ...layers.0" at 0 launches
    # k1 at 1,000 and k2 at 2,000; marker "fwd projector" at 10,000 launches k3 at 11,000;
    # "optimizer" at 50,000 launches a copy at 51,000. Device: k1 [5, 15) ms, k2 [15, 20), k3
    # [30, 40) (10 ms idle before it), the copy [100, 104) (60 ms idle). k0 has no launch record.
    # k2 runs after the projector's marker but was launched before it: it counts for layers.12.
    # k4, launched under "fwd projector", runs on another stream overlapping k3 ([32, 45)): the
    # union, not the last kernel's end, decides the next gap (55 ms, not 59), and no gap is
    # counted before k4 itself.
    events = [
        _ev("user_annotation", "phase: fwd language_model.layers.12", 0),
        _ev("user_annotation", "phase: fwd projector", 10_000),
        _ev("user_annotation", "phase: optimizer", 50_000),
        _ev("user_annotation", "FSDP::pre_forward", 49_000),  # not a phase marker
        _ev("cuda_runtime", "cudaLaunchKernel", 1_000, 1, corr=1),
        _ev("cuda_driver", "cuLaunchKernel", 2_000, 1, corr=2),
        _ev("cuda_runtime", "cudaLaunchKernel", 11_000, 1, corr=3),
        _ev("cuda_runtime", "cudaMemcpyAsync", 51_000, 1, corr=4),
        _ev("cuda_runtime", "cudaLaunchKernel", 12_000, 1, corr=5),
        _ev("kernel", "k0", 4_000, 1_000),
        _ev("kernel", "k1", 5_000, 10_000, corr=1),
        _ev("kernel", "k2", 15_000, 5_000, corr=2),
        _ev("kernel", "k3", 30_000, 10_000, corr=3),
        _ev("kernel", "k4", 32_000, 13_000, corr=5),
        _ev("gpu_memcpy", "Memcpy HtoD", 100_000, 4_000, corr=4),
    ]
    t = phase_table(events, steps=1)
    g = t["groups"]
    assert g["fwd language_model.layers.N"] == {"kernel_ms": 15.0, "idle_ms": 0.0}
    assert g["fwd projector"] == {"kernel_ms": 23.0, "idle_ms": 10.0}
    assert g["(no launch record)"] == {"kernel_ms": 1.0, "idle_ms": 0.0}
    assert g["optimizer"] == {"kernel_ms": 4.0, "idle_ms": 55.0}
    assert list(g) == ["optimizer", "fwd projector", "fwd language_model.layers.N",
                       "(no launch record)"]  # by kernel + idle time
    assert [x["ms"] for x in t["largest_gaps"]] == [55.0, 10.0]
    assert t["largest_gaps"][1] == {"ms": 10.0, "phase": "fwd projector",
                                    "next_kernel": "k3"}
    text = format_phases(t)
    assert "fwd language_model.layers.N" in text and "gap    55.00 ms in optimizer before" in text
    # Per step: two steps halve every figure.
    assert phase_table(events, steps=2)["groups"]["optimizer"] == {"kernel_ms": 2.0, "idle_ms": 27.5}
    # A launch before the first marker has its own label.
    early = [dict(e, ts=-5) if e["name"] == "cudaLaunchKernel" and e["args"]["correlation"] == 1
             else e for e in events]
    assert phase_table(early, 1)["groups"]["(before the first marker)"]["kernel_ms"] == 10.0
    # No markers (or no device events): no table rather than a misleading one.
    assert phase_table([e for e in events if not e["name"].startswith("phase: ")], 1) is None
    assert phase_table([e for e in events if e["cat"] == "user_annotation"], 1) is None


@pytest.mark.parametrize(
    "stage,extra",
    [
        (1, ["--no-trim-last-block", "--optimizer.implementation", "fused", "--sgd-standin",
             "--inductor", "triton.autotune_pointwise=False",
             "--activation_checkpoint.llm_layers_without_ac", "1"]),
        (2, ["--llm-layers", "1", "--profile", "prof", "--optimizer.implementation", "fused",
             "--no-defer-check", "--full-logits", "--activation_checkpoint.components", "llm"]),
    ],
)
def test_benchmark_prints_every_figure(tmp_path, stage, extra):
    out_json = tmp_path / "r.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "train_throughput.py"),
        "--stage",
        str(stage),
        "--flavor",
        "debug",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json-out",
        str(out_json),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        env.pop(key, None)
    proc = subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for figure in FIGURES:
        assert figure in proc.stdout, f"missing {figure!r} in:\n{proc.stdout}"
    r = json.loads(out_json.read_text())
    line = next(x for x in proc.stdout.splitlines() if x.startswith("step breakdown: "))
    for bucket in ("data_wait", "vision", "llm", "bwd_tail", "grad_norm_clip", "optimizer",
                   "host_other"):
        assert f" {bucket} " in line, line
    # No figure may be NaN / inf (json writes NaN as NaN): every number of the result.
    def numbers(x):
        if isinstance(x, bool) or x is None or isinstance(x, str):
            return []
        if isinstance(x, (int, float)):
            return [x]
        items = x.values() if isinstance(x, dict) else x
        return [n for v in items for n in numbers(v)]
    assert all(math.isfinite(n) for n in numbers(r)), r
    # The FLOP figure: positive, and consistent with the rate.
    assert r["tflop_per_sample"] > 0
    assert r["tflops_per_s"] == pytest.approx(r["tflop_per_sample"] * r["samples_per_s"])
    assert r["breakdown_ms"]["grad_norm_clip"] > 0 and r["breakdown_ms"]["data_wait"] >= 0
    assert r["measured_steps"] == 2 and r["mfu"] is None and r["peak_memory_gib"] is None
    # The GPU's MFU line (no peak on the CPU): MFU = TFLOP/s over the peak.
    gpu = report({**r, "mfu": r["tflops_per_s"] * 1e12 / 989e12, "peak_flops": 989e12})
    assert f"MFU: {100 * r['tflops_per_s'] / 989:.1f}% of 989 TFLOP/s bf16 dense" in gpu
    # run_train.sh's allocator settings (none set here); no allocator figures off CUDA.
    assert r["alloc_conf"] == "PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True'"
    assert r["alloc_retries"] is None
    # Micro-batches with images among the measured ones, and those whose tile count is new.
    assert 0 <= r["vision_new_tile_counts"] <= r["vision_micro_batches"]
    assert r["vision_micro_batches"] >= (2 if stage == 1 else 1)
    # Per measured step: the vision bucket, and whether a new tile count came in that step.
    assert len(r["vision_ms_per_step"]) == len(r["vision_new_per_step"]) == 2
    # No flash implementation asked for: none named, no FA4 kernel calls.
    assert r["flash_attention_impl"] == ""
    assert r["fa4_calls_measured"] == {"forward": 0, "backward": 0}
    # With FA4 (a GPU run), the config line names it and its kernel calls in the measured steps.
    fa4 = report({**r, "flash_attention_impl": "FA4",
                  "fa4_calls_measured": {"forward": 64, "backward": 64}})
    assert ("flash implementation FA4: 64 forward and 64 backward FA4 kernel calls in the "
            "measured steps") in fa4
    assert "flash implementation" not in report(r)
    assert sum(r["vision_new_per_step"]) <= r["vision_new_tile_counts"]
    assert sum(r["vision_ms_per_step"]) / 2 == pytest.approx(r["breakdown_ms"]["vision"])
    elapsed = r["step_time_s"] * 2
    assert r["tokens_per_s"] == pytest.approx(r["text_tokens_per_s"] + r["image_tokens_per_s"])
    assert r["samples_per_s"] * elapsed == pytest.approx(round(r["samples_per_s"] * elapsed))
    assert r["image_tokens_per_s"] > 0 and r["text_tokens_per_s"] > 0
    assert r["ratio_to_reference"] == pytest.approx(r["samples_per_s"] / {1: 4.8, 2: 2.0}[stage])
    bd = r["breakdown_ms"]
    assert bd["vision"] > 0 and bd["llm"] > 0 and bd["optimizer"] > 0
    # The backward's tail after the tower's blocks exists only where the tower trains.
    assert (bd["bwd_tail"] > 0) == (stage == 2)
    # The buckets partition the measured step.
    assert sum(bd.values()) == pytest.approx(1e3 * r["step_time_s"], rel=1e-6)
    if stage == 2:
        # --profile: the category table, the top kernels and both files.
        assert "kernel profile: 2 measured steps, CPU operator self time" in proc.stdout
        assert "PROFILED run" in proc.stdout and r["profiled"]
        kp = r["kernel_profile"]
        assert kp["categories_ms_per_step"]["matmul"] > 0
        assert kp["categories_ms_per_step"]["attention"] > 0
        assert sum(kp["categories_ms_per_step"].values()) == pytest.approx(kp["total_ms_per_step"])
        assert (tmp_path / "prof" / "kernel_profile.json").exists()
        assert (tmp_path / "prof" / "trace.json.gz").stat().st_size > 0
        # The phase markers reach the trace (the phase table itself needs device kernels: CUDA),
        # in the order a step runs them (the last step's, the last of each): each backward
        # marker after the forward has finished. (The first profiled step has no "data": the
        # profiler starts after it.)
        with gzip.open(tmp_path / "prof" / "trace.json.gz", "rt") as f:
            last: dict[str, float] = {}
            for e in json.load(f)["traceEvents"]:
                if e.get("cat") == "user_annotation" and e["name"].startswith("phase: "):
                    last[e["name"][7:]] = max(last.get(e["name"][7:], float("-inf")), e["ts"])
        order = ["data", "step start", "fwd vision_tower", "fwd vision_tower.layers.0",
                 "fwd projector", "fwd language_model.layers.0", "fwd language_model.norm",
                 "fwd language_model.output", "bwd language_model.output",
                 "bwd language_model.norm", "bwd language_model.layers.0", "bwd projector",
                 "bwd vision_tower.layers.0", "optimizer"]
        assert set(order) <= set(last), set(order) - set(last)
        assert sorted(order, key=last.get) == order
        assert kp["phases"] is None
    else:
        assert not r["profiled"] and r["kernel_profile"] is None
    # --inductor options are reported with the compile setting.
    options = {"triton.autotune_pointwise": False} if stage == 1 else {}
    assert r["inductor_options"] == options
    assert ("compile False triton.autotune_pointwise=False," in proc.stdout) == (stage == 1)
    # AC (full here) on the LLM's blocks only, in stage 2: reported with the policy.
    assert r["ac"] == "full"
    assert r["ac_components"] == (["llm"] if stage == 2 else ["llm", "vision"])
    assert ("AC full (llm only)," in proc.stdout) == (stage == 2)
    # Stage 1 leaves the last of its 2 LLM blocks without AC: in the report's config line.
    assert r["ac_without"] == {"llm": 1 if stage == 1 else 0, "vision": 0}
    assert ("AC full, the last 1 LLM blocks without AC," in proc.stdout) == (stage == 1)
    # Stage 1 untrims the last block itself; stage 2 by computing logits on every position.
    assert not r["trim_last_block"]
    assert r["full_logits"] == (stage == 2)
    assert ("logits at every position" in proc.stdout) == (stage == 2)
    # --sgd-standin (stage 1 here): a state-free SGD in AdamW's place, and the rate with AdamW's
    # step estimated from SGD's (7/3 of its optimizer time).
    if stage == 1:
        assert r["optimizer"].startswith("SGD stand-in") and "OPTIMIZER: SGD stand-in" in proc.stdout
        adamw_s = elapsed + 2 * bd["optimizer"] * (7 / 3 - 1) / 1e3
        assert r["adamw_estimate_samples_per_s"] == pytest.approx(
            r["samples_per_s"] * elapsed / adamw_s
        )
    else:
        assert r["optimizer"] == "AdamW" and r["adamw_estimate_samples_per_s"] is None
    # Fused AdamW reads each step's numbers a step later unless --no-defer-check.
    assert r["deferred_check"] == (stage == 1)
    assert f"step check deferred {stage == 1}" in proc.stdout
    if stage == 2:
        assert r["llm_layers"] == 1 and r["llm_layers_full"] == 2
        assert "REDUCED DEPTH" in proc.stdout and r["full_depth_estimate_samples_per_s"] > 0
        # By step time: the LLM, clip and optimizer buckets twice as long (2 of 2 layers), the rest as is.
        deep = bd["llm"] + bd["grad_norm_clip"] + bd["optimizer"]
        samples = r["samples_per_s"] * elapsed / 2
        assert r["full_depth_estimate_by_time_samples_per_s"] == pytest.approx(
            samples / ((1e3 * r["step_time_s"] + deep) / 1e3)
        )
        assert "full-depth estimate by step time" in proc.stdout
    else:
        assert r["full_depth_estimate_by_time_samples_per_s"] is None


def test_full_logits_before_gives_the_same_loss(tmp_path):
    """--full-logits (head and fp32 CE on every position) is the same training as the default
    (logits at loss positions only): same loss after 2 steps."""
    losses = []
    for extra in ([], ["--full-logits"]):
        out_json = tmp_path / f"r{len(extra)}.json"
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "train_throughput.py"),
               "--stage", "1", "--flavor", "debug", "--steps", "1", "--warmup", "1",
               "--json-out", str(out_json), *extra]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("RANK", None)
        proc = subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        r = json.loads(out_json.read_text())
        assert r["full_logits"] == bool(extra)
        losses.append(r["final_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_inductor_options_parse_and_refuse_bad_pairs():
    from train_throughput import inductor_options

    assert inductor_options(["triton.autotune_pointwise=False", "coordinate_descent_tuning=True"]) == {
        "triton.autotune_pointwise": False, "coordinate_descent_tuning": True}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        inductor_options(["coordinate_descent_tuning"])
    with pytest.raises(ValueError, match="not a Python literal"):
        inductor_options(["coordinate_descent_tuning=yes"])
    with pytest.raises(ValueError, match="no option 'no_such_option'"):
        inductor_options(["no_such_option=1"])
    with pytest.raises(ValueError, match="no option 'triton.no_such_option'"):
        inductor_options(["triton.no_such_option=1"])
    with pytest.raises(ValueError, match="expected a bool"):
        inductor_options(["coordinate_descent_tuning='yes'"])
    with pytest.raises(ValueError, match="expected a bool"):
        inductor_options(["coordinate_descent_tuning=1"])


def test_fsdp_host_overhead_benchmark_prints_every_case():
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "fsdp_host_overhead.py"),
           "--blocks", "2", "--iters", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.endswith(" ms")]
    assert len(rows) == 6 and all(float(r.split()[-2]) > 0 for r in rows), proc.stdout
    assert sum("FSDP unit" in r for r in rows) == 3


def test_patch_embed_benchmark_matches_the_conv_and_prints_timings():
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "patch_embed.py"), "--iters", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff_line = next(line for line in proc.stdout.splitlines() if line.startswith("max |conv"))
    assert float(diff_line.split("= ")[1].split()[0]) < 1e-4  # the same product (fp32 on CPU)
    assert "conv2d " in proc.stdout and "patches @ W" in proc.stdout


def test_rope_kernel_benchmark_matches_the_model_and_prints_timings():
    # CPU: eager variants only (compiled ones are the GPU's business); the halves and swap
    # formulations must give exactly the model's rope, forward and gradient.
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "rope_kernel.py"), "--tokens", "64", "--iters", "2"],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0] + " " + line.split()[1]: line.split()[2:]
            for line in proc.stdout.splitlines() if line.startswith(("rotate_half ", "halves ", "swap "))}
    assert set(rows) == {"rotate_half eager", "halves eager", "swap eager"}
    for fwd_ms, gbps, fb_ms, diff, gdiff in rows.values():
        assert float(fwd_ms) > 0 and float(fb_ms) > 0
        assert float(diff) == 0.0 and float(gdiff) == 0.0


def test_rope_kernel_lists_triton_launches_in_order():
    from rope_kernel import launch_lines

    events = [
        {"cat": "kernel", "name": "triton_poi_fused_add_cat_mul_neg_1", "ts": 20.0, "dur": 517.4,
         "args": {"grid": [130960, 1, 1], "block": [256, 1, 1], "registers per thread": 45}},
        {"cat": "kernel", "name": "void pytorch_flash::flash_fwd_kernel", "ts": 30.0, "dur": 9.0,
         "args": {"grid": [19, 8, 32], "block": [128, 1, 1]}},
        {"cat": "cpu_op", "name": "triton_poi_fused_add_cat_mul_neg_1", "ts": 1.0, "dur": 3.0},
        {"cat": "kernel", "name": "triton_poi_fused_add_cat_mul_neg_slice_2", "ts": 10.0, "dur": 118.0,
         "args": {"grid": [65480, 1, 1], "block": [128, 1, 1]}},
    ]
    assert launch_lines(events) == [
        "    triton_poi_fused_add_cat_mul_neg_slice_2: grid [65480, 1, 1], 4 warps, ? registers, 118 us",
        "    triton_poi_fused_add_cat_mul_neg_1: grid [130960, 1, 1], 8 warps, 45 registers, 517 us",
    ]


def test_attention_kernel_benchmark_runs_its_reference_check_on_cpu():
    # CPU: the dense-mask route against the per-document fp32 reference; the CUDA kernels are
    # reported as skipped.
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "attention_kernel.py"), "--iters", "1"],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("dense mask"))
    figures, cycling = row.split("cycling 3 packings:")
    out_diff, grad_diff = (float(x) for x in figures.split()[-2:])
    assert out_diff < 1e-5 and grad_diff < 1e-5
    assert float(cycling.split()[0]) > 0
    assert "flash varlen, cuDNN ragged: skipped (need CUDA)" in proc.stdout
    assert proc.stdout.rstrip().endswith("ATTENTION KERNELS OK (report only, not counted: cuDNN ragged)")


def test_attention_kernel_flop_count_by_hand():
    from titan_llava.flops import attention_flops

    # Documents of 3 and 2 tokens: 6 + 3 causal pairs; 2 heads x 4 dims: 4 * 8 FLOPs per pair.
    assert attention_flops(2 * 4, [3, 2], backward=False) == 4 * 8 * 9
    assert attention_flops(2 * 4, [3, 2], backward=True) == 3 * 4 * 8 * 9


def test_sgd_standin_follows_the_lr_schedule():
    """--sgd-standin replaces AdamW after the trainer built its schedule: the new SGD gets the
    groups' base rates (not the warm-up's first, scaled rate) and a schedule of its own, so its
    rates follow the run's schedule step by step, as AdamW's would have."""
    from types import SimpleNamespace

    from train_throughput import sgd_standin

    from titan_llava.config import load_config
    from titan_llava.optim import build_lr_scheduler

    cfg = load_config(["--training.steps", "10", "--lr_scheduler.warmup_steps", "4",
                       "--optimizer.lr", "1e-3"])
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    adamw = torch.optim.AdamW([{"params": params[:1], "lr": 1e-3, "name": "a"},
                               {"params": params[1:], "lr": 2e-4, "name": "b"}])
    expected = build_lr_scheduler(
        torch.optim.SGD([{"params": [torch.zeros(1)], "lr": 1e-3},
                         {"params": [torch.zeros(1)], "lr": 2e-4}]), cfg, 10)
    trainer = SimpleNamespace(cfg=cfg, optimizer=adamw, total_steps=10,
                              lr_scheduler=build_lr_scheduler(adamw, cfg, 10),
                              step_check=SimpleNamespace(optimizer=adamw))
    sgd_standin(trainer)
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert trainer.step_check.optimizer is trainer.optimizer
    rates = []
    for _ in range(10):
        got = [g["lr"] for g in trainer.optimizer.param_groups]
        want = [g["lr"] for g in expected.optimizer.param_groups]
        assert got == pytest.approx(want, rel=1e-12, abs=0), (len(rates), got, want)
        rates.append(got[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        expected.optimizer.step()
        expected.step()
    assert max(rates) == pytest.approx(1e-3)  # the warm-up reached the base rate
    with pytest.raises(ValueError, match="checkpoint.enable"):
        sgd_standin(SimpleNamespace(cfg=load_config(["--checkpoint.enable"])))


@pytest.mark.parametrize("plan, run", [("round8", "s1_8k_eager"), ("round9", "s1_8k_auto_eager")])
def test_gpu_session_wrapper_returns_the_summary_and_the_logs(tmp_path, plan, run):
    """benchmarks/gpu_session.sh (the device call's wrapper) on the CPU with the debug flavor and
    one short run of the plan: its figures reach summary.txt, and every log comes back in
    logs.tgz under OUT (what a device call returns)."""
    import tarfile

    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "PLAN": plan, "FLAVOR": "debug", "STEPS": "1",
           "BUDGET_S": "300", "ONLY": run, "OMP_NUM_THREADS": "1",
           # A checkout without the carried folders: the wrapper says so and goes on.
           "PYTHONPATH": ROOT}
    env.pop("RANK", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_session.sh")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "gpu_session: plan exited 0; returned: logs.tgz summary.txt" in proc.stdout
    summary = (out / "summary.txt").read_text()
    assert f"== {run} " in summary and "samples/s/GPU:" in summary, summary
    with tarfile.open(out / "logs.tgz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"summary.txt", f"{run}.log"} <= names, names
