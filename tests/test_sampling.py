import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from mtl.data import label_matrix
from mtl.modeling import IGNORE_INDEX
from mtl.sampling import TaskMixingSampler, balanced_class_weights, task_probabilities
from tests.conftest import make_rows

N_TOPIC, N_SENTIMENT = 100, 900


def partial_labels() -> np.ndarray:
    """100 topic-only rows then 900 sentiment-only rows, like a small topic set mixed with a big sentiment set."""
    labels = np.full((N_TOPIC + N_SENTIMENT, 2), IGNORE_INDEX)
    labels[:N_TOPIC, 0] = np.arange(N_TOPIC) % 3
    labels[N_TOPIC:, 1] = np.arange(N_SENTIMENT) % 3
    return labels


def topic_share(indices) -> float:
    indices = np.asarray(list(indices))
    return float((indices < N_TOPIC).mean())


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [("proportional", 0.1), ("temperature", 10 / 40), ("round_robin", 0.5), ("equal", 0.5)],
)
def test_probabilities(strategy, expected):
    assert task_probabilities([N_TOPIC, N_SENTIMENT], strategy, temperature=2.0)[0] == pytest.approx(expected)


def test_a_task_without_rows_is_never_drawn():
    assert task_probabilities([0, 50], "round_robin").tolist() == [0.0, 1.0]
    assert task_probabilities([0, 50], "temperature", temperature=1e6).tolist() == [0.0, 1.0]


def test_a_small_temperature_does_not_overflow():
    # 47,519 ** (1 / 0.01) overflows a float: the shares are computed relative to the largest task.
    probabilities = task_probabilities([N_TOPIC, N_SENTIMENT], "temperature", temperature=0.01)
    assert probabilities.tolist() == pytest.approx([0.0, 1.0])
    assert np.isfinite(probabilities).all()


@pytest.mark.parametrize(
    ("strategy", "expected"), [("temperature", 0.25), ("round_robin", 0.5), ("proportional", 0.1)]
)
def test_observed_task_frequencies_match_the_mix(strategy, expected):
    sampler = TaskMixingSampler(partial_labels(), strategy, temperature=2.0, seed=0)
    shares = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        shares.append(topic_share(sampler))
    assert len(sampler) == N_TOPIC + N_SENTIMENT  # same budget per epoch whatever the mix
    assert np.mean(shares) == pytest.approx(expected, abs=0.01)
    assert max(shares) - min(shares) <= 0.001  # every epoch has the mix, not only the average over epochs


def test_small_task_rows_repeat_only_after_all_were_seen():
    sampler = TaskMixingSampler(partial_labels(), "round_robin", seed=1)
    drawn = [i for i in sampler if i < N_TOPIC]  # about 500 draws from 100 topic rows
    first_pass = drawn[:N_TOPIC]
    assert sorted(first_pass) == list(range(N_TOPIC))
    counts = np.bincount(drawn, minlength=N_TOPIC)
    assert counts.max() - counts.min() <= 1
    second_pass = drawn[N_TOPIC : 2 * N_TOPIC]
    assert sorted(second_pass) == list(range(N_TOPIC)) and second_pass != first_pass  # reshuffled, not replayed


def test_rows_labelled_for_several_tasks_sit_in_one_pool():
    labels = partial_labels()
    labels[N_TOPIC : N_TOPIC + 50, 0] = 1  # 50 sentiment rows also labelled for the topic: 150 topic rows in all
    sampler = TaskMixingSampler(labels, "temperature", temperature=1.0, seed=0)
    assert [len(pool) for pool in sampler.pools] == [N_TOPIC + 50, N_SENTIMENT - 50]  # with the smaller task
    assert sorted(sampler) == list(range(N_TOPIC + N_SENTIMENT))  # T=1: every row once per epoch
    both = np.full((300, 2), 1)
    for strategy in ("temperature", "round_robin"):  # every row labels every task: a plain shuffle
        assert sorted(TaskMixingSampler(both, strategy, seed=0)) == list(range(300))


def test_seeded_by_seed_and_epoch():
    a, b = TaskMixingSampler(partial_labels(), seed=5), TaskMixingSampler(partial_labels(), seed=5)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_distributed_shards_keep_the_mix():
    sampler = TaskMixingSampler(partial_labels(), "temperature", temperature=2.0, seed=0)
    batches = BatchSampler(sampler, batch_size=16, drop_last=False)
    shards = [list(BatchSamplerShard(batches, num_processes=2, process_index=rank)) for rank in range(2)]
    for shard in shards:
        assert topic_share(i for batch in shard for i in batch) == pytest.approx(0.25, abs=0.03)
    # The two processes split one global sequence: together they hold each position once.
    interleaved = [i for pair in zip(*shards, strict=False) for batch in pair for i in batch]
    assert interleaved[:960] == list(sampler)[:960]


def test_proportional_sees_every_example(tiny_model, make_trainer):
    trainer = make_trainer(tiny_model, rows=make_rows(24))
    assert sorted(trainer._get_train_sampler()) == list(range(24))


def test_trainer_uses_the_mixing_sampler(tiny_model, make_trainer):
    rows = make_rows(24)
    for row in rows[4:]:
        row["category"] = None  # 4 topic rows, 24 sentiment rows
    trainer = make_trainer(tiny_model, rows=rows, task_mixing="round_robin", num_train_epochs=2)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, TaskMixingSampler)
    assert sampler.probabilities.tolist() == [0.5, 0.5]
    trainer.train()
    assert trainer.state.global_step == 6


