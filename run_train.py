"""Fine-tune one shared encoder with one classification head per task.

python run_train.py                                  # all-MiniLM-L6-v2 on data/, written to outputs/mtl-minilm
python run_train.py --train_file a.csv b.jsonl --freeze encoder --num_train_epochs 3
python run_train.py config.yaml                      # every option from one JSON/YAML file
accelerate launch run_train.py ...                   # several processes / GPUs
"""

import logging
import sys

from datasets import Dataset
from transformers import PretrainedConfig, PreTrainedTokenizerBase, set_seed

from mtl import MultiTaskConfig, MultiTaskModel, MultiTaskTrainer
from mtl.args import DEFAULT_MAX_SEQ_LENGTH, DataArguments, ModelArguments, MultiTaskTrainingArguments
from mtl.checkpointing import check_output_dir, resolve_checkpoint
from mtl.cli import ArgumentParser, parse_arguments, run, setup_logging
from mtl.configuration import token_limit
from mtl.data import (
    MissingSplitError,
    MultiTaskDataCollator,
    RandomTruncation,
    drop_unlabelled,
    load_files,
    load_hub,
    require_labels,
    require_some_labels,
    tokenize,
    warn_missing_classes,
)
from mtl.freezing import check_freeze
from mtl.hub import data_sources, detach_hub_push, push_to_hub
from mtl.metrics import format_summary
from mtl.modeling import load_config, load_multitask_model, load_tokenizer, resolve_encoder_name
from mtl.trainer import check_metric_for_best_model, check_metric_has_labels, resolve_task_weights

logger = logging.getLogger("run_train")


def load_split(data_args: DataArguments, tasks: dict, split: str) -> Dataset | None:
    """A split from --dataset_name or from the local files; an empty --validation_file/--test_file means none."""
    files = data_args.split_files(split)
    if not data_args.reads_hub(split):
        return load_files(files, tasks, data_args.text_column) if files else None
    try:
        return load_hub(data_args.dataset_name, split, tasks, data_args.text_column, data_args.dataset_config_name)
    except MissingSplitError as error:
        if split == "train":
            raise ValueError(f"--dataset_name: {error} Name the training split's file with --train_file.") from None
        logger.warning("--dataset_name: %s No %s data; pass --%s_file FILE to use one.", error, split, split)
        setattr(data_args, f"{split}_file", None)  # so the model card names only the splits that were used
        return None


def check_evaluation_data(
    data_args: DataArguments, training_args: MultiTaskTrainingArguments, tasks: dict, *splits: Dataset | None
) -> None:
    """The validation and test sets label some task, and the validation set the task --metric_for_best_model names."""
    for split, dataset in zip(("validation", "test"), splits, strict=True):
        if dataset is not None:
            origin = data_args.dataset_name if data_args.reads_hub(split) else getattr(data_args, f"{split}_file")
            counts = require_some_labels(dataset, tasks, f"{split} data ({origin})")
            if split == "validation":
                check_metric_has_labels(training_args, counts, f"the validation data ({origin})")


def resolve_tasks(
    model_args: ModelArguments, training_args: MultiTaskTrainingArguments
) -> tuple[str, PretrainedConfig, dict[str, list[str]], list[str]]:
    """The model to start from, its config, the tasks with their labels and the frozen tasks. Tasks and label names
    come from the model: a saved mtl model's config, or --tasks for a new one. The options that depend on them are
    checked here, before any data or weights are read."""
    source = resolve_encoder_name(model_args.model_name_or_path)
    config = load_config(source)
    continuing = isinstance(config, MultiTaskConfig)
    if continuing and model_args.tasks:
        raise ValueError(f"--tasks cannot change the tasks of the saved mtl model {source!r}; leave it out.")
    tasks = config.tasks if continuing else model_args.parsed_tasks() or MultiTaskConfig().tasks
    frozen = check_freeze(training_args.freeze, list(tasks), training_args.unfreeze_encoder_after_epochs)
    resolve_task_weights(training_args, list(tasks))
    check_metric_for_best_model(training_args, list(tasks))
    return source, config, tasks, frozen


def choose_max_seq_length(
    data_args: DataArguments, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
) -> None:
    """--max_seq_length, or the default: a saved model goes on at the length it was trained at (run_train.py stores
    it as the tokenizer's), a new one at 128 or the encoder's limit if that is lower."""
    limit = token_limit(config)
    # (a tokenizer saved by hand may hold its stock length, e.g. 512, beyond what the encoder reads)
    saved = isinstance(config, MultiTaskConfig) and tokenizer.model_max_length < 1e6
    default_length = tokenizer.model_max_length if saved else DEFAULT_MAX_SEQ_LENGTH
    data_args.set_max_seq_length(data_args.max_seq_length or min(default_length, limit or default_length))
    if limit and data_args.max_seq_length > limit:
        raise ValueError(f"--max_seq_length {data_args.max_seq_length} exceeds the encoder's limit of {limit} tokens.")


