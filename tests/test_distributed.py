"""`accelerate launch` with two real processes (DDP over gloo on CPU)."""

import json
import shutil
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

import run_eval
from tests.conftest import launch_two_processes, make_rows, write_jsonl

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def launch(encoder: Path, train_file: Path, output: Path, *flags: str) -> None:
    """run_train.py with two CPU processes; `flags` add to or override the defaults."""
    # fmt: off
    completed = launch_two_processes([
        "run_train.py",
        "--model_name_or_path", str(encoder), "--train_file", str(train_file), "--validation_file", "",
        "--test_file", "", "--output_dir", str(output), "--use_cpu", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "4", "--max_seq_length", "32", "--disable_tqdm", "true", *flags,
    ])
    # fmt: on
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_two_process_training_with_partial_labels_a_frozen_head_and_gradual_unfreezing(tmp_path, tiny_encoder_dir):
    # With activation checkpointing too: the Trainer would then tell DDP to expect a gradient for every parameter,
    # and the encoder gets none while it is frozen.
    rows = make_rows(36)
    for i, row in enumerate(rows):  # a third topic-only, a third sentiment-only, a third both
        if i % 3 == 0:
            row["sentiment"] = None
        elif i % 3 == 1:
            row["category"] = None
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", make_rows(12))
    output = tmp_path / "model"
    launch(
        tiny_encoder_dir,
        tmp_path / "train.jsonl",
        output,
        "--validation_file",
        str(tmp_path / "validation.jsonl"),
        "--freeze",
        "sentiment",
        "--unfreeze_encoder_after_epochs",
        "1",
        "--task_mixing",
        "temperature",
        "--activation_checkpointing",
    )
    train_results = json.loads((output / "train_results.json").read_text())
    assert train_results["world_size"] == 2
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 10  # 36 rows over 2 processes x 4 = 5 steps per epoch (one process: 9)
    # Only the main process wrote the files: one set, no duplicates from rank 1.
    assert sorted(p.name for p in output.glob("model*.safetensors")) == ["model.safetensors"]
    # The encoder sat out epoch 1 bit-identical, then trained; the frozen head never moved.
    initial = load_file(tiny_encoder_dir / "model.safetensors")
    epoch1 = load_file(output / "checkpoint-5" / "model.safetensors")
    epoch2 = load_file(output / "checkpoint-10" / "model.safetensors")
    encoder_keys = [key for key in epoch1 if key.startswith("encoder.")]
    assert encoder_keys
    assert all(torch.equal(epoch1[key], initial[key.removeprefix("encoder.")]) for key in encoder_keys)
    assert any(not torch.equal(epoch2[key], epoch1[key]) for key in encoder_keys)
    head_keys = [key for key in epoch1 if key.startswith("heads.sentiment.")]
    assert head_keys and all(torch.equal(epoch2[key], epoch1[key]) for key in head_keys)
    results = run_eval.main(
        [
            "--model_name_or_path",
            str(output),
            "--test_file",
            str(tmp_path / "validation.jsonl"),
            "--output_dir",
            str(tmp_path / "eval"),
        ]
    )
    assert 0.0 <= results["category_accuracy"] <= 1.0 and "sentiment_accuracy" in results


@pytest.mark.parametrize("mixing", [["--task_mixing", "temperature"], []])  # [] : the defaults (length-grouped)
def test_two_process_resume_mid_epoch_ends_with_the_uninterrupted_model(tmp_path, tiny_encoder_dir, mixing):
    rows = make_rows(36)
    for row in rows[::3]:
        row["sentiment"] = None
    write_jsonl(tmp_path / "train.jsonl", rows)
    steps = ["--num_train_epochs", "3", "--learning_rate", "3e-3", "--save_strategy", "steps", "--save_steps", "2"]
    steps += ["--save_total_limit", "20"]
    launch(tiny_encoder_dir, tmp_path / "train.jsonl", tmp_path / "full", *steps, *mixing)
    # 5 steps per epoch: checkpoint-6 is one step into epoch 2, whose order must not be epoch 0's
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    resume = ["--resume_from_checkpoint", "latest"]
    launch(tiny_encoder_dir, tmp_path / "train.jsonl", tmp_path / "resumed", *steps, *mixing, *resume)
    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(full[key], resumed[key]) for key in full)


def test_two_processes_make_the_same_step_as_one_process_with_their_batches_together(tmp_path, tiny_encoder_dir):
    import run_train

    # No dropout, so that both runs compute the same gradients.
    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_encoder_dir, encoder)
    config = json.loads((encoder / "config.json").read_text())
    (encoder / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0,
                                                     "attention_probs_dropout_prob": 0.0}))  # fmt: skip
    rows = make_rows(8)
    for row in rows[:3]:  # rank 0's 4 rows hold one sentiment label, rank 1's four
        row["sentiment"] = None
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    # fmt: off
    step = ["--max_steps", "1", "--optim", "sgd", "--learning_rate", "1.0", "--max_grad_norm", "0",
            "--lr_scheduler_type", "constant", "--train_sampling_strategy", "sequential", "--classifier_dropout", "0",
            "--save_strategy", "no", "--class_weights", "balanced"]
    # fmt: on
    launch(encoder, train, tmp_path / "two", *step)  # 4 rows a process
    run_train.main(
        ["--model_name_or_path", str(encoder), "--train_file", str(train), "--validation_file", "", "--test_file", "",
         "--output_dir", str(tmp_path / "one"), "--use_cpu", "--per_device_train_batch_size", "8",
         "--max_seq_length", "32", "--disable_tqdm", "true", *step]
    )  # fmt: skip
    two, one = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    # and the same training loss is reported (one step, never logged: the processes' parts must be averaged)
    losses = [json.loads((tmp_path / run / "train_results.json").read_text())["train_loss"] for run in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)


def test_a_hanging_launch_fails_with_every_ranks_stack_and_leaves_no_process(tmp_path):
    # Rank 0 waits at a barrier that rank 1, asleep, never reaches: what a collective left unmatched looks like.
    script = tmp_path / "hang.py"
    script.write_text(
        "import time\nimport torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "if dist.get_rank() == 1:\n    time.sleep(600)  # rank 1 sleeps\n"
        "dist.barrier()  # rank 0 waits\n"
    )
    with pytest.raises(pytest.fail.Exception, match="still running after 20 s") as failure:
        launch_two_processes([str(script)], timeout=20)
    stacks = str(failure.value)
    assert "line 5 in <module>" in stacks and "line 6 in <module>" in stacks  # where each rank was
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(script) in " ".join(p.info["cmdline"] or [])]
