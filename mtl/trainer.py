"""`MultiTaskTrainer`: the stock Trainer loop with a multi-task loss, per-task logging, freezing and StepLR."""

import logging
import math
import re
from collections import defaultdict
from collections.abc import Sequence

import torch
from datasets import Dataset
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import BatchRebalanceSampler, nested_gather
from transformers.trainer_utils import EvalLoopOutput, TrainOutput, has_length

from .args import STEP_SCHEDULER, MultiTaskTrainingArguments
from .caching import EMBEDDINGS_COLUMN, cache_embeddings
from .checkpointing import (
    GracefulStop,
    TrainingInterrupted,
    check_checkpoint_fits,
    check_checkpoint_tasks,
    check_output_dir,
    checkpoint_step,
    complete_checkpoints,
    remove_earlier_run,
    resolve_checkpoint,
)
from .data import MultiTaskDataCollator, label_matrix, token_lengths
from .freezing import (
    UnfreezeEncoderCallback,
    apply_freeze,
    check_freeze,
    count_parameters,
    freeze_targets,
    parse_freeze,
)
from .hub import write_model_card
from .metrics import build_compute_metrics, metric_names
from .modeling import IGNORE_INDEX, MultiTaskOutput, label_weight_sum, labels_to_tensor, multitask_loss
from .sampling import EpochSeededLengthGroupedSampler, TaskMixingSampler, balanced_class_weights

logger = logging.getLogger(__name__)


def resolve_task_weights(args: TrainingArguments, task_names: list[str]) -> list[float]:
    """One loss weight per task (default 1.0 each), with a clear error for a list of the wrong length."""
    weights = getattr(args, "task_weights", None)
    if weights is None:
        return [1.0] * len(task_names)
    if len(weights) != len(task_names):
        raise ValueError(
            f"--task_weights has {len(weights)} value(s) but the model has {len(task_names)} tasks "
            f"{task_names}: give one weight per task, in that order."
        )
    return list(weights)


def check_metric_for_best_model(
    args: TrainingArguments, task_names: list[str], eval_set_names: Sequence[str] = ()
) -> None:
    """--metric_for_best_model must be a metric evaluation logs: the Trainer would only find out at the first
    evaluation, an epoch into training. With several evaluation sets (a dict), their names prefix the metrics. A
    task's loss is set to count as better when lower (`args.greater_is_better = False`), as the total loss does."""
    name = args.metric_for_best_model
    if name is None:
        return
    allowed = metric_names(task_names)
    named = [f"{set_name}_{metric}" for set_name in eval_set_names for metric in allowed]
    if name.removeprefix("eval_") not in allowed + named:
        raise ValueError(f"--metric_for_best_model {name!r} is not a metric evaluation logs; choose one of {allowed}.")
    # transformers takes a metric whose name does not end in "loss" as better when higher: a task's loss
    # (loss_<task>) would keep the worst checkpoint.
    losses = ["loss", *(f"loss_{task}" for task in task_names)]
    if name.removeprefix("eval_") in losses + [f"{s}_{loss}" for s in eval_set_names for loss in losses]:
        args.greater_is_better = False


def check_metric_has_labels(args: TrainingArguments, counts: dict[str, int], source: str) -> None:
    """--metric_for_best_model must name a task the validation data labels: the Trainer would fail after the first
    epoch, not finding the metric."""
    name = (args.metric_for_best_model or "").removeprefix("eval_")
    for task, count in counts.items():
        if count == 0 and (name.startswith(f"{task}_") or name == f"loss_{task}"):
            raise ValueError(
                f"--metric_for_best_model {args.metric_for_best_model!r} needs {task} labels, which {source} has "
                f"none of; choose a metric of a task it labels ({[t for t, c in counts.items() if c]}) or a mean_ one."
            )


def layerwise_lr_scales(model: nn.Module, decay: float, head_scale: float = 1.0) -> dict[str, float]:
    """Learning-rate factor of every parameter: `head_scale` for the heads and whatever sits outside the encoder,
    decay**k for the encoder's k-th layer from the top, and one more factor of decay for the embeddings."""
    layer_of = {}
    for name, _ in model.named_parameters():
        found = re.search(r"\.(?:layer|layers|block|h)\.(\d+)\.", name)
        if name.startswith("encoder.") and found:
            layer_of[name] = int(found.group(1))
    depth = max(layer_of.values(), default=-1) + 1  # number of layers
    scales = {}
    for name, _ in model.named_parameters():
        if name in layer_of:
            scales[name] = decay ** (depth - layer_of[name])
        elif name.startswith("encoder."):
            scales[name] = decay ** (depth + 1) if "embed" in name else 1.0
        else:
            scales[name] = head_scale
    return scales


