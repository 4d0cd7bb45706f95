"""Configuration of a multi-task classifier: the encoder's own config, pooling, and the tasks with their labels."""

import re
from typing import ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# The project's first use: one sentence, two questions. Every other place reads task and label names from a config.
DEFAULT_TASKS: dict[str, list[str]] = {
    "category": ["Tech", "Sports", "Politics"],
    "sentiment": ["Positive", "Negative", "Neutral"],
}
POOLING_MODES = ("mean", "cls")
# Task names become file keys, metric names and CLI values: keep them to a safe, path-free alphabet.
_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# Names that already mean something where task names appear: --freeze's keywords, the data's columns, the loss, and
# the `mean_<metric>` averages over the tasks.
RESERVED_TASK_NAMES = ("none", "all", "encoder", "labels", "loss", "text", "mean")


def check_head_options(pooling: object, classifier_dropout: object, prefix: str = "") -> None:
    """The pooling mode and the dropout before the heads (`prefix="--"` names them as command-line flags)."""
    if pooling not in POOLING_MODES:
        raise ValueError(f"{prefix}pooling must be one of {list(POOLING_MODES)}, got {pooling!r}.")
    if not isinstance(classifier_dropout, (int, float)) or not 0.0 <= classifier_dropout < 1.0:
        raise ValueError(f"{prefix}classifier_dropout must be in [0, 1), got {classifier_dropout}.")


def validate_tasks(tasks: dict[str, list[str]]) -> None:
    """Raise a `ValueError` that says how to fix it if `tasks` is not a usable {task: [label, ...]} mapping."""
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(f"tasks must be a non-empty mapping of task name to label names, got {tasks!r}.")
    for task, labels in tasks.items():
        if not isinstance(task, str) or not _TASK_NAME.match(task) or task.lower() in RESERVED_TASK_NAMES:
            raise ValueError(
                f"Task name {task!r} is not allowed: use letters, digits and '_' starting with a letter, "
                f"and none of {list(RESERVED_TASK_NAMES)}."
            )
        if not isinstance(labels, (list, tuple)) or len(labels) < 2:
            raise ValueError(f"Task {task!r} needs a list of at least 2 label names, got {labels!r}.")
        if not all(isinstance(label, str) and label.strip() for label in labels):
            raise ValueError(f"Task {task!r} has an empty or non-string label name: {labels!r}.")
        if len(set(labels)) != len(labels):
            raise ValueError(f"Task {task!r} lists a label name twice: {labels!r}.")
        if task.endswith("_score") and task.removesuffix("_score") in tasks:
            # Predictions hold "<task>" and "<task>_score" (its probability): the two would write one key.
            raise ValueError(
                f"Task name {task!r} clashes with the score of task {task.removesuffix('_score')!r} in "
                "predictions; rename it."
            )


class MultiTaskConfig(PreTrainedConfig):
    r"""
    Configuration of a [`MultiTaskModel`].

    Args:
        encoder (`PreTrainedConfig` or `dict`, *optional*):
            The shared encoder's config (any model `AutoModel` can build, e.g. BERT). It is stored whole, so a saved
            model rebuilds offline without the checkpoint it was first loaded from.
        tasks (`dict[str, list[str]]`, *optional*):
            Ordered mapping from task name to its label names. Defaults to `category` and `sentiment`.
        pooling (`str`, *optional*, defaults to `"mean"`):
            `"mean"`: average of the token states over the attention mask (how all-MiniLM-L6-v2 was trained);
            `"cls"`: the first token's state.
        classifier_dropout (`float`, *optional*, defaults to 0.1):
            Dropout applied to the pooled embedding before the task heads.
    """

    model_type = "mtl"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "encoder": SubConfigSpec(config_class=AutoConfig, model_type="bert")
    }

    encoder: PreTrainedConfig | dict | None = None
    tasks: dict[str, list[str]] | list | None = None
    pooling: str = "mean"
    classifier_dropout: float = 0.1

    def __post_init__(self, **kwargs):
        if kwargs.get("model_type", self.model_type) != self.model_type:  # e.g. MultiTaskModel.from_pretrained(bert)
            raise ValueError(
                f"This is the config of a {kwargs['model_type']!r} model, not of an mtl model: build one on that "
                "encoder with MultiTaskModel.from_encoder(path), or load a directory written by run_train.py."
            )
        tasks = DEFAULT_TASKS if self.tasks is None else self.tasks
        if isinstance(tasks, list):  # the saved form: [[task, [labels...]], ...]
            if not all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in tasks):
                raise ValueError(f"tasks must be a mapping of task name to label names, got {tasks!r}.")
            tasks = dict(tasks)
        validate_tasks(tasks)
        self.tasks = {task: list(labels) for task, labels in tasks.items()}
        check_head_options(self.pooling, self.classifier_dropout)
        super().__post_init__(**kwargs)

    def to_dict(self) -> dict:
        output = super().to_dict()
        # config.json is written with sorted keys, which would reorder a mapping; pairs keep the task order.
        output["tasks"] = [[task, list(labels)] for task, labels in self.tasks.items()]
        return output

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size


# Encoders whose position ids start after the padding index (as in fairseq): of their `max_position_embeddings`
# (514 for RoBERTa-base), pad_token_id + 1 are never used by a token, so 512 tokens fit, not 514.
# The model types whose transformers code numbers positions with `create_position_ids_from_input_ids`.
PADDING_OFFSET_MODEL_TYPES = (
    "roberta", "xlm-roberta", "xlm-roberta-xl", "roberta-prelayernorm", "camembert", "mpnet", "data2vec-text",
    "ibert", "longformer", "luke", "markuplm", "esm", "xmod", "lilt", "layoutlmv3",
)  # fmt: skip


def token_limit(config: PreTrainedConfig) -> int | None:
    """The most tokens (special tokens included) the encoder of `config` (an mtl or encoder config) can read."""
    # By model type, not class: a model loaded with trust_remote_code has its own copy of MultiTaskConfig.
    encoder = config.encoder if getattr(config, "model_type", None) == MultiTaskConfig.model_type else config
    limit = getattr(encoder, "max_position_embeddings", None)
    if limit and getattr(encoder, "model_type", None) in PADDING_OFFSET_MODEL_TYPES:
        limit -= (getattr(encoder, "pad_token_id", None) or 0) + 1
    return limit
