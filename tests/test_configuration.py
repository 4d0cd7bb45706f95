import pytest
import torch
from transformers import AutoConfig, AutoModel

from mtl import DEFAULT_TASKS, MultiTaskConfig
from mtl.configuration import token_limit


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
        ({"tasks": {"a/../../evil": ["a", "b"]}}, "not allowed"),  # a safe start is not enough: the whole name
        ({"tasks": {"encoder": ["a", "b"]}}, "not allowed"),
        ({"tasks": {"mean": ["a", "b"]}}, "not allowed"),  # its metrics would collide with the mean over tasks
        ({"tasks": {"topic": ["a", ""]}}, "empty"),
        ({"pooling": "max"}, "pooling"),
        ({"classifier_dropout": 1.5}, "classifier_dropout"),
        # Predictions hold "topic" and "topic_score": a task of that name would overwrite the probability.
        ({"tasks": {"topic": ["a", "b"], "topic_score": ["low", "high"]}}, "clashes with the score of task 'topic'"),
    ],
)
def test_invalid_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiTaskConfig(**kwargs)


# Text encoders whose positions start after the padding index, and some that number them from 0.
@pytest.mark.parametrize(
    "model_type",
    ["roberta", "xlm-roberta-xl", "roberta-prelayernorm", "mpnet", "ibert", "longformer", "luke", "markuplm", "esm",
     "bert", "electra", "distilbert"],
)  # fmt: skip
def test_token_limit_is_the_longest_input_the_encoder_reads(model_type):
    config = AutoConfig.for_model(
        model_type, vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=40, pad_token_id=1, attention_window=[4],
    )  # fmt: skip
    encoder = AutoModel.from_config(config).eval()
    limit = token_limit(config)

    def forward(length: int) -> None:
        ids = torch.full((1, length), 5)
        with torch.no_grad():
            encoder(input_ids=ids, attention_mask=torch.ones_like(ids))

    forward(limit)  # reads its limit...
    with pytest.raises((IndexError, RuntimeError)):  # ...and not one token more
        forward(limit + 1)