def load_training_data(
    data_args: DataArguments, training_args: MultiTaskTrainingArguments, tasks: dict, frozen: list[str]
) -> Dataset:
    """The training rows (--max_train_samples of them), each labelled for some task, every trained task labelled."""
    train = load_split(data_args, tasks, "train")
    if data_args.max_train_samples:  # before the label checks, which must hold for the rows that train
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    source = data_args.dataset_name if data_args.reads_hub("train") else ", ".join(data_args.train_file)
    train = drop_unlabelled(train, source)
    require_labels(train, tasks, [t for t in tasks if t not in frozen], f"training data ({source})")
    warn_missing_classes(train, tasks, f"training data ({source})")
    batch = training_args.train_batch_size * training_args.world_size
    if training_args.dataloader_drop_last and len(train) < batch:  # not one full batch: nothing would train
        raise ValueError(
            f"--dataloader_drop_last drops every batch: training data ({source}) has {len(train)} rows, fewer "
            f"than one batch of {batch}; lower --per_device_train_batch_size or leave --dataloader_drop_last off."
        )
    return train


def load_evaluation_data(
    data_args: DataArguments, training_args: MultiTaskTrainingArguments, tasks: dict
) -> tuple[Dataset | None, Dataset | None]:
    """The validation and test sets (--max_eval_samples of each); without a validation set, evaluation is off."""
    from_hub = data_args.reads_hub("validation")  # before load_split, which forgets a split the Hub set lacks
    validation = load_split(data_args, tasks, "validation")
    test = load_split(data_args, tasks, "test")
    if validation is None:
        training_args.disable_evaluation(
            f"{data_args.dataset_name} has no validation split" if from_hub else "--validation_file is empty"
        )
    if data_args.max_eval_samples:
        validation, test = (
            d.select(range(min(data_args.max_eval_samples, len(d)))) if d else d for d in (validation, test)
        )
    check_evaluation_data(data_args, training_args, tasks, validation, test)
    return validation, test


def build_model(
    source: str, config: PretrainedConfig, tasks: dict[str, list[str]], model_args: ModelArguments
) -> MultiTaskModel:
    """A saved mtl model trains on as it is; an encoder gets a new head per task."""
    if isinstance(config, MultiTaskConfig):
        return load_multitask_model(source, allow_pickle=model_args.allow_pickle)
    return MultiTaskModel.from_encoder(
        source,
        tasks=tasks,
        pooling=model_args.pooling,
        classifier_dropout=model_args.classifier_dropout,
        allow_pickle=model_args.allow_pickle,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser((ModelArguments, DataArguments, MultiTaskTrainingArguments))
    model_args, data_args, training_args = parse_arguments(parser, argv)
    hub_push = detach_hub_push(training_args)  # pushed once at the end; the token kept out of training_args.bin
    # Our progress on the main process only; transformers at its own --log_level (warnings by default).
    level = logging.INFO if training_args.should_log else logging.WARNING
    setup_logging(level, library_level=training_args.get_process_log_level())
    set_seed(training_args.seed)

    # 1. The tasks, the checkpoint to resume from and the sequence length: every option is checked before any data
    #    or weights are read.
    source, config, tasks, frozen = resolve_tasks(model_args, training_args)
    resume = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    check_output_dir(training_args.output_dir, resume, training_args.overwrite_output_dir)
    tokenizer = load_tokenizer(source)
    choose_max_seq_length(data_args, config, tokenizer)

    # 2. Read and check every data file before anything is written.
    train = load_training_data(data_args, training_args, tasks, frozen)
    validation, test = load_evaluation_data(data_args, training_args, tasks)

    # 3. The model (the tokenizer was read in step 1).
    # Saved with the model, so that prediction truncates where training did (run_eval, the pipeline, mtl.predict).
    tokenizer.model_max_length = data_args.max_seq_length
    model = build_model(source, config, tasks, model_args)
    with training_args.main_process_first(desc="tokenizing"):
        length, column = data_args.max_seq_length, data_args.text_column
        train = tokenize(train, tokenizer, length, column, max_windows=data_args.max_train_windows)
        validation, test = (tokenize(d, tokenizer, length, column) if d else d for d in (validation, test))

    # 4. Train.
    collator = MultiTaskDataCollator.for_training_args(tokenizer, training_args)
    train_collator = None
    if data_args.random_truncation_min_length:
        train_collator = RandomTruncation(
            collator, data_args.random_truncation_min_length, data_args.max_seq_length, tokenizer.all_special_ids
        )
    trainer = MultiTaskTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
        data_collator=collator,
        train_data_collator=train_collator,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    result.metrics["world_size"] = training_args.world_size  # processes that trained (accelerate launch)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()

    # 5. Evaluate on the validation and test files.
    metrics = {"train": result.metrics}
    for name, dataset in (("eval", validation), ("test", test)):
        if dataset is not None:
            metrics[name] = trainer.evaluate(dataset, metric_key_prefix=name)
            trainer.log_metrics(name, metrics[name])
            trainer.save_metrics(name, metrics[name])
    if trainer.is_world_process_zero() and "test" in metrics:
        logger.info("Test results:\n%s", format_summary(tasks, metrics["test"], prefix="test_"))

    # 6. The model card (README.md); with --push_to_hub, the output directory is pushed to the Hub in one commit.
    try:
        if hub_push is not None:
            push_to_hub(trainer, hub_push, dataset=data_sources(data_args))
        else:
            trainer.create_model_card(dataset=data_sources(data_args))
    finally:
        # Under `accelerate launch`, the other processes wait for the main one's writing (or its failed push) before
        # they leave the process group (`run`, below, leaves it); a no-op in a single process.
        trainer.accelerator.wait_for_everyone()
    return metrics


if __name__ == "__main__":
    sys.exit(run(main))