def test_balanced_class_weights():
    labels = np.array([[0, 1], [0, IGNORE_INDEX], [0, 1], [1, 0]])
    category, sentiment = balanced_class_weights(labels, [3, 2])
    torch.testing.assert_close(category, torch.tensor([4 / (3 * 3), 4 / (3 * 1), 1.0]))
    torch.testing.assert_close(sentiment, torch.tensor([3 / (2 * 1), 3 / (2 * 2)]))


def test_balanced_class_weights_come_from_the_training_rows(tiny_model, make_trainer):
    rows = make_rows(24)
    trainer = make_trainer(tiny_model, rows=rows[:20], class_weights="balanced")
    assert not torch.allclose(trainer.class_weights[0], torch.ones(3))
    expected = balanced_class_weights(label_matrix(trainer.train_dataset), [3, 3])
    for weights, task_expected in zip(trainer.class_weights, expected, strict=True):
        torch.testing.assert_close(weights, task_expected)


def test_length_grouped_order_depends_only_on_seed_and_epoch():
    from mtl.sampling import EpochSeededLengthGroupedSampler

    lengths = [(i * 7) % 40 + 1 for i in range(200)]
    a, b = EpochSeededLengthGroupedSampler(16, lengths, seed=3), EpochSeededLengthGroupedSampler(16, lengths, seed=3)
    torch.manual_seed(123)  # the global random state must not matter (a resumed run restores another one)
    first = list(a)
    torch.manual_seed(999)
    assert list(b) == first and sorted(first) == list(range(200))
    b.set_epoch(1)
    second = list(b)
    assert second != first
    # another seed is another sequence of orders, not the same one shifted by an epoch
    assert list(EpochSeededLengthGroupedSampler(16, lengths, seed=4)) != second
    assert sorted(EpochSeededLengthGroupedSampler(16, lengths, seed=-1)) == list(range(200))  # a negative --data_seed
    assert len(list(TaskMixingSampler(partial_labels(), "temperature", seed=-1))) == N_TOPIC + N_SENTIMENT
    # batches hold similar lengths: far less padding than a plain shuffle
    padded = sum(16 * max(lengths[i] for i in first[k : k + 16]) for k in range(0, 200, 16))
    shuffled = torch.randperm(200, generator=torch.Generator().manual_seed(0)).tolist()
    padded_shuffle = sum(16 * max(lengths[i] for i in shuffled[k : k + 16]) for k in range(0, 200, 16))
    assert padded < 0.8 * padded_shuffle


def test_trainer_groups_by_length_by_default(tiny_model, make_trainer):
    from mtl.sampling import EpochSeededLengthGroupedSampler

    assert isinstance(make_trainer(tiny_model)._get_train_sampler(), EpochSeededLengthGroupedSampler)


def test_mixing_with_lengths_keeps_the_mix_and_cuts_padding():
    # topic rows are long (news), sentiment rows short (tweets)
    lengths = [120 if i < N_TOPIC else 12 + i % 20 for i in range(N_TOPIC + N_SENTIMENT)]
    plain = TaskMixingSampler(partial_labels(), "round_robin", seed=4)
    grouped = TaskMixingSampler(partial_labels(), "round_robin", seed=4, lengths=lengths, batch_size=8)
    a, b = list(plain), list(grouped)
    stretch = 50 * 8
    for start in range(0, len(a), stretch):  # the same rows in every stretch of 50 batches, only reordered
        assert sorted(a[start : start + stretch]) == sorted(b[start : start + stretch])

    def padded_tokens(order):
        return sum(8 * max(lengths[i] for i in order[k : k + 8]) for k in range(0, len(order), 8))

    assert padded_tokens(b) < 0.7 * padded_tokens(a)
    # Batches are now whole-task chunks, so one epoch's per-process share varies more: average over epochs.
    for rank in range(2):
        shares = []
        for epoch in range(10):
            grouped.set_epoch(epoch)
            shard = BatchSamplerShard(BatchSampler(grouped, 8, False), 2, rank)
            shares.append(topic_share(i for batch in shard for i in batch))
        assert np.mean(shares) == pytest.approx(0.5, abs=0.03)


def test_length_grouping_keeps_a_rows_copies_in_different_batches():
    # 100 rows drawn 632 times an epoch: sorted by length alone, a row's copies sat side by side in one batch
    # (169 rows counted twice in their step); by copy first, then length, almost none do.
    rng = np.random.default_rng(0)
    labels = np.full((5100, 2), IGNORE_INDEX)
    labels[:100, 0], labels[100:, 1] = 0, 1
    lengths = rng.integers(5, 60, size=5100)
    sampler = TaskMixingSampler(labels, "temperature", 2.0, seed=0, lengths=lengths, batch_size=32)
    order = np.array(list(sampler))
    assert (order < 100).sum() == 632  # the mix is unchanged
    batches = [order[i : i + 32] for i in range(0, len(order), 32)]
    assert sum(len(batch) - len(set(batch.tolist())) for batch in batches) <= 10


def test_copy_numbers():
    from mtl.sampling import copy_numbers

    assert copy_numbers(np.array([7, 3, 7, 7, 3, 1])).tolist() == [0, 0, 1, 2, 1, 0]
