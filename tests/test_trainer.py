import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

import mtl.modeling
from mtl import MultiTaskModel, MultiTaskTrainer, MultiTaskTrainingArguments
from mtl.data import RandomTruncation
from mtl.modeling import IGNORE_INDEX
from tests.conftest import count_host_reads, make_rows


def step_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_per_task_losses_are_logged_and_sum_to_the_total(tiny_model, make_trainer):
    trainer = make_trainer(tiny_model, num_train_epochs=2)
    trainer.train()
    logs = step_logs(trainer)
    assert len(logs) == 4
    for entry in logs:
        assert entry["loss"] == pytest.approx(entry["loss_category"] + entry["loss_sentiment"], abs=2e-3)


def test_task_weights_scale_the_total(tiny_model, make_trainer):
    trainer = make_trainer(tiny_model, task_weights=[2.0, 0.5])
    trainer.train()
    for entry in step_logs(trainer):
        assert entry["loss"] == pytest.approx(2.0 * entry["loss_category"] + 0.5 * entry["loss_sentiment"], abs=2e-3)


def test_task_weights_must_match_the_tasks(tiny_model, make_trainer):
    with pytest.raises(ValueError, match=r"--task_weights has 3 value\(s\) but the model has 2 tasks"):
        make_trainer(tiny_model, task_weights=[1.0, 1.0, 1.0])


@pytest.mark.parametrize("weights", [[-1.0, 1.0], [0.0, 0.0]])
def test_invalid_task_weights(weights):
    with pytest.raises(ValueError, match="task_weights"):
        MultiTaskTrainingArguments(output_dir="unused", task_weights=weights)


def test_partial_labels_train_without_nan(tiny_model, make_trainer):
    rows = make_rows(16)
    for i, row in enumerate(rows):  # half the rows topic-only, half sentiment-only
        row["sentiment" if i % 2 else "category"] = None
    trainer = make_trainer(tiny_model, rows=rows, num_train_epochs=2)
    trainer.train()
    assert all(math.isfinite(entry["loss"]) for entry in step_logs(trainer))


def test_task_loss_is_averaged_over_the_batches_that_label_the_task(tiny_model, make_trainer):
    rows = make_rows(16)
    for row in rows[:8]:  # the first batch (sequential order) has no sentiment labels
        row["sentiment"] = None
    trainer = make_trainer(tiny_model, rows=rows, logging_steps=2, train_sampling_strategy="sequential")
    trainer.train()
    (entry,) = step_logs(trainer)
    # Two batches: category in both, sentiment in the second only, so the total's mean holds half a sentiment loss.
    assert entry["loss"] == pytest.approx(entry["loss_category"] + 0.5 * entry["loss_sentiment"], abs=2e-3)


def test_predict_returns_rows_in_dataset_order(tiny_model, make_trainer, tiny_tokenizer):
    rows = make_rows(16)
    for i, row in enumerate(rows):  # lengths that a length-grouped evaluation sampler would reorder
        row["text"] += " and the law" * (i % 5)
    trainer = make_trainer(tiny_model, rows=rows, per_device_eval_batch_size=4)
    assert trainer.args.train_sampling_strategy == "group_by_length"
    logits = trainer.predict(trainer.eval_dataset).predictions
    tiny_model.eval()
    with torch.no_grad():
        for i in (0, 3, 7, 15):
            encoded = tiny_tokenizer(rows[i]["text"], return_tensors="pt")
            expected = tiny_model(**encoded).logits
            for task in range(2):
                assert torch.allclose(torch.as_tensor(logits[task][i]), expected[task][0], atol=1e-5)


def test_drop_last_drops_training_rows_only(tiny_model, make_trainer):
    # 16 rows in batches of 5: training drops the last row of each epoch, evaluation and prediction keep all 16.
    trainer = make_trainer(
        tiny_model, per_device_train_batch_size=5, per_device_eval_batch_size=5, dataloader_drop_last=True
    )
    assert len(trainer.get_train_dataloader()) == 3
    assert trainer.predict(trainer.eval_dataset).predictions[0].shape == (16, 3)
    assert len(trainer.get_eval_dataloader()) == 4  # the last batch holds the 16th row
    assert trainer.args.dataloader_drop_last is True  # lent to evaluation only


