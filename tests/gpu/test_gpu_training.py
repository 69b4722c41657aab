"""One-GPU training checks (bf16, SDPA flash path). They need CUDA and are skipped without it;
CI has no GPU, so these run only on a lent GPU machine: `pytest tests/gpu`.

Run in their own pytest process (they initialise a 1-rank NCCL group in the test process).
"""

import functools

import pytest
import torch

from zenlm.config import load_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

OVERRIDES = [
    "model.hidden_size=512",
    "model.intermediate_size=1376",
    "model.num_layers=4",
    "model.num_attention_heads=8",
    "model.num_kv_heads=4",
    "model.vocab_size=4096",
    "model.max_seq_len=1024",
    "data.seq_len_tokens=1024",
    "data.global_batch_size_seqs=16",
    "data.micro_batch_size_seqs=8",
    "optim.lr=3e-3",
    "optim.warmup_steps=5",
    "optim.train_steps=40",
    "runtime.precision=bf16",
    "logging.eval_interval_steps=0",
    "logging.log_interval_steps=10",
]


def test_flash_attention_path_matches_math_path():
    """The model's SDPA call runs under the flash kernel alone, and agrees with the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from zenlm.model.transformer import Transformer

    cfg = load_config(None, OVERRIDES).model
    model = Transformer(cfg, seed=0).cuda().to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 1024), device="cuda")
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot run this call
            flash = model(ids).float()
        with sdpa_kernel(SDPBackend.MATH):
            math_ = model(ids).float()
    vocab = cfg.vocab_size
    err = (flash[..., :vocab] - math_[..., :vocab]).abs().max().item()
    assert err < 5e-2, f"flash vs math logits differ by {err}"


def test_bf16_training_on_one_gpu(tmp_path):
    from zenlm.testing.reference import rank_micro_batches
    from zenlm.train.trainer import Trainer

    cfg = load_config(
        None, [*OVERRIDES, f"logging.run_dir={tmp_path}", "logging.peak_tflops_per_device=989"]
    )
    trainer = Trainer(cfg, train_data=functools.partial(rank_micro_batches, cfg))
    history = trainer.fit()
    param = next(trainer.engine.module.parameters())
    assert param.is_cuda and param.dtype == torch.bfloat16  # DeepSpeed's bf16 module copy
    trainer.close()
    losses = [h["train/loss"] for h in history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, f"bf16 run does not train: {losses}"
    assert history[-1]["train/mfu"] > 0
