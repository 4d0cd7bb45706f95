"""Read labelled text files (CSV, TSV, JSON, JSON Lines) or a Hub data set, check every row against the config's
label names, and tokenize with `datasets.map`. Every problem is one `DataError` naming the file, row and value."""

import csv
import io
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, TrainingArguments

from .modeling import IGNORE_INDEX
from .sampling import class_counts

logger = logging.getLogger(__name__)

# The columns a tokenized row feeds the model, and the one that replaces them when the encoder's output is cached.
TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
EMBEDDINGS_COLUMN = "pooled_embeddings"

SUPPORTED_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl")


class DataError(ValueError):
    """A data file or row that cannot be used, with where it is and how to fix it."""


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line} is not valid UTF-8 (byte {error.start}); save the file as UTF-8."
        ) from None


class _QuoteError(DataError):
    """A field whose quoting does not close (or, read leniently, that swallowed a tab or a line break)."""


def _read_delimited(text: str, path: Path, delimiter: str) -> Iterator[tuple[int, dict]]:
    """Rows of a CSV or TSV file, with quoting read strictly: a quote left open would swallow the delimiters and line
    breaks after it and merge rows without a word. TSV files are often written without quoting, where a text may
    start with a quoted phrase (`"Wow" said nobody`); a TSV file that strict quoting refuses is read again leniently,
    as pandas reads it, and refused only if a field then holds a tab or a line break (what an open quote swallows)."""
    if delimiter != "\t":
        return _parse_delimited(text, path, delimiter, strict=True)
    try:
        return iter(list(_parse_delimited(text, path, delimiter, strict=True)))
    except _QuoteError:
        return _parse_delimited(text, path, delimiter, strict=False)


def _parse_delimited(text: str, path: Path, delimiter: str, strict: bool) -> Iterator[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=strict)
    try:
        for number, row in delimited_rows(reader, path, delimiter):
            if not strict and any("\t" in value or "\n" in value or "\r" in value for value in row.values()):
                raise csv.Error("a field holds a tab or a line break, as an unclosed quote leaves it")
            yield number, row
    except csv.Error as error:
        raise _QuoteError(
            f"{path}: line {reader.line_num}: {error}; a field that starts with a quote must end with one (write a "
            'quote inside a quoted field as "")'
        ) from None