@pytest.mark.parametrize("strategy", ["batch_rebalance", "random", "group_by_length"])
def test_every_sampling_strategy_follows_the_seed(tiny_model, make_trainer, strategy):
    def first_batches(seed: int) -> list[list[int]]:
        trainer = make_trainer(tiny_model, seed=seed, train_sampling_strategy=strategy, per_device_train_batch_size=4)
        return [batch["labels"][:, 0].tolist() for batch in trainer.get_train_dataloader()]

    assert first_batches(1) == first_batches(1)
    assert first_batches(1) != first_batches(2)  # transformers seeds batch_rebalance with 42, whatever --seed says


def test_data_seed_orders_the_batches(tiny_model, make_trainer):
    def first_batch(**overrides) -> list[int]:
        trainer = make_trainer(tiny_model, seed=0, **overrides)
        return list(trainer._get_train_sampler())[:8]

    assert first_batch() == first_batch(data_seed=0)
    assert first_batch() != first_batch(data_seed=1)


def test_a_second_train_call_builds_a_fresh_steplr(tiny_model, make_trainer):
    trainer = make_trainer(tiny_model, num_train_epochs=2, lr_gamma=0.5, learning_rate=1e-3)
    rates = []
    for _ in range(2):  # the second run starts again from the full rate, as with the stock schedulers
        trainer.train()
        rates.append([entry["learning_rate"] for entry in step_logs(trainer)])
    assert rates[0] == rates[1] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])


def test_steplr_decays_every_epoch_by_gamma(tiny_model, make_trainer):
    trainer = make_trainer(tiny_model, num_train_epochs=3, lr_gamma=0.5, lr_step_epochs=1, learning_rate=1e-3)
    trainer.train()
    rates = [entry["learning_rate"] for entry in step_logs(trainer)]
    # 16 rows / batch 8 = 2 optimizer steps per epoch, each logged with the rate it used.
    assert rates == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])


def test_steplr_warms_up_linearly_first(tiny_model, make_trainer):
    trainer = make_trainer(tiny_model, num_train_epochs=3, lr_gamma=0.5, learning_rate=1e-3, warmup_steps=2)
    trainer.train()
    rates = [entry["learning_rate"] for entry in step_logs(trainer)]
    assert rates == pytest.approx([5e-4, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])  # 1/2, 2/2 of the rate, then StepLR


