"""The Hugging Face Hub side of a trained model: its model card, and pushing the output directory in one commit."""

import logging
import os
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import httpx, validate_repo_id
from transformers import TrainingArguments
from transformers.trainer_utils import HubStrategy

from .args import STEP_SCHEDULER, DataArguments
from .checkpointing import RUN_RESULT_FILES
from .cli import first_line
from .configuration import MultiTaskConfig
from .modeling import DEFAULT_ENCODER_HUB_ID, default_encoder_path, resolve_encoder_name

if TYPE_CHECKING:
    from .trainer import MultiTaskTrainer

logger = logging.getLogger(__name__)

MODEL_CARD_NAME = "README.md"
CARD_TAGS = ("mtl", "multi-task", "text-classification")
# The Trainer's metric-key prefix -> the split those metrics were measured on.
EVAL_SPLITS = {"eval": "validation", "test": "test"}
# Our per-task metric -> (its model-index metric type, its name in the card).
CARD_METRICS = {
    "accuracy": ("accuracy", "accuracy"),
    "macro_f1": ("f1", "macro-F1"),
    "macro_recall": ("recall", "macro-recall"),
}
POOLING_TEXT = {"mean": "averages the token states (mean pooling)", "cls": "takes the first ([CLS]) token state"}
DataSources = str | Sequence[str] | Mapping[str, str | Sequence[str]]


# ---- pushing ----


@dataclass(frozen=True)
class HubPush:
    """A requested push. The token lives here, not in the `TrainingArguments`: the Trainer pickles those into
    `training_args.bin`, which is uploaded with the model."""

    token: str | None = field(default=None, repr=False)


def detach_hub_push(args: TrainingArguments) -> HubPush | None:
    """Take `push_to_hub` and `hub_token` out of `args` before the Trainer is built; `None` when no push is asked for.

    Left in, they would make the Trainer create the repository before training, upload every checkpoint during
    training, and write the token into each `training_args.bin`. Instead `push_to_hub` pushes once, after the model
    and its results are saved. `hub_model_id`, `hub_private_repo` and `hub_revision` stay in `args` and apply.
    """
    # The Trainer's default, every_save, and `end` both mean "the model" here; these ask for checkpoints on the Hub.
    checkpoints = (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS)
    if args.push_to_hub and (args.hub_strategy in checkpoints or args.hub_always_push):
        raise ValueError(
            f"--hub_strategy {HubStrategy(args.hub_strategy).value} / --hub_always_push: mtl pushes once, after "
            "training (model, tokenizer, card and results; checkpoints stay local); leave both at their defaults."
        )
    push = HubPush(token=args.hub_token) if args.push_to_hub else None
    args.push_to_hub = False
    args.hub_token = None
    return push


def push_to_hub(trainer: "MultiTaskTrainer", push: HubPush, dataset: DataSources | None = None) -> str | None:
    """Write the model card, then upload the output directory (model, tokenizer, model code, card, results; not the
    checkpoints) as one commit to `--hub_model_id`. Returns the commit URL (`None` off the main process).

    A Hub or network failure becomes one `ValueError` that says what went wrong and how to upload the saved model
    later; the local files are left as they are.
    """
    if not trainer.is_world_process_zero():
        return None
    args = trainer.args
    # Written before the upload too, so that a failed push leaves a card for the `hf upload` the error suggests: under
    # the repository id when it is known in full; a bare name gets the user's namespace only from the Hub, so until
    # then the card loads the model from where it was saved.
    name = _repo_name(trainer)
    trainer.create_model_card(dataset=dataset, model_name=name if "/" in name else None)
    try:
        trainer.init_hf_repo(token=push.token)  # created if new (private with --hub_private_repo); the full id
        if args.hub_revision:  # a new branch starts from main, as `hf upload --revision` makes it
            HfApi().create_branch(trainer.hub_model_id, branch=args.hub_revision, token=push.token, exist_ok=True)
        trainer.create_model_card(dataset=dataset)
        commit = HfApi().upload_folder(
            repo_id=trainer.hub_model_id,
            folder_path=args.output_dir,
            commit_message="End of training",
            token=push.token,
            revision=args.hub_revision,
            ignore_patterns=["_*", "checkpoint-*"],
            # An earlier push's results that this run did not write (no test set this time) would stay beside the
            # new model and describe another one.
            delete_patterns=[name for name in RUN_RESULT_FILES if not Path(args.output_dir, name).exists()] or None,
        )
    except Exception as error:
        cause = _hub_failure(error)
        if cause is None:
            raise
        raise ValueError(_push_error_message(cause, trainer, push.token)) from error
    logger.info("Pushed %s to %s", args.output_dir, commit.commit_url)
    return commit.commit_url


