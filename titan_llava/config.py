"""Job configuration: section dataclasses (TorchTitan names), TOML/JSON loading, `--section.key` CLI
overrides, validation (rules in config_validate.py), and the resolved-config dump. Precedence:
defaults < config file < CLI.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, get_type_hints

from titan_llava.config_parse import BareFlag, coerce, load_config_file, parse_cli, suggest

TRAINABLE_PARTS = ("projector", "llm", "vision")
TEMPLATES = ("plain", "vicuna_v1")


@dataclass
class Job:
    config_file: str | None = None
    """TOML (or a dumped config.json) to load; set on the CLI as `--job.config_file`."""
    dump_folder: str = "./outputs"
    """Run folder: resolved config.json, metrics.jsonl, checkpoint/, tb/ live here."""
    seed: int = 42
    """Seed for model init, data order and every RNG (see distributed.utils.set_determinism)."""
    description: str = ""
    """Free text recorded in the dumped config."""


@dataclass
class Model:
    flavor: str = "debug"
    """Key of titan_llava.models.args.LLAVA_FLAVORS (ignored where the architecture comes from HF
    config.json files via checkpoint.initial_load_in_hf)."""
    tokenizer_path: str = "tests/assets/tokenizer/tokenizer.model"
    """SentencePiece tokenizer.model (Vicuna's for the real recipe)."""
    attn_backend: Literal["sdpa", "flex", "flash"] = "sdpa"
    """LLM attention kernel: "sdpa" (torch SDPA; packed rows run on torch's flash varlen kernel on
    CUDA in bf16/fp16, on a dense document mask elsewhere), "flex" (FlexAttention; compile the
    blocks), or "flash" (flash-attn varlen, an optional dependency)."""
    flash_attention_impl: Literal["", "FA3", "FA4", "auto"] = ""
    """With attn_backend "sdpa" on CUDA: the flash-attention implementation torch's kernels
    route to (torch >= 2.11's `activate_flash_attention_impl`; the package must be installed:
    FA3 = flash-attention's Hopper build, FA4 = PyPI's flash-attn-4, run through
    models/fa4_compat.py). "" = torch's own (FA2-class). "auto" = FA4 on a Hopper GPU where it
    imports, else torch's own (logged). Checked once against fp32 SDPA before the model is built."""
    image_aspect_ratio: Literal["anyres", "pad", "resize"] | None = None
    """Image preprocessing: LLaVA-NeXT AnyRes tiling, or one 336 tile (pad / resize). None: the
    mode the starting checkpoint was trained with (an earlier run's model_args.json; a Hugging
    Face LlavaNext checkpoint is AnyRes), else "anyres". Set to another mode than the earlier
    run's, it is used and the set-up log says so."""
    grid_pinpoints: list[tuple[int, int]] | None = None
    """AnyRes candidate resolutions as (width, height), each a multiple of the 336 tile. None: the
    ones the starting checkpoint was trained with (a LlavaNext config.json, or the earlier run's
    model_args.json), else LLaVA-NeXT's five (336x672, 672x336, 672x672, 1008x336, 336x1008).
    Set, they must be the starting checkpoint's candidates (in any order; the order set here is
    the one AnyRes breaks ties by)."""


@dataclass
class Data:
    path: str = "tests/assets/sample_data/pretrain.json"
    """LLaVA JSON (top-level list) or JSONL with id / image / conversations."""
    image_folder: str | None = "tests/assets/sample_data"
    """Folder that relative image paths resolve in (images may not escape it); None = text only."""
    template: Literal["plain", "vicuna_v1"] = "plain"
    """Conversation template: "plain" (stage 1 captions) or "vicuna_v1" (stage 2 chat)."""
    shuffle: bool = True
    """Seeded shuffle of the sample order each epoch (seed = job.seed + epoch)."""
    packing: bool = False
    """Pack several samples into each row (per-document attention and positions; the loss and
    gradients equal the unpacked ones). A micro-batch is padded only to its longest row."""
    packing_row_len: int = -1
    """Tokens per packed row; -1 = max_seq_len. Larger than max_seq_len is allowed (samples are
    still truncated at max_seq_len): with ~2,100-token AnyRes samples, one row of
    local_batch_size x 4096 tokens wastes no slots, where 4096-token rows rarely hold two samples.
    Attention cost per document is unchanged (documents never attend to each other)."""
    packing_lookahead: int = 8
    """Packing: each row starts with the oldest waiting sample, then takes the longest of the next
    `packing_lookahead` waiting samples that still fits, until none fits (1 = greedy in order).
    The packer holds about this many processed samples."""
    group_by_modality_length: bool = False
    """Reference LengthGroupedSampler: batches are all-image or all-text, grouped by length."""
    modality_megabatch: int = -1
    """group_by_modality_length with packing: samples per single-modality megabatch (the reference's
    megabatch is its global batch, the samples of one step: 128 in stage 2). Must be set there,
    since training.global_batch_size counts packed rows; without packing the megabatch is
    training.global_batch_size, as in the reference, and this stays -1."""
    manifest: bool = False
    """Write <dump_folder>/manifest/rank<r>.jsonl with the sample ids of every step (audit/resume)."""
    max_seq_len: int = 4096
    """Row length in tokens after image expansion; longer samples are truncated (reference)."""
    num_workers: int = 0
    """Parallel preprocessing workers per rank (0 = in the training process)."""
    strict: bool = False
    """Raise on the first bad sample instead of skipping and counting it."""


@dataclass
class Training:
    steps: int = 10
    """Optimizer steps to train; -1 = `epochs` passes over the data (see resolve_steps)."""
    epochs: int = 1
    """Passes over the data when steps = -1 (the reference trains one epoch per stage)."""
    local_batch_size: int = 2
    """Rows per micro-batch per data-parallel rank."""
    global_batch_size: int = -1
    """Rows per optimizer step over all ranks; must be a multiple of local_batch_size x dp degree
    (the quotient is the gradient-accumulation count). -1 = local_batch_size x dp (no accumulation)."""
    trainable: list[str] = field(default_factory=lambda: ["projector"])
    """Parts that train: any of "projector" (incl. image_newline), "llm", "vision". Others are frozen
    before sharding and get no optimizer state."""
    mixed_precision_param: Literal["bfloat16", "float32"] = "bfloat16"
    """FSDP2 compute dtype of parameters (master weights stay fp32); float32 makes CPU runs exact."""
    mixed_precision_reduce: Literal["float32", "bfloat16"] = "float32"
    """FSDP2 gradient reduce-scatter dtype."""
    frozen_param_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Storage dtype of frozen parameters (parts not in `trainable`): they are never updated, so a
    copy above the compute dtype is only memory and a cast per all-gather. "auto" = the compute
    dtype (mixed_precision_param); with bfloat16 compute the frozen Vicuna of stage 1 takes 13.5
    instead of 27 GB and its forward and backward are bit-identical. The reference also holds its
    frozen parts in bf16 (it loads the whole model with torch_dtype=bfloat16)."""
    max_norm: float = 1.0
    """Global gradient-norm clip (HF Trainer default 1.0); 0 disables clipping."""
    loss_normalization: Literal["global_tokens", "per_microbatch"] = "global_tokens"
    """"global_tokens": summed token CE / valid tokens of the whole step (all micro-batches and ranks).
    "per_microbatch": mean CE per micro-batch averaged over micro-batches (HF Trainer)."""

    def gradient_accumulation_steps(self, dp_degree: int) -> int:
        """Micro-batches per optimizer step on each rank."""
        if self.global_batch_size == -1:
            return 1
        return self.global_batch_size // (self.local_batch_size * dp_degree)


@dataclass
class Optimizer:
    name: Literal["AdamW"] = "AdamW"
    """Optimizer class (only AdamW, as the reference)."""
    lr: float = 2e-5
    """Base learning rate; the default for every part without its own lr."""
    llm_lr: float | None = None
    """LLM learning rate (None = lr)."""
    vision_lr: float | None = None
    """Vision tower learning rate (None = lr; the stage-2 recipe uses 2e-6)."""
    projector_lr: float | None = None
    """Projector + image_newline learning rate (None = lr)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to all weights except biases and LayerNorm/RMSNorm weights
    (the HF Trainer rule)."""
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = "auto"
    """AdamW kernel: auto = fused on CUDA, foreach otherwise. Fused AdamW skips a non-finite step
    on the device, so the trainer reads each step's loss without a host sync per step; the others
    are checked (a sync) before their update."""


@dataclass
class LRScheduler:
    warmup_ratio: float = 0.03
    """Linear warmup length as a fraction of training.steps, rounded up (HF Trainer)."""
    warmup_steps: int | None = None
    """Warmup length in steps; overrides warmup_ratio when set."""
    decay_type: Literal["cosine"] = "cosine"
    """Decay after warmup (cosine, as HF get_cosine_schedule_with_warmup)."""
    min_lr_ratio: float = 0.0
    """Final lr as a fraction of the peak (the reference decays to 0)."""


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = 1
    """HSDP replicas (each holds a full copy split over its shard group); 1 = plain FSDP."""
    data_parallel_shard_degree: int = -1
    """FSDP shard-group size; -1 = world size / replicate degree."""
    fsdp_vision_unit: Literal["block", "tower"] = "block"
    """How FSDP wraps the vision tower: "block" (each CLIP layer its own unit, like the LLM's
    blocks) or "tower" (the whole tower one unit: one all-gather of its ~0.6 GB of bf16 weights
    and one gradient reduce-scatter instead of 23 of each, and 22 fewer sets of FSDP hooks per
    forward and backward; the tower's per-layer work at LLaVA-NeXT's tile counts is small)."""
    init_timeout_seconds: int = 1800
    """Timeout of every collective until the first step has finished (set-up, weight loading,
    the first compile and step)."""
    train_timeout_seconds: int = 600
    """Timeout of every collective from then on (including checkpoint saves): a rank that died or
    hangs stops the others within this time instead of holding every GPU for init_timeout."""
    replicate_frozen: bool = False
    """Keep the parts that do not train (stage 1: Vicuna and CLIP) whole on every rank instead of
    sharding them. They have no gradients and no optimizer state, so sharding only saves their
    memory, and costs two all-gathers of each frozen block per step (forward and backward).
    Replicated, they cost their full size on each GPU (13.5 GB for the bf16 Vicuna-7B), and an
    asynchronous checkpoint stages that full copy in host memory on every rank. Needs frozen
    parameters stored in the compute dtype (training.frozen_param_dtype "auto"). Checkpoints load
    either way (sharded <-> replicated)."""


@dataclass
class ActivationCheckpoint:
    mode: Literal["none", "full", "selective"] = "none"
    """Recompute block activations in backward: none, full (every block), selective."""
    selective_ac_option: str = "op"
    """Selective AC: "op" (save attention outputs and every other matmul's), "op_all_mm" (save
    every matmul's and attention's: only norms, activations, RoPE and adds are recomputed; more
    memory, less recompute) or an integer N (fully checkpoint every N-th block)."""
    components: list[str] = field(default_factory=lambda: ["llm", "vision"])
    """Which towers' blocks the mode applies to: "llm", "vision" (the other runs without AC; a
    frozen vision tower never checkpoints, it runs without autograd)."""
    llm_layers_without_ac: int = 0
    """The last N LLM blocks run without AC whatever the mode: spare memory buys back their
    recompute (~0.84 GiB per 7B block at 8192 tokens over selective "op", compiled;
    benchmarks/README.md). 0 = every block follows the mode."""
    vision_layers_without_ac: int = 0
    """The same for the vision tower's last N blocks (a trainable tower only)."""


