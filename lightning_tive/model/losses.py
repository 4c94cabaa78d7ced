"""Per-example next-token losses: the full-logits reference and the chunked form that training and TIVE use."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

#: Supervised tokens per lm_head + cross-entropy chunk of :func:`chunked_per_example_nll`.
NLL_CHUNK_TOKENS = 1024


def per_example_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and supervised-token count per example (labels -100 are ignored).

    The reference definition, from full logits; training and valuation use
    :func:`chunked_per_example_nll`, which gives the same numbers without ``[B, T, V]`` logits.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.clamp(min=0).reshape(-1),
        reduction="none",
    ).view_as(shift_labels)
    nll = nll * mask
    return nll.sum(dim=1), mask.sum(dim=1)


def _token_nll(states: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(states).float(), targets, reduction="none")


def chunked_per_example_nll(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk_tokens: int = NLL_CHUNK_TOKENS,
    min_chunks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_example_nll(head(hidden), labels)` from last hidden states, never holding more than one chunk's logits.

    Only supervised positions go through ``head`` (in float32 after it, as in the reference), in chunks
    of ``chunk_tokens``, each under non-reentrant checkpointing so its logits are recomputed in
    backward instead of kept from the forward. ``min_chunks`` pads with empty chunks, so ``head`` runs
    that many times at least (under FSDP every process must run it equally often).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    rows, cols = mask.nonzero(as_tuple=True)
    states, targets = hidden[rows, cols], shift_labels[rows, cols]
    checkpointed = torch.is_grad_enabled()
    pieces = []
    # At least one (maybe empty) chunk, so the result stays attached to the graph without supervision.
    for start in range(0, max(len(targets), 1, min_chunks * chunk_tokens), chunk_tokens):
        piece = (states[start : start + chunk_tokens], targets[start : start + chunk_tokens], head)
        if checkpointed:
            pieces.append(checkpoint(_token_nll, *piece, use_reentrant=False))
        else:
            pieces.append(_token_nll(*piece))
    nll = torch.cat(pieces)
    # Scattered back to [B, T-1] and summed along T, so the sums add up in the reference's order.
    per_token = torch.zeros(mask.shape, dtype=nll.dtype, device=nll.device).index_put((rows, cols), nll)
    return per_token.sum(dim=1), mask.sum(dim=1)

