"""Checkpoint averaging: the element-wise mean of the weights of several checkpoints of one run.

The last checkpoints of a run sit near the same minimum, and their mean often generalises a little better than any one
of them (on our accuracy benchmark it did not move the test numbers: benchmarks/RESULTS.md), for the cost of reading
them back. Use it after training with `--average_checkpoints N`, or on the saved checkpoints of any run:

    python -m mtl.averaging --checkpoints outputs/run/checkpoint-1000 outputs/run/checkpoint-1500 \
        --output_dir outputs/averaged
"""

import json
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.utils import SAFE_WEIGHTS_NAME as WEIGHTS_NAME

from .cli import ArgumentParser, parse_arguments, run, setup_logging

logger = logging.getLogger(__name__)

# Config, tokenizer and card files are copied from the last checkpoint given (the newest, when listed in order), so the
# result loads like any saved model; the training state (optimizer, scheduler, RNG, trainer_state.json) is not.
MODEL_FILE_SUFFIXES = (".json", ".txt", ".model", ".md", ".py")
TRAINING_STATE_FILES = ("trainer_state.json",)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a readable safetensors file ({error}); was the run interrupted while saving it? Leave "
            "that checkpoint out."
        ) from None


def average_state_dicts(checkpoints: Sequence[str | Path]) -> dict[str, torch.Tensor]:
    """Mean of the `model.safetensors` weights in `checkpoints`, computed in float32 and returned in each tensor's
    own dtype. Integer tensors (buffers such as position ids) must be equal in all checkpoints and are kept."""
    if not checkpoints:
        raise ValueError("average_state_dicts needs at least one checkpoint.")
    paths = [Path(checkpoint) / WEIGHTS_NAME for checkpoint in checkpoints]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: checkpoint averaging reads unsharded safetensors weights."
            )
    check_same_tasks(checkpoints)
    first = _read_weights(paths[0])
    sums = {name: t.float() if t.is_floating_point() else t for name, t in first.items()}
    for path in paths[1:]:
        weights = _read_weights(path)
        if weights.keys() != sums.keys():
            different = sorted(weights.keys() ^ sums.keys())
            raise ValueError(f"{path} holds other tensors than {paths[0]} ({different[:3]}): not the same model.")
        for name, tensor in weights.items():
            if tensor.shape != sums[name].shape:
                raise ValueError(
                    f"{path}: tensor {name} has shape {tuple(tensor.shape)}, {paths[0]} has "
                    f"{tuple(sums[name].shape)}: not the same model."
                )
            if tensor.is_floating_point():
                sums[name] += tensor.float()
            elif not torch.equal(tensor, sums[name]):
                raise ValueError(f"{path}: integer tensor {name} differs from {paths[0]}'s: not the same model.")
    return {
        name: (total / len(paths)).to(first[name].dtype) if total.is_floating_point() else total
        for name, total in sums.items()
    }


def check_same_tasks(checkpoints: Sequence[str | Path]) -> None:
    """Checkpoints whose configs list other tasks, labels (or label orders) or pooling hold heads whose rows mean
    different things: averaging them would mix the labels without any shape telling."""
    first = None  # (checkpoint, its tasks and pooling)
    for checkpoint in checkpoints:
        path = Path(checkpoint) / "config.json"
        if not path.is_file():
            continue
        config = json.loads(path.read_text(encoding="utf-8"))
        setup = (config.get("tasks"), config.get("pooling"))
        if first is None:
            first = (checkpoint, setup)
        elif setup != first[1]:
            (tasks, pooling), (other_tasks, other_pooling) = first[1], setup
            raise ValueError(
                f"{checkpoint} was trained with tasks {other_tasks} and {other_pooling} pooling, {first[0]} with "
                f"{tasks} and {pooling} pooling: average checkpoints of one run only."
            )


def load_averaged_weights(model: torch.nn.Module, checkpoints: Sequence[str | Path]) -> None:
    """Replace `model`'s weights with the mean of `checkpoints`' weights (same architecture required)."""
    averaged = average_state_dicts(checkpoints)
    missing, unexpected = model.load_state_dict(averaged, strict=False)
    if unexpected:
        raise ValueError(f"{checkpoints[0]} has weights the model does not ({unexpected[:3]}): not the same model.")
    if missing:  # tied or non-persistent tensors are not saved; anything else would keep its current value
        logger.warning("Averaged checkpoints have no value for %s; those keep the model's current weights.", missing)


def save_averaged(checkpoints: Sequence[str | Path], output_dir: str | Path) -> Path:
    """Write the averaged model to `output_dir`: the averaged weights, and the config and tokenizer of the last
    checkpoint given."""
    output = Path(output_dir)
    if any(Path(c).resolve() == output.resolve() for c in checkpoints):
        raise ValueError(f"--output_dir {output} is one of the checkpoints being averaged; choose a new folder.")
    held = [name for name in ("config.json", WEIGHTS_NAME) if (output / name).exists()]
    if held:  # its model card, results and checkpoints would stay behind, describing another model
        raise ValueError(f"--output_dir {output} already holds a model ({', '.join(held)}); choose a new folder.")
    averaged = average_state_dicts(checkpoints)
    output.mkdir(parents=True, exist_ok=True)
    last = Path(checkpoints[-1])
    for path in last.iterdir():
        if path.is_file() and path.suffix in MODEL_FILE_SUFFIXES and path.name not in TRAINING_STATE_FILES:
            shutil.copy2(path, output / path.name)
    save_file({name: t.contiguous() for name, t in averaged.items()}, output / WEIGHTS_NAME, metadata={"format": "pt"})
    logger.info("Averaged %d checkpoints into %s", len(checkpoints), output)
    return output


@dataclass
class AveragingArguments:
    checkpoints: list[str] = field(metadata={"help": "Checkpoint folders of one run (each with model.safetensors)."})
    output_dir: str = field(metadata={"help": "Where the averaged model is written (a new folder)."})


def main(argv: Sequence[str] | None = None) -> Path:
    (args,) = parse_arguments(ArgumentParser(AveragingArguments), argv)
    setup_logging()
    if len(args.checkpoints) < 2:
        raise ValueError(f"--checkpoints: give at least two checkpoint folders to average, got {args.checkpoints}.")
    folders = [Path(checkpoint).resolve() for checkpoint in args.checkpoints]
    repeated = next(
        (c for c, folder in zip(args.checkpoints, folders, strict=True) if folders.count(folder) > 1), None
    )
    if repeated:  # it would count twice in the mean, or (given only twice) make a plain copy
        raise ValueError(f"--checkpoints names {repeated} more than once; give each checkpoint folder once.")
    return save_averaged(args.checkpoints, args.output_dir)


if __name__ == "__main__":
    sys.exit(run(main))
