"""The training order: length-grouped batches that survive distribution, resumable mid-epoch.

An epoch's plan is a list of *global* batches (`world_size x batch_size` examples each, the last one
possibly smaller); process r takes the r-th contiguous share of every global batch. Grouped by
length (LLaVA's `group_by_modality_length`), examples of one modality are shuffled, cut into
megabatches of `megabatch_factor` global batches, sorted by length inside each and cut into global
batches, so every process's batch in a step holds examples of similar length: little padding, and
under FSDP no process waits for another's long batch. The order depends only on (seed, epoch), so
a resumed run that skips the batches already trained sees exactly the examples an uninterrupted
run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import DistributedSampler


def epoch_plan(
    lengths: np.ndarray, batch_size: int, world_size: int, seed: int, epoch: int, group_by_length: bool,
    megabatch_factor: int = 50,
) -> list[np.ndarray]:
    """The global batches of one epoch: positions into `lengths` (negative length: text-only).

    Every global batch holds `world_size * batch_size` positions except the last, which holds a
    multiple of `world_size` (filled up with the epoch's first positions, as DistributedSampler
    pads), so every process gets the same number of batches.
    """
    lengths = np.asarray(lengths)
    size = len(lengths)
    step = world_size * batch_size
    rng = np.random.default_rng([seed, epoch])
    if not group_by_length:
        order = rng.permutation(size)
        batches = [order[k : k + step] for k in range(0, size, step)]
    else:
        full, rest = [], []
        for members in (np.nonzero(lengths >= 0)[0], np.nonzero(lengths < 0)[0]):
            members = members[rng.permutation(len(members))]
            mega = step * megabatch_factor
            for k in range(0, len(members), mega):
                block = members[k : k + mega]
                block = block[np.argsort(-np.abs(lengths[block]), kind="stable")]
                cuts = [block[j : j + step] for j in range(0, len(block), step)]
                full.extend(c for c in cuts if len(c) == step)
                rest.extend(c for c in cuts if len(c) < step)
        # The modalities' leftovers share the epoch's last (at most two) global batches.
        leftover = np.concatenate(rest) if rest else np.zeros(0, dtype=np.int64)
        leftover = leftover[np.argsort(-np.abs(lengths[leftover]), kind="stable")]
        tail = [leftover[j : j + step] for j in range(0, len(leftover), step)]
        full.extend(t for t in tail if len(t) == step)
        batches = [full[i] for i in rng.permutation(len(full))] + [t for t in tail if len(t) < step]
    if batches and len(batches[-1]) % world_size:
        last = batches[-1]
        fill = world_size * math.ceil(len(last) / world_size) - len(last)
        batches[-1] = np.concatenate([last, np.resize(np.concatenate(batches), fill)])
    return [np.asarray(b, dtype=np.int64) for b in batches]


def rank_batches(plan: Sequence[np.ndarray], world_size: int, rank: int) -> list[np.ndarray]:
    """Process `rank`'s batch of every global batch: its contiguous share."""
    out = []
    for batch in plan:
        share = len(batch) // world_size
        out.append(batch[rank * share : (rank + 1) * share])
    return out


def padding_efficiency(batches: Sequence[np.ndarray], lengths: np.ndarray) -> float:
    """Real tokens / padded tokens over `batches` (each padded to its longest example); 1.0 is no padding."""
    lengths = np.abs(np.asarray(lengths))
    real = padded = 0
    for batch in batches:
        if len(batch):
            real += int(lengths[batch].sum())
            padded += len(batch) * int(lengths[batch].max())
    return real / padded if padded else 1.0


class ResumableDistributedSampler(DistributedSampler):
    """This process's share of `epoch_plan`, resumable at any batch of an epoch.

    A `DistributedSampler`, so Lightning leaves it in place instead of wrapping it (the wrapper would
    shuffle again and undo the length grouping). `resume(epoch, batches_done)` makes the next
    iteration over that epoch skip the batches already trained; other epochs start at their first.
    """

    def __init__(
        self, dataset: Sequence, lengths: np.ndarray, batch_size: int, world_size: int = 1, rank: int = 0,
        seed: int = 0, group_by_length: bool = False, megabatch_factor: int = 50,
    ) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
        if len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for a dataset of {len(dataset)} examples")
        self.lengths, self.batch_size = np.asarray(lengths), int(batch_size)
        self.group_by_length, self.megabatch_factor = group_by_length, megabatch_factor
        self._resume: tuple[int, int] | None = None

    def plan(self, epoch: int | None = None) -> list[np.ndarray]:
        """The global batches of `epoch` (default: the current one)."""
        return epoch_plan(
            self.lengths, self.batch_size, self.num_replicas, self.seed, self.epoch if epoch is None else epoch,
            self.group_by_length, self.megabatch_factor,
        )

    def batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """This process's batches of `epoch`, in order."""
        return rank_batches(self.plan(epoch), self.num_replicas, self.rank)

    @property
    def num_batches(self) -> int:
        """Batches per epoch on every process."""
        return math.ceil(len(self.lengths) / (self.num_replicas * self.batch_size))

    def resume(self, epoch: int, batches_done: int) -> None:
        """Start `epoch` (once) after its first `batches_done` batches."""
        self._resume = (int(epoch), int(batches_done))
        self.epoch = int(epoch)

    def __len__(self) -> int:
        # The whole epoch, also when resuming: Lightning sizes the epoch (and the schedule) from it.
        step = self.num_replicas * self.batch_size
        full, last = divmod(len(self.lengths), step)
        return full * self.batch_size + math.ceil(last / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1]
            self._resume = None
        for batch in self.batches()[skip:]:
            yield from batch.tolist()