@dataclass
class Compile:
    enable: bool = False
    """torch.compile each transformer block (dynamic shapes)."""
    components: list[str] = field(default_factory=lambda: ["llm", "vision"])
    """Which towers' blocks to compile: "llm", "vision"."""


@dataclass
class Checkpoint:
    enable: bool = False
    """Save DCP checkpoints to <dump_folder>/<folder>/step-N."""
    folder: str = "checkpoint"
    """Checkpoint folder, relative to job.dump_folder."""
    interval: int = 500
    """Save every this many steps (and at the last step)."""
    initial_load_path: str | None = None
    """Initial weights when the run has no checkpoint of its own: a DCP step folder, or with
    initial_load_in_hf an HF LlavaNext directory, or "LLM_DIR,CLIP_DIR" (Vicuna + CLIP directories)."""
    initial_load_in_hf: bool = False
    """initial_load_path holds Hugging Face safetensors directories."""
    initial_load_model_only: bool = True
    """Load only model weights from initial_load_path (not optimizer / scheduler / data state)."""
    keep_latest_k: int = 0
    """Keep only the newest k step folders; 0 = keep all."""
    async_mode: Literal["disabled", "async"] = "disabled"
    """"async": dcp.async_save so training continues while the checkpoint is written."""
    load_step: int = -1
    """Resume from this step's checkpoint; -1 = the latest complete one."""


