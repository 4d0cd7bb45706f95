from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtl import MultiTaskTrainingArguments, load_multitask_model
from mtl.averaging import WEIGHTS_NAME, average_state_dicts, main
from mtl.checkpointing import complete_checkpoints
from tests.conftest import make_rows


def save_weights(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True)
    save_file(tensors, directory / WEIGHTS_NAME)
    return directory


def weights_of(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_weights_equal(model, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=1e-7, msg=name)


def test_average_is_the_elementwise_mean(tmp_path):
    a = save_weights(tmp_path / "a", {"w": torch.tensor([1.0, 2.0]), "h": torch.ones(2, dtype=torch.bfloat16)})
    b = save_weights(tmp_path / "b", {"w": torch.tensor([3.0, 6.0]), "h": torch.zeros(2, dtype=torch.bfloat16)})
    c = save_weights(tmp_path / "c", {"w": torch.tensor([5.0, 1.0]), "h": torch.ones(2, dtype=torch.bfloat16)})
    averaged = average_state_dicts([a, b, c])
    torch.testing.assert_close(averaged["w"], torch.tensor([3.0, 3.0]))
    assert averaged["h"].dtype == torch.bfloat16  # each tensor keeps its dtype
    torch.testing.assert_close(averaged["h"], torch.full((2,), 2 / 3, dtype=torch.bfloat16))


def test_integer_tensors_are_kept_and_must_agree(tmp_path):
    ids = torch.arange(4)
    a = save_weights(tmp_path / "a", {"w": torch.zeros(1), "ids": ids})
    b = save_weights(tmp_path / "b", {"w": torch.ones(1), "ids": ids})
    assert torch.equal(average_state_dicts([a, b])["ids"], ids)
    c = save_weights(tmp_path / "c", {"w": torch.ones(1), "ids": ids + 1})
    with pytest.raises(ValueError, match="integer tensor ids differs"):
        average_state_dicts([a, c])


def test_checkpoints_of_different_models_are_refused(tmp_path):
    a = save_weights(tmp_path / "a", {"w": torch.zeros(2)})
    b = save_weights(tmp_path / "b", {"w": torch.zeros(3)})
    c = save_weights(tmp_path / "c", {"v": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"tensor w has shape \(3,\)"):
        average_state_dicts([a, b])
    with pytest.raises(ValueError, match="other tensors"):
        average_state_dicts([a, c])
    with pytest.raises(FileNotFoundError, match=r"missing.model\.safetensors does not exist"):
        average_state_dicts([a, tmp_path / "missing"])


def test_a_truncated_weights_file_is_a_clear_error(tmp_path):
    a = save_weights(tmp_path / "a", {"w": torch.zeros(64)})
    b = save_weights(tmp_path / "b", {"w": torch.ones(64)})
    weights = b / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:40])  # as a run killed while saving leaves it
    with pytest.raises(ValueError, match=r"b.model\.safetensors is not a readable safetensors file"):
        average_state_dicts([a, b])


def test_checkpoints_with_other_label_orders_are_refused(tmp_path, tiny_model):
    from mtl import MultiTaskConfig

    a, b = tmp_path / "a", tmp_path / "b"
    tiny_model.save_pretrained(a)
    tiny_model.save_pretrained(b)
    tasks = {"category": ["Politics", "Tech", "Sports"], "sentiment": ["Positive", "Negative", "Neutral"]}
    MultiTaskConfig(encoder=tiny_model.config.encoder, tasks=tasks).save_pretrained(b)  # same shapes, rows reordered
    with pytest.raises(ValueError, match=r"b was trained with tasks .*'Politics', 'Tech'.*one run only"):
        average_state_dicts([a, b])
    c = tmp_path / "c"
    tiny_model.save_pretrained(c)
    MultiTaskConfig(encoder=tiny_model.config.encoder, tasks=tiny_model.config.tasks, pooling="cls").save_pretrained(c)
    with pytest.raises(ValueError, match=r"c was trained with .* and cls pooling, .*a with .* and mean pooling"):
        average_state_dicts([a, c])
    assert average_state_dicts([a, a]).keys() == load_file(a / WEIGHTS_NAME).keys()


def test_trainer_averages_the_last_checkpoints(tiny_model, make_trainer, tmp_path):
    trainer = make_trainer(
        tiny_model, num_train_epochs=3, save_strategy="epoch", save_total_limit=2, average_checkpoints=2
    )
    trainer.train()
    checkpoints = complete_checkpoints(tmp_path / "out")
    assert [c.name for c in checkpoints] == ["checkpoint-4", "checkpoint-6"]  # 2 steps per epoch
    assert trainer.averaged_checkpoints == ["checkpoint-4", "checkpoint-6"]
    last, before_last = load_file(checkpoints[1] / WEIGHTS_NAME), load_file(checkpoints[0] / WEIGHTS_NAME)
    assert not torch.equal(last["heads.category.weight"], before_last["heads.category.weight"])
    assert_weights_equal(tiny_model, {name: (last[name] + before_last[name]) / 2 for name in last})