def _repo_name(trainer: "MultiTaskTrainer") -> str:
    """The repository a push goes to: --hub_model_id, or the output directory's name (as the Trainer names it)."""
    return trainer.hub_model_id or trainer.args.hub_model_id or Path(trainer.args.output_dir).absolute().name


def _hub_failure(error: BaseException | None) -> BaseException | None:
    """The HTTP, network, file or argument error behind `error`, if any (huggingface_hub wraps a failed LFS upload
    in a RuntimeError)."""
    while error is not None:
        if isinstance(error, (httpx.HTTPError, OSError, ValueError)):
            return error
        error = error.__cause__
    return None


def _push_error_message(error: BaseException, trainer: "MultiTaskTrainer", token: str | None) -> str:
    args = trainer.args
    # The command as this push would have made it: private and on its branch if asked (`hf upload` creates a
    # missing repository public otherwise).
    command = ["hf", "upload", _repo_name(trainer), str(args.output_dir), "--exclude", "checkpoint-*"]
    if args.hub_private_repo:
        command.append("--private")
    if args.hub_revision:
        command += ["--revision", args.hub_revision]
    message = (
        f"pushing to the Hub failed: {_failure_reason(error)}. The trained model is saved in {args.output_dir}; "
        f"upload it later with `{shlex.join(command)}`."
    )
    # Server messages may echo what they were sent; the token must not reach a terminal or a log.
    return message.replace(token, "<HUB_TOKEN>") if token else message


def _failure_reason(error: BaseException) -> str:
    endpoint = constants.ENDPOINT
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code
        if status == 401:
            return (
                f"{endpoint} refused the token (401 Unauthorized): pass a valid write token with --hub_token, "
                "set HF_TOKEN, or log in with `hf auth login`"
            )
        if status == 403:
            return f"the token may not write to this repository (403 Forbidden: {error.server_message})"
        return f"{endpoint} answered {status}: {error.server_message or first_line(error)}"
    if isinstance(error, httpx.TransportError):
        return (
            f"cannot reach the Hub at {endpoint} ({type(error).__name__}: {error}); check the network or HF_ENDPOINT"
        )
    return first_line(error)


# ---- the model card ----


def write_model_card(
    trainer: "MultiTaskTrainer",
    *,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    dataset: DataSources | None = None,
    tags: str | Sequence[str] | None = None,
    language: str | None = None,
    license: str | None = None,
) -> Path:
    """Write `trainer`'s model card to `README.md` in its output directory, with its latest evaluation results."""
    args, config = trainer.args, trainer.model.config
    # Without a Hub id, the card's code loads the model from where it was written.
    repo_id = trainer.hub_model_id or args.hub_model_id or model_name or str(args.output_dir)
    card = build_model_card(
        config,
        args,
        latest_metrics(trainer.state.log_history),
        repo_id=repo_id,
        sources=split_sources(dataset),
        base_model=finetuned_from or base_model_id(config),
        tags=[tags] if isinstance(tags, str) else tags or (),
        language=language,
        license=license,
        averaged=getattr(trainer, "averaged_checkpoints", ()),
    )
    path = Path(args.output_dir) / MODEL_CARD_NAME
    card.save(path)
    logger.info("Wrote the model card %s", path)
    return path


