"""The single-process reference of the layout matrix. It shares no code with zenlm's training path.

- Data: an independent reader (json + tarfile + numpy) of a corpus written by tools/preprocess.py
  (or tools/preprocess_sft.py: its uint8 loss mask sets the labels of uncounted tokens to -100),
  in the global order that docs/loader.md documents: per epoch, shards in a permutation keyed by
  (seed, corpus, epoch, 0), cut into windows of 16 shards whose samples are permuted jointly,
  keyed by (seed, corpus, epoch, 1, window); a permutation keyed by K is the stable argsort of
  numpy PCG64(SeedSequence(K)).random_raw(n). Step s takes global indices [s*B, (s+1)*B).
  Validation: the valid split in natural order (manifest shard order, tar member order), the
  first N samples.
- Model: transformers' LlamaForCausalLM (Qwen2ForCausalLM with q/k/v biases), SDPA attention,
  with zenlm's initial weights copied in by name (that is the only thing taken from zenlm, so
  both sides start from the same point). Document masking is a 4-D boolean mask (same document
  and causal) plus positions restarting at each document start, built here from the stored
  document starts.
- Training: torch.optim.AdamW with parameter groups built here (no decay on norms, biases and
  the input embedding), torch.optim.lr_scheduler.LambdaLR with linear warmup + cosine written
  here from docs/training.md, clip_grad_norm_, loss = the mean over every counted token of the
  global batch (labels -100 not counted).
"""

from __future__ import annotations

import json
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

WINDOW_SHARDS = 16


def permutation(n: int, key: tuple[int, ...]) -> np.ndarray:
    bits = np.random.PCG64(np.random.SeedSequence(list(key))).random_raw(n)
    return np.argsort(bits, kind="stable")


@dataclass
class Split:
    tokens: list[np.ndarray]  # per shard: (samples, seq_len + 1) int64
    doc_starts: list[list[np.ndarray]]  # per shard, per sample: uint32 starts
    loss_masks: list[np.ndarray] | None = None  # per shard: (samples, seq_len + 1) 0/1 (SFT)


