"""Which parameters train: a freeze spec (`none`, `all`, `encoder`, task names, or a comma-separated mix), and the
callback that keeps the encoder out of training for the first N epochs."""

import logging
import math

import torch
from torch import nn
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

FREEZE_KEYWORDS = ("none", "all", "encoder")


def parse_freeze(spec: str) -> list[str]:
    """Split `"encoder,sentiment"` into parts; `none` and `all` must stand alone. Task names are checked later,
    against the model's config, by `apply_freeze`."""
    parts = [part.strip() for part in str(spec).split(",") if part.strip()]
    if not parts:
        raise ValueError("--freeze is empty: use 'none', 'all', 'encoder', a task name, or a comma-separated mix.")
    if len(parts) > 1 and ({"none", "all"} & set(parts)):
        raise ValueError(f"--freeze {spec!r}: 'none' and 'all' cannot be combined with other parts.")
    if len(set(parts)) != len(parts):
        raise ValueError(f"--freeze {spec!r} names a part twice.")
    return parts


def check_freeze(spec: str, task_names: list[str], unfreeze_encoder_after_epochs: int | None = None) -> list[str]:
    """The parts of a spec, each checked against the keywords and the model's task names (and against a frozen start
    of the encoder, which needs a head to train meanwhile)."""
    parts = parse_freeze(spec)
    allowed = [*FREEZE_KEYWORDS, *task_names]
    unknown = [part for part in parts if part not in allowed]
    if unknown:
        raise ValueError(f"--freeze {spec!r}: unknown part(s) {unknown}; allowed values are {allowed}.")
    if unfreeze_encoder_after_epochs and set(task_names) <= set(parts):
        raise ValueError(
            f"--freeze {spec!r} freezes every head, so nothing would train during the first "
            f"{unfreeze_encoder_after_epochs} epoch(s) of --unfreeze_encoder_after_epochs; leave a head trainable "
            "or drop --unfreeze_encoder_after_epochs."
        )
    return parts


def freeze_targets(model: nn.Module, spec: str) -> list[nn.Module]:
    """The modules a spec freezes."""
    parts = check_freeze(spec, model.config.task_names)
    if parts == ["none"]:
        return []
    if parts == ["all"]:
        return [model]
    return [model.encoder if part == "encoder" else model.heads[part] for part in parts]


def apply_freeze(model: nn.Module, spec: str) -> tuple[int, int]:
    """Make exactly the parameters that `spec` names untrainable; return (trainable, total) parameter counts."""
    # Frozen by hand, that is: not by an earlier apply_freeze (a second trainer on the same model is no surprise).
    by_hand = {id(p) for p in model.parameters() if not p.requires_grad} - getattr(model, "_frozen_by_spec", set())
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    for module in freeze_targets(model, spec):
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    model._frozen_by_spec = {id(p) for p in model.parameters() if not p.requires_grad}
    thawed = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) in by_hand)
    if thawed:  # frozen by hand (requires_grad_(False)) before the trainer was built: the spec decides
        logger.warning(
            "freeze=%r makes %s parameters trainable that were frozen on the model; name the parts to freeze "
            "in --freeze (freeze=) instead of setting requires_grad by hand.",
            spec,
            f"{thawed:,}",
        )
    trainable, total = count_parameters(model)
    logger.info(
        "freeze=%r: %s of %s parameters are trainable (%.1f%%)",
        spec,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )
    return trainable, total


def count_parameters(model: nn.Module) -> tuple[int, int]:
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


class UnfreezeEncoderCallback(TrainerCallback):
    """Train the heads on a frozen encoder for the first `after_epochs` epochs, then fine-tune everything.

    The encoder keeps `requires_grad=True` throughout, so that the optimizer and DDP (which synchronises only the
    parameters that were trainable when it wrapped the model) hold it from the first step. While frozen, it runs with
    autograd off: the backward pass stops at the heads, its parameters get no gradient (still none after DDP's
    all-reduce), and the optimizer, which skips parameters without one, leaves them bit-identical.
    """

    def __init__(self, after_epochs: int):
        self.after_epochs = after_epochs
        self.frozen = True
        self._hooks = []
        self._grad_modes = []  # the grad mode to restore after each encoder call (a stack: calls could nest)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.remove_hooks()  # left by a run that raised before its end
        self.frozen = True
        self._hooks = [
            model.encoder.register_forward_pre_hook(self._enter),
            model.encoder.register_forward_hook(self._leave, always_call=True),
        ]
        logger.info("The encoder is frozen for the first %d epoch(s)", self.after_epochs)

    def on_epoch_begin(self, args, state, control, **kwargs):
        # Whole epochs only: a run resumed mid-epoch (state.epoch 1.5) has done one, not two.
        epochs_done = math.floor((state.epoch or 0.0) + 1e-9)
        if self.frozen and epochs_done >= self.after_epochs:
            self.frozen = False
            logger.info("Epoch %d: encoder unfrozen, the whole model now trains", epochs_done)

    def on_train_end(self, args, state, control, **kwargs):
        self.remove_hooks()

    def remove_hooks(self) -> None:
        """Detach from the encoder (at the end of training, also when it raised)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _enter(self, module: nn.Module, inputs) -> None:
        self._grad_modes.append(torch.is_grad_enabled())
        if self.frozen:
            torch.set_grad_enabled(False)
            # A frozen encoder is a fixed feature extractor, as under --freeze encoder: no dropout. The Trainer puts
            # the model back in train mode every step, which trains the encoder fully once it is unfrozen.
            module.eval()

    def _leave(self, module: nn.Module, inputs, output) -> None:
        torch.set_grad_enabled(self._grad_modes.pop())
