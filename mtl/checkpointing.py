"""Surviving interruptions: find the newest complete checkpoint to resume from, and stop cleanly on a signal.

The Trainer writes a checkpoint's files one after the other and `trainer_state.json` last, so a checkpoint without
it (or without weights) was cut short while saving: it is never picked for resuming.
"""

import json
import logging
import re
import shutil
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainingArguments

from .configuration import MultiTaskConfig

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKERS = ("trainer_state.json", "model.safetensors")


def is_complete(checkpoint: Path) -> bool:
    return all((checkpoint / name).is_file() for name in COMPLETE_MARKERS)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete `checkpoint-<step>` folders in `output_dir` by step (incomplete ones skipped, with a warning)."""
    complete = []
    for checkpoint in checkpoint_folders(output_dir):
        if is_complete(checkpoint):
            complete.append(checkpoint)
        else:
            logger.warning("Skipping %s: it is incomplete (interrupted while saving).", checkpoint)
    return complete


def checkpoint_step(checkpoint: str | Path) -> int:
    """The step of a `checkpoint-<step>` folder."""
    return int(_CHECKPOINT.match(Path(checkpoint).name).group(1))


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """Every `checkpoint-<step>` folder in `output_dir`, complete or not, by step."""
    found = [path for path in Path(output_dir).glob("checkpoint-*") if _CHECKPOINT.match(path.name)]
    return sorted(found, key=checkpoint_step)


# What a run writes next to its model besides checkpoints; a later run need not write them all (no test set, no
# evaluation), so an overwritten folder must not keep the earlier run's (they would be pushed with the new model).
RUN_RESULT_FILES = (
    "all_results.json",
    "train_results.json",
    "eval_results.json",
    "test_results.json",
    "trainer_state.json",
    "README.md",
)


def remove_earlier_run(output_dir: str | Path) -> None:
    """Delete what an earlier run left in `output_dir` (--overwrite_output_dir): its checkpoints, which resuming,
    checkpoint rotation and --average_checkpoints would mix into this run by step number, and its results."""
    for checkpoint in checkpoint_folders(output_dir):
        logger.warning("--overwrite_output_dir: deleting %s, left by an earlier run.", checkpoint)
        shutil.rmtree(checkpoint)
    if not Path(output_dir, "config.json").is_file():  # no earlier model here: a README.md is the user's own
        return
    for name in RUN_RESULT_FILES:
        Path(output_dir, name).unlink(missing_ok=True)


def check_output_dir(output_dir: str | Path, resume: str | bool | None, overwrite: bool) -> None:
    """Refuse to overwrite a trained model or to start a run among an earlier run's checkpoints by accident
    (resuming into the same directory is fine; with `overwrite`, the trainer deletes the old checkpoints)."""
    directory = Path(output_dir)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"--output_dir {directory} is a file, not a folder; choose another --output_dir.")
    if overwrite or resume:
        return
    if any((directory / name).exists() for name in ("config.json", "model.safetensors")):
        raise ValueError(
            f"--output_dir {directory} already holds a trained model; pass --overwrite_output_dir to replace "
            "it, --resume_from_checkpoint to continue, or choose another --output_dir."
        )
    checkpoints = [path.name for path in checkpoint_folders(directory)]
    if checkpoints:
        raise ValueError(
            f"--output_dir {directory} holds an earlier run's checkpoints ({', '.join(checkpoints)}); pass "
            "--resume_from_checkpoint latest to continue that run, --overwrite_output_dir to start again "
            "(the checkpoints are deleted), or choose another --output_dir."
        )


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in `output_dir`."""
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(resume: str | bool | None, output_dir: str | Path) -> str | None:
    """`True`/'latest' -> the newest complete checkpoint in `output_dir`; a path -> that checkpoint, checked."""
    if resume is None or resume is False or resume == "":
        return None
    if resume is True or str(resume).lower() in ("true", "latest"):
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume_from_checkpoint: no complete checkpoint-* folder in {output_dir}.")
        return str(checkpoint)
    checkpoint = Path(resume)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {checkpoint}: no such checkpoint folder.")
    if not is_complete(checkpoint):
        missing = [name for name in COMPLETE_MARKERS if not (checkpoint / name).is_file()]
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} is incomplete (missing {missing}; interrupted while saving?) "
            "or not a training checkpoint; use an earlier checkpoint or --resume_from_checkpoint latest."
        )
    return str(checkpoint)


