import logging

import pytest
import torch
from transformers import TrainerCallback, TrainerState

from mtl.freezing import UnfreezeEncoderCallback, apply_freeze, parse_freeze


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def unchanged(module, before) -> bool:
    return all(torch.equal(p, before[name]) for name, p in module.named_parameters())


def changed(module, before) -> bool:
    return any(not torch.equal(p, before[name]) for name, p in module.named_parameters())


@pytest.mark.parametrize(
    ("spec", "frozen"),
    [
        ("none", []),
        ("encoder", ["encoder"]),
        ("sentiment", ["sentiment"]),
        ("category", ["category"]),
        ("encoder,sentiment", ["encoder", "sentiment"]),
    ],
)
def test_freeze_modes_keep_exactly_the_frozen_parts(tiny_model, make_trainer, spec, frozen):
    parts = {"encoder": tiny_model.encoder, **tiny_model.heads}
    before = {name: snapshot(module) for name, module in parts.items()}
    trainer = make_trainer(tiny_model, freeze=spec, num_train_epochs=2)
    trainer.train()
    assert trainer.state.global_step == 4
    for name, module in parts.items():
        if name in frozen:
            assert unchanged(module, before[name]), f"{name} changed under freeze={spec}"
        else:
            assert changed(module, before[name]), f"{name} did not train under freeze={spec}"


def test_freeze_all_stops_before_the_first_step(tiny_model, make_trainer):
    before = snapshot(tiny_model)
    trainer = make_trainer(tiny_model, freeze="all")
    with pytest.raises(ValueError, match="nothing to train"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert unchanged(tiny_model, before)


def test_unknown_freeze_part_lists_allowed_values(tiny_model, make_trainer):
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['colour'\].*'encoder', 'category', 'sentiment'"):
        make_trainer(tiny_model, freeze="encoder,colour")


@pytest.mark.parametrize("spec", ["", "none,encoder", "all,sentiment", "encoder,encoder"])
def test_malformed_freeze_specs(spec):
    with pytest.raises(ValueError, match="freeze"):
        parse_freeze(spec)


def test_trainable_parameter_count_is_logged(tiny_model, caplog):
    with caplog.at_level(logging.INFO, logger="mtl.freezing"):
        trainable, total = apply_freeze(tiny_model, "encoder")
    head_parameters = sum(p.numel() for p in tiny_model.heads.parameters())
    assert trainable == head_parameters
    assert total == sum(p.numel() for p in tiny_model.parameters())
    assert f"{trainable:,} of {total:,} parameters are trainable" in caplog.text


class EncoderAtEpochEnd(TrainerCallback):
    def __init__(self):
        self.snapshots = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.snapshots.append(snapshot(model.encoder))


def test_gradual_unfreezing_trains_the_encoder_after_n_epochs(tiny_model, make_trainer):
    initial_encoder = snapshot(tiny_model.encoder)
    initial_heads = snapshot(tiny_model.heads)
    recorder = EncoderAtEpochEnd()
    trainer = make_trainer(tiny_model, unfreeze_encoder_after_epochs=2, num_train_epochs=4)
    trainer.add_callback(recorder)
    trainer.train()
    epoch1, epoch2, epoch3, epoch4 = recorder.snapshots
    for frozen_epoch in (epoch1, epoch2):
        assert all(torch.equal(frozen_epoch[n], initial_encoder[n]) for n in initial_encoder)
    assert any(not torch.equal(epoch3[n], epoch2[n]) for n in initial_encoder)  # really trained after the switch
    assert any(not torch.equal(epoch4[n], epoch3[n]) for n in initial_encoder)
    assert changed(tiny_model.heads, initial_heads)
    optimizer_parameters = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimizer_parameters for p in tiny_model.encoder.parameters())


def test_encoder_scheduled_after_the_last_epoch_stays_frozen_and_is_released_after_training(tiny_model, make_trainer):
    initial_encoder = snapshot(tiny_model.encoder)
    trainer = make_trainer(tiny_model, unfreeze_encoder_after_epochs=3, num_train_epochs=2)
    trainer.train()
    assert unchanged(tiny_model.encoder, initial_encoder)
    # The gate is removed with the end of training: the encoder takes part in autograd again.
    ids = torch.tensor([[2, 5, 6, 3]])
    hidden = tiny_model.encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert hidden.requires_grad


@pytest.mark.parametrize("freeze", ["category,sentiment", "encoder,category,sentiment"])
def test_gradual_unfreezing_with_every_head_frozen_is_refused_before_training(tiny_model, make_trainer, freeze):
    # Nothing would train during the frozen epochs: the first backward pass would fail with an autograd error.
    with pytest.raises(ValueError, match=r"freezes every head, so nothing would train during the first 1 epoch"):
        make_trainer(tiny_model, freeze=freeze, unfreeze_encoder_after_epochs=1, num_train_epochs=2)
    assert make_trainer(tiny_model, freeze="category", unfreeze_encoder_after_epochs=1).args.ddp_find_unused_parameters


def test_unfreezing_after_the_last_epoch_is_a_warning(tiny_model, make_trainer, caplog):
    with caplog.at_level("WARNING", logger="mtl.trainer"):
        make_trainer(tiny_model, unfreeze_encoder_after_epochs=2, num_train_epochs=2)
    assert "the encoder stays frozen for the whole run" in caplog.text


@pytest.mark.parametrize(("epoch", "frozen"), [(0.0, True), (1.5, True), (1.9999, True), (2.0, False), (2.5, False)])
def test_gradual_unfreezing_counts_whole_epochs_when_resumed_mid_epoch(epoch, frozen):
    callback = UnfreezeEncoderCallback(after_epochs=2)
    callback.on_epoch_begin(None, TrainerState(epoch=epoch), None)
    assert callback.frozen is frozen


def test_a_gradually_unfrozen_encoder_runs_without_dropout_while_frozen(tiny_model, make_trainer):
    modes = []  # (epoch, encoder in train mode) at each encoder call
    trainer = make_trainer(tiny_model, unfreeze_encoder_after_epochs=1, num_train_epochs=2)
    tiny_model.encoder.register_forward_hook(
        lambda module, args, output: modes.append((trainer.state.epoch, module.training))
    )
    trainer.train()
    assert len(modes) == 4  # 16 rows, batches of 8, 2 epochs
    assert [training for epoch, training in modes] == [False, False, True, True]


class RaiseAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("boom")


def test_a_failed_training_run_leaves_no_hook_or_signal_handler_behind(tiny_model, make_trainer):
    import signal

    handler = signal.getsignal(signal.SIGINT)
    trainer = make_trainer(tiny_model, unfreeze_encoder_after_epochs=1, num_train_epochs=2)
    trainer.add_callback(RaiseAtStep())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C works again
    assert not tiny_model.encoder._forward_pre_hooks and not tiny_model.encoder._forward_hooks
    ids = torch.tensor([[2, 5, 6, 3]])
    assert tiny_model.encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.requires_grad


def test_parameters_frozen_by_hand_are_decided_by_the_spec_with_a_warning(tiny_model, caplog):
    tiny_model.encoder.embeddings.requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="mtl.freezing"):
        apply_freeze(tiny_model, "none")
    assert all(p.requires_grad for p in tiny_model.parameters())
    assert "makes" in caplog.text and "trainable that were frozen on the model" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mtl.freezing"):  # two stages: frozen encoder, then everything
        apply_freeze(tiny_model, "encoder")
        apply_freeze(tiny_model, "none")
    assert "frozen on the model" not in caplog.text
