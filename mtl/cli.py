"""What the entry points share: argument parsing (flags or one JSON/YAML file), logging set-up, and turning our
errors into one clear line and a non-zero exit."""

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import torch
import transformers
import yaml
from transformers import HfArgumentParser

from .checkpointing import TrainingInterrupted

logger = logging.getLogger(__name__)

CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml")
# Set MTL_DEBUG=1 to get the full traceback of an error the CLIs would otherwise report in one line.
DEBUG_ENV = "MTL_DEBUG"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default to its help, except where the help says what the default is: an unset option
    often means "worked out from something else" (e.g. the length the model was trained at), and "(default: None)"
    after that reads as a contradiction."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose errors are one line: argparse prints the whole usage first (130 lines for
    run_train.py), which buries the message."""

    def __init__(self, dataclass_types=None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(dataclass_types, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_arguments(parser: HfArgumentParser, argv: Sequence[str] | None = None) -> tuple:
    """Parse command-line flags, or a single JSON/YAML file holding all of them (as {flag name: value})."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].lower().endswith(CONFIG_FILE_SUFFIXES) and not argv[0].startswith("-"):
        if len(argv) > 1:  # argparse would say only that the file name is an unused argument
            raise ValueError(
                f"a config file ({argv[0]}) must be the only argument; write {argv[1]} into it, or pass every "
                "option as a flag."
            )
        return parser.parse_dict(read_config_file(Path(argv[0]), parser))
    return parser.parse_args_into_dataclasses(args=argv)


def read_config_file(path: Path, parser: HfArgumentParser) -> dict:
    """A JSON/YAML config file's settings, each value converted and checked as its flag's would be: a wrong type is
    an error now, naming the file and the option, not an epoch into training. `null` keeps its meaning (None: e.g.
    no validation file); unknown names are left for `parse_dict` to refuse."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        settings = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        problem = " ".join(str(error).split())
        raise ValueError(f"config file {path} is not valid {path.suffix[1:].upper()}: {problem}") from None
    if not isinstance(settings, dict) or not settings:
        raise ValueError(
            f"config file {path} must map option names to values (e.g. num_train_epochs: 3), got "
            f"{type(settings).__name__ if settings else 'nothing'}."
        )
    return {name: _typed(parser, path, name, value) for name, value in settings.items()}


def _typed(parser: HfArgumentParser, path: Path, name: str, value: object) -> object:
    action = parser._option_string_actions.get(f"--{name}")
    if action is None or value is None:
        return value
    takes_list = action.nargs in ("+", "*")
    if isinstance(value, list) and not takes_list and not _annotation_allows_list(parser, name):
        raise ValueError(f"config file {path}: {name}: takes one value, got the list {value!r}.")
    items = value if isinstance(value, list) else [value]
    if action.type is not None:
        try:  # through the flag's own text form, so that 3.5 is no int and "abc" no float, as on the command line
            items = [action.type(_flag_value(item)) for item in items]
        except (TypeError, ValueError, argparse.ArgumentTypeError):  # the last from transformers' string_to_bool
            kind = getattr(action.type, "__name__", "value")
            kind = "boolean (true or false)" if "bool" in kind else kind
            raise ValueError(f"config file {path}: {name}: {value!r} is not a valid {kind}.") from None
    wrong = [item for item in items if action.choices and item not in action.choices]
    if wrong:
        raise ValueError(f"config file {path}: {name}: {wrong[0]!r} is not one of {list(action.choices)}.")
    if takes_list or isinstance(value, list):  # one value for a list option is a list of one, as on the command line
        return items
    return items[0]


def _annotation_allows_list(parser: HfArgumentParser, name: str) -> bool:
    """Whether the dataclass field takes a list although its flag takes one value (report_to: `str | list[str]`)."""
    for dataclass_type in parser.dataclass_types:
        if name in {f.name for f in dataclasses.fields(dataclass_type)}:
            hint = typing.get_type_hints(dataclass_type)[name]
            return any(t is list or typing.get_origin(t) is list for t in (hint, *typing.get_args(hint)))
    return False


def _flag_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):  # e.g. tasks written as a mapping: the JSON that --tasks takes
        return json.dumps(value)
    return str(value)


def setup_logging(level: int = logging.INFO, library_level: int = logging.WARNING) -> None:
    """Entry points only: one format for all loggers; ours at `level`, transformers' and datasets' at
    `library_level` (their INFO logs dump whole configs)."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level, force=True
    )
    transformers.utils.logging.set_verbosity(library_level)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    datasets.utils.logging.set_verbosity(max(library_level, logging.WARNING))


def first_line(error: BaseException) -> str:
    """An error's message cut to its first line (or its type, when it has none): what fits one CLI line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def one_line(error: BaseException) -> str:
    """A bad input's message on one line: the values that some (transformers') messages list on the lines after
    "but found" are the point of the message. An OSError keeps its first line: the Hub's errors go on with
    paragraphs of advice."""
    if isinstance(error, OSError):
        return first_line(error)
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Call `main`; a bad input (ValueError, or an OSError such as a missing file, a path that is a file, no
    permission, no network) becomes one 'error:' line on stderr and exit 1. Under `accelerate launch` the process
    leaves its process group on the way out, however `main` ended."""
    try:
        main(argv)
    except (ValueError, OSError) as error:
        if os.environ.get(DEBUG_ENV):
            raise
        sys.stderr.write(f"error: {one_line(error)}\n")
        return 1
    except TrainingInterrupted as stopped:
        sys.stderr.write(f"error: {stopped}\n")
        return 130
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    finally:
        leave_process_group()
    return 0


def leave_process_group() -> None:
    """Under `accelerate launch`: destroy the default process group and join its threads while Python still runs.

    A gloo thread that releases its last collective's tensors after the interpreter began to shut down aborts the
    process (SIGABRT, 'terminate called without an active exception'), failing a run that had finished, or turning a
    clean stop's exit 130 into a crash. Destroying the group only drops torch's own reference to it: the DDP-wrapped
    model and the trainer hold it too, in reference cycles, so they are collected here, which joins the threads."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        gc.collect()
