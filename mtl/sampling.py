"""How training batches mix tasks when the tasks' data sets differ in size.

- `proportional`: a plain shuffle; each task appears as often as it has labelled rows (a small task starves).
- `temperature`: task t gets a share of each epoch's draws proportional to n_t ** (1 / T), each draw one of its
  rows; T=1 is proportional, larger T flattens towards equal.
- `round_robin` (alias `equal`): every task equally often.

Within a task, rows are drawn without replacement from a reshuffled pool (a small task's rows repeat only after all
were seen). A row labelled for several tasks trains all of them whenever it is drawn, so it sits in one pool only, that
of its task with the fewest labelled rows, and n_t counts the rows of t's pool: otherwise such rows would come up
through several pools and repeat while others wait (data labelled for every task is then one pool, a plain shuffle).

The sampler yields as many rows per epoch as the data set has, so an epoch costs the same whatever the mix, and it is
seeded by (seed, epoch): every process of a distributed run draws the same sequence, which accelerate then splits into
per-process batches.
"""

import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import LengthGroupedSampler

from .modeling import IGNORE_INDEX

logger = logging.getLogger(__name__)

MIXING_STRATEGIES = ("proportional", "temperature", "round_robin", "equal")


def task_probabilities(counts: list[int], strategy: str, temperature: float = 2.0) -> np.ndarray:
    """How often each task is drawn, given its number of labelled rows."""
    counts = np.asarray(counts, dtype=np.float64)
    if strategy == "proportional":
        weights = counts
    elif strategy == "temperature":
        # n ** (1/T) relative to the largest task, in log space: a small T would overflow n ** (1/T) to inf, and an
        # empty pool keeps a weight of 0 for any T (0 ** 0 is 1).
        with np.errstate(divide="ignore"):
            logs = np.log(counts)
        weights = np.exp((logs - logs.max()) / temperature)
    elif strategy in ("round_robin", "equal"):
        weights = (counts > 0).astype(np.float64)
    else:
        raise ValueError(f"task mixing {strategy!r} is not one of {list(MIXING_STRATEGIES)}.")
    return weights / weights.sum()


def disjoint_pools(labels: np.ndarray) -> list[np.ndarray]:
    """Per task, the rows it draws from: each labelled row in the pool of its task with the fewest labelled rows."""
    labelled = labels != IGNORE_INDEX
    # Tasks from the smallest up: a row goes to the first of its tasks in that order.
    rank = np.argsort(np.argsort(labelled.sum(axis=0), kind="stable"), kind="stable")
    owner = np.where(labelled, rank, labels.shape[1]).argmin(axis=1)
    owned = labelled.any(axis=1)
    return [np.flatnonzero(owned & (owner == task)) for task in range(labels.shape[1])]


class TaskMixingSampler(Sampler[int]):
    """Yield row indices so that tasks are drawn with `task_probabilities(...)`; see the module docstring."""

    def __init__(
        self,
        labels: np.ndarray,
        strategy: str = "temperature",
        temperature: float = 2.0,
        seed: int = 0,
        num_samples: int | None = None,
        lengths: list[int] | None = None,
        batch_size: int = 32,
    ):
        self.pools = disjoint_pools(np.asarray(labels))
        self.probabilities = task_probabilities([len(pool) for pool in self.pools], strategy, temperature)
        self.num_samples = num_samples or len(labels)
        self.seed = seed
        self.epoch = 0
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.batch_size = batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def task_draws(self) -> np.ndarray:
        """How many of an epoch's draws each task gets: its share of them, rounded so that they add up. Fixed
        counts, not a draw per row, so that every epoch has the configured mix exactly (and T=1 is a shuffle)."""
        exact = self.probabilities * self.num_samples
        draws = np.floor(exact).astype(np.int64)
        largest_remainders = np.argsort(draws - exact, kind="stable")[: self.num_samples - draws.sum()]
        draws[largest_remainders] += 1
        return draws

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed % 2**64, self.epoch])  # entropy must be non-negative
        tasks = rng.permutation(np.repeat(np.arange(len(self.pools)), self.task_draws()))
        cursors = [0] * len(self.pools)
        orders = [rng.permutation(pool) for pool in self.pools]
        drawn = np.empty(self.num_samples, dtype=np.int64)
        for position, task in enumerate(tasks):
            if cursors[task] == len(orders[task]):  # pool exhausted: reshuffle it
                orders[task] = rng.permutation(self.pools[task])
                cursors[task] = 0
            drawn[position] = orders[task][cursors[task]]
            cursors[task] += 1
        if self.lengths is not None:
            drawn = self._group_by_length(drawn, rng)
        yield from drawn.tolist()

    def _group_by_length(self, drawn: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Within each stretch of 50 batches, cut batches of similar lengths, then shuffle the batches: the mix is
        kept, long texts (news) and short ones (tweets) no longer pad each other, and tasks still alternate.

        A small task's rows can come up several times in one stretch. Sorted by length alone, the copies of a row
        would sit side by side and share a batch (the row counted twice in one step); so the first copies are sorted
        and cut first, then the second copies, and so on: copies then share a batch only where one group of copies
        ends and the next begins, and rarely."""
        stretch = 50 * self.batch_size
        for start in range(0, len(drawn), stretch):
            part = drawn[start : start + stretch]
            part = part[np.lexsort((-self.lengths[part], copy_numbers(part)))]  # by copy, then longest first
            batches = [part[i : i + self.batch_size] for i in range(0, len(part), self.batch_size)]
            drawn[start : start + stretch] = np.concatenate([batches[i] for i in rng.permutation(len(batches))])
        return drawn


def copy_numbers(values: np.ndarray) -> np.ndarray:
    """For each entry, how many equal entries come before it: [7, 3, 7, 7] -> [0, 0, 1, 2]."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    first_of_run = np.r_[True, ordered[1:] != ordered[:-1]]
    run_start = np.maximum.accumulate(np.where(first_of_run, np.arange(len(values)), 0))
    copies = np.empty(len(values), dtype=np.int64)
    copies[order] = np.arange(len(values)) - run_start
    return copies


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped shuffle (batches of similar lengths, little padding), seeded by (seed, epoch)
    instead of the global random state: a run resumed mid-epoch replays that epoch's order, and every process of a
    distributed run draws the same one."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int = 0):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        # Both numbers mixed, not added: with seed + epoch, seed 0's second epoch would be seed 1's first.
        mixed = np.random.SeedSequence([self.seed % 2**64, epoch]).generate_state(1, dtype=np.uint64)[0]
        self.generator = torch.Generator().manual_seed(int(mixed))


def class_counts(labels: np.ndarray, num_labels: list[int]) -> list[np.ndarray]:
    """Per task (a column of `labels`), how many labelled rows each of its `num_labels[task]` classes has."""
    return [
        np.bincount(labels[:, task][labels[:, task] != IGNORE_INDEX], minlength=k) for task, k in enumerate(num_labels)
    ]


def balanced_class_weights(labels: np.ndarray, num_labels: list[int]) -> list[torch.Tensor]:
    """Per task, n / (k * n_c) for each class c (scikit-learn's 'balanced'); an absent class gets weight 1."""
    weights = []
    for counts, k in zip(class_counts(labels, num_labels), num_labels, strict=True):
        counts = counts.astype(np.float64)
        task_weights = np.where(counts > 0, counts.sum() / (k * np.maximum(counts, 1)), 1.0)
        weights.append(torch.tensor(task_weights, dtype=torch.float32))
    return weights