def delimited_rows(reader: Iterator[list[str]], path: Path, delimiter: str) -> Iterator[tuple[int, dict]]:
    """(line number, row) after the header; `reader` is a `csv.reader` (its `line_num` names the line)."""
    header = next(reader, None)
    if not header or not any(name.strip() for name in header):
        raise DataError(f"{path}: the file is empty; it needs a header row and at least one data row.")
    header = [name.strip() for name in header]
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataError(f"{path}: duplicate column name(s) {duplicates} in the header; give each column one name.")
    for fields in reader:
        if not fields:  # a blank line
            continue
        if len(fields) != len(header):
            raise DataError(
                f"{path}: line {reader.line_num} has {len(fields)} field(s) but the header has {len(header)} "
                f"({header}); quote fields that contain the delimiter {delimiter!r}."
            )
        yield reader.line_num, dict(zip(header, fields, strict=True))


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object, refusing a key given twice (json would silently keep the last one)."""
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise DataError(f"duplicate key(s) {duplicates} in one object; give each column one name.")
    return dict(pairs)


def _parse_json(text: str, path: Path, where: str):
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except DataError as error:
        raise DataError(f"{path}: {where}: {error}") from None


def _read_json_lines(text: str, path: Path) -> Iterator[tuple[int, dict]]:
    # Only line breaks JSON strings cannot hold end a line: str.splitlines would also split at U+2028 and the like,
    # which JSON strings may hold raw.
    for line_number, line in enumerate(re.split(r"\r\n|\r|\n", text), start=1):
        if not line.strip():
            continue
        try:
            record = _parse_json(line, path, f"line {line_number}")
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {line_number} is not valid JSON ({error.msg}).") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {line_number} is a JSON {type(record).__name__}, not an object.")
        yield line_number, record


def _read_json(text: str, path: Path) -> Iterator[tuple[int, dict]]:
    """A JSON array of objects (or {"data": [...]}); files that hold one object per line are read as JSON Lines."""
    try:
        document = _parse_json(text, path, "the JSON document")
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):  # meant as one array: say where it breaks, not that line 1 is no object
            raise DataError(f"{path}: line {error.lineno} is not valid JSON ({error.msg}).") from None
        yield from _read_json_lines(text, path)
        return
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        document = document["data"]
    if isinstance(document, dict):  # a single-line JSON Lines file
        document = [document]
    if not isinstance(document, list):
        raise DataError(f"{path}: expected a JSON array of objects or one object per line.")
    for index, record in enumerate(document, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {index} is a JSON {type(record).__name__}, not an object.")
        yield index, record


def read_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line or record number, row) from a CSV, TSV, JSON or JSON Lines file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; use one of {list(SUPPORTED_EXTENSIONS)}."
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file." if not path.exists() else f"{path}: not a file.")
    text = _decode(path.read_bytes(), path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty.")
    if suffix in (".csv", ".tsv"):
        return _read_delimited(text, path, "," if suffix == ".csv" else "\t")
    return _read_json_lines(text, path) if suffix == ".jsonl" else _read_json(text, path)


# A label position as a cell holds it: "2", or "2.0" as pandas writes an integer column that has empty cells.
_POSITION = re.compile(r"(\d+)(?:\.0*)?")


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")


def _is_number(name: str) -> bool:
    return _NUMBER.fullmatch(name.strip()) is not None


def _label_id(value, labels: list[str], where: str, task: str) -> int:
    """The id of a label name, or of a label position (0, 1, ...; a number or a string of digits, as CSV cells are);
    -100 for an empty cell, null or missing key. Where the label names are numbers ("1" to "5" stars), a value is a
    name only: it means the same in JSON (1) and in CSV ("1"), and a file coded 0-4 is an error, not shifted by one."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return IGNORE_INDEX
    if isinstance(value, float) and value.is_integer():  # 2.0, as above
        value = int(value)
    # A number is read by its text: 1 and "1" name the label "1", 1.5 the label "1.5" (2.0 became 2 above).
    name = value.strip() if isinstance(value, str) else str(value) if isinstance(value, (int, float)) else None
    if name is not None and not isinstance(value, bool):
        if name in labels:
            return labels.index(name)
        number = _POSITION.fullmatch(name)
        if number and number[1] in labels:  # "3.0" for the label named "3"
            return labels.index(number[1])
        numeric_names = any(_is_number(label) for label in labels)
        if number and int(number[1]) < len(labels) and not numeric_names:
            return int(number[1])
        matches = [label for label in labels if label.lower() == name.lower()]
        if matches:
            raise DataError(f"{where}: {task} label {value!r} has the wrong case; did you mean {matches[0]!r}?")
    positions = "" if any(_is_number(label) for label in labels) else f", their positions 0-{len(labels) - 1},"
    raise DataError(
        f"{where}: unknown {task} label {value!r}; allowed values are {labels}{positions} or an empty cell for no "
        "label."
    )


def check_text(value: object, where: str) -> str:
    """`value` if it is a non-blank string, else a `DataError` that starts with `where` (file and row, or input)."""
    if not isinstance(value, str):
        raise DataError(f"{where} is a {type(value).__name__} ({value!r}), not text.")
    if not value.strip():
        raise DataError(f"{where} is empty or whitespace only; remove it or give it text.")
    return value


def _check_task_columns(row: dict, tasks: dict[str, list[str]], where: str, text_column: str) -> None:
    """A column meant for a task but spelled differently (`Sentiment` for `sentiment`) would leave that task
    unlabelled without a word: refuse it."""
    for column in row:
        if column in tasks or column == text_column:
            continue
        meant = [task for task in tasks if task.lower() == str(column).strip().lower() and task not in row]
        if meant:
            raise DataError(f"{where}: column {column!r} is not a task; did you mean {meant[0]!r}? Rename the column.")