def build_model_card(
    config: MultiTaskConfig,
    args: TrainingArguments,
    metrics: Mapping[str, float],
    *,
    repo_id: str,
    sources: Mapping[str, Sequence[str]] | None = None,
    base_model: str | None = None,
    tags: Iterable[str] = (),
    language: str | None = None,
    license: str | None = None,
    averaged: Sequence[str] = (),
) -> ModelCard:
    """The card of a trained model: Hub metadata (per-task results as `model-index`), then the tasks and labels, how
    it was trained, its results, and how to use it with or without mtl.

    Task and label names come from `config`; `metrics` holds the Trainer's `eval_*`/`test_*` values; `sources` maps
    each split to the data it was read from; `averaged` names the checkpoints whose mean the weights are, if any.
    """
    sources = dict(sources or {})
    model_name = repo_id.rstrip("/").split("/")[-1]
    eval_results = _eval_results(config, metrics, sources)
    data = ModelCardData(
        base_model=base_model,
        datasets=_unique(name for names in sources.values() for name in names) or None,
        eval_results=eval_results or None,
        language=language,
        library_name="transformers",
        license=license,
        metrics=[metric_type for metric_type, _ in CARD_METRICS.values()],
        model_name=model_name if eval_results else None,
        pipeline_tag="text-classification",
        tags=_unique([*CARD_TAGS, *tags]),
    )
    sections = [
        f"# {model_name}",
        _summary(config, base_model),
        _tasks_section(config),
        _training_section(config, args, sources, base_model, averaged),
        _results_section(config, metrics, sources),
        _usage_section(config, repo_id),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def latest_metrics(log_history: Iterable[Mapping[str, object]]) -> dict[str, float]:
    """The newest `eval_*` and `test_*` values of a Trainer's log history (a later evaluation replaces an earlier)."""
    prefixes = tuple(f"{prefix}_" for prefix in EVAL_SPLITS)
    latest = {}
    for entry in log_history:
        latest.update({key: value for key, value in entry.items() if key.startswith(prefixes)})
    return latest


def base_model_id(config: MultiTaskConfig) -> str | None:
    """The Hub id this model was fine-tuned from, for the card's `base_model`; `None` when it started from local files.

    The packaged all-MiniLM-L6-v2 (a local path) is the Hub's sentence-transformers/all-MiniLM-L6-v2. A model that
    continued training from a local mtl directory is credited to the encoder that directory started from.
    """
    for name in (config.name_or_path, getattr(config.encoder, "name_or_path", None)):
        if not name:
            continue
        if resolve_encoder_name(name) == default_encoder_path():
            return DEFAULT_ENCODER_HUB_ID
        if not os.path.exists(name) and _is_repo_id(name):
            return name
    return None


def data_sources(data_args: DataArguments) -> dict[str, list[str]]:
    """What each split was read from, as the card names it: the Hub data set, or file names (never local paths)."""
    sources = {}
    for split in ("train", "validation", "test"):
        if data_args.reads_hub(split):
            sources[split] = [data_args.dataset_name]
        elif data_args.split_files(split):
            sources[split] = [Path(name).name for name in data_args.split_files(split)]
    return sources


def split_sources(dataset: DataSources | None) -> dict[str, list[str]]:
    """`dataset` as {split: [names]}; a name or a list of names without splits stands for every split."""
    if dataset is None:
        return {}
    if isinstance(dataset, Mapping):
        return {split: [names] if isinstance(names, str) else list(names) for split, names in dataset.items()}
    names = [dataset] if isinstance(dataset, str) else list(dataset)
    return {split: names for split in ("train", *EVAL_SPLITS.values())}


def _eval_results(
    config: MultiTaskConfig, metrics: Mapping[str, float], sources: Mapping[str, Sequence[str]]
) -> list[EvalResult]:
    # One model-index result per split; each metric is named after its task, as the tasks share a split.
    results = []
    for prefix, split in EVAL_SPLITS.items():
        dataset = ", ".join(sources.get(split, ())) or f"{split} data"
        for task in config.tasks:
            for key, (metric_type, metric_name) in CARD_METRICS.items():
                value = metrics.get(f"{prefix}_{task}_{key}")
                if value is None:
                    continue
                result = EvalResult(
                    task_type="text-classification",
                    task_name="Multi-task text classification",
                    dataset_type=dataset,
                    dataset_name=dataset,
                    dataset_split=split,
                    metric_type=metric_type,
                    metric_name=f"{task} {metric_name}",
                    metric_value=float(value),
                    metric_args=None if key == "accuracy" else {"average": "macro"},
                )
                results.append(result)
    return results


def _summary(config: MultiTaskConfig, base_model: str | None) -> str:
    encoder = f"`{base_model}`" if base_model else f"a {config.encoder.model_type} model"
    return (
        f"A multi-task text classifier trained with mtl. One shared encoder ({encoder}) reads the text and "
        f"{POOLING_TEXT[config.pooling]} into one sentence embedding; one linear head per task reads that embedding, "
        "so a single forward pass labels a text for every task."
    )


def _tasks_section(config: MultiTaskConfig) -> str:
    rows = [[task, ", ".join(labels)] for task, labels in config.tasks.items()]
    return "\n\n".join(
        [
            "## Tasks and labels",
            "The model outputs one logits tensor per task, in this order; column *i* is the *i*-th label.",
            _table(["task", "labels"], rows),
        ]
    )


def _training_section(
    config: MultiTaskConfig,
    args: TrainingArguments,
    sources: Mapping[str, Sequence[str]],
    base_model: str | None,
    averaged: Sequence[str],
) -> str:
    settings = {"encoder": f"`{base_model}`" if base_model else config.encoder.model_type, "pooling": config.pooling}
    settings.update({f"{split} data": ", ".join(names) for split, names in sources.items() if names})
    settings.update(
        {
            "frozen": _freezing(args),
            # --max_steps overrides the number of epochs in the Trainer.
            "epochs": f"{args.num_train_epochs:g}" if args.max_steps <= 0 else f"{args.max_steps} steps (max_steps)",
            "learning rate": f"{args.learning_rate:g} ({_plain(args.optim)}, weight decay {args.weight_decay:g})",
            "scheduler": _scheduler(args),
            "batch size": (
                f"{args.per_device_train_batch_size} per device x {args.world_size} device(s) x "
                f"{args.gradient_accumulation_steps} accumulation step(s)"
            ),
            "seed": str(args.seed),
        }
    )
    settings.update(_recipe(config, args, averaged))
    return "\n\n".join(["## Training", _table(["setting", "value"], list(map(list, settings.items())))])


def _recipe(config: MultiTaskConfig, args: TrainingArguments, averaged: Sequence[str]) -> dict[str, str]:
    """The multi-task options that differ from their defaults, so that the card says how to train the model again."""
    recipe = {}
    weights = getattr(args, "task_weights", None)
    if weights:
        recipe["task weights"] = ", ".join(f"{t} {w:g}" for t, w in zip(config.tasks, weights, strict=False))
    mixing = getattr(args, "task_mixing", "proportional")
    if mixing != "proportional":
        recipe["task mixing"] = f"temperature, T={args.mixing_temperature:g}" if mixing == "temperature" else mixing
    if getattr(args, "class_weights", "none") != "none":
        recipe["class weights"] = args.class_weights
    if args.label_smoothing_factor:
        recipe["label smoothing"] = f"{args.label_smoothing_factor:g}"
    if getattr(args, "layerwise_lr_decay", 1.0) != 1.0:
        recipe["layer-wise learning-rate decay"] = f"{args.layerwise_lr_decay:g}"
    if getattr(args, "head_learning_rate", None):
        recipe["heads' learning rate"] = f"{args.head_learning_rate:g}"
    if averaged:
        recipe["final weights"] = f"the mean of {', '.join(averaged)}"
    return recipe


def _freezing(args: TrainingArguments) -> str:
    freeze = getattr(args, "freeze", "none")
    after = getattr(args, "unfreeze_encoder_after_epochs", None)
    if not after:
        return freeze
    encoder = f"the encoder for the first {after} epoch(s)"
    return encoder if freeze == "none" else f"{freeze}, and {encoder}"


def _scheduler(args: TrainingArguments) -> str:
    if _plain(args.lr_scheduler_type) == STEP_SCHEDULER:
        return f"StepLR: x{args.lr_gamma:g} every {args.lr_step_epochs:g} epoch(s)"
    return _plain(args.lr_scheduler_type)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _plain(option: object) -> str:
    return str(getattr(option, "value", option))  # TrainingArguments turns some options into enums


def _results_section(
    config: MultiTaskConfig, metrics: Mapping[str, float], sources: Mapping[str, Sequence[str]]
) -> str:
    parts = ["## Evaluation results"]
    columns = ["task", *(name for _, name in CARD_METRICS.values())]
    for prefix, split in EVAL_SPLITS.items():
        rows = [
            [task, *(_number(metrics.get(f"{prefix}_{task}_{key}")) for key in CARD_METRICS)]
            for task in config.tasks
            if any(f"{prefix}_{task}_{key}" in metrics for key in CARD_METRICS)
        ]
        if rows:
            source = ", ".join(sources.get(split, ())) or f"the {split} data"
            parts += [f"On {split} ({source}):", _table(columns, rows)]
    return "\n\n".join(parts if len(parts) > 1 else [*parts, "No evaluation was run."])


def _usage_section(config: MultiTaskConfig, repo_id: str) -> str:
    pooling = "mean pooling" if config.pooling == "mean" else "[CLS] pooling"
    outputs = ", ".join(f"'{task}': ..., '{task}_score': ..." for task in config.tasks)
    return f"""## Usage

Without mtl, with transformers only (`trust_remote_code=True` runs this repository's `configuration.py` and
`modeling.py`: read them first):

```python
import torch
from transformers import AutoModel, AutoTokenizer

repo = {repo_id!r}
tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)  # the config it reads is this code's
model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()

texts = ["Replace this with your own sentence.", "And this with another one."]
batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits  # one tensor per task; the {pooling} happens inside the model
for (task, labels), task_logits in zip(model.config.tasks.items(), logits):
    probabilities = task_logits.softmax(dim=-1)
    for text, p in zip(texts, probabilities):
        print(f"{{task}}: {{labels[int(p.argmax())]}} ({{float(p.max()):.2f}}) {{text}}")
```

With mtl installed (then `import mtl` also lets `AutoModel.from_pretrained(repo)` load the model without remote
code):

```python
from mtl.pipeline import MultiTaskPipeline

classifier = MultiTaskPipeline.from_pretrained({repo_id!r})
print(classifier(["Replace this with your own sentence."]))
# [{{'text': ..., {outputs}}}]
```"""


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table; `|` in a cell (a label may hold one) is escaped."""
    lines = [columns, ["---"] * len(columns), *([str(cell).replace("|", "\\|") for cell in row] for row in rows)]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)