@pytest.mark.parametrize("class_weights", ["none", "balanced"])
def test_gradient_accumulation_makes_the_same_step_as_one_big_batch(tiny_encoder_dir, make_trainer, class_weights):
    from mtl import MultiTaskModel

    rows = make_rows(8)
    for row in rows[:3]:  # the first micro-batch of 4 has one sentiment label, the second four
        row["sentiment"] = None

    def one_step(batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = MultiTaskModel.from_encoder(tiny_encoder_dir)
        for module in model.modules():  # no dropout: the two runs must compute the same gradients
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        trainer = make_trainer(
            model, rows=rows, max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
            train_sampling_strategy="sequential", class_weights=class_weights,
        )  # fmt: skip
        trainer.train()
        (entry,) = step_logs(trainer)
        return {name: t.detach().clone() for name, t in model.state_dict().items()}, entry

    (big, big_log), (accumulated, accumulated_log) = one_step(8, 1), one_step(4, 2)
    for name, tensor in big.items():
        torch.testing.assert_close(accumulated[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    for key in ("loss", "loss_category", "loss_sentiment"):  # and the same losses are logged
        assert accumulated_log[key] == pytest.approx(big_log[key], abs=2e-4), key


def test_task_losses_are_averaged_over_steps_as_the_total_is(tiny_model, make_trainer):
    # 36 rows in batches of 8 with accumulation 4: steps of 4 batches and of 1, both tasks in every batch
    trainer = make_trainer(
        tiny_model,
        rows=make_rows(36),
        gradient_accumulation_steps=4,
        logging_steps=2,
        train_sampling_strategy="random",
    )
    trainer.train()
    (entry,) = step_logs(trainer)
    assert entry["loss"] == pytest.approx(entry["loss_category"] + entry["loss_sentiment"], abs=2e-4)


def test_evaluation_between_two_logs_leaves_the_task_losses_alone(tiny_model, make_trainer):
    # evaluation counts its batches too (transformers' prediction_step): they are no training steps of a task
    trainer = make_trainer(
        tiny_model, rows=make_rows(32), logging_steps=2, eval_strategy="steps", eval_steps=1,
        per_device_eval_batch_size=4,
    )  # fmt: skip
    trainer.train()
    for entry in step_logs(trainer):
        assert entry["loss"] == pytest.approx(entry["loss_category"] + entry["loss_sentiment"], abs=2e-4)


def test_steplr_reuses_the_training_loops_steps_per_epoch(tiny_model, make_trainer):
    trainer = make_trainer(
        tiny_model, rows=make_rows(32), num_train_epochs=2, gradient_accumulation_steps=2, learning_rate=1e-3
    )
    built = []
    original = trainer.get_train_dataloader
    trainer.get_train_dataloader = lambda: built.append(1) or original()
    trainer.train()
    assert len(built) == 1  # the training loop's own dataloader only
    # 32 rows / batch 8 = 4 batches = 2 optimizer steps per epoch with accumulation 2; StepLR decays each epoch.
    assert [entry["learning_rate"] for entry in step_logs(trainer)] == pytest.approx([1e-3, 1e-3, 7e-4, 7e-4])


def test_steplr_step_size_in_epochs(tiny_model, make_trainer):
    trainer = make_trainer(tiny_model, num_train_epochs=4, lr_gamma=0.1, lr_step_epochs=2, learning_rate=1e-3)
    trainer.create_optimizer_and_scheduler(num_training_steps=8)
    rates = []
    for _ in range(8):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert rates == pytest.approx([1e-3] * 4 + [1e-4] * 4)


def test_seed_defaults():
    args = MultiTaskTrainingArguments(output_dir="unused")
    assert args.learning_rate == 1e-4
    assert args.weight_decay == 0.0
    assert args.lr_scheduler_type == "step"
    assert args.optim == "adamw_torch_fused"  # with no weight decay: Adam


def test_the_default_optimizer_steps_as_the_seeds_adam(tiny_model, make_trainer):
    """The fused kernel is a speed option only: the default optimizer moves every weight as torch.optim.Adam (the
    seed's optimizer) does, given the same gradients; to within float rounding, so even a small weight decay shows."""
    reference = copy.deepcopy(tiny_model)
    start = {name: param.detach().clone() for name, param in tiny_model.named_parameters()}
    optimizer = make_trainer(tiny_model, learning_rate=1e-2).create_optimizer()
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for step in range(3):
        for model, opt in ((tiny_model, optimizer), (reference, adam)):
            generator = torch.Generator().manual_seed(step)
            for param in model.parameters():
                param.grad = torch.randn(param.shape, generator=generator)
            opt.step()
    for (name, param), expected in zip(tiny_model.named_parameters(), reference.parameters(), strict=True):
        assert not torch.equal(param, start[name]), name  # every weight moved...
        torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-7, msg=name)  # ...as Adam moved it


@pytest.mark.parametrize(
    "settings", [{}, {"label_smoothing_factor": 0.2}, {"class_weights": "balanced"}], ids=["plain", "smooth", "cw"]
)
def test_evaluation_reports_each_task(tiny_model, make_trainer, settings):
    # one evaluation batch: eval_loss is then exactly the sum of the tasks' losses over the whole set
    trainer = make_trainer(tiny_model, per_device_eval_batch_size=16, **settings)
    metrics = trainer.evaluate()
    for task in ("category", "sentiment"):
        for name in (
            f"eval_loss_{task}",
            f"eval_{task}_accuracy",
            f"eval_{task}_macro_f1",
            f"eval_{task}_macro_recall",
        ):
            assert name in metrics
        assert 0.0 <= metrics[f"eval_{task}_accuracy"] <= 1.0
    assert metrics["eval_loss"] == pytest.approx(
        metrics["eval_loss_category"] + metrics["eval_loss_sentiment"], rel=1e-4
    )


def test_eval_loss_is_the_weighted_sum_of_the_task_losses_whatever_the_batches(tiny_model, make_trainer):
    # a topic-only half, then a sentiment-only half, in batches of 4: every batch holds one task only
    rows = make_rows(16)
    for i, row in enumerate(rows):
        row["sentiment" if i < 8 else "category"] = None
    trainer = make_trainer(tiny_model, rows=rows, per_device_eval_batch_size=4, task_weights=[1.0, 0.5])
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_loss_category"] + 0.5 * metrics["eval_loss_sentiment"])


@pytest.mark.parametrize(("class_weights", "smoothing"), [("balanced", 0.0), ("none", 0.2), ("balanced", 0.2)])
def test_training_and_evaluation_losses_are_torchs_cross_entropy(tiny_model, make_trainer, class_weights, smoothing):
    # The reference: F.cross_entropy with the run's class weights and label smoothing, per task, over a batch
    # smaller than the data set (its window's denominators decide the mean) that has a row without a sentiment.
    rows = make_rows(16)  # imbalanced: 6/5/5 categories, 6/6/4 sentiments
    for row in rows[::5]:
        row["sentiment"] = None
    for module in tiny_model.modules():  # the reference forward pass must see the same activations
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    trainer = make_trainer(
        tiny_model,
        rows=rows,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        train_sampling_strategy="sequential",
        class_weights=class_weights,
        label_smoothing_factor=smoothing,
    )
    weights = trainer.class_weights or [None, None]
    if class_weights == "balanced":
        assert not torch.allclose(weights[1], torch.ones(3))  # else the weights would change nothing

    def reference(logits, labels) -> list[torch.Tensor]:
        return [
            F.cross_entropy(task_logits, task_labels, weight=w, label_smoothing=smoothing, ignore_index=IGNORE_INDEX)
            for task_logits, task_labels, w in zip(logits, labels.T, weights, strict=True)
        ]

    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"][:, 1] == IGNORE_INDEX).any() and len(batch["labels"]) < len(rows)
    samples, denominators = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    tiny_model.train()
    loss = trainer.compute_loss(tiny_model, samples[0], num_items_in_batch=denominators)
    logits = tiny_model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(loss, sum(reference(logits, batch["labels"])))

    metrics = trainer.evaluate()
    tiny_model.eval()
    with torch.no_grad():
        batches = list(trainer.get_eval_dataloader())
        outputs = [tiny_model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]
    logits = [torch.cat([output[task] for output in outputs]) for task in range(2)]
    expected = reference(logits, torch.cat([b["labels"] for b in batches]))
    assert [metrics["eval_loss_category"], metrics["eval_loss_sentiment"]] == pytest.approx(
        [e.item() for e in expected], rel=1e-5
    )


def test_compute_loss_keeps_the_hf_signature(tiny_model, make_trainer, tiny_tokenizer):
    trainer = make_trainer(tiny_model)
    inputs = tiny_tokenizer(["the phone is great", "the vote was awful"], padding=True, return_tensors="pt")
    inputs["labels"] = torch.tensor([[0, 0], [2, 1]])
    loss, outputs = trainer.compute_loss(tiny_model, dict(inputs), return_outputs=True, num_items_in_batch=4)
    assert loss.shape == () and outputs.loss is loss
    assert len(outputs.logits) == 2


def test_training_lowers_the_loss(tiny_model, make_trainer):
    trainer = make_trainer(
        tiny_model, rows=make_rows(36), num_train_epochs=20, lr_scheduler_type="constant", learning_rate=3e-3
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before * 0.5
    assert after["eval_category_accuracy"] > 0.9


def test_layerwise_lr_decay_scales_each_layer(tiny_model, make_trainer):
    trainer = make_trainer(tiny_model, layerwise_lr_decay=0.5, learning_rate=1e-3, lr_scheduler_type="constant")
    optimizer = trainer.create_optimizer()
    rate_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(tiny_model.named_parameters())
    assert len(rate_of) == len(named)  # every parameter in exactly one group
    expected = {
        "heads.category.weight": 1e-3,
        "encoder.encoder.layer.1.attention.self.query.weight": 5e-4,  # top layer of two
        "encoder.encoder.layer.0.output.dense.bias": 2.5e-4,
        "encoder.embeddings.word_embeddings.weight": 1.25e-4,
    }
    for name, rate in expected.items():
        assert rate_of[id(named[name])] == pytest.approx(rate)
    assert trainer.create_optimizer() is optimizer  # a second call keeps the optimizer, rates not decayed twice


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_head_learning_rate_applies_to_heads_only(tiny_model, make_trainer, decay):
    trainer = make_trainer(
        tiny_model, head_learning_rate=1e-2, layerwise_lr_decay=decay, learning_rate=1e-3, lr_scheduler_type="constant"
    )
    optimizer = trainer.create_optimizer()
    rate_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(tiny_model.named_parameters())
    assert len(rate_of) == len(named)
    for task in ("category", "sentiment"):
        assert rate_of[id(named[f"heads.{task}.weight"])] == pytest.approx(1e-2)
        assert rate_of[id(named[f"heads.{task}.bias"])] == pytest.approx(1e-2)
    top_layer = named["encoder.encoder.layer.1.attention.self.query.weight"]
    assert rate_of[id(top_layer)] == pytest.approx(1e-3 * decay)
    assert rate_of[id(named["encoder.embeddings.word_embeddings.weight"])] == pytest.approx(1e-3 * decay**3)


def test_rate_options_with_a_given_optimizer_warn_and_keep_it(tiny_model, tmp_path, caplog):
    given = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    args = MultiTaskTrainingArguments(
        output_dir=str(tmp_path), head_learning_rate=1e-2, use_cpu=True, eval_strategy="no"
    )
    with caplog.at_level("WARNING", logger="mtl.trainer"):
        trainer = MultiTaskTrainer(model=tiny_model, args=args, optimizers=(given, None))
    assert "--head_learning_rate are ignored" in caplog.text
    assert trainer.create_optimizer() is given and len(given.param_groups) == 1


@pytest.mark.parametrize("rate", [0.0, -1e-3])
def test_invalid_head_learning_rate(rate):
    with pytest.raises(ValueError, match="--head_learning_rate must be a positive number"):
        MultiTaskTrainingArguments(output_dir="unused", head_learning_rate=rate)


def test_layerwise_lr_decay_trains_every_layer(tiny_model, make_trainer):
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    trainer = make_trainer(tiny_model, layerwise_lr_decay=0.8)
    trainer.train()
    changed = {name for name, p in tiny_model.named_parameters() if not torch.equal(p, before[name])}
    assert "encoder.embeddings.word_embeddings.weight" in changed
    assert "encoder.encoder.layer.0.attention.self.query.weight" in changed
    assert "heads.sentiment.weight" in changed


@pytest.mark.parametrize("decay", [0.0, -0.5, 1.5])
def test_invalid_layerwise_lr_decay(decay):
    with pytest.raises(ValueError, match=r"--layerwise_lr_decay must be in \(0, 1\]"):
        MultiTaskTrainingArguments(output_dir="unused", layerwise_lr_decay=decay)


def test_train_data_collator_collates_training_batches_only(tiny_model, make_trainer, tiny_tokenizer):
    rows = [{"text": " ".join(["phone"] * 40), "category": "Tech", "sentiment": "Positive"}] * 16
    trainer = make_trainer(tiny_model, rows)
    trainer.train_data_collator = RandomTruncation(trainer.data_collator, 5, 5, tiny_tokenizer.all_special_ids)
    assert {batch["input_ids"].shape[1] for batch in trainer.get_train_dataloader()} == {5}
    assert {batch["input_ids"].shape[1] for batch in trainer.get_eval_dataloader()} == {32}  # rows as tokenized
    assert trainer.data_collator is not trainer.train_data_collator


def test_augmented_training_batches_are_not_cached(tiny_model, make_trainer, tiny_tokenizer, caplog):
    trainer = make_trainer(tiny_model, freeze="encoder")
    trainer.train_data_collator = RandomTruncation(trainer.data_collator, 5, 32, tiny_tokenizer.all_special_ids)
    with caplog.at_level("WARNING", logger="mtl.trainer"):
        trainer.train()
    assert "input_ids" in trainer.train_dataset.column_names  # the encoder still sees every (cut) batch
    assert "not cached" in caplog.text


@pytest.mark.parametrize(("bf16", "width"), [(False, 11), (True, 16)])
def test_default_collator_pads_to_a_multiple_of_8_in_mixed_precision(tiny_model, make_trainer, bf16, width):
    rows = [{"text": " ".join(["phone"] * 9), "category": "Tech", "sentiment": "Positive"}] * 4  # 11 tokens
    trainer = make_trainer(tiny_model, rows, bf16=bf16)
    assert {batch["input_ids"].shape[1] for batch in trainer.get_train_dataloader()} == {width}


def test_the_trainer_resumes_the_hf_way_and_refuses_to_mix_runs(tiny_model, make_trainer, tmp_path):
    make_trainer(tiny_model, save_strategy="epoch", num_train_epochs=1).train()  # leaves out/checkpoint-2
    trainer = make_trainer(tiny_model, save_strategy="epoch", num_train_epochs=2)  # arguments alone are no error
    with pytest.raises(ValueError, match=r"holds an earlier run's checkpoints \(checkpoint-2\)"):
        trainer.train()
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # 2 steps of 8 would be reread as 4 of 4 rows: another run, not this one continued
        ({"per_device_train_batch_size": 4}, r"trained at a batch size of 8 per device, this run has 4"),
        ({"num_train_epochs": 1}, r"has already trained 1 epochs, so --num_train_epochs 1 leaves nothing to train"),
        ({"max_steps": 2}, r"has already trained 2 steps, so --max_steps 2 leaves nothing to train"),
        # other parameter groups: torch's own error would not say why
        ({"freeze": "encoder"}, r"its optimizer state does not fit this run's parameter groups \(--freeze"),
        ({"layerwise_lr_decay": 0.5}, r"its optimizer state does not fit"),
    ],
)
def test_a_resumed_run_must_continue_the_run_that_wrote_the_checkpoint(tiny_model, make_trainer, overrides, message):
    first = make_trainer(tiny_model, save_strategy="epoch", num_train_epochs=1)
    first.train()  # out/checkpoint-2, one epoch of 16 rows at 8
    settings = {"save_strategy": "epoch", "num_train_epochs": 3, **overrides}
    with pytest.raises(ValueError, match=message):
        make_trainer(tiny_model, **settings).train(resume_from_checkpoint=True)


def test_auto_find_batch_size_resumes_at_the_size_the_checkpoint_shrank_to(tiny_model, make_trainer, tmp_path):
    make_trainer(tiny_model, save_strategy="epoch", num_train_epochs=1).train()
    state = tmp_path / "out" / "checkpoint-2" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "train_batch_size": 4}))  # as after an OOM halving
    settings = {"save_strategy": "epoch", "num_train_epochs": 2, "auto_find_batch_size": True}
    from mtl.checkpointing import check_checkpoint_fits

    check_checkpoint_fits(tmp_path / "out" / "checkpoint-2", make_trainer(tiny_model, **settings).args)  # no error


