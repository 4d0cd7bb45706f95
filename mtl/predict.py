"""Label texts from the command line, one JSON line per text.

    python -m mtl.predict MODEL "text one" "text two"
    python -m mtl.predict MODEL --input texts.txt|texts.jsonl|texts.csv [--output predictions.jsonl]

MODEL is a directory written by run_train.py or a Hub id. Files are streamed in chunks, so memory stays flat on
inputs of any length; the output file appears only once every line is written.
"""

import csv
import io
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .args import InferenceArguments, check_max_length
from .cli import ArgumentParser, run, setup_logging
from .data import DataError, check_text, delimited_rows
from .pipeline import MultiTaskPipeline

logger = logging.getLogger(__name__)

INPUT_SUFFIXES = (".txt", ".jsonl", ".csv")
NEGATIVE_NUMBER = re.compile(r"-\d+(\.\d*)?([eE][-+]?\d+)?")


@dataclass
class PredictArguments(InferenceArguments):
    input: str | None = field(
        default=None, metadata={"help": "A .txt (one text per line), .jsonl or .csv (with a text column) file."}
    )
    output: str | None = field(
        default=None, metadata={"help": "Write the JSON lines here (a .jsonl file) instead of stdout."}
    )
    text_column: str = field(default="text", metadata={"help": "The text column of a .jsonl/.csv input."})
    max_length: int | None = field(
        default=None,
        metadata={"help": "Truncate texts to this many tokens (default: the length the model was trained at)."},
    )
    chunk_size: int = field(default=4096, metadata={"help": "Texts read, sorted and labelled at a time."})

    def __post_init__(self):
        super().__post_init__()
        check_max_length(self.max_length, "--max_length")
        if self.chunk_size < 1:
            raise ValueError(f"--chunk_size must be at least 1 text, got {self.chunk_size}.")
        check_predictions_file(self.output, "--output")


def iter_texts(path: str | Path, text_column: str = "text") -> Iterator[str]:
    """Stream the texts of a .txt/.jsonl/.csv file, checking each one (blank .txt lines are skipped)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise DataError(f"{path}: unsupported input type {suffix or '(none)'!r}; use one of {list(INPUT_SUFFIXES)}.")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8", Notepad) is no part of the first text, as in training.
    with open(path, encoding="utf-8-sig", newline="" if suffix == ".csv" else None) as handle:
        try:
            yield from _iter_handle(handle, path, suffix, text_column)
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not valid UTF-8 ({error.reason}); save the file as UTF-8.") from None


def _iter_handle(handle: io.TextIOBase, path: Path, suffix: str, text_column: str) -> Iterator[str]:
    if suffix == ".csv":
        # Read as training reads CSV: a row with more fields than the header (an unquoted comma) is an error, not a
        # text cut at its first comma.
        reader = csv.reader(handle, strict=True)
        try:
            for line, row in delimited_rows(reader, path, ","):
                if text_column not in row:
                    raise DataError(f"{path}: no {text_column!r} column (columns: {list(row)}); use --text_column.")
                yield check_text(row[text_column], f"{path}: line {line}: the text")
        except csv.Error as error:
            raise DataError(f"{path}: line {reader.line_num}: {error}; close every quote a field opens.") from None
        return
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        if suffix == ".txt":
            yield line.rstrip("\r\n")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {number} is not valid JSON ({error.msg}).") from None
        if not isinstance(record, dict) or text_column not in record:
            raise DataError(f"{path}: line {number} has no {text_column!r} key; use --text_column.")
        yield check_text(record[text_column], f"{path}: line {number}: the text")


def _write_lines(predictions: Iterator[dict], handle) -> int:
    count = 0
    for prediction in predictions:
        handle.write(json.dumps(prediction, ensure_ascii=False) + "\n")
        count += 1
    return count


def check_predictions_file(path: str | None, option: str) -> None:
    """Predictions are written as JSON lines: a file named otherwise (preds.csv) would mislead whoever opens it."""
    if path is not None and Path(path).suffix.lower() != ".jsonl":
        raise ValueError(f"{option} {path}: predictions are JSON lines; name the file *.jsonl.")


def write_predictions(predictions: Iterator[dict], output: str | None) -> int:
    """Write JSON lines to stdout, or to `output` through a temporary file renamed at the end (never half-written)."""
    if output is None:
        return _write_lines(predictions, sys.stdout)
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            count = _write_lines(predictions, handle)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(PredictArguments, description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="A directory written by run_train.py, or a Hub model id.")
    parser.add_argument("texts", nargs="*", help="Texts to label (or use --input).")
    args, positional, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    # argparse fills `texts` only from the words right after MODEL: texts given after a flag come back unparsed. A
    # word there that looks like an option (-o, --out) is a mistyped flag, not a text; negative numbers are texts.
    unknown = [word for word in rest if word.startswith("-") and not NEGATIVE_NUMBER.fullmatch(word)]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; see python -m mtl.predict --help.")
    positional.texts += rest
    setup_logging(logging.WARNING)
    files = [text for text in positional.texts if text.lower().endswith(INPUT_SUFFIXES) and os.path.isfile(text)]
    if files:
        raise ValueError(f"{files[0]} is a file, not a text to label; to label its texts, use --input {files[0]}.")
    if bool(positional.texts) == bool(args.input):
        raise ValueError("give either texts on the command line or --input FILE (one of them, not both).")
    clf = MultiTaskPipeline.from_pretrained(
        positional.model,
        device=args.device,
        batch_size=args.batch_size,
        max_length=args.max_length,
        allow_pickle=args.allow_pickle,
    )
    texts = iter(positional.texts) if positional.texts else iter_texts(args.input, args.text_column)
    first = next(texts, None)  # an empty input is an error before any output file exists
    if first is None:
        raise ValueError(f"{args.input}: no texts to label.")
    return write_predictions(clf.iter_predictions(itertools.chain([first], texts), args.chunk_size), args.output)


if __name__ == "__main__":
    sys.exit(run(main))
