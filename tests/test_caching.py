import numpy as np
import pytest
import torch

import mtl.caching
from mtl.caching import EMBEDDINGS_COLUMN, cache_embeddings, fingerprint
from mtl.freezing import apply_freeze
from tests.conftest import make_rows


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "embedding-cache"
    monkeypatch.setattr(mtl.caching, "default_cache_dir", lambda: directory)
    return directory


def heads_after_training(tiny_encoder_dir, make_trainer, cache: bool):
    from mtl import MultiTaskModel

    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder(tiny_encoder_dir)
    trainer = make_trainer(
        model, rows=make_rows(24), freeze="encoder", num_train_epochs=3, cache_frozen_embeddings=cache
    )
    trainer.train()
    assert (EMBEDDINGS_COLUMN in trainer.train_dataset.column_names) is cache
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {name: p.detach().clone() for name, p in model.heads.named_parameters()}, losses


def test_cached_and_uncached_training_agree(tiny_encoder_dir, make_trainer, cache_dir):
    cached_heads, cached_losses = heads_after_training(tiny_encoder_dir, make_trainer, cache=True)
    plain_heads, plain_losses = heads_after_training(tiny_encoder_dir, make_trainer, cache=False)
    assert len(list(cache_dir.glob("*.npy"))) == 1  # train and eval sets are the same rows here: one entry
    assert cached_losses == pytest.approx(plain_losses, abs=1e-3)
    for name, value in plain_heads.items():
        torch.testing.assert_close(cached_heads[name], value, atol=1e-4, rtol=1e-4)


def test_embeddings_come_from_the_cache_the_second_time(tiny_model, tiny_tokenizer, make_trainer, monkeypatch):
    apply_freeze(tiny_model, "encoder")
    dataset = make_trainer(tiny_model).train_dataset
    first = cache_embeddings(tiny_model, dataset)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(mtl.caching, "compute_embeddings", fail)
    second = cache_embeddings(tiny_model, dataset)
    np.testing.assert_array_equal(second[EMBEDDINGS_COLUMN][:], first[EMBEDDINGS_COLUMN][:])
    assert "input_ids" not in second.column_names and "labels" in second.column_names


def test_cached_embeddings_equal_the_encoder_output(tiny_model, tiny_tokenizer, make_trainer):
    rows = make_rows(16)
    rows[0]["text"] = "the phone is great and the app is good and the chip is amazing"  # the others pad to its length
    dataset = make_trainer(tiny_model, rows=rows).train_dataset
    assert len({len(ids) for ids in dataset["input_ids"]}) > 1
    cached = torch.tensor(cache_embeddings(tiny_model, dataset, batch_size=16)[EMBEDDINGS_COLUMN][:])
    tiny_model.eval()
    with torch.no_grad():
        for i in (0, 1, 5):
            row = dataset[i]
            expected, _ = tiny_model.embed(torch.tensor([row["input_ids"]]), torch.tensor([row["attention_mask"]]))
            torch.testing.assert_close(cached[i], expected[0], atol=1e-5, rtol=1e-5)


def test_mixed_precision_training_caches_what_its_encoder_would_compute(tiny_model, make_trainer, cache_dir):
    apply_freeze(tiny_model, "encoder")
    trainer = make_trainer(tiny_model, freeze="encoder", bf16=True)
    row = trainer.train_dataset[3]
    trainer._cache_frozen_embeddings()
    cached = torch.as_tensor(trainer.train_dataset[3][EMBEDDINGS_COLUMN])
    tiny_model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, _ = tiny_model.embed(torch.tensor([row["input_ids"]]), torch.tensor([row["attention_mask"]]))
    torch.testing.assert_close(cached, expected[0].float())
    # a separate cache entry from the fp32 one, which differs at bf16's precision
    fp32 = torch.as_tensor(cache_embeddings(tiny_model, make_trainer(tiny_model).train_dataset)[EMBEDDINGS_COLUMN][3])
    assert len(list(cache_dir.glob("*.npy"))) == 2 and not torch.equal(cached, fp32)
    torch.testing.assert_close(cached, fp32, atol=0.05, rtol=0.05)


def test_fingerprint_follows_the_encoder_weights(tiny_model, make_trainer):
    dataset = make_trainer(tiny_model).train_dataset
    before = fingerprint(tiny_model, dataset)
    assert fingerprint(tiny_model, dataset) == before
    with torch.no_grad():
        tiny_model.encoder.embeddings.word_embeddings.weight[5, 0] += 1.0
    assert fingerprint(tiny_model, dataset) != before
    assert fingerprint(tiny_model, dataset.select(range(4))) != fingerprint(tiny_model, dataset)
    # the rows as selected, not the table under them: the same rows in another order are other embeddings
    assert fingerprint(tiny_model, dataset.select(range(len(dataset))[::-1])) != fingerprint(tiny_model, dataset)


def test_fingerprint_follows_the_pooling(tiny_encoder_dir, make_trainer):
    from mtl import MultiTaskModel

    mean = MultiTaskModel.from_encoder(tiny_encoder_dir, pooling="mean")
    cls = MultiTaskModel.from_encoder(tiny_encoder_dir, pooling="cls")  # the same encoder weights
    dataset = make_trainer(mean).train_dataset
    assert fingerprint(mean, dataset) != fingerprint(cls, dataset)


def test_no_caching_when_the_encoder_trains(tiny_model, make_trainer):
    trainer = make_trainer(tiny_model, freeze="sentiment")
    trainer.train()
    assert EMBEDDINGS_COLUMN not in trainer.train_dataset.column_names


def test_batch_rebalance_sampling_works_on_cached_embeddings(tiny_model, make_trainer):
    heads = {name: p.detach().clone() for name, p in tiny_model.heads.named_parameters()}
    trainer = make_trainer(tiny_model, freeze="encoder", train_sampling_strategy="batch_rebalance")
    trainer.train()
    assert EMBEDDINGS_COLUMN in trainer.train_dataset.column_names and trainer.state.global_step == 2
    assert any(not torch.equal(p, heads[name]) for name, p in tiny_model.heads.named_parameters())