@pytest.mark.parametrize(
    ("metric", "greater"),
    [
        ("loss_category", False),
        ("eval_loss_sentiment", False),
        ("eval_dev_loss_category", False),
        ("category_accuracy", True),
        ("eval_loss", False),
    ],
)
def test_a_task_loss_is_better_when_lower(metric, greater):
    from mtl.trainer import check_metric_for_best_model

    # transformers' rule (lower is better only for names ending in "loss") would rank loss_category upside down.
    args = MultiTaskTrainingArguments(output_dir="unused", metric_for_best_model=metric)
    check_metric_for_best_model(args, ["category", "sentiment"], ["dev"] if "dev" in metric else ())
    assert args.greater_is_better is greater


def test_the_best_checkpoint_by_a_task_loss_is_the_lowest(tiny_model, make_trainer):
    trainer = make_trainer(
        tiny_model,
        num_train_epochs=3,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="loss_category",
    )
    trainer.train()
    losses = [entry["eval_loss_category"] for entry in trainer.state.log_history if "eval_loss_category" in entry]
    assert len(losses) == 3 and len(set(losses)) == 3
    assert trainer.state.best_metric == min(losses)


def test_metric_for_best_model_may_name_one_of_several_evaluation_sets(tiny_model, make_trainer):
    from mtl.trainer import check_metric_for_best_model

    args = MultiTaskTrainingArguments(output_dir="unused", metric_for_best_model="eval_dev_mean_macro_recall")
    check_metric_for_best_model(args, ["category", "sentiment"], ["dev", "other"])
    with pytest.raises(ValueError, match="'eval_dev_mean_macro_recall' is not a metric evaluation logs"):
        check_metric_for_best_model(args, ["category", "sentiment"])
    with pytest.raises(ValueError, match="'f1' is not a metric"):  # save_strategy='best' reads it too
        make_trainer(tiny_model, save_strategy="best", metric_for_best_model="f1")


