"""Fine-tuning an imported Hugging Face model at TP2 x PP2, on the user's path.

A transformers LlamaForCausalLM (GQA 4:2, random weights, vocabulary 384 = the corpus
tokenizer's) is saved with save_pretrained, imported with `tools/convert.py import` (the CLI),
and a 4-rank TP2 x PP2 run starts from it with checkpoint.init_from through `Trainer(cfg).fit()`
on a corpus written by the CLIs. The reference (hf_reference.py) trains transformers' own model
from the same HF weights (mapped by name here, not by the converter) in a plain PyTorch loop:
every step's loss and grad norm within 1e-5 relative, as in the layout matrix. So the import is
right at TP > 1 and PP > 1 (vocabulary padded to 512 at TP 2), the load reads the right slices,
and no init is drawn over the loaded weights. A second model, transformers' Qwen2 with q/k/v
biases (randomised) and tied embeddings, goes the same way.

Round trip: the same 4-rank run saves before its first step (weights only changed by nothing),
`tools/convert.py export` writes a HF directory, and every tensor equals the original bit for
bit; transformers loads it and its logits equal the original model's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zenlm.config import load_config
from zenlm.testing.distributed import run_distributed
from zenlm.testing.text_corpus import build_text_corpus

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "debug.yaml")
STEPS = 6
BASE = [
    f"optim.train_steps={STEPS}",
    "optim.warmup_steps=2",
    "optim.lr=0.001",
    "optim.min_lr=0.0001",
    "optim.eps=1e-6",  # see test_layout_matrix.py: 1e-5 then measures the layout, not noise
    "optim.grad_clip_norm=0.5",
    "data.global_batch_size_seqs=8",
    "data.micro_batch_size_seqs=2",
    "model.num_layers=4",
    "model.num_kv_heads=2",
    "logging.eval_interval_steps=0",
    "logging.tensorboard_enabled=false",
    "parallel.tensor_parallel_degree=2",
    "parallel.pipeline_parallel_degree=2",
]
TO_ZENLM = {
    "model.embed_tokens.weight": "embed.embedding.weight",
    "model.norm.weight": "head.norm.weight",
    "lm_head.weight": "head.output.weight",
}
LAYER = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    **{
        f"self_attn.{p}_proj.{t}": f"attention.{p}_proj.{t}"
        for p in "qkvo"
        for t in ("weight", "bias")
    },
    **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}


SHAPE = dict(
    hidden_size=64,
    intermediate_size=172,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
)
QWEN2 = ["model.qkv_bias=true", "model.tie_word_embeddings=true"]
"""A Qwen2-shaped second model: q/k/v biases and tied embeddings (at PP 2 the embedding's copy
lives on both stages), imported from transformers' Qwen2ForCausalLM."""


def zenlm_names(hf_state: dict[str, torch.Tensor], tied: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in hf_state.items():
        if tied and key == "lm_head.weight":
            continue
        if key in TO_ZENLM:
            out[TO_ZENLM[key]] = value
        else:
            _, _, idx, rest = key.split(".", 3)
            out[f"layers.{idx}.{LAYER[rest]}"] = value
    return out


def _convert(*args: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _runs(rank, world_size, corpus_overrides, imported, qwen2, run_dir):
    from zenlm.train.trainer import Trainer

    def cfg(name, init, extra=()):
        return load_config(
            CONFIG,
            [*BASE, *corpus_overrides, f"checkpoint.init_from={init}", *extra,
             f"logging.run_dir={run_dir}", f"logging.run_name={name}"],
        )  # fmt: skip

    out = {}
    for name, init, extra in [("finetune", imported, ()), ("qwen2", qwen2, QWEN2)]:
        trainer = Trainer(cfg(name, init, extra))
        history = trainer.fit()
        trainer.close()
        out[name] = {
            "losses": [h["train/loss"] for h in history],
            "grad_norms": [h["train/grad_norm"] for h in history],
        }
    saver = Trainer(cfg("saved", imported))
    saver.checkpoints.save()  # step 0: the imported weights as loaded at TP2 x PP2
    saver.close()
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("init_from")
    corpus = build_text_corpus(root / "data")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        **SHAPE, vocab_size=corpus.vocab_size, tie_word_embeddings=False
    )
    model = _nontrivial(transformers.LlamaForCausalLM(hf_cfg))
    qwen2 = _nontrivial(
        transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(
                **{**SHAPE, "vocab_size": corpus.vocab_size, "tie_word_embeddings": True}
            )
        )
    )
    imported = {}
    for name, m in (("llama", model), ("qwen2", qwen2)):
        m.save_pretrained(root / f"hf-{name}", safe_serialization=True)
        imported[name] = root / f"imported-{name}"
        _convert("import", str(root / f"hf-{name}"), str(imported[name]))
    per_rank = run_distributed(
        _runs,
        4,
        args=(
            corpus.overrides(),
            str(imported["llama"]),
            str(imported["qwen2"]),
            str(root / "runs"),
        ),
        timeout_s=900,
    )
    return root, corpus, {"finetune": model, "qwen2": qwen2}, per_rank


def _nontrivial(model):
    """Random norms and biases (transformers initialises them to 1 and 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.02)
    return model.eval()


@pytest.mark.parametrize("name", ["finetune", "qwen2"])
def test_finetune_from_import_matches_transformers(setup, name):
    from hf_reference import reference_run

    _, corpus, models, per_rank = setup
    extra = QWEN2 if name == "qwen2" else []
    cfg = load_config(CONFIG, [*BASE, *corpus.overrides(), *extra])
    state = {k: v.detach().clone() for k, v in models[name].state_dict().items()}
    initial = zenlm_names(state, tied=name == "qwen2")
    ref = reference_run(cfg, corpus.corpus, STEPS, initial)
    for rank in per_rank:
        r = rank[name]
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5), (r["losses"], ref["losses"])
        assert r["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
    assert ref["losses"][-1] < ref["losses"][0]


def test_round_trip_through_a_tp2_pp2_run_is_bit_exact(setup):
    root, corpus, models, _ = setup
    model = models["finetune"]
    ckpt = root / "runs" / "saved" / "checkpoints" / "step_00000000"
    out = root / "exported"
    _convert("export", str(ckpt), str(out), "--dtype", "fp32")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    original = model.state_dict()
    exported = back.state_dict()
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    ids = torch.randint(0, corpus.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back.eval()(ids).logits, model(ids).logits)
