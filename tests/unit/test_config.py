"""The typed config tree: strict loading, overrides, errors that name the field, every YAML loads."""

from pathlib import Path

import pytest
import yaml

from zenlm.config import ConfigError, RunConfig, dump_config, load_config
from zenlm.config.load import parse_override, read_yaml
from zenlm.config.validate import validate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_build_and_validate():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    layout = validate(cfg, world_size=1)
    assert (
        layout.grad_accum_steps == cfg.data.global_batch_size_seqs // cfg.data.micro_batch_size_seqs
    )


@pytest.mark.parametrize(
    "path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS))
)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # A file that names a model must give that model's architecture, not the defaults.
    raw = read_yaml(path)
    if "model" in raw:
        for key, value in raw["model"].items():
            if not isinstance(value, dict):
                assert getattr(cfg.model, key) == value, key


def test_overrides_are_typed():
    cfg = load_config(
        overrides=[
            "model.hidden_size=128",
            "optim.lr=1e-3",
            "runtime.precision=bf16",
            "data.corpora=[{path: a, weight: 2}]",
            "model.num_kv_heads=null",
        ]
    )
    assert cfg.model.hidden_size == 128
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.runtime.precision == "bf16"
    assert cfg.data.corpora[0].path == "a" and cfg.data.corpora[0].weight == 2.0
    assert cfg.model.num_kv_heads is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.hiden_size=3",
            "unknown config key 'model.hiden_size' (did you mean 'hidden_size'?)",
        ),
        ("optimm.lr=3", "unknown config key 'optimm' (did you mean 'optim'?)"),
        (
            "data.corpora=[{pth: a}]",
            "unknown config key 'data.corpora[0].pth' (did you mean 'path'?)",
        ),
        ("optim.lr=abc", "optim.lr: expected float, got str 'abc'"),
        ("parallel.zero_stage=1.5", "parallel.zero_stage: expected int, got float 1.5"),
        (
            "runtime.precision=fp8",
            "runtime.precision: 'fp8' is not one of ['fp32', 'bf16', 'fp16']",
        ),
        ("model.qkv_bias=1", "model.qkv_bias: expected bool, got int 1"),
        ("nodot", "not of the form a.b.c=value"),
    ],
)
def test_bad_input_names_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert message in str(e.value)


def test_yaml_base_chain_and_unknown_key_in_file(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "model: {hidden_size: 96, num_layers: 3}\noptim: {lr: 0.01}\n"
    )
    (tmp_path / "run.yaml").write_text("base: [base.yaml]\nmodel: {num_layers: 5}\n")
    cfg = load_config(tmp_path / "run.yaml", ["optim.lr=0.02"])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.optim.lr) == (96, 5, 0.02)
    (tmp_path / "bad.yaml").write_text("logging: {log_interval: 5}\n")
    with pytest.raises(
        ConfigError, match=r"logging.log_interval' \(did you mean 'log_interval_steps'"
    ):
        load_config(tmp_path / "bad.yaml")


def test_dump_round_trip(tmp_path):
    cfg = load_config(overrides=["model.rope_scaling.type=llama3", "data.corpora=[{path: x}]"])
    path = dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["model"]["rope_scaling"]["type"] == "llama3"


def test_parse_override_nesting():
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (
            [
                "parallel.tensor_parallel_degree=4",
                "model.num_attention_heads=6",
                "model.hidden_size=96",
                "model.num_kv_heads=null",
                "model.intermediate_size=256",
            ],
            4,
            "model.num_attention_heads (6) is not divisible by tensor_parallel_degree (4)",
        ),
        (
            [
                "parallel.tensor_parallel_degree=4",
                "model.num_attention_heads=8",
                "model.num_kv_heads=2",
                "model.intermediate_size=256",
            ],
            4,
            "model.num_kv_heads (2) is not divisible by tensor_parallel_degree (4)",
        ),
        (
            ["data.global_batch_size_seqs=10", "data.micro_batch_size_seqs=2"],
            4,
            "data.global_batch_size_seqs (10) is not divisible by micro_batch_size_seqs x data-parallel degree = 2 x 4 = 8",
        ),
        (
            ["parallel.tensor_parallel_degree=3"],
            4,
            "world size 4 is not divisible by tensor_parallel_degree x pipeline_parallel_degree = 3 x 1 = 3",
        ),
        (
            ["parallel.pipeline_parallel_degree=2", "parallel.zero_stage=2"],
            2,
            "parallel.zero_stage=2 with pipeline_parallel_degree=2",
        ),
        (
            ["parallel.pipeline_parallel_degree=2", "model.num_layers=3"],
            2,
            "model.num_layers (3) is not divisible by parallel.pipeline_parallel_degree (2)",
        ),
        (
            [
                "parallel.pipeline_parallel_degree=2",
                "data.global_batch_size_seqs=2",
                "data.micro_batch_size_seqs=2",
            ],
            2,
            "grad_accum_steps = 1 < pipeline_parallel_degree = 2",
        ),
        (
            ["data.grad_accum_steps=3"],
            1,
            "data.grad_accum_steps (3) != global / (micro x DP) = 8 / (2 x 1) = 4",
        ),
        (["parallel.sequence_parallel_enabled=true"], 1, "needs tensor_parallel_degree > 1"),
    ],
)
def test_validate_names_the_numbers(overrides, world, message):
    with pytest.raises(ConfigError) as e:
        validate(load_config(overrides=overrides), world)
    assert message in str(e.value)


def test_layout_derivation():
    cfg = load_config(
        overrides=[
            "parallel.tensor_parallel_degree=2",
            "parallel.pipeline_parallel_degree=2",
            "data.global_batch_size_seqs=16",
            "data.micro_batch_size_seqs=2",
        ]
    )
    layout = validate(cfg, 8)
    assert (layout.data_parallel_degree, layout.grad_accum_steps) == (2, 4)
    assert layout.tokens_per_step == 16 * cfg.data.seq_len_tokens
