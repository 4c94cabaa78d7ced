"""Tiny models and the naive batch-of-one reference shared by the tive tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

VOCAB = 64


def tiny_llama(seed: int = 0, hidden: int = 64, attention_dropout: float = 0.0):
    """Return a tiny random LlamaForCausalLM (hidden 64 so bitsandbytes' CPU 4-bit blocks fit)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attention_dropout=attention_dropout,
    )
    return LlamaForCausalLM(cfg)


def add_lora(model, seed: int = 0, r: int = 4, dropout: float = 0.0, targets: list[str] | None = None):
    """Wrap ``model`` with a LoRA adapter (default on q,k,v,o) whose A and B are both random (B=0 gives zero A-grads)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=dropout,
        target_modules=targets or ["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, cfg)
    peft_model.eval()
    return peft_model


def make_batch(lengths: list[int], prompt: list[int], side: str = "right", seed: int = 0) -> dict:
    """Random sequences of the given lengths, padded on ``side``; the first ``prompt[i]`` tokens are unsupervised."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full((len(lengths), width), -100, dtype=torch.long)
    for i, (n, p) in enumerate(zip(lengths, prompt, strict=True)):
        seq = torch.randint(1, VOCAB, (n,), generator=gen)
        sl = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, sl] = seq
        mask[i, sl] = 1
        lab = seq.clone()
        lab[:p] = -100
        labels[i, sl] = lab
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def per_example_loss(model, batch: dict) -> Tensor:
    """Each example's mean NLL over its own supervised tokens, from a padded batch."""
    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids).logits
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=-100, reduction="none"
    )
    count = (labels != -100).sum(-1)
    return nll.sum(-1) / count


def single(batch: dict, i: int) -> dict:
    """Example ``i`` of ``batch`` alone, with its padding removed."""
    keep = batch["attention_mask"][i].bool()
    return {k: v[i][keep][None] for k, v in batch.items()}


def naive_reference(model, layers, projector, batch: dict):
    """Per-example norms and features from a loop over batches of one (the definition)."""
    weights = [m.weight for _, m in layers]
    norms, feats = [], []
    for i in range(batch["input_ids"].shape[0]):
        loss = per_example_loss(model, single(batch, i))[0]
        grads = torch.autograd.grad(loss, weights)
        norms.append(torch.sqrt(sum(g.double().pow(2).sum() for g in grads)))
        feats.append(projector.project([g[None] for g in grads])[0])
    return torch.stack(norms), torch.stack(feats)


def brute_instance_values(feats, task_ids, finite):
    """u(s) = mean over finite s' of its task of cos(f_s, f_s'), from the full N x N cosine matrix."""
    f = np.where(finite[:, None], feats.astype(np.float64), 0.0)
    norms = np.linalg.norm(f, axis=1)
    unit = np.divide(f, norms[:, None], out=np.zeros_like(f), where=norms[:, None] > 0)
    cos = unit @ unit.T
    u = np.full(len(f), np.nan)
    for t in np.unique(task_ids):
        members = np.flatnonzero((task_ids == t) & finite)
        if members.size:
            u[members] = cos[np.ix_(members, members)].mean(axis=1)
    return u
