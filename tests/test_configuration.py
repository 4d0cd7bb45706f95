import pytest

from mtl import DEFAULT_TASKS, MultiTaskConfig


def test_defaults():
    config = MultiTaskConfig()
    assert config.tasks == {
        "category": ["Tech", "Sports", "Politics"],
        "sentiment": ["Positive", "Negative", "Neutral"],
    }
    assert config.tasks == DEFAULT_TASKS
    assert config.pooling == "mean"
    assert config.model_type == "mtl"
    assert config.task_names == ["category", "sentiment"]


def test_round_trip_keeps_tasks_in_order(tmp_path):
    tasks = {"z_last": ["b", "a"], "a_first": ["x", "y", "w"]}
    MultiTaskConfig(tasks=tasks, classifier_dropout=0.3).save_pretrained(tmp_path)
    loaded = MultiTaskConfig.from_pretrained(tmp_path)
    assert list(loaded.tasks.items()) == list(tasks.items())
    assert loaded.classifier_dropout == 0.3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": {}}, "non-empty"),
        ({"tasks": {"topic": ["only"]}}, "at least 2"),
        ({"tasks": {"topic": ["a", "a"]}}, "twice"),
        ({"tasks": {"../evil": ["a", "b"]}}, "not allowed"),
        ({"tasks": {"encoder": ["a", "b"]}}, "not allowed"),
        ({"tasks": {"mean": ["a", "b"]}}, "not allowed"),  # its metrics would collide with the mean over tasks
        ({"tasks": {"topic": ["a", ""]}}, "empty"),
        ({"pooling": "max"}, "pooling"),
        ({"classifier_dropout": 1.5}, "classifier_dropout"),
    ],
)
def test_invalid_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiTaskConfig(**kwargs)