def encode_rows(
    rows: Iterable[tuple[int, dict]], source: str, tasks: dict[str, list[str]], text_column: str = "text"
) -> dict[str, list]:
    """Check rows and turn them into columns: the text, and `labels` (one id per task, -100 where unlabelled)."""
    if text_column in tasks:  # one column cannot hold both the text and that task's labels
        raise DataError(f"--text_column {text_column!r} is also a task name; rename the task or the text column.")
    texts, labels = [], []
    for number, row in rows:
        where = f"{source}: row {number}"
        if text_column not in row:
            raise DataError(
                f"{where}: no {text_column!r} column (columns: {sorted(row)}); "
                "name the text column with --text_column."
            )
        _check_task_columns(row, tasks, where, text_column)
        text = check_text(row[text_column], f"{where}: the {text_column!r} value")
        texts.append(text)
        labels.append([_label_id(row.get(task), names, where, task) for task, names in tasks.items()])
    if not texts:
        raise DataError(f"{source}: no data rows.")
    return {text_column: texts, "labels": labels}


def load_files(paths: str | Path | list, tasks: dict[str, list[str]], text_column: str = "text") -> datasets.Dataset:
    """One `Dataset` from one or more local files, every row validated; several files are concatenated."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    columns = {text_column: [], "labels": []}
    for path in paths:
        encoded = encode_rows(read_records(path), str(path), tasks, text_column)
        for name, values in columns.items():
            values.extend(encoded[name])
    return _to_dataset(columns, tasks, text_column)


class MissingSplitError(DataError):
    """A Hub data set without the split asked for."""


def load_hub(
    name: str, split: str, tasks: dict[str, list[str]], text_column: str = "text", config_name: str | None = None
) -> datasets.Dataset:
    """A split of a `datasets` Hub data set (needs network), validated like local files. A `ClassLabel` column is
    read by its label names, so its class order need not match the task's."""
    try:
        splits = datasets.load_dataset(name, config_name)
    except ConnectionError as error:  # offline, or the Hub is unreachable
        raise DataError(
            f"--dataset_name {name!r}: cannot reach the Hub; check the network or use local files instead: {error}"
        ) from None
    if split not in splits:
        raise MissingSplitError(f"the Hub data set {name!r} has no {split!r} split (it has {sorted(splits)}).")
    dataset = splits[split]
    class_names = {
        task: feature.names
        for task, feature in dataset.features.items()
        if task in tasks and isinstance(feature, datasets.ClassLabel)
    }

    def named(row: dict) -> dict:
        for task, names in class_names.items():
            value = row[task]
            row[task] = names[value] if value is not None and value >= 0 else None  # -1: ClassLabel's "no label"
        return row

    rows = ((index, named(row)) for index, row in enumerate(dataset, start=1))
    return _to_dataset(encode_rows(rows, f"{name}[{split}]", tasks, text_column), tasks, text_column)


def _to_dataset(columns: dict[str, list], tasks: dict[str, list[str]], text_column: str) -> datasets.Dataset:
    features = datasets.Features(
        {
            text_column: datasets.Value("string"),
            "labels": datasets.Sequence(datasets.Value("int64"), length=len(tasks)),
        }
    )
    return datasets.Dataset.from_dict(columns, features=features)


def label_matrix(dataset: datasets.Dataset) -> np.ndarray:
    """The `labels` column as a (rows, tasks) integer array."""
    labels = dataset.select_columns(["labels"]).with_format("numpy")[:]["labels"]
    return np.asarray(labels, dtype=np.int64).reshape(len(dataset), dataset.features["labels"].length)


def token_lengths(dataset: datasets.Dataset, column: str = "input_ids") -> list[int]:
    """Each row's token count, from the Arrow list offsets: no row is decoded (for 48,395 rows, 2 ms against 2 s)."""
    return pc.list_value_length(dataset.with_format("arrow")[column]).to_pylist()


def pad_rows(rows: list, width: int, pad_value: int, left: bool = False) -> np.ndarray:
    """Rows of ids (none longer than `width`) as one (len(rows), width) int64 array, padded with `pad_value` on the
    right, or on the left."""
    padded = np.full((len(rows), width), pad_value, dtype=np.int64)
    for index, row in enumerate(rows):
        padded[index, slice(width - len(row), None) if left else slice(len(row))] = row
    return padded


