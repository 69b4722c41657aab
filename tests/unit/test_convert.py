"""tools/convert.py: Hugging Face import and export against transformers' own models.

Tiny random Llama 2 / Llama 3 (llama3 rope scaling) / Mistral / Qwen2 (tied and untied) models in
shapes the converter was not tuned on (GQA ratios 1, 2, 4; vocabularies 250 and 301, not multiples
of 128; a custom head_dim) are saved with save_pretrained, imported through the CLI, loaded into a
zenlm Transformer and compared with transformers' forward; exports load back with
AutoModelForCausalLM. Every refusal is one `error:` line naming the field or tensor.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zenlm.checkpoint import verify
from zenlm.checkpoint.compat import check_compatible, expected_shapes
from zenlm.checkpoint.hf_config import DEFAULTS, HFConfigError, model_config_from_hf
from zenlm.checkpoint.hf_io import write_streamed
from zenlm.checkpoint.hf_tensors import TENSOR_MAP
from zenlm.checkpoint.io import read_tensors, write_tensors
from zenlm.model import PlainFactory, Transformer, load_full_state_dict
from zenlm.testing.cli_probe import REPO, run_tool_probe

transformers = pytest.importorskip("transformers")

_spec = importlib.util.spec_from_file_location("convert_tool", REPO / "tools" / "convert.py")
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # fmt: skip

# name: (config class, model class, config kwargs). None of these shapes is a default anywhere.
CASES = {
    # Llama 2: MHA (GQA ratio 1), vocab 250.
    "llama2": ("LlamaConfig", dict(vocab_size=250, hidden_size=48, intermediate_size=80,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
               rms_norm_eps=1e-5)),
    # Llama 3.1-style: GQA 4, llama3 rope scaling, custom head_dim (8 x 16 != 64), vocab 301.
    "llama3": ("LlamaConfig", dict(vocab_size=301, hidden_size=64, intermediate_size=96,
               num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
               rope_parameters=LLAMA3_ROPE, rms_norm_eps=1e-5)),
    # Mistral: GQA 2; transformers' default sliding_window 4096 >= max_position_embeddings 64.
    "mistral": ("MistralConfig", dict(vocab_size=250, hidden_size=64, intermediate_size=112,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    # Qwen2 tied (Qwen2.5 0.5B-style): biases, GQA 2, vocab 301.
    "qwen2_tied": ("Qwen2Config", dict(vocab_size=301, hidden_size=64, intermediate_size=96,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                   "rope_theta": 1e6})),
    # Qwen2 untied: GQA 4, 3 layers, vocab 250.
    "qwen2": ("Qwen2Config", dict(vocab_size=250, hidden_size=64, intermediate_size=80,
              num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2)),
}  # fmt: skip


def make_hf(case: str, seed: int = 0) -> torch.nn.Module:
    cls_name, kwargs = CASES[case]
    config = getattr(transformers, cls_name)(
        **kwargs, max_position_embeddings=64, attn_implementation="eager"
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: randomize them too
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model


def save_hf(model: torch.nn.Module, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def cli(*argv: str | Path) -> int:
    return convert.main([str(a) for a in argv])


def refused(capsys, *argv: str | Path) -> str:
    """Run the CLI expecting bad input: exit 2 and exactly one `error:` line; return it."""
    assert cli(*argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def load_ckpt(ckpt: Path) -> dict[str, torch.Tensor]:
    meta = verify(ckpt)
    out = {}
    for name, fname in meta["tensors"]["model"].items():
        with safe_open(str(ckpt / fname), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def zenlm_model(ckpt: Path) -> Transformer:
    import yaml

    from zenlm.config.load import build
    from zenlm.model import ModelConfig

    cfg = build(ModelConfig, yaml.safe_load((ckpt / "config.yaml").read_text())["model"])
    model = Transformer(cfg, PlainFactory(), seed=None)
    load_full_state_dict(model, model.factory, load_ckpt(ckpt))
    return model.eval()


IDS = torch.randint(0, 250, (2, 20), generator=torch.Generator().manual_seed(1))


def hf_state(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]  # fmt: skip
    out = {}
    for f in files:
        out.update(load_file(path / f))
    return out


# -- config mapping --------------------------------------------------------------------------


def _class_default(cls, field: str):
    dc = getattr(cls, "__dataclass_fields__", {})
    if field in dc:
        f = dc[field]
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()
    import inspect

    return inspect.signature(cls.__init__).parameters[field].default


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_defaults_are_transformers_defaults(kind: str) -> None:
    """A field config.json omits is what the installed transformers would use."""
    cls = transformers.CONFIG_MAPPING[kind]
    for field, value in DEFAULTS[kind].items():
        assert _class_default(cls, field) == value, (kind, field)


def test_model_config_roundtrip_and_policy() -> None:
    from zenlm.checkpoint.hf_config import hf_config_from_model

    for case in CASES:
        hf = make_hf(case).config.to_dict()
        cfg = model_config_from_hf(hf)
        again = model_config_from_hf(hf_config_from_model(cfg, hf["model_type"]))
        assert dataclasses.replace(again, name=cfg.name) == cfg, case
    legacy = {  # a Llama 3.1 config.json as transformers 4.4x wrote it
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
        "num_attention_heads": 8, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "vocab_size": 300, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "torch_dtype": "bfloat16", "transformers_version": "4.43.0", "pretraining_tp": 1,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    }  # fmt: skip
    cfg = model_config_from_hf(legacy)
    assert cfg.rope_scaling.type == "llama3" and cfg.rope_scaling.factor == 8.0
    assert cfg.rope_theta == 500000.0 and cfg.max_seq_len == 131072
    with pytest.raises(HFConfigError, match="unsloth_version"):
        model_config_from_hf({**legacy, "unsloth_version": "x"})
    model_config_from_hf({**legacy, "unsloth_version": "x"}, ignore=["unsloth_version"])
    # all problems at once
    with pytest.raises(HFConfigError, match=r"hidden_act=.gelu.*mlp_bias"):
        model_config_from_hf({**legacy, "mlp_bias": True, "hidden_act": "gelu"})


# -- import: logits parity -------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers_logits(case: str, tmp_path: Path) -> None:
    hf = make_hf(case)
    src = save_hf(hf, tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    assert cli("import", src, ckpt) == 0
    meta = verify(ckpt)
    assert meta["kind"] == "weights" and meta["step"] == 0
    assert meta["source"]["model_type"] == hf.config.model_type
    model = zenlm_model(ckpt)
    check_compatible(ckpt, meta, model.cfg, None)
    assert meta["parameter_count"] == sum(
        p.numel() for n, p in hf.named_parameters() if n != "lm_head.weight" or not model.cfg.tie_word_embeddings
    )  # fmt: skip
    assert sorted(meta["shapes"]) == sorted(expected_shapes(model.cfg))
    with torch.no_grad():
        want = hf(IDS).logits
        got = model(IDS)[..., : hf.config.vocab_size]
    err = (got - want).abs().max().item()
    print(f"{case}: max abs logits error {err:.1e}")
    assert err < 1e-4, err


# -- round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["llama3", "qwen2_tied"])
def test_roundtrip_bit_exact(case: str, tmp_path: Path) -> None:
    hf = make_hf(case)
    src = save_hf(hf, tmp_path / "hf")
    ckpt, out, out16 = tmp_path / "ckpt", tmp_path / "out", tmp_path / "out16"
    assert cli("import", src, ckpt) == 0
    assert cli("export", ckpt, out, "--dtype", "fp32") == 0
    before, after = hf_state(src), hf_state(out)
    assert sorted(before) == sorted(after)
    for name, t in before.items():
        assert after[name].dtype == t.dtype and torch.equal(after[name], t), name
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert back.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(back.eval()(IDS).logits, hf(IDS).logits)
    assert cli("export", ckpt, out16, "--dtype", "bf16") == 0
    b16 = transformers.AutoModelForCausalLM.from_pretrained(out16, attn_implementation="eager")
    assert b16.dtype == torch.bfloat16
    ref = dict(hf.named_parameters())
    for name, p in b16.named_parameters():
        assert torch.equal(p, ref[name].to(torch.bfloat16)), name
    with torch.no_grad():
        logits16 = b16.eval()(IDS).logits.float()
    assert (logits16 - hf(IDS).logits).abs().max().item() < 0.1


def test_sharded_and_bf16_sources(tmp_path: Path) -> None:
    hf = make_hf("llama3")
    single = save_hf(hf, tmp_path / "single")
    sharded = save_hf(hf, tmp_path / "sharded", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    assert cli("import", single, tmp_path / "a") == 0
    # a small import file size too: many zenlm files, same tensors
    from zenlm.checkpoint.hf import import_hf

    import_hf(sharded, tmp_path / "b", max_file_bytes=200_000)
    a, b = load_ckpt(tmp_path / "a"), load_ckpt(tmp_path / "b")
    assert len(verify(tmp_path / "b")["files"]) > 3
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # sharded export loads
    assert cli("export", tmp_path / "b", tmp_path / "hf_sharded", "--max-shard-size", "150KB") == 0
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_sharded")
    assert back.dtype == torch.bfloat16
    # bf16 source: stored as exact fp32, exported bf16 bit for bit
    b16 = save_hf(hf.to(torch.bfloat16), tmp_path / "bf16")
    assert cli("import", b16, tmp_path / "c") == 0
    c = load_ckpt(tmp_path / "c")
    assert all(t.dtype == torch.float32 for t in c.values())
    assert (
        json.loads((tmp_path / "c" / "meta.json").read_text())["source"]["torch_dtype"]
        == "bfloat16"
    )
    assert cli("export", tmp_path / "c", tmp_path / "hf16") == 0
    src16, out16 = hf_state(b16), hf_state(tmp_path / "hf16")
    assert all(
        torch.equal(out16[k], v) and out16[k].dtype == torch.bfloat16 for k, v in src16.items()
    )


def test_pickle_only_with_allow_pickle(tmp_path: Path, capsys) -> None:
    hf = make_hf("mistral")
    src = tmp_path / "hf"
    save_hf(hf, src)
    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    line = refused(capsys, "import", src, tmp_path / "x")
    assert "pytorch_model.bin" in line and "--allow-pickle" in line
    assert not (tmp_path / "x").exists()
    assert cli("import", src, tmp_path / "y", "--allow-pickle") == 0
    got = load_ckpt(tmp_path / "y")
    assert torch.equal(got["embed.embedding.weight"], state["model.embed_tokens.weight"])


def test_export_of_training_layout_names_and_tokenizer(tmp_path: Path) -> None:
    """A checkpoint with training-style file names (model-p{stage}-w{writer}) and a meta
    `tokenizer` instead of ids in `source`: export reads through the meta index and copies the
    tokenizer files of the source dir."""
    hf = make_hf("llama2")
    src = save_hf(hf, tmp_path / "hf")
    (src / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    (src / "special_tokens_map.json").write_text("{}")
    ckpt = tmp_path / "ckpt"
    assert cli("import", src, ckpt) == 0
    meta = json.loads((ckpt / "meta.json").read_text())
    state = load_ckpt(ckpt)
    names = sorted(state)
    files = {}
    for w, part in enumerate((names[::2], names[1::2])):
        fname = f"model-p{w}-w0.safetensors"
        rec = write_tensors(ckpt / fname, {n: state[n] for n in part})
        files[fname] = {"crc32": rec.crc32, "bytes": rec.bytes}
        meta["tensors"]["model"].update(dict.fromkeys(part, fname))
    for old in [f for f in meta["files"] if f.startswith("model-0")]:
        (ckpt / old).unlink()
        del meta["files"][old]
    meta["files"].update(files)
    meta["source"].update(bos_token_id=None, eos_token_id=None)
    meta["tokenizer"] = {"bos_id": 5, "eos_id": 6, "pad_id": -1}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert cli("export", ckpt, tmp_path / "out") == 0
    out = tmp_path / "out"
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 5,
        "eos_token_id": 6,
    }
    assert (out / "tokenizer_config.json").is_file() and (out / "special_tokens_map.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert back.config.model_type == "llama" and back.config.bos_token_id == 5
    with torch.no_grad():
        err = (back.eval()(IDS).logits - hf(IDS).logits).abs().max().item()
    assert err < 0.1  # bf16 weights


@pytest.mark.parametrize("direct", [True, False])
def test_streamed_io_is_write_tensors(tmp_path: Path, monkeypatch, direct: bool) -> None:
    """The streamed writer's file equals write_tensors' byte for byte, through O_DIRECT (with a
    padded, truncated last block) and buffered, with staging buffers far smaller than a tensor;
    ranged reads at unaligned offsets return the same tensors."""
    from zenlm.checkpoint import hf_io
    from zenlm.checkpoint.hf_tensors import read_into, safetensors_entries

    monkeypatch.setattr(hf_io, "STAGE_BYTES", 2 * hf_io.ALIGN)
    if not direct:
        monkeypatch.setattr(hf_io, "_O_DIRECT", 0)
    fd, is_direct = hf_io._open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT)
    os.close(fd)
    if direct and not is_direct:
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "b": torch.randn(37, 51, generator=gen),
        "a": torch.randn(7, generator=gen).to(torch.bfloat16),  # odd bf16 length: next is unaligned
        "c": torch.zeros(0, 4),
        "d": torch.randn(3000, generator=gen),
    }
    ref = write_tensors(tmp_path / "ref.safetensors", tensors)
    got = write_streamed(
        tmp_path / "got.safetensors",
        {n: (t.dtype, list(t.shape)) for n, t in tensors.items()},
        lambda n: tensors[n],
    )
    assert got == ref
    assert (tmp_path / "ref.safetensors").read_bytes() == (
        tmp_path / "got.safetensors"
    ).read_bytes()
    assert all(
        torch.equal(v, tensors[k])
        for k, v in read_tensors(tmp_path / "got.safetensors", got).items()
    )
    buf = hf_io.aligned_empty(hf_io.read_span(4 * 3000))
    for name, src in safetensors_entries(tmp_path / "got.safetensors").items():
        assert torch.equal(read_into(src, buf), tensors[name]), name
        assert torch.equal(read_into(src), tensors[name]), name


def test_import_export_buffered_io(tmp_path: Path, monkeypatch) -> None:
    """Where O_DIRECT is refused (tmpfs), the same import and export run buffered."""
    from zenlm.checkpoint import hf_io

    monkeypatch.setattr(hf_io, "_O_DIRECT", 0)
    hf = make_hf("qwen2")
    src = save_hf(hf, tmp_path / "hf")
    assert cli("import", src, tmp_path / "ckpt") == 0
    assert cli("export", tmp_path / "ckpt", tmp_path / "out", "--dtype", "fp32") == 0
    before, after = hf_state(src), hf_state(tmp_path / "out")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_tensor_map_is_complete() -> None:
    """Every canonical parameter of a model with biases, untied, has exactly one HF name."""
    from zenlm.checkpoint.hf_tensors import to_hf, to_zenlm
    from zenlm.model import ModelConfig

    cfg = ModelConfig(qkv_bias=True, num_layers=3)
    names = list(expected_shapes(cfg))
    hf_names = [to_hf(n) for n in names]
    assert len(set(hf_names)) == len(names) == 3 * 12 + 3
    assert [to_zenlm(h) for h in hf_names] == names
    assert len(TENSOR_MAP) == 15


# -- refusals --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_hf(make_hf("llama2"), tmp_path_factory.mktemp("src") / "llama")


def edited(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "changes, named",
    [
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "'linear'"),
        (dict(rope_parameters=None, rope_scaling={"type": "yarn", "factor": 4.0}), "'yarn'"),
        (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}), "'dynamic'"),
        (dict(attention_dropout=0.1), "attention_dropout"),
        (dict(pretraining_tp=2), "pretraining_tp"),
        (dict(frobnicate=3), "frobnicate"),
        (dict(model_type="gemma"), "gemma"),
    ],
)  # fmt: skip
def test_refused_config(llama_dir: Path, tmp_path: Path, capsys, changes, named) -> None:
    src = edited(llama_dir, tmp_path / "hf", **changes)
    line = refused(capsys, "import", src, tmp_path / "out")
    assert named in line, line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))


def test_refused_sliding_window(tmp_path: Path, capsys) -> None:
    mistral = save_hf(make_hf("mistral"), tmp_path / "mistral")
    src = edited(mistral, tmp_path / "m16", sliding_window=16)
    assert "sliding_window=16" in refused(capsys, "import", src, tmp_path / "o1")
    qwen = save_hf(make_hf("qwen2"), tmp_path / "qwen")
    src = edited(qwen, tmp_path / "q", use_sliding_window=True, sliding_window=16)
    assert "use_sliding_window" in refused(capsys, "import", src, tmp_path / "o2")


def _edit_tensors(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_refused_tensors(llama_dir: Path, tmp_path: Path, capsys) -> None:
    def extra(s):
        s["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
        s["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(6)  # dropped on purpose

    line = refused(
        capsys, "import", _edit_tensors(llama_dir, tmp_path / "a", extra), tmp_path / "o"
    )
    assert "unknown" in line and "model.layers.0.self_attn.extra.weight" in line
    assert "inv_freq" not in line

    def missing(s):
        del s["model.layers.1.mlp.up_proj.weight"]

    line = refused(
        capsys, "import", _edit_tensors(llama_dir, tmp_path / "b", missing), tmp_path / "o"
    )
    assert "missing" in line and "model.layers.1.mlp.up_proj.weight" in line

    def shapes(s):
        s["model.norm.weight"] = torch.ones(47)
        s["model.layers.0.self_attn.k_proj.weight"] = torch.ones(40, 48)
        s["model.layers.1.self_attn.q_proj.bias"] = torch.ones(48)  # llama has no biases

    line = refused(
        capsys, "import", _edit_tensors(llama_dir, tmp_path / "c", shapes), tmp_path / "o"
    )
    assert "2 wrong shapes" in line and "model.norm.weight [47]" in line
    assert "model.layers.0.self_attn.k_proj.weight [40, 48]" in line
    assert "model.layers.1.self_attn.q_proj.bias" in line  # unexpected, in the same message

    trunc = tmp_path / "e"
    shutil.copytree(llama_dir, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[:-100])
    line = refused(capsys, "import", trunc, tmp_path / "o")
    assert "model.safetensors" in line and "the file has" in line

    def untie(s):
        s["lm_head.weight"] = torch.randn_like(s["model.embed_tokens.weight"])

    tied = edited(llama_dir, tmp_path / "t", tie_word_embeddings=True)
    _edit = _edit_tensors(tied, tmp_path / "d", untie)
    assert "lm_head.weight differs" in refused(capsys, "import", _edit, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_refused_existing_output(llama_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already exists" in refused(capsys, "import", llama_dir, out)
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    ckpt = tmp_path / "ckpt"
    assert cli("import", llama_dir, ckpt) == 0
    assert "already exists" in refused(capsys, "export", ckpt, out)
    assert "already exists" in refused(capsys, "import", llama_dir, ckpt)


def test_cli_error_is_one_line_in_a_fresh_process(llama_dir: Path, tmp_path: Path) -> None:
    src = edited(llama_dir, tmp_path / "hf", attention_bias=True)
    r = run_tool_probe(["tools/convert.py", "import", str(src), str(tmp_path / "out")])
    assert r.returncode == 2 and not r.traceback, r.stderr
    assert len(r.error_lines) == 1 and "attention_bias" in r.error_lines[0]
    assert r.heavy_imports == []