class MultiTaskTrainer(Trainer):
    """Trains a `MultiTaskModel` on the (weighted) sum of its tasks' cross-entropies.

    Freezing follows `args.freeze` and `args.unfreeze_encoder_after_epochs`; each task's training loss is logged
    beside the total (`loss_category`, ...), and evaluation reports each task's loss and metrics.
    """

    args: MultiTaskTrainingArguments
    # compute_loss divides each task's loss by its labelled examples in the whole gradient accumulation window (see
    # `_task_denominators`), or, without them, by the accumulation steps itself: the Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args: MultiTaskTrainingArguments | None = None, train_data_collator=None, **kwargs):
        """`train_data_collator`, if given, collates the training batches only (e.g. with augmentation such as
        `RandomTruncation`); evaluation keeps `data_collator`."""
        if args is None:
            args = MultiTaskTrainingArguments()
        # Checked against the model's tasks before the Trainer creates the output directory.
        task_weights = resolve_task_weights(args, model.config.task_names)
        freeze_targets(model, getattr(args, "freeze", "none"))
        own_metrics = kwargs.get("compute_metrics") is None
        if own_metrics:
            eval_sets = kwargs.get("eval_dataset")
            names = list(eval_sets) if isinstance(eval_sets, dict) else []
            check_metric_for_best_model(args, model.config.task_names, names)
            # The Trainer checks it on init; it is rebuilt below, once the class weights are known.
            kwargs["compute_metrics"] = build_compute_metrics(model.config.tasks)
        if kwargs.get("data_collator") is None and kwargs.get("processing_class") is not None:
            kwargs["data_collator"] = MultiTaskDataCollator.for_training_args(kwargs["processing_class"], args)
        super().__init__(model=model, args=args, **kwargs)
        if self._optimizer_given() and self._lr_scales():
            logger.warning(
                "--layerwise_lr_decay and --head_learning_rate are ignored: the Trainer was given its optimizer "
                "(optimizers= or optimizer_cls_and_kwargs=), whose parameter groups are used as they are."
            )
        self.train_data_collator = train_data_collator
        self.task_names = list(model.config.task_names)
        self.task_weights = task_weights
        self.class_weights = self._resolve_class_weights()
        if own_metrics:  # the per-task evaluation losses measure what training minimises, as eval_loss does
            self.compute_metrics = build_compute_metrics(
                model.config.tasks, self.class_weights, self.args.label_smoothing_factor
            )
        self._apply_freezing()
        # Per task, since the last log: its summed losses, and the optimizer steps that trained it.
        self._task_loss_sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.args.device))
        self._task_loss_counts: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.args.device))
        self._token_lengths: list[int] | None = None  # of the training rows, kept when their embeddings are cached
        self.averaged_checkpoints: list[str] = []  # the checkpoints whose mean the final weights are, if any
        self._steps_per_epoch: int | None = None  # optimizer steps per epoch, as the training loop counted them
        self._epoch_seeded_sampler: Sampler | None = None  # ours, seeded by (seed, epoch), when training uses one
        self._nan_filter_lent = False  # whether training_step has the loop's NaN/inf check off (see there)

    def _resolve_class_weights(self) -> list[torch.Tensor] | None:
        if getattr(self.args, "class_weights", "none") != "balanced" or self.train_dataset is None:
            return None
        num_labels = [len(labels) for labels in self.model.config.tasks.values()]
        weights = balanced_class_weights(label_matrix(self.train_dataset), num_labels)
        logger.info(
            "Balanced class weights: %s", {t: w.tolist() for t, w in zip(self.task_names, weights, strict=True)}
        )
        return [w.to(self.args.device) for w in weights]

    def get_train_dataloader(self) -> DataLoader:
        self._epoch_seeded_sampler = None
        # The Trainer builds every loader from self.data_collator: lend it the training one for this loader only.
        eval_collator = self.data_collator
        self.data_collator = self.train_data_collator or eval_collator
        try:
            dataloader = super().get_train_dataloader()
        finally:
            self.data_collator = eval_collator
        if self._epoch_seeded_sampler is not None and hasattr(dataloader, "set_sampler"):
            # In a distributed run accelerate wraps the sampler, and the loader it builds to skip the batches a
            # resumed epoch has done would not pass set_epoch on: that epoch would replay epoch 0's order. Naming
            # the sampler to the loader (as accelerate does for its own seedable sampler) keeps the epoch in step.
            dataloader.set_sampler(self._epoch_seeded_sampler)
        return dataloader

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if dataset is None:
            return super()._get_train_sampler(train_dataset)
        grouped = self.args.train_sampling_strategy == "group_by_length"
        lengths = self._row_lengths(dataset) if grouped else None
        batch_size = self.args.train_batch_size * self.args.gradient_accumulation_steps
        strategy = getattr(self.args, "task_mixing", "proportional")
        if strategy != "proportional" and "labels" in dataset.column_names:
            sampler = TaskMixingSampler(
                label_matrix(dataset),
                strategy,
                self.args.mixing_temperature,
                seed=self._data_seed,
                lengths=lengths,
                batch_size=batch_size,
            )
            shares = dict(zip(self.task_names, sampler.probabilities.round(3).tolist(), strict=True))
            pools = dict(zip(self.task_names, (len(pool) for pool in sampler.pools), strict=True))
            # A row labelled for several tasks sits in the pool of its smallest task (see mtl.sampling).
            logger.info("Task mixing %r: pools of %s rows, drawn with probabilities %s", strategy, pools, shares)
        elif self._lend_lengths(dataset):
            # The stock sampler reads token lengths from input_ids, which cached embeddings replaced: lend it those
            # the rows had, in the column it reads first.
            lengths = self._token_lengths
            return self._seeded(super()._get_train_sampler(dataset.add_column(self.args.length_column_name, lengths)))
        elif not grouped:
            return self._seeded(super()._get_train_sampler(train_dataset))
        elif lengths is None:
            return RandomSampler(dataset)
        else:
            sampler = EpochSeededLengthGroupedSampler(batch_size, lengths, seed=self._data_seed)
        self._epoch_seeded_sampler = sampler
        return sampler

    def _seeded(self, sampler: Sampler | None) -> Sampler | None:
        """transformers builds its batch_rebalance sampler with a fixed seed (42): give it the run's, as ours have."""
        if isinstance(sampler, BatchRebalanceSampler):
            sampler.seed = self._data_seed
        return sampler

    def _lend_lengths(self, dataset: Dataset) -> bool:
        """Whether batch_rebalance needs the token lengths kept from before caching (the data has none of its own)."""
        columns = dataset.column_names
        return (
            self.args.train_sampling_strategy == "batch_rebalance"
            and self._token_lengths is not None
            and "input_ids" not in columns
            and self.args.length_column_name not in columns
        )

    @property
    def _data_seed(self) -> int:
        """The seed of the training batches' order: --data_seed if given, else --seed (as the Trainer does)."""
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    def _row_lengths(self, dataset) -> list[int] | None:
        """Token counts of the rows; for cached embeddings, those the rows had before caching, so that batches match
        an uncached run's."""
        if "input_ids" in dataset.column_names:
            return token_lengths(dataset)
        return self._token_lengths

    def _get_dataloader(self, *args, is_training: bool = False, **kwargs) -> DataLoader:
        if is_training or not self.args.dataloader_drop_last:
            return super()._get_dataloader(*args, is_training=is_training, **kwargs)
        # --dataloader_drop_last is for training batches: the Trainer would also drop the last evaluation and test
        # rows, and report metrics on fewer rows than the data set has, without a word.
        self.args.dataloader_drop_last = False
        try:
            return super()._get_dataloader(*args, is_training=is_training, **kwargs)
        finally:
            self.args.dataloader_drop_last = True

    def _get_eval_sampler(self, eval_dataset: Dataset | None) -> Sampler | None:
        # In row order, so that `predict()` returns its outputs in the data set's order: under group_by_length the
        # Trainer would shuffle evaluation batches by length. Distributed runs shard as the Trainer does (None).
        if eval_dataset is None or not has_length(eval_dataset) or self.args.world_size > 1:
            return None
        return SequentialSampler(eval_dataset)

    def _apply_freezing(self) -> None:
        spec = getattr(self.args, "freeze", "none")
        after = getattr(self.args, "unfreeze_encoder_after_epochs", None)
        if after:
            # The callback keeps the encoder out of training; its parameters stay trainable for the optimizer and DDP.
            check_freeze(spec, self.model.config.task_names, after)
            if self.args.max_steps <= 0 and after >= self.args.num_train_epochs:
                logger.warning(
                    "--unfreeze_encoder_after_epochs %d with --num_train_epochs %g: the encoder stays frozen for the "
                    "whole run.",
                    after,
                    self.args.num_train_epochs,
                )
            parts = [part for part in parse_freeze(spec) if part not in ("none", "encoder")]
            spec = ",".join(parts) or "none"
            self.add_callback(UnfreezeEncoderCallback(after))
        apply_freeze(self.model, spec)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> TrainOutput:
        trainable, _ = count_parameters(self.model)
        if trainable == 0:
            raise ValueError(
                f"freeze={self.args.freeze!r} leaves nothing to train: every parameter is frozen. Use "
                "--freeze none, encoder, or a task name instead."
            )
        resume = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        overwrite = getattr(self.args, "overwrite_output_dir", False)
        check_output_dir(self.args.output_dir, resume, overwrite)
        self._cache_frozen_embeddings()
        if resume is not None:
            check_checkpoint_tasks(resume, self.model.config.tasks)
            check_checkpoint_fits(resume, self.args)
        elif overwrite and self.args.should_save:
            remove_earlier_run(self.args.output_dir)
        stopper = GracefulStop()
        self.add_callback(stopper)
        try:
            result = super().train(resume_from_checkpoint=resume, **kwargs)
        except ValueError as error:
            if resume is None or "parameter group" not in str(error):
                raise
            # torch's own words ("loaded state dict has a different number of parameter groups") say nothing of why.
            raise ValueError(
                f"--resume_from_checkpoint {resume}: its optimizer state does not fit this run's parameter groups "
                "(--freeze, --unfreeze_encoder_after_epochs, --layerwise_lr_decay or --head_learning_rate differ from "
                f"the run that wrote it); resume with that run's options, or start a new run from its weights with "
                f"--model_name_or_path {resume}."
            ) from None
        finally:  # on_train_end is not called when training raises: leave no handler or hook behind
            self._restore_nan_filter()
            self.remove_callback(stopper)
            stopper.restore()
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, UnfreezeEncoderCallback):
                    callback.remove_hooks()
        if stopper.stopped_at is not None:
            raise TrainingInterrupted(
                f"training stopped by {stopper.requested} at step {stopper.stopped_at}; the checkpoint is in "
                f"{self.args.output_dir}: run the same command with --resume_from_checkpoint latest to continue."
            )
        if getattr(self.args, "average_checkpoints", None):
            self._average_checkpoints(self.args.average_checkpoints)
        return result

    def _average_checkpoints(self, count: int) -> None:
        """Replace the weights by the mean of the last `count` checkpoints; after load_best_model_at_end, only if the
        mean scores better on the evaluation set than the best checkpoint did."""
        # Imported here: `python -m mtl.averaging` must not find its module already imported by the package.
        from .averaging import load_averaged_weights

        self.accelerator.wait_for_everyone()  # the main process writes the last checkpoint
        # Not past this run's last step: a run resumed from an earlier checkpoint may have left later ones behind.
        done = self.state.global_step
        checkpoints = [c for c in complete_checkpoints(self.args.output_dir) if checkpoint_step(c) <= done][-count:]
        if len(checkpoints) < 2:
            logger.warning(
                "--average_checkpoints %d: %d checkpoint(s) saved, nothing to average.", count, len(checkpoints)
            )
            return
        model = self.accelerator.unwrap_model(self.model)
        names = [checkpoint.name for checkpoint in checkpoints]
        compare = (
            self.args.load_best_model_at_end and self.eval_dataset is not None and self.state.best_metric is not None
        )
        kept = {name: t.detach().clone() for name, t in model.state_dict().items()} if compare else None
        load_averaged_weights(model, checkpoints)
        if not compare:
            self.averaged_checkpoints = names
            logger.info("Final weights: the mean of %s", names)
            return
        metric = self.args.metric_for_best_model.removeprefix("eval_")
        averaged = self.evaluate(metric_key_prefix="eval_averaged").get(f"eval_averaged_{metric}")
        best = self.state.best_metric
        if averaged is None:  # e.g. several evaluation sets, whose metrics carry their names
            model.load_state_dict(kept)
            logger.warning("Kept the best checkpoint: the evaluation of the mean of %s has no %s.", names, metric)
        elif averaged > best if self.args.greater_is_better else averaged < best:
            self.averaged_checkpoints = names
            logger.info(
                "Final weights: the mean of %s (%s %.4f against %.4f for the best)", names, metric, averaged, best
            )
        else:
            model.load_state_dict(kept)
            logger.info(
                "Kept the best checkpoint: the mean of %s scored %s %.4f against %.4f", names, metric, averaged, best
            )

    def _cache_frozen_embeddings(self) -> None:
        """With the encoder frozen for the whole run, embed the data once and train the heads on the embeddings."""
        # An encoder that unfreezes later keeps requires_grad=True (see UnfreezeEncoderCallback): never cached.
        frozen = not any(p.requires_grad for p in self.model.encoder.parameters())
        if not (frozen and getattr(self.args, "cache_frozen_embeddings", False)):
            return
        if not isinstance(self.data_collator, MultiTaskDataCollator):
            logger.warning("Frozen-encoder embeddings are not cached: the data collator is not MultiTaskDataCollator.")
            return
        if self.train_data_collator is not None:
            logger.warning(
                "Frozen-encoder embeddings are not cached: training batches go through train_data_collator (e.g. "
                "--random_truncation_min_length), whose changes to the tokens a cache would lose."
            )
            return
        self.model.to(self.args.device)
        batch_size = self.args.per_device_train_batch_size  # the batch size the encoder would have run at
        # In mixed precision, embedded as the uncached path (and later evaluation and prediction) would embed them.
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        with self.args.main_process_first(desc="caching frozen-encoder embeddings"):
            if self.train_dataset is not None and EMBEDDINGS_COLUMN not in self.train_dataset.column_names:
                self._token_lengths = self._row_lengths(self.train_dataset)
                self.train_dataset = cache_embeddings(self.model, self.train_dataset, batch_size, autocast_dtype=dtype)
            if isinstance(self.eval_dataset, Dataset) and EMBEDDINGS_COLUMN not in self.eval_dataset.column_names:
                self.eval_dataset = cache_embeddings(self.model, self.eval_dataset, batch_size, autocast_dtype=dtype)

    def _optimizer_given(self) -> bool:
        """Whether the optimizer is not ours to build: passed to the Trainer, or already built by an earlier call."""
        return self.optimizer is not None or self.optimizer_cls_and_kwargs is not None

    def _lr_scales(self) -> dict[str, float] | None:
        """Each parameter's learning-rate factor, when --layerwise_lr_decay or --head_learning_rate asks for one."""
        decay = getattr(self.args, "layerwise_lr_decay", 1.0)
        head_lr = getattr(self.args, "head_learning_rate", None)
        head_scale = 1.0 if head_lr is None else head_lr / self.args.learning_rate
        if decay == 1.0 and head_scale == 1.0:
            return None
        return layerwise_lr_scales(self.model, decay, head_scale)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        scales = None if self._optimizer_given() else self._lr_scales()  # split the Trainer's optimizer only once
        optimizer = super().create_optimizer(model)
        if scales:
            self.optimizer = optimizer = self._split_by_rate(optimizer, scales)
        return optimizer

    def _split_by_rate(self, optimizer: torch.optim.Optimizer, scales: dict[str, float]) -> torch.optim.Optimizer:
        """The Trainer's optimizer rebuilt with each parameter group split by learning-rate factor (heads, each
        encoder layer) and each part's rate scaled (the schedulers scale every group's rate alike, so the ratios
        hold for the whole run)."""
        scale_of = {id(parameter): scales[name] for name, parameter in self.model.named_parameters()}
        groups = []
        for group in optimizer.param_groups:
            by_scale = defaultdict(list)
            for parameter in group["params"]:
                by_scale[scale_of[id(parameter)]].append(parameter)
            for scale, params in sorted(by_scale.items(), reverse=True):
                groups.append({"params": params, "weight_decay": group["weight_decay"], "lr": group["lr"] * scale})
        logger.info(
            "Learning rates by parameter group: from %.3g down to %.3g",
            max(group["lr"] for group in groups),
            min(group["lr"] for group in groups),
        )
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        return optimizer_cls(groups, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.args.lr_scheduler_type != STEP_SCHEDULER or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        step_size = max(1, round(self.args.lr_step_epochs * self._optimizer_steps_per_epoch(num_training_steps)))
        warmup = self.args.get_warmup_steps(num_training_steps)
        gamma = self.args.lr_gamma

        def step_lr(step: int) -> float:
            # Linear warm-up (if asked for), then StepLR: gamma ** (number of whole step_size periods done).
            warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
            return warm * gamma ** (step // step_size)

        self.lr_scheduler = LambdaLR(optimizer or self.optimizer, step_lr)
        self._created_lr_scheduler = True  # so that a second train() builds a fresh one, as for the stock schedulers
        logger.info("StepLR: learning rate x%s every %d optimizer steps", gamma, step_size)
        return self.lr_scheduler

    def set_initial_training_values(self, args, dataloader, *rest, **kwargs):
        # The training loop works out the optimizer steps per epoch before it builds the scheduler; keep the number so
        # StepLR need not build (and length-scan) a second training dataloader to learn it.
        values = super().set_initial_training_values(args, dataloader, *rest, **kwargs)
        self._steps_per_epoch = values[1]
        return values

    def _optimizer_steps_per_epoch(self, num_training_steps: int) -> int:
        if self._steps_per_epoch:
            return self._steps_per_epoch
        try:
            batches = len(self.get_train_dataloader())
        except TypeError:  # an iterable data set has no length: count the whole run as one epoch
            return num_training_steps
        return max(1, math.ceil(batches / self.args.gradient_accumulation_steps))

    def get_batch_samples(
        self, epoch_iterator, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | None]:
        # Only the training loop calls this (evaluation counts its batches with `_get_num_items_in_batch`, left as is).
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        return batch_samples, self._task_denominators(batch_samples, device)

    def evaluation_loop(
        self,
        dataloader: DataLoader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        # The Trainer's eval loss is the mean of each batch's loss; each batch sums the means of the tasks it labels,
        # so with batches of one task (a topic file, then a sentiment file) it comes out near the tasks' mean, not
        # their sum. The weighted sum of the per-task losses over the whole set is the training objective.
        prefix = metric_key_prefix
        task_losses = [
            (w, output.metrics.get(f"{prefix}_loss_{t}"))
            for w, t in zip(self.task_weights, self.task_names, strict=True)
        ]
        if f"{prefix}_loss" in output.metrics and any(loss is not None for _, loss in task_losses):
            output.metrics[f"{prefix}_loss"] = sum(w * loss for w, loss in task_losses if loss is not None)
        return output

    def _finalize_training(self, *args, **kwargs) -> TrainOutput:
        # The loss of the steps since the last log is added to `train_loss` from this process alone, while logging
        # takes the processes' mean: each holds its share times the number of processes (see compute_loss), so the
        # mean is the loss, and one process's part alone is not.
        if self.args.world_size > 1:
            self._tr_loss = nested_gather(self._tr_loss, self.args.parallel_mode).mean()
        return super()._finalize_training(*args, **kwargs)

    def _task_denominators(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Per task, what its mean loss divides by in this gradient accumulation window: its labelled examples (their
        class weights, with --class_weights) in all the window's batches, summed over the processes. Each example then
        counts the same whichever batch or process it lands in, as in one batch of the window's size; divided batch by
        batch, a task's single example in one batch would weigh as much as its eight in the next."""
        if not batch_samples or any("labels" not in batch for batch in batch_samples) or self.args.n_gpu > 1:
            return None  # (DataParallel splits each batch again: compute_loss falls back to per-batch means)
        weights = self.class_weights or [None] * len(self.task_names)
        sums = torch.zeros(len(self.task_names), device=device)
        for batch in batch_samples:
            labels = labels_to_tensor(batch["labels"], self.task_names).to(device)
            for index, task_weights in enumerate(weights):
                sums[index] += label_weight_sum(labels[:, index], task_weights)
        if self.args.world_size > 1:
            sums = self.accelerator.gather(sums).view(-1, len(self.task_names)).sum(dim=0)
        for index, task in enumerate(self.task_names):  # the optimizer steps that train each task, for its log
            self._task_loss_counts[task] += (sums[index] > 0).float()
        return sums

    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | None = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not (self.args.logging_nan_inf_filter and hasattr(self, "_tr_loss")):
            return loss
        # Right after this the training loop checks the loss for NaN/inf on the host, which on a GPU makes the CPU wait
        # for the step to finish before it can queue the next one. The same filter runs here on the device (a
        # non-finite loss counts as the mean of the window's losses so far, as in the loop), and the loop's check is
        # off until it calls `floating_point_ops`, its next step.
        window = 1 + self.state.global_step - self._globalstep_last_logged
        self.args.logging_nan_inf_filter = False
        self._nan_filter_lent = True
        return torch.where(torch.isfinite(loss), loss, self._tr_loss / window)

    def floating_point_ops(self, inputs: dict[str, torch.Tensor]) -> int:
        self._restore_nan_filter()
        return super().floating_point_ops(inputs)

    def _restore_nan_filter(self) -> None:
        if self._nan_filter_lent:
            self.args.logging_nan_inf_filter = True
            self._nan_filter_lent = False

    def compute_loss(
        self, model, inputs, return_outputs=False, num_items_in_batch=None
    ) -> torch.Tensor | tuple[torch.Tensor, MultiTaskOutput]:
        # Not popped: the Trainer's prediction_step reads the labels from `inputs` again.
        outputs = model(**{name: value for name, value in inputs.items() if name != "labels"})
        labels = labels_to_tensor(inputs["labels"], self.task_names)
        windowed = model.training and torch.is_tensor(num_items_in_batch) and num_items_in_batch.dim() == 1
        loss, per_task = multitask_loss(
            outputs.logits,
            labels,
            task_weights=self.task_weights,
            class_weights=self.class_weights,
            label_smoothing=self.args.label_smoothing_factor,
            denominators=num_items_in_batch if windowed else None,
        )
        if model.training:
            # (set by the training loop; a call from outside it, e.g. a test, gets the configured number)
            steps = 1 if windowed else getattr(self, "current_gradient_accumulation_steps", None)
            steps = steps or self.args.gradient_accumulation_steps
            # Summed over a window's batches (and processes) these are each task's mean loss of the optimizer step.
            for index, (task, task_loss) in enumerate(zip(self.task_names, per_task, strict=True)):
                self._task_loss_sums[task] += task_loss.detach() / steps
                if not windowed:
                    self._task_loss_counts[task] += (labels[:, index] != IGNORE_INDEX).any().float() / steps
            # With window denominators summed over the processes, DDP's mean of their gradients is P times too small,
            # as in the Trainer's own `average_tokens_across_devices`; per-batch means are scaled for accumulation.
            loss = loss * self.accelerator.num_processes if windowed else loss / steps
        outputs.loss = loss
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._task_loss_counts:  # a training log: add each task's mean loss since the last one
            for task in self.task_names:
                # The processes' parts of each step's mean add up; the steps that trained the task are counted alike
                # on every process (from the window's denominators, summed over the processes).
                total = self.accelerator.gather(self._task_loss_sums[task]).sum()
                steps = self._task_loss_counts[task]
                if steps > 0:
                    logs[f"loss_{task}"] = round((total / steps).item(), 4)
            self._task_loss_sums.clear()
            self._task_loss_counts.clear()
        super().log(logs, start_time)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        dataset: str | list[str] | dict[str, list[str]] | None = None,
    ) -> None:
        """Write mtl's model card to `README.md` in `args.output_dir` (where `push_to_hub` uploads it from): Hub
        metadata with the per-task results, the tasks and labels, the training set-up, the latest evaluation results
        and usage (see `mtl.hub.build_model_card`). `dataset` may map each split to its sources, e.g.
        `{"train": ["train.jsonl"], "validation": ["dev.jsonl"]}`."""
        if not self.is_world_process_zero():
            return
        write_model_card(
            self,
            model_name=model_name,
            finetuned_from=finetuned_from,
            dataset=dataset,
            tags=tags,
            language=language,
            license=license,
        )
