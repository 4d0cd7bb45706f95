"""mtl.cli: how the entry points end."""

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import run_train
from mtl.cli import ArgumentParser, run
from tests.conftest import free_port


def gloo_threads() -> int:
    """The process's gloo worker threads (named by torch), alive while a gloo process group is."""
    return sum(
        Path(task, "comm").read_text().strip() == "pt_gloo_runloop" for task in Path("/proc/self/task").iterdir()
    )


class Holder:
    """Like a DDP-wrapped model inside a trainer: the group held from inside a reference cycle."""

    def __init__(self):
        self.group = dist.group.WORLD
        self.me = self


def train(argv):
    holder = Holder()
    dist.all_gather(list(torch.zeros(1, 1)), torch.ones(1))  # a collective whose tensors Python has since dropped
    dist.barrier()
    return holder


def fail(argv):
    train(argv)
    raise ValueError("--train_file: no such file")


def interrupt(argv):
    train(argv)
    raise KeyboardInterrupt


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
@pytest.mark.parametrize(("main", "code"), [(train, 0), (fail, 1), (interrupt, 130)])
def test_the_process_group_is_left_and_its_threads_joined_however_main_ended(main, code):
    # A gloo thread left running into interpreter shutdown could abort the process (SIGABRT), which made a finished
    # two-process run fail now and then: the group must be gone, threads and all, when `run` returns.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        dist.barrier()  # run by a worker thread, which names itself once it starts: count only after one ran
        assert gloo_threads() > 0
        assert run(main, []) == code
        assert not dist.is_initialized()
        assert gloo_threads() == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_without_a_process_group_nothing_changes():
    assert not dist.is_initialized()
    assert run(lambda argv: None, []) == 0
    assert not dist.is_initialized()


def test_os_errors_are_one_line_and_exit_1(capsys):
    def main(argv):
        raise PermissionError(13, "Permission denied", "/app/outputs/model.safetensors")

    assert run(main, []) == 1
    assert capsys.readouterr().err == "error: [Errno 13] Permission denied: '/app/outputs/model.safetensors'\n"


def test_a_multi_line_value_error_keeps_its_values_on_the_one_line(capsys):
    # transformers lists the conflicting values on the lines after "but found": they are the point of the message
    assert run(run_train.main, ["--load_best_model_at_end", "--save_strategy", "steps", "--save_steps", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert re.fullmatch(r"error: .*strategy to match.* but found .*Evaluation strategy: .*epoch.*steps.*\n", err, re.I)


def test_a_bad_flag_value_is_one_line_without_the_usage(capsys):
    with pytest.raises(SystemExit) as stopped:
        run_train.main(["--num_train_epochs", "three"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # argparse would print some 130 lines of usage before it
    assert re.fullmatch(r".*error: argument --num_train_epochs.*invalid float value: 'three' \(see .* --help\)\n", err)


@dataclass
class HelpExample:
    batch_size: int = field(default=64, metadata={"help": "Texts per forward pass."})
    max_length: int | None = field(default=None, metadata={"help": "Tokens (default: the model's own length)."})
    device: str | None = field(default=None, metadata={"help": "Where to run."})


def test_help_gives_each_default_once():
    text = " ".join(ArgumentParser(HelpExample).format_help().split())
    assert "Texts per forward pass. (default: 64)" in text
    assert "Tokens (default: the model's own length)." in text
    assert "own length). (default: None)" not in text  # said by the help already
    assert "Where to run. (default: None)" in text  # an unset option the help does not explain keeps its default