def test_a_resumed_run_averages_none_of_the_later_checkpoints_an_earlier_run_left(tiny_model, make_trainer, tmp_path):
    make_trainer(tiny_model, num_train_epochs=3, save_strategy="epoch", save_total_limit=None).train()
    later = load_file(tmp_path / "out" / "checkpoint-6" / WEIGHTS_NAME)  # left by the 3-epoch run
    trainer = make_trainer(
        tiny_model, num_train_epochs=2, save_strategy="epoch", save_total_limit=None, average_checkpoints=2
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    assert trainer.averaged_checkpoints == ["checkpoint-2", "checkpoint-4"]  # not checkpoint-6 of the earlier run
    assert not torch.equal(tiny_model.state_dict()["heads.category.weight"], later["heads.category.weight"])


@pytest.mark.parametrize("averaged_is_better", [True, False, None], ids=["better", "worse", "no-metric"])
def test_with_load_best_the_average_must_beat_the_best(tiny_model, make_trainer, tmp_path, averaged_is_better):
    trainer = make_trainer(
        tiny_model,
        num_train_epochs=3,
        save_strategy="epoch",
        eval_strategy="epoch",
        save_total_limit=3,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        average_checkpoints=2,
    )
    scored = {}

    def evaluate(*args, metric_key_prefix="eval", **kwargs):
        if metric_key_prefix != "eval_averaged":
            return type(trainer).evaluate(trainer, *args, metric_key_prefix=metric_key_prefix, **kwargs)
        scored["weights"] = weights_of(tiny_model)  # what the trainer evaluated as the average
        if averaged_is_better is None:  # e.g. several evaluation sets, whose metrics carry their names
            return {"eval_averaged_topic_loss": 0.0}
        shift = -1.0 if averaged_is_better else 1.0  # loss: lower is better
        return {"eval_averaged_loss": trainer.state.best_metric + shift}

    trainer.evaluate = evaluate
    trainer.train()
    best = load_file(Path(trainer.state.best_model_checkpoint) / WEIGHTS_NAME)
    expected = scored["weights"] if averaged_is_better else best
    assert_weights_equal(tiny_model, expected)
    assert trainer.averaged_checkpoints == (["checkpoint-4", "checkpoint-6"] if averaged_is_better else [])
    newest = [load_file(c / WEIGHTS_NAME) for c in complete_checkpoints(tmp_path / "out")[-2:]]
    torch.testing.assert_close(
        scored["weights"]["heads.sentiment.weight"],
        (newest[0]["heads.sentiment.weight"] + newest[1]["heads.sentiment.weight"]) / 2,
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"average_checkpoints": 1}, "must be at least 2"),
        ({"average_checkpoints": 2, "save_strategy": "no"}, "set --save_strategy"),
        ({"average_checkpoints": 3, "save_total_limit": 2}, "--save_total_limit to at least 3"),
        (
            {
                "average_checkpoints": 2,
                "save_total_limit": 2,
                "load_best_model_at_end": True,
                "eval_strategy": "epoch",
            },
            "--save_total_limit to at least 3",
        ),
    ],
)
def test_invalid_averaging_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        MultiTaskTrainingArguments(output_dir="unused", **settings)


def test_cli_writes_a_loadable_averaged_model(tiny_model, make_trainer, tmp_path):
    trainer = make_trainer(tiny_model, rows=make_rows(16), num_train_epochs=2, save_strategy="epoch")
    trainer.train()
    checkpoints = [str(c) for c in complete_checkpoints(tmp_path / "out")]
    assert len(checkpoints) == 2
    output = main(["--checkpoints", *checkpoints, "--output_dir", str(tmp_path / "averaged")])
    assert not (output / "trainer_state.json").exists() and not (output / "optimizer.pt").exists()
    averaged = load_multitask_model(output)
    expected = average_state_dicts(checkpoints)
    assert_weights_equal(averaged, expected)
    assert averaged.config.tasks == tiny_model.config.tasks
    with pytest.raises(ValueError, match="at least two checkpoint folders"):
        main(["--checkpoints", checkpoints[0], "--output_dir", str(tmp_path / "one")])
    with pytest.raises(ValueError, match="is one of the checkpoints"):
        main(["--checkpoints", *checkpoints, "--output_dir", checkpoints[0]])
    with pytest.raises(ValueError, match=r"names \S+checkpoint-\d+ more than once; give each checkpoint folder once"):
        main(["--checkpoints", checkpoints[0], f"{checkpoints[0]}/", "--output_dir", str(tmp_path / "copy")])
    assert not (tmp_path / "copy").exists()
    # a folder holding another model: its card and results would stay behind, describing the wrong weights
    tiny_model.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"already holds a model \(config.json, model.safetensors\); choose a new"):
        main(["--checkpoints", *checkpoints, "--output_dir", str(tmp_path / "other")])
    before = (output / WEIGHTS_NAME).read_bytes()
    with pytest.raises(ValueError, match="already holds a model"):  # nor its own earlier output
        main(["--checkpoints", *checkpoints, "--output_dir", str(output)])
    assert (output / WEIGHTS_NAME).read_bytes() == before