def check_checkpoint_tasks(checkpoint: str | Path, tasks: dict[str, list[str]]) -> None:
    """A checkpoint resumes only a model with its tasks and labels, in its order: the Trainer would otherwise load it
    with fresh heads (missing keys are only a warning) or fail on a shape deep inside torch."""
    if not Path(checkpoint, "config.json").is_file():
        return
    saved = MultiTaskConfig.from_pretrained(checkpoint).tasks
    if list(saved.items()) != list(tasks.items()):
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} was trained with tasks {saved}, but this run's model has {tasks}; "
            "resume with the same --tasks and --model_name_or_path as the run that wrote it."
        )


def check_checkpoint_fits(checkpoint: str | Path, args: TrainingArguments) -> None:
    """A resumed run must continue the run that wrote the checkpoint: with another batch size its steps would be
    reread as another amount of data, and a run whose length the checkpoint already reached would train nothing and
    save the checkpoint's model under this run's settings."""
    path = Path(checkpoint, "trainer_state.json")
    if not path.is_file():
        return
    state = json.loads(path.read_text(encoding="utf-8"))
    fresh = f"or start a new run from its weights with --model_name_or_path {checkpoint}"
    saved_batch = state.get("train_batch_size")  # per device, times the GPUs of a DataParallel run
    # (--auto_find_batch_size: the Trainer itself resumes at the size the checkpoint had shrunk to)
    if saved_batch and saved_batch != args.train_batch_size and not args.auto_find_batch_size:
        per_device = saved_batch // max(1, args.n_gpu)
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} was trained at a batch size of {per_device} per device, this run "
            f"has {args.per_device_train_batch_size}: resume with --per_device_train_batch_size {per_device}, {fresh}."
        )
    step, epoch = state.get("global_step", 0), state.get("epoch") or 0.0
    if args.max_steps > 0 and step >= args.max_steps:
        done, asked = f"{step} steps", f"--max_steps {args.max_steps}"
    elif args.max_steps <= 0 and epoch >= args.num_train_epochs - 1e-9:
        done, asked = f"{epoch:g} epochs", f"--num_train_epochs {args.num_train_epochs:g}"
    else:
        return
    raise ValueError(
        f"--resume_from_checkpoint {checkpoint} has already trained {done}, so {asked} leaves nothing to train: "
        f"ask for more, {fresh}."
    )


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""


class GracefulStop(TrainerCallback):
    """On SIGINT or SIGTERM, finish the current step, save a checkpoint and end training.

    In a distributed run every process must stop at the same step, so the request is agreed on (max over
    processes) at each step end.
    """

    def __init__(self):
        self.requested: str | None = None
        self.stopped_at: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        logger.warning("%s received: saving a checkpoint after this step, then stopping.", self.requested)

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.requested is not None
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor(float(requested), device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested:
            self.requested = self.requested or "a signal on another process"
            self.stopped_at = state.global_step
            control.should_training_stop = True  # the loop leaves the epoch: on_epoch_end comes next, then the save

    def on_epoch_end(self, args, state, control, **kwargs):
        # Save after what an uninterrupted run does at this point, and only that, so that the checkpoint (its random
        # state included) is the one that run would write here: an epoch's end keeps its evaluation; a stop mid-epoch
        # must not evaluate (the Trainer would, on leaving the epoch), since an evaluation draws from the random
        # state, and its metrics could become the run's best.
        if self.stopped_at != state.global_step:
            return
        control.should_save = True
        if abs(state.epoch - round(state.epoch)) > 1e-6:
            control.should_evaluate = False

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """Give the signals back to their earlier handlers (also when training raised and never reached its end)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
