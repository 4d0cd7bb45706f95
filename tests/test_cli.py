"""mtl.cli: how the entry points end."""

import socket

import pytest
import torch.distributed as dist

from mtl.cli import run


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fail(argv):
    raise ValueError("--train_file: no such file")


def succeed(argv):
    return {}


def interrupt(argv):
    raise KeyboardInterrupt


@pytest.mark.parametrize(("main", "code"), [(succeed, 0), (fail, 1), (interrupt, 130)])
def test_the_process_group_is_left_however_main_ended(main, code):
    # A process that exits with its gloo group still up can abort in interpreter shutdown (SIGABRT), which made a
    # finished two-process run fail now and then.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert run(main, []) == code
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_without_a_process_group_nothing_changes():
    assert not dist.is_initialized()
    assert run(succeed, []) == 0
    assert not dist.is_initialized()