class HostReadsBetweenSteps(TrainerCallback):
    """Counts the host reads of tensor values from the end of step `first` to the end of step `last`."""

    def __init__(self, first: int, last: int):
        self.first, self.last, self.reads, self._counting = first, last, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.first:
            self._counting = count_host_reads()
            self.reads = self._counting.__enter__()
        elif state.global_step == self.last:
            self._counting.__exit__(None, None, None)


def test_training_steps_read_no_tensor_on_the_host(tiny_model, make_trainer, monkeypatch):
    """On a GPU each read of a tensor's value makes the CPU wait for the queued work, so it cannot queue the next step
    meanwhile: between logs and evaluations the training loop reads none (nor do the loss and the model's forward)."""
    monkeypatch.setattr(mtl.modeling, "host_reads_wait", lambda device: True)  # the model's GPU path, on the CPU
    trainer = make_trainer(tiny_model, rows=make_rows(40), per_device_train_batch_size=4, logging_strategy="no")
    counter = HostReadsBetweenSteps(2, 8)
    trainer.add_callback(counter)
    trainer.train()
    assert counter.reads == {}
    # The stock loop and transformers' mask handling do read: the count sees them.
    monkeypatch.setattr(mtl.modeling, "host_reads_wait", lambda device: False)
    monkeypatch.setattr(MultiTaskTrainer, "training_step", Trainer.training_step)
    counter = HostReadsBetweenSteps(2, 8)
    trainer.add_callback(counter)
    trainer.train()
    sites = " ".join(counter.reads)
    assert "masking_utils.py" in sites and "trainer.py" in sites