@dataclass
class Metrics:
    log_freq: int = 10
    """Log (stdout + metrics.jsonl) every this many steps."""
    enable_tensorboard: bool = False
    """Also write TensorBoard scalars (only when tensorboard is installed)."""
    save_tb_folder: str = "tb"
    """TensorBoard folder, relative to job.dump_folder."""
    enable_wandb: bool = False
    """Also log to Weights & Biases (only when wandb is installed)."""


SECTIONS: dict[str, type] = {
    "job": Job,
    "model": Model,
    "data": Data,
    "training": Training,
    "optimizer": Optimizer,
    "lr_scheduler": LRScheduler,
    "parallelism": Parallelism,
    "activation_checkpoint": ActivationCheckpoint,
    "compile": Compile,
    "checkpoint": Checkpoint,
    "metrics": Metrics,
}


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)

    # ----- construction -----
    @classmethod
    def from_dict(
        cls,
        raw: dict[str, Any],
        source: str = "config",
        cli: dict[str, dict[str, str]] | None = None,
    ) -> "JobConfig":
        """Build from nested {section: {key: value}} (TOML/JSON-native values, strictly typed),
        then apply `cli` overrides (strings, parsed per the field type)."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a table of sections, got {type(raw).__name__}")
        values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for layer, origin in ((raw, source), (cli or {}, "command line")):
            for name, table in layer.items():
                if name not in SECTIONS:
                    raise ValueError(f"{origin}: unknown section [{name}]{suggest(name, SECTIONS)}")
                if not isinstance(table, dict):
                    raise ValueError(f"{origin}: [{name}] must be a table")
                hints = get_type_hints(SECTIONS[name])
                for key, value in table.items():
                    if key not in hints:
                        hint = suggest(key, hints, prefix=name + ".")
                        raise ValueError(f"{origin}: unknown key {name}.{key}{hint}")
                    values[name][key] = coerce(
                        value, hints[key], f"{name}.{key}", from_cli=layer is cli
                    )
        return cls(**{name: SECTIONS[name](**values[name]) for name in SECTIONS})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict (JSON-serialisable; tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def save(self, folder: str | None = None, filename: str = "config.json") -> str:
        """Write the resolved config as JSON into `folder` (default: job.dump_folder); returns the
        path. Loading it back (`load_config_file`) gives an equal JobConfig."""
        folder = self.job.dump_folder if folder is None else folder
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, filename)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)  # never leave a half-written config behind
        return path

    # ----- derived values -----
    def lr_for(self, part: str) -> float:
        """Learning rate of a model part ("llm" | "vision" | "projector")."""
        per_part = getattr(self.optimizer, f"{part}_lr")  # llm_lr | vision_lr | projector_lr
        return self.optimizer.lr if per_part is None else per_part

    def warmup_steps(self, total_steps: int | None = None) -> int:
        """Warmup length: warmup_steps if set, else ceil(warmup_ratio * steps) (HF Trainer)."""
        total = self.training.steps if total_steps is None else total_steps
        if self.lr_scheduler.warmup_steps is not None:
            return self.lr_scheduler.warmup_steps
        return math.ceil(self.lr_scheduler.warmup_ratio * total)

    def frozen_dtype(self) -> str:
        """Resolved training.frozen_param_dtype ("auto" = mixed_precision_param)."""
        t = self.training
        return t.mixed_precision_param if t.frozen_param_dtype == "auto" else t.frozen_param_dtype

    def packing_row_len(self) -> int:
        """Tokens per packed row (data.packing_row_len, -1 = data.max_seq_len)."""
        d = self.data
        return d.max_seq_len if d.packing_row_len == -1 else d.packing_row_len

    def resolve_steps(self, num_samples: int) -> int:
        """training.steps, or for steps = -1 the steps of `epochs` passes over `num_samples`
        rows at global_batch_size rows per step (rounded up, as HF Trainer)."""
        if self.training.steps > 0:
            return self.training.steps
        assert self.training.global_batch_size > 0, "resolve after validate(world_size)"
        steps = math.ceil(self.training.epochs * num_samples / self.training.global_batch_size)
        if self.warmup_steps(steps) > steps:  # validate() checks this where steps are set
            raise ValueError(
                f"lr_scheduler.warmup_steps ({self.warmup_steps(steps)}) exceeds the "
                f"{steps} steps of training.epochs = {self.training.epochs} over {num_samples} "
                f"samples at training.global_batch_size {self.training.global_batch_size}"
            )
        return steps

    # ----- validation -----
    def validate(self, world_size: int = 1) -> None:
        """Cross-field rules that need no I/O (titan_llava.config_validate). Resolves
        global_batch_size = -1 in place."""
        from titan_llava.config_validate import validate

        validate(self, world_size)

    def validate_paths(self) -> None:
        """Check that the input files exist; the error names the config key."""
        from titan_llava.config_validate import validate_paths

        validate_paths(self)


def load_config(argv: list[str] | None = None) -> JobConfig:
    """defaults < job.config_file (TOML or JSON) < CLI. Does not validate (call validate())."""
    cli = parse_cli(list(sys.argv[1:] if argv is None else argv))
    config_file = cli.get("job", {}).get("config_file")
    if isinstance(config_file, BareFlag):
        raise ValueError("job.config_file needs a value (a TOML or JSON file)")
    if config_file is not None and not config_file.strip():
        raise ValueError("job.config_file is empty (leave it out to run with the defaults)")
    raw: dict[str, Any] = load_config_file(config_file) if config_file else {}
    return JobConfig.from_dict(raw, source=config_file or "defaults", cli=cli)