def labelled_counts(dataset: datasets.Dataset, tasks: dict[str, list[str]]) -> dict[str, int]:
    """How many rows carry a label, per task."""
    labels = label_matrix(dataset)
    return {task: int((labels[:, index] != IGNORE_INDEX).sum()) for index, task in enumerate(tasks)}


def drop_unlabelled(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
    """Training rows with no label for any task teach nothing but cost a forward pass: leave them out."""
    keep = np.flatnonzero((label_matrix(dataset) != IGNORE_INDEX).any(axis=1))
    if len(keep) == 0:
        raise DataError(
            f"{source}: no row has a label for any task; fill in at least one task column (named after the task)."
        )
    if len(keep) < len(dataset):
        logger.warning("%s: %d row(s) have no label for any task and are skipped.", source, len(dataset) - len(keep))
        dataset = dataset.select(keep)
    return dataset


def require_some_labels(dataset: datasets.Dataset, tasks: dict[str, list[str]], source: str) -> dict[str, int]:
    """An evaluation set must label at least one task (a misnamed label column would leave it empty, and evaluation
    would report a loss of 0 and choose the best model on nothing); returns its labelled rows per task."""
    counts = labelled_counts(dataset, tasks)
    if not any(counts.values()):
        raise DataError(
            f"{source}: no row has a label for any of the tasks {list(tasks)}; name its label columns after the tasks."
        )
    return counts


def warn_missing_classes(dataset: datasets.Dataset, tasks: dict[str, list[str]], source: str) -> None:
    """Say which labels no training row has: their heads' rows learn nothing, and test sets will show it."""
    counts = class_counts(label_matrix(dataset), [len(names) for names in tasks.values()])
    for (task, names), task_counts in zip(tasks.items(), counts, strict=True):
        missing = [name for name, count in zip(names, task_counts, strict=True) if count == 0]
        if missing and task_counts.sum():
            logger.warning(
                "%s: no training row has the %s label(s) %s; the model cannot learn them.", source, task, missing
            )


def require_labels(
    dataset: datasets.Dataset, tasks: dict[str, list[str]], tasks_to_check: list[str], source: str
) -> None:
    """A task that is trained must have at least one labelled training row, or its head would learn nothing."""
    counts = labelled_counts(dataset, tasks)
    empty = [task for task in tasks_to_check if counts[task] == 0]
    if empty:
        raise DataError(
            f"{source}: no row has a label for task(s) {empty} (labelled rows per task: {counts}); add a column "
            f"named after each task, or freeze its head with --freeze (or, for a new model, leave the task out with "
            "--tasks)."
        )


def tokenize(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int = 128,
    text_column: str = "text",
    max_windows: int = 1,
) -> datasets.Dataset:
    """Token ids truncated to `max_seq_length`, unpadded: the collator pads each batch to its own longest text.

    With `max_windows` > 1, a longer text gives up to that many rows, one per consecutive window of `max_seq_length`
    tokens (the first window, then the text truncation would drop), each with the text's other columns (its labels).
    A window of less than a quarter of `max_seq_length` tokens (a document's last few words) is left out.
    """

    def encode(batch):
        return tokenizer(batch[text_column], truncation=True, max_length=max_seq_length)

    def encode_windows(batch):
        encoded = tokenizer(
            batch[text_column], truncation=True, max_length=max_seq_length, return_overflowing_tokens=True
        )
        sources = encoded.pop("overflow_to_sample_mapping")
        keep, windows_of = [], Counter()
        for index, source in enumerate(sources):
            windows_of[source] += 1  # this is the text's n-th window
            long_enough = len(encoded["input_ids"][index]) * 4 >= max_seq_length
            if windows_of[source] == 1 or (windows_of[source] <= max_windows and long_enough):
                keep.append(index)
        windows = {name: [values[i] for i in keep] for name, values in encoded.items()}
        others = {name: [values[sources[i]] for i in keep] for name, values in batch.items() if name != text_column}
        return {**others, **windows}

    if max_windows == 1:
        return dataset.map(encode, batched=True, remove_columns=[text_column], desc="Tokenizing")
    special = tokenizer.num_special_tokens_to_add()
    if max_seq_length <= special:  # no room for text: the tokenizer would give the whole overflow as one window
        raise ValueError(
            f"--max_train_windows {max_windows} needs --max_seq_length above the {special} special tokens of each "
            f"window, got {max_seq_length}."
        )
    # Rows are added: every input column is replaced by encode_windows' own.
    return dataset.map(encode_windows, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")


class MultiTaskDataCollator:
    """Pads token ids per batch (dynamic padding), or stacks cached `pooled_embeddings`; stacks the labels.

    Rows of token ids, attention mask, token type ids and labels are padded here in numpy, as `tokenizer.pad` would
    pad them (its side, pad ids, multiple): it walks every row in Python, 34 ms for a batch of 256 mixed-length texts
    against 1.4 ms here, which would be the data loading workers' whole budget for a GPU step. Any other column goes
    through `DataCollatorWithPadding`."""

    FAST_COLUMNS = frozenset({"input_ids", "attention_mask", "token_type_ids", "labels"})

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None):
        self.padder = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
        pad_ids = {"input_ids": tokenizer.pad_token_id, "token_type_ids": tokenizer.pad_token_type_id}
        self.pad_values = {**pad_ids, "attention_mask": 0}
        self.left = tokenizer.padding_side == "left"
        self.multiple = pad_to_multiple_of

    @classmethod
    def for_training_args(cls, tokenizer: PreTrainedTokenizerBase, args: TrainingArguments) -> "MultiTaskDataCollator":
        """The collator for a run with these `TrainingArguments`: in bf16/fp16, batches are padded to a multiple of 8
        tokens, the shapes tensor cores work on; it also keeps the number of distinct batch shapes small."""
        return cls(tokenizer, pad_to_multiple_of=8 if args.bf16 or args.fp16 else None)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if EMBEDDINGS_COLUMN not in features[0]:
            columns = features[0].keys()
            fast = columns <= self.FAST_COLUMNS and {"input_ids", "attention_mask"} <= columns
            return self._pad(features) if fast and self.pad_values["input_ids"] is not None else self.padder(features)
        embeddings = np.asarray([f[EMBEDDINGS_COLUMN] for f in features], dtype=np.float32)
        return {EMBEDDINGS_COLUMN: torch.from_numpy(embeddings), **self._labels(features)}

    def _pad(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        batch = {
            name: torch.from_numpy(pad_rows([f[name] for f in features], width, pad_value, self.left))
            for name, pad_value in self.pad_values.items()
            if name in features[0]
        }
        return {**batch, **self._labels(features)}

    @staticmethod
    def _labels(features: list[dict]) -> dict[str, torch.Tensor]:
        if "labels" not in features[0]:
            return {}
        return {"labels": torch.from_numpy(np.asarray([f["labels"] for f in features], dtype=np.int64))}


class RandomTruncation:
    """Training-time augmentation for long documents: wraps a collator and, each time a row is drawn, cuts a row of
    `max_length` tokens (one that `tokenize` truncated, or, rarely, one exactly that long: the token ids do not tell
    them apart) again at a random length between `min_length` and `max_length`.

    The beginning is kept (for news, the headline and the lead) and a closing special token such as [SEP] is put
    back, so that a topic model trained on long articles also sees text as short as a headline with its first
    sentence. Rows shorter than `max_length` (tweets, sentences) and cached embeddings pass through unchanged.
    """

    def __init__(self, collator, min_length: int, max_length: int, special_ids: Iterable[int] = ()):
        if not 2 <= min_length <= max_length:
            raise ValueError(
                f"random truncation needs 2 <= min_length <= max_length, got {min_length} and {max_length}."
            )
        self.collator = collator
        self.min_length = min_length
        self.max_length = max_length
        self.special_ids = set(special_ids)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return self.collator([self._cut(feature) for feature in features])

    def _cut(self, feature: dict) -> dict:
        ids = feature.get("input_ids")
        if ids is None or len(ids) < self.max_length:
            return feature
        length = random.randint(self.min_length, self.max_length)  # seeded per worker by the Trainer
        if length >= len(ids):
            return feature
        keep_last = ids[-1] in self.special_ids
        cut = dict(feature)
        for key in TOKEN_COLUMNS:
            if key in feature:
                values = list(feature[key])
                cut[key] = values[: length - 1] + values[-1:] if keep_last else values[:length]
        return cut