@pytest.mark.parametrize("nan_filter", [True, False])
def test_a_non_finite_step_loss_is_logged_as_the_trainers_own_filter_logs_it(tiny_encoder_dir, make_trainer,
                                                                             monkeypatch, nan_filter):  # fmt: skip
    """MultiTaskTrainer filters non-finite step losses on the device (see training_step); the logs are the
    Trainer's, and --logging_nan_inf_filter reads as the user set it throughout."""
    compute_loss = MultiTaskTrainer.compute_loss
    calls = []

    def nan_at_some_steps(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        calls.append(self.args.logging_nan_inf_filter)
        if len(calls) in (2, 7):  # the value NaN, the gradient intact
            loss = loss + (torch.tensor(math.nan) - loss.detach())
        return loss

    monkeypatch.setattr(MultiTaskTrainer, "compute_loss", nan_at_some_steps)
    logs = []
    for step in (MultiTaskTrainer.training_step, Trainer.training_step):  # ours, then the stock loop's check alone
        monkeypatch.setattr(MultiTaskTrainer, "training_step", step)
        calls.clear()
        torch.manual_seed(0)
        trainer = make_trainer(
            MultiTaskModel.from_encoder(tiny_encoder_dir), rows=make_rows(48), per_device_train_batch_size=4,
            logging_steps=3, logging_nan_inf_filter=nan_filter, train_sampling_strategy="random",
        )  # fmt: skip
        trainer.train()
        assert calls == [nan_filter] * 12 and trainer.args.logging_nan_inf_filter is nan_filter
        logs.append([entry["loss"] for entry in step_logs(trainer)])
    assert len(logs[0]) == 4
    if nan_filter:
        assert all(math.isfinite(loss) for loss in logs[0])
        assert logs[0] == pytest.approx(logs[1], abs=1e-4)
    else:  # unfiltered, a NaN stays in the loop's running loss (NaN - NaN after a log): the stock loop's logs too
        assert all(math.isnan(loss) for loss in logs[0] + logs[1])
