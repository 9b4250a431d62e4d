"""Config: precedence (defaults < TOML < CLI), type errors, unknown keys, validation, round trip."""

import glob
import os

import pytest

from titan_llava.config import SECTIONS, JobConfig, load_config
from titan_llava.config_parse import parse_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOMLS = sorted(glob.glob(os.path.join(REPO, "train_configs", "*.toml")))


def _write(tmp_path, text: str) -> str:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_precedence_defaults_toml_cli(tmp_path):
    path = _write(tmp_path, "[training]\nsteps = 7\nlocal_batch_size = 3\n[optimizer]\nlr = 0.5\n")
    cfg = load_config(["--job.config_file", path, "--training.steps", "9", "--optimizer.eps=1e-6"])
    assert cfg.training.steps == 9  # CLI beats TOML
    assert cfg.training.local_batch_size == 3  # TOML beats default
    assert cfg.optimizer.lr == 0.5
    assert cfg.optimizer.eps == 1e-6
    assert cfg.training.max_norm == 1.0  # default
    assert cfg.job.config_file == path


def test_cli_types():
    cfg = load_config(
        [
            "--compile.enable",  # bare flag = true
            "--data.shuffle", "false",
            "--training.trainable", "llm,vision",
            "--compile.components=[\"llm\"]",
            "--model.grid_pinpoints", "[[336, 672], [672, 336]]",
            "--optimizer.betas", "0.8,0.95",
            "--checkpoint.initial_load_path", "none",
            "--optimizer.vision_lr", "2e-6",
        ]
    )
    assert cfg.compile.enable is True and cfg.data.shuffle is False
    assert cfg.training.trainable == ["llm", "vision"]
    assert cfg.compile.components == ["llm"]
    assert cfg.model.grid_pinpoints == [(336, 672), (672, 336)]
    assert cfg.optimizer.betas == (0.8, 0.95)
    assert cfg.checkpoint.initial_load_path is None
    assert cfg.optimizer.vision_lr == 2e-6


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--training.stepz", "3"], "training.steps"),  # suggestion for a typo
        (["--trainig.steps", "3"], "training"),
        (["--training.steps", "abc"], "training.steps"),
        (["--data.shuffle", "maybe"], "data.shuffle"),
        (["--training.steps"], "training.steps"),  # bare flag on a non-bool
        (["--activation_checkpoint.mode", "half"], "activation_checkpoint.mode"),
        (["--optimizer.betas", "0.9"], "optimizer.betas"),
        (["steps", "3"], "--section.key"),
    ],
)
def test_cli_errors_name_the_key(argv, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        load_config(argv)


def test_unknown_key_suggests(tmp_path):
    path = _write(tmp_path, "[training]\nlocal_batch = 3\n")
    with pytest.raises(ValueError, match=r"unknown key training\.local_batch .*local_batch_size"):
        load_config(["--job.config_file", path])
    path = _write(tmp_path, "[optimiser]\nlr = 3.0\n")
    with pytest.raises(ValueError, match=r"unknown section \[optimiser\].*optimizer"):
        load_config(["--job.config_file", path])


@pytest.mark.parametrize(
    "toml, key",
    [
        ('[training]\nsteps = "5"\n', "training.steps"),  # strings are not ints in a file
        ("[training]\nsteps = 5.0\n", "training.steps"),
        ("[data]\nshuffle = 1\n", "data.shuffle"),
        ('[training]\ntrainable = "llm"\n', "training.trainable"),
        ("[optimizer]\nlr = true\n", "optimizer.lr"),
        ("[model]\ngrid_pinpoints = [[336, 672, 1]]\n", "model.grid_pinpoints"),
    ],
)
def test_toml_wrong_types(tmp_path, toml, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(["--job.config_file", _write(tmp_path, toml)])


def test_validate_batch_and_parallelism():
    cfg = load_config(["--training.local_batch_size", "2", "--training.global_batch_size", "16"])
    cfg.validate(world_size=4)
    assert cfg.training.gradient_accumulation_steps(4) == 2
    cfg = load_config(["--training.local_batch_size", "2"])
    cfg.validate(world_size=4)  # -1 resolves to local x dp
    assert cfg.training.global_batch_size == 8
    assert cfg.training.gradient_accumulation_steps(4) == 1
    cfg = load_config(["--training.local_batch_size", "2", "--training.global_batch_size", "12"])
    with pytest.raises(ValueError, match="training.global_batch_size"):
        cfg.validate(world_size=4)
    cfg = load_config(["--parallelism.data_parallel_replicate_degree", "3"])
    with pytest.raises(ValueError, match="data_parallel_replicate_degree"):
        cfg.validate(world_size=4)
    cfg = load_config(["--parallelism.data_parallel_shard_degree", "3"])
    with pytest.raises(ValueError, match="data_parallel_shard_degree"):
        cfg.validate(world_size=4)


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--training.trainable", "llm,text"], "training.trainable"),
        (["--training.trainable", "llm,llm"], "training.trainable"),
        (["--data.template", "chatml"], "data.template"),
        (["--lr_scheduler.warmup_ratio", "1.5"], "lr_scheduler.warmup_ratio"),
        (["--lr_scheduler.warmup_steps", "11", "--training.steps", "10"], "lr_scheduler.warmup_steps"),
        (["--model.flavor", "debgu"], "model.flavor"),
        (["--model.grid_pinpoints", "[[300, 672]]"], "model.grid_pinpoints"),
        (["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option",
          "x"], "selective_ac_option"),
        (["--activation_checkpoint.llm_layers_without_ac", "-1"],
         "activation_checkpoint.llm_layers_without_ac must be >= 0"),
        (["--activation_checkpoint.vision_layers_without_ac", "-2"],
         "activation_checkpoint.vision_layers_without_ac must be >= 0"),
        (["--checkpoint.initial_load_in_hf"], "checkpoint.initial_load_in_hf"),
        (["--checkpoint.load_step", "4"], "checkpoint.load_step = 4 needs checkpoint.enable = true"),
        (["--checkpoint.load_step", "-5"], "checkpoint.load_step must be -1"),
        (["--optimizer.lr", "inf"], "optimizer.lr must be a finite number >= 0"),
        (["--optimizer.weight_decay", "nan"], "optimizer.weight_decay must be a finite number"),
        (["--optimizer.eps", "nan"], "optimizer.eps must be a finite number"),
        (["--training.max_norm", "nan"], "training.max_norm must be a finite number"),
        (["--job.seed", "99999999999999999999999"], "job.seed must be in"),
        (["--training.steps", "0"], "training.steps"),
        (["--compile.components", "llm,projector"], "compile.components"),
        (["--activation_checkpoint.components", "llm,projector"], "activation_checkpoint.components"),
        (["--data.packing", "--data.packing_row_len", "2048"], "data.packing_row_len"),
        (["--data.packing", "--training.steps", "-1"], "data.packing = false"),
        (["--data.packing", "--data.group_by_modality_length"], "data.modality_megabatch"),
        (["--data.modality_megabatch", "128"], "leave it at -1"),
        (["--data.packing", "--data.group_by_modality_length", "--data.modality_megabatch", "0"],
         "must be a positive multiple of the data-parallel degree"),
        (["--parallelism.replicate_frozen", "--training.frozen_param_dtype", "float32"],
         "training.frozen_param_dtype is 'float32' but training.mixed_precision_param"),
        (["--parallelism.train_timeout_seconds", "0"], "parallelism.train_timeout_seconds must be > 0"),
        (["--parallelism.init_timeout_seconds", "-1"], "parallelism.init_timeout_seconds must be > 0"),
        (["--training.steps", "-1", "--training.epochs", "0"], "training.epochs must be > 0"),
        (["--optimizer.betas", "0.9,1.0"], "optimizer.betas must be in"),
        (["--optimizer.lr", "-1e-3"], "optimizer.lr must be a finite number >= 0"),
        (["--lr_scheduler.min_lr_ratio", "1.5"], "lr_scheduler.min_lr_ratio"),
        (["--lr_scheduler.warmup_steps", "-1"], "lr_scheduler.warmup_steps must be >= 0"),
        (["--model.grid_pinpoints", "[[336, 300]]"], "model.grid_pinpoints"),
        (["--model.grid_pinpoints", "[]"], "model.grid_pinpoints must not be empty"),
        (["--job.seed", "-1"], "job.seed must be in"),
    ],
)
def test_validate_rejects(argv, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(argv).validate()


def test_validate_boundaries_and_the_data_parallel_degree():
    """Limits that are allowed pass; the megabatch must split evenly over the DP ranks."""
    cfg = load_config(["--lr_scheduler.warmup_steps", "10", "--training.steps", "10"])
    cfg.validate()  # warmup as long as the run is allowed (HF too)
    assert cfg.resolve_steps(1000) == 10
    cfg = load_config(["--training.steps", "1"])
    cfg.validate()
    assert cfg.resolve_steps(1000) == 1  # a set step count is never replaced by epochs
    grouped = ["--data.packing", "--data.group_by_modality_length", "--data.modality_megabatch", "3"]
    load_config(grouped).validate(world_size=1)
    with pytest.raises(ValueError, match=r"data\.modality_megabatch \(3\) must be a positive multiple of "
                                         r"the data-parallel degree \(2\)"):
        load_config(grouped).validate(world_size=2)


def test_warmup_and_steps():
    cfg = load_config(["--training.steps", "100", "--lr_scheduler.warmup_ratio", "0.03"])
    assert cfg.warmup_steps() == 3  # HF Trainer: ceil(warmup_ratio * steps)
    cfg = load_config(["--training.steps", "-1", "--training.global_batch_size", "256",
                       "--training.local_batch_size", "32"])
    cfg.validate(world_size=8)
    assert cfg.resolve_steps(558128) == 2181  # the reference's stage-1 step count
    assert cfg.lr_for("vision") == cfg.optimizer.lr
    assert cfg.packing_row_len() == 4096
    cfg = load_config(["--data.packing_row_len", "16384"])
    cfg.validate()
    assert cfg.packing_row_len() == 16384
    cfg = load_config(["--optimizer.vision_lr", "2e-6"])
    assert cfg.lr_for("vision") == 2e-6 and cfg.lr_for("llm") == cfg.optimizer.lr


def test_validate_paths(tmp_path):
    cfg = load_config(["--model.tokenizer_path", str(tmp_path / "nope.model")])
    with pytest.raises(ValueError, match="model.tokenizer_path"):
        cfg.validate_paths()
    tok = tmp_path / "tok.model"
    tok.write_text("x")
    data = tmp_path / "d.json"
    data.write_text("[]")
    base = ["--model.tokenizer_path", str(tok), "--data.path", str(data)]
    with pytest.raises(ValueError, match="data.image_folder"):
        load_config(base + ["--data.image_folder", str(tmp_path / "imgs")]).validate_paths()
    with pytest.raises(ValueError, match="checkpoint.initial_load_path"):
        load_config(
            base + ["--data.image_folder", str(tmp_path), "--checkpoint.initial_load_path",
                    f"{tmp_path},{tmp_path}/missing"]
        ).validate_paths()
    load_config(base + ["--data.image_folder", "none"]).validate_paths()
    with pytest.raises(ValueError, match="checkpoint.initial_load_path: directory"):
        load_config(base + ["--checkpoint.initial_load_path", str(tok)]).validate_paths()  # a file


def test_dump_round_trip(tmp_path):
    cfg = load_config(
        ["--job.dump_folder", str(tmp_path), "--optimizer.betas", "0.8,0.9",
         "--model.grid_pinpoints", "[[336, 672]]", "--checkpoint.initial_load_path", "a,b"]
    )
    path = cfg.save()
    assert path == os.path.join(str(tmp_path), "config.json")
    back = load_config(["--job.config_file", path])
    back.job.config_file = cfg.job.config_file
    assert back == cfg
    assert JobConfig.from_dict(cfg.to_dict()) == cfg


def test_every_field_has_a_docstring():
    # Field docs live in the source under each field (as TorchTitan); check none is missing.
    import ast
    import inspect

    from titan_llava import config

    tree = ast.parse(inspect.getsource(config))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in {c.__name__ for c in SECTIONS.values()}:
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    ok = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    assert ok, f"{node.name}.{stmt.target.id} has no docstring"


@pytest.mark.parametrize("path", TOMLS, ids=os.path.basename)
def test_shipped_tomls_load_and_validate(path):
    cfg = load_config(["--job.config_file", path])
    cfg.validate(world_size=8 if "vicuna7b" in path else 1)
    assert cfg.job.config_file == path


def test_debug_toml_paths_exist(monkeypatch):
    cfg = load_config(["--job.config_file", os.path.join(REPO, "train_configs", "debug_model.toml")])
    monkeypatch.chdir(REPO)  # its paths are relative to the repository root
    if not os.path.isfile(cfg.data.path):
        pytest.skip(f"{cfg.data.path} not created yet (sample data)")
    cfg.validate_paths()


def test_shipped_tomls_exist():
    names = {os.path.basename(p) for p in TOMLS}
    assert {"debug_model.toml", "llava_next_vicuna7b_pretrain.toml",
            "llava_next_vicuna7b_finetune.toml"} <= names


def test_parse_cli_forms():
    assert parse_cli(["--a.b", "1", "--c.d=x=y", "--e.f"]) == {
        "a": {"b": "1"}, "c": {"d": "x=y"}, "e": {"f": "true"}}


@pytest.mark.parametrize(
    "key, value",
    [
        ("data.max_seq_len", "0"),
        ("data.num_workers", "-1"),
        ("data.packing_lookahead", "0"),
        ("checkpoint.interval", "0"),
        ("checkpoint.keep_latest_k", "-1"),
        ("metrics.log_freq", "0"),
    ],
)
def test_out_of_range_counts_name_the_key(key, value):
    cfg = load_config([f"--{key}", value])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        cfg.validate()


@pytest.mark.parametrize(
    "argv, vocab, needle",
    [
        (["--data.max_seq_len", "5000"], 1000,
         "data.max_seq_len (5000) exceeds the positions the LLM was built for (4096"),
        (["--activation_checkpoint.llm_layers_without_ac", "3"], 1000,
         "activation_checkpoint.llm_layers_without_ac (3) exceeds the 2 blocks the model has"),
        (["--activation_checkpoint.vision_layers_without_ac", "3"], 1000,
         "activation_checkpoint.vision_layers_without_ac (3) exceeds the 2 blocks the model has"),
        ([], 1025, ("model.tokenizer_path: the tokenizer has 1025 pieces but the model's "
                    "vocabulary has 1024 rows")),
    ],
)
def test_rules_against_the_architecture_name_the_key(argv, vocab, needle):
    """What needs the resolved architecture (the debug flavor: 2 LLM blocks, 2 of 3 CLIP blocks built,
    1024 vocabulary rows) is checked before any model exists; the limits themselves pass."""
    from titan_llava.config_validate import validate_against_architecture
    from titan_llava.models.args import LLAVA_FLAVORS

    args = LLAVA_FLAVORS["debug"]
    assert (args.llm.n_layers, args.vision.n_built_layers, args.llm.vocab_size) == (2, 2, 1024)
    with pytest.raises(ValueError) as e:
        validate_against_architecture(load_config(argv), args, vocab)
    assert needle in str(e.value)
    validate_against_architecture(
        load_config(["--activation_checkpoint.llm_layers_without_ac", "2",
                     "--activation_checkpoint.vision_layers_without_ac", "2"]), args, 1024
    )


@pytest.mark.parametrize("argv, needle", [
    (["--job.dump_folder", "--training.steps", "2"], "job.dump_folder needs a value"),
    (["--checkpoint.folder"], "checkpoint.folder needs a value"),
    (["--job.config_file"], "job.config_file needs a value"),
    (["--job.config_file", ""], "job.config_file is empty"),
])
def test_keys_given_without_a_value(argv, needle):
    """Only true/false keys may be given bare; a string key without its value is an error, not
    the string "true" (which would send a run's outputs to ./true)."""
    with pytest.raises(ValueError) as e:
        load_config(argv)
    assert needle in str(e.value)
    assert load_config(["--compile.enable", "--training.steps", "2"]).compile.enable is True


def test_warmup_longer_than_the_epochs_steps_is_refused_once_they_are_known():
    cfg = load_config(["--training.steps", "-1", "--lr_scheduler.warmup_steps", "100",
                       "--training.global_batch_size", "4"])
    cfg.validate()
    assert cfg.resolve_steps(4000) == 1000
    with pytest.raises(ValueError, match=r"lr_scheduler.warmup_steps \(100\) exceeds the 5 steps"):
        cfg.resolve_steps(20)


def test_attention_backends_the_run_cannot_train_with_are_refused(monkeypatch):
    import sys

    import torch

    from titan_llava.models.attention import check_backend

    check_backend("sdpa", torch.device("cpu"))
    with pytest.raises(ValueError, match="'flex' cannot train on the CPU"):
        check_backend("flex", torch.device("cpu"))
    check_backend("flex", torch.device("cuda"))
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    with pytest.raises(ValueError, match="model.attn_backend 'flash' needs the flash-attn package"):
        check_backend("flash", torch.device("cuda"))


def test_train_help_prints_the_usage(capsys):
    from titan_llava import train

    assert train.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m titan_llava.train") and "titan_llava/config.py" in out