def read_split(corpus: Path, split: str) -> Split:
    manifest = json.loads((corpus / "manifest.json").read_text())
    dtype = np.dtype(manifest["dtype"])
    length = manifest["seq_len"] + 1
    tokens, starts, masks = [], [], []
    for shard in manifest["splits"][split]["shards"]:
        by_key: dict[str, dict[str, bytes]] = {}
        with tarfile.open(corpus / shard["path"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                by_key.setdefault(key, {})[ext] = tar.extractfile(member).read()
        keys = list(by_key)  # insertion order = member order in the tar
        rows = []
        for k in keys:
            (tok_ext,) = [e for e in by_key[k] if e.startswith("tokens")]
            rows.append(np.frombuffer(by_key[k][tok_ext], dtype=dtype).astype(np.int64))
        assert all(len(r) == length for r in rows)
        tokens.append(np.stack(rows))
        # SFT corpora: a uint8 "lossmask" member, 1 where the token's prediction counts.
        mask_rows = [
            np.frombuffer(v, np.uint8).astype(np.int64)
            for k in keys
            for e, v in by_key[k].items()
            if e.startswith("lossmask")
        ]
        if mask_rows:
            assert len(mask_rows) == len(rows) and all(len(r) == length for r in mask_rows)
            masks.append(np.stack(mask_rows))
        starts.append(
            [
                np.frombuffer(
                    next(v for e, v in by_key[k].items() if e.startswith("docstarts")), "<u4"
                )
                for k in keys
            ]
        )
    return Split(tokens, starts, masks or None)


def train_order(split: Split, seed: int, count: int, corpus_index: int = 0) -> list[tuple]:
    """The first `count` (shard, member) pairs of the documented global order (one corpus)."""
    sizes = np.array([len(t) for t in split.tokens])
    out: list[tuple] = []
    epoch = 0
    while len(out) < count:
        shards = permutation(len(sizes), (seed, corpus_index, epoch, 0))
        for w in range(0, len(shards), WINDOW_SHARDS):
            window = shards[w : w + WINDOW_SHARDS]
            pairs = [(int(s), m) for s in window for m in range(sizes[s])]
            mix = permutation(len(pairs), (seed, corpus_index, epoch, 1, w // WINDOW_SHARDS))
            out += [pairs[i] for i in mix]
        epoch += 1
    return out[:count]


def batch_of(split: Split, pairs: list[tuple], document_masking: bool) -> dict[str, torch.Tensor]:
    rows = np.stack([split.tokens[s][m] for s, m in pairs])
    seq = rows.shape[1] - 1
    labels = rows[:, 1:].copy()
    if split.loss_masks is not None:  # the prediction of token t+1 counts where its mask is 1
        mask = np.stack([split.loss_masks[s][m] for s, m in pairs])
        labels[mask[:, 1:] == 0] = -100
    out = {
        "input_ids": torch.from_numpy(rows[:, :-1].copy()),
        "labels": torch.from_numpy(labels),
    }
    if document_masking:
        positions = np.zeros((len(pairs), seq), np.int64)
        docs = np.zeros((len(pairs), seq), np.int64)
        for i, (s, m) in enumerate(pairs):
            starts = [int(x) for x in split.doc_starts[s][m] if 0 < x < seq]
            doc, begin = 0, 0
            for p in range(seq):
                if p in starts:
                    doc, begin = doc + 1, p
                docs[i, p], positions[i, p] = doc, p - begin
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        d = torch.from_numpy(docs)
        same_doc = d[:, :, None] == d[:, None, :]
        out["attention_mask"] = (same_doc & causal)[:, None]  # (b, 1, s, s), True = attend
        out["position_ids"] = torch.from_numpy(positions)
    return out


def hf_model(model_cfg, initial: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers' own model with zenlm's initial weights (`initial`: zenlm canonical names)."""
    import transformers

    m = model_cfg
    common = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.kv_heads,
        head_dim=m.head_size,
        max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.rms_norm_eps,
        tie_word_embeddings=m.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        # SDPA: transformers' eager path misreads a 4-D boolean mask in this version (its
        # logits differ from per-document forwards by 0.38); SDPA's equal them exactly, which
        # test_reference_document_mask_is_per_document checks.
        attn_implementation="sdpa",
    )
    if m.qkv_bias:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    names = {
        "model.embed_tokens.weight": "embed.embedding.weight",
        "model.norm.weight": "head.norm.weight",
        "lm_head.weight": "embed.embedding.weight"
        if m.tie_word_embeddings
        else "head.output.weight",
    }
    layer = {
        "input_layernorm.weight": "attention_norm.weight",
        "post_attention_layernorm.weight": "mlp_norm.weight",
        **{f"self_attn.{p}_proj.{t}": f"attention.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")},
        **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
    }  # fmt: skip
    state, used = {}, set()
    for key in model.state_dict():
        if key in names:
            source = names[key]
        else:
            _, _, idx, rest = key.split(".", 3)  # model.layers.<i>.<rest>
            source = f"layers.{idx}.{layer[rest]}"
        state[key] = initial[source]
        used.add(source)
    assert used == set(initial), f"zenlm weights not copied: {sorted(set(initial) - used)}"
    model.load_state_dict(state, strict=True)
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # a tied lm_head is the same Parameter: listed once
        skip = p.ndim < 2 or name.endswith(".bias") or "embed_tokens" in name
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(lr: float, min_lr: float, warmup: int, total: int):
    """Multiplier of step k (k optimizer steps taken): (k+1)/warmup during warmup, then cosine
    from 1 to min_lr/lr over the remaining steps (docs/training.md)."""

    def f(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        progress = min(1.0, (k - warmup) / max(1, total - warmup))
        floor = min_lr / lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _loss_sum(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of token losses, correct next-token predictions, tokens) of one micro batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    labels = batch["labels"]
    losses = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100
    )
    correct = ((logits.argmax(-1) == labels) & (labels != -100)).sum()
    return losses, correct, (labels != -100).sum()


def reference_run(cfg, corpus: Path, steps: int, initial: dict[str, torch.Tensor]) -> dict:
    """Per-step losses and pre-clip grad norms of `steps` fp32 steps, then validation on the
    first cfg.logging.eval_samples valid samples."""
    torch.manual_seed(0)
    model = hf_model(cfg.model, initial).train()
    o = cfg.optim
    assert o.schedule == "cosine"
    opt = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(o.lr, o.min_lr, o.warmup_steps, o.train_steps)
    )
    train = read_split(corpus, "train")
    B, mbs = cfg.data.global_batch_size_seqs, cfg.data.micro_batch_size_seqs
    order = train_order(train, cfg.data.seed, steps * B)
    masking = cfg.model.document_masking
    losses, norms = [], []
    for s in range(steps):
        step_pairs = order[s * B : (s + 1) * B]
        total = 0.0
        n_micro = B // mbs
        batches = [
            batch_of(train, step_pairs[i * mbs : (i + 1) * mbs], masking) for i in range(n_micro)
        ]
        # The step's loss: the mean over every counted token of the global batch.
        counted = sum(int((b["labels"] != -100).sum()) for b in batches)
        for batch in batches:
            loss_sum, _, _ = _loss_sum(model, batch)
            loss = loss_sum / counted
            loss.backward()
            total += loss.item()
        clip = o.grad_clip_norm if o.grad_clip_norm > 0 else float("inf")
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(total)
    model.eval()
    valid = read_split(corpus, "valid")
    natural = [(s, m) for s in range(len(valid.tokens)) for m in range(len(valid.tokens[s]))]
    n = cfg.logging.eval_samples
    pairs = [natural[i % len(natural)] for i in range(n)]
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, n, 8):
            sums += torch.stack(
                [x.double() for x in _loss_sum(model, batch_of(valid, pairs[i : i + 8], masking))]
            )
    return {
        "losses": losses,
        "grad_norms": norms,
        "val_loss": (sums[0] / sums[2]).item(),
        "val_accuracy": (sums[1] / sums[2]).item(),
    }
