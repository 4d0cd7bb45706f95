import csv
import json
import logging

import datasets
import pytest
import torch
from transformers import AutoTokenizer, DataCollatorWithPadding

from mtl import DEFAULT_TASKS, DataError, load_files, tokenize
from mtl.data import (
    IGNORE_INDEX,
    MissingSplitError,
    MultiTaskDataCollator,
    RandomTruncation,
    drop_unlabelled,
    label_matrix,
    load_hub,
    require_labels,
    token_lengths,
    warn_missing_classes,
)

TASKS = DEFAULT_TASKS


def write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_all_formats_give_the_same_rows(tmp_path):
    rows = [
        {"text": "New chip, great speed", "category": "Tech", "sentiment": "Positive"},
        {"text": "The vote is on Monday", "category": "Politics", "sentiment": "Neutral"},
    ]
    csv_text = "text,category,sentiment\n" + "".join(f'"{r["text"]}",{r["category"]},{r["sentiment"]}\n' for r in rows)
    tsv_text = "text\tcategory\tsentiment\n" + "".join(
        f"{r['text']}\t{r['category']}\t{r['sentiment']}\n" for r in rows
    )
    files = [
        write(tmp_path, "a.csv", csv_text),
        write(tmp_path, "a.tsv", tsv_text),
        write(tmp_path, "a.json", json.dumps(rows)),
        write(tmp_path, "b.json", json.dumps({"data": rows})),
        write(tmp_path, "a.jsonl", "".join(json.dumps(r) + "\n" for r in rows)),
    ]
    for path in files:
        dataset = load_files(path, TASKS)
        assert dataset["text"][:] == [r["text"] for r in rows], path
        assert label_matrix(dataset).tolist() == [[0, 0], [2, 2]], path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_what_spreadsheets_and_editors_write_is_read(tmp_path, suffix):
    # Excel's "CSV UTF-8" starts with a byte-order mark (else the first column is "\ufefftext"), files end in
    # CRLF, and hand-edited ones carry blank lines between rows
    rows = [{"text": "the phone", "category": "Tech"}, {"text": "the vote", "category": "Politics"}]
    if suffix == ".jsonl":
        lines = [json.dumps(row) for row in rows]
    else:
        separator = "," if suffix == ".csv" else "\t"
        lines = [f"text{separator}category", *(f"{row['text']}{separator}{row['category']}" for row in rows)]
    content = "\ufeff" + "\r\n\r\n".join(lines) + "\r\n"
    dataset = load_files(write(tmp_path, f"excel{suffix}", content), TASKS)
    assert dataset["text"][:] == ["the phone", "the vote"]
    assert label_matrix(dataset)[:, 0].tolist() == [0, 2]


def test_missing_labels_become_ignore_index(tmp_path):
    path = write(
        tmp_path,
        "partial.jsonl",
        '{"text": "goal!", "category": "Sports"}\n'
        '{"text": "so sad", "category": null, "sentiment": "Negative"}\n'
        '{"text": "hm", "category": "", "sentiment": "Neutral"}\n',
    )
    assert label_matrix(load_files(path, TASKS)).tolist() == [[1, IGNORE_INDEX], [IGNORE_INDEX, 1], [IGNORE_INDEX, 2]]
    csv = write(tmp_path, "partial.csv", "text,category,sentiment\ngoal!,Sports,\nso sad,,Negative\n")
    assert label_matrix(load_files(csv, TASKS)).tolist() == [[1, IGNORE_INDEX], [IGNORE_INDEX, 1]]


def test_several_files_are_combined(tmp_path):
    topic = write(tmp_path, "topic.csv", "text,category\nnew laptop,Tech\nfinal score,Sports\n")
    sentiment = write(tmp_path, "sentiment.jsonl", '{"text": "awful", "sentiment": "Negative"}\n')
    dataset = load_files([topic, sentiment], TASKS)
    assert len(dataset) == 3
    assert label_matrix(dataset).tolist() == [[0, IGNORE_INDEX], [1, IGNORE_INDEX], [IGNORE_INDEX, 1]]


def test_integer_label_ids_are_accepted(tmp_path):
    path = write(tmp_path, "ids.jsonl", '{"text": "x y", "category": 2, "sentiment": 0}\n')
    assert label_matrix(load_files(path, TASKS)).tolist() == [[2, 0]]
    csv = write(tmp_path, "ids.csv", "text,category,sentiment\nx y,2,0\nz,1.0,\n")  # CSV cells are text
    assert label_matrix(load_files(csv, TASKS)).tolist() == [[2, 0], [1, IGNORE_INDEX]]
    as_float = write(tmp_path, "float.jsonl", '{"text": "x y", "category": 1.0}\n')  # pandas' integers with gaps
    assert label_matrix(load_files(as_float, TASKS)).tolist() == [[1, IGNORE_INDEX]]


def test_numeric_label_names_mean_the_same_in_json_and_csv(tmp_path):
    stars = {"stars": ["1", "2", "3"]}
    from_json = write(tmp_path, "stars.jsonl", '{"text": "a", "stars": 1}\n{"text": "b", "stars": 3}\n')
    from_csv = write(tmp_path, "stars.csv", "text,stars\na,1\nb,3\n")
    assert label_matrix(load_files(from_json, stars)).tolist() == [[0], [2]]  # the names "1" and "3"
    assert label_matrix(load_files(from_csv, stars)).tolist() == [[0], [2]]
    as_pandas_writes = write(tmp_path, "stars.0.csv", "text,stars\na,1.0\nb,3.0\nc,\n")
    assert label_matrix(load_files(as_pandas_writes, stars)).tolist() == [[0], [2], [IGNORE_INDEX]]
    zero_based = {"grade": ["0", "1"]}
    assert label_matrix(load_files(write(tmp_path, "g.csv", "text,grade\na,1\n"), zero_based)).tolist() == [[1]]
    # Numeric names are names only: a file coded 0-2 for stars 1-3 is refused, not read shifted by one.
    for value in (4, 0):
        with pytest.raises(
            DataError, match=rf"unknown stars label {value}; allowed values are \['1', '2', '3'\] or an empty cell"
        ):
            load_files(write(tmp_path, "bad.jsonl", f'{{"text": "a", "stars": {value}}}\n'), stars)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "bad.jsonl",
            '{"text": "ok", "category": "Tech"}\n{"text": "broken"\n',
            r"bad.jsonl: line 2 is not valid JSON",
        ),
        (
            "label.jsonl",
            '{"text": "ok", "category": "Science"}\n',
            r"row 1: unknown category label 'Science'; allowed "
            r"values are \['Tech', 'Sports', 'Politics'\]",
        ),
        ("position.csv", "text,category\nok,3\n", r"row 2: unknown category label '3'.*positions 0-2"),
        ("bool.jsonl", '{"text": "ok", "category": true}\n', r"unknown category label True"),
        ("fraction.jsonl", '{"text": "ok", "category": 0.5}\n', r"unknown category label 0.5"),
        ("case.jsonl", '{"text": "ok", "sentiment": "positive"}\n', r"wrong case; did you mean 'Positive'\?"),
        (
            "notext.csv",
            "sentence,category\nhello,Tech\n",
            r"row 2: no 'text' column \(columns: \['category', 'sentence'\]\)",
        ),
        ("empty_text.jsonl", '{"text": "   ", "category": "Tech"}\n', r"row 1: the 'text' value is empty"),
        (
            "number_text.jsonl",
            '{"text": 42, "category": "Tech"}\n',
            r"row 1: the 'text' value is a int \(42\)",
        ),
        (
            "ragged.csv",
            "text,category\nhello,Tech\nhi,Tech,extra\n",
            r"ragged.csv: line 3 has 3 field\(s\) but the header has 2",
        ),
        ("dupes.csv", "text,category,category\nhello,Tech,Tech\n", r"duplicate column name\(s\) \['category'\]"),
        ("empty.jsonl", "\n\n", r"empty.jsonl: the file is empty"),
        ("latin1.jsonl", b'{"text": "caf\xe9", "category": "Tech"}\n', r"line 1 is not valid UTF-8"),
        ("array.jsonl", "[1, 2]\n", r"line 1 is a JSON list, not an object"),
        ("data.parquet", "x", r"unsupported file type '.parquet'"),
        # A task column spelled differently would leave the task unlabelled without a word.
        ("case_column.csv", "text,Sentiment\nhello,Positive\n", r"row 2: column 'Sentiment' is not a task; did you"),
        # An open quote would swallow the tab, the line break and the next row: two rows merged into one.
        ("open_quote.tsv", 'text\tcategory\n"Great phone\tTech\nmatch day" was fun\tSports\n', r"line 3: .*quote"),
        ("unclosed.csv", 'text,category\n"never closed,Tech\nnext,Sports\n', r"unclosed.csv: line \d+: .*quote"),
        # A broken array: where it breaks (line 3), not that its first line is no object.
        ("trailing_comma.json", '[\n  {"text": "a", "category": "Tech"},\n]\n', r"line 3 is not valid JSON"),
    ],
)
def test_bad_input_names_file_row_and_value(tmp_path, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError, match=message):
        load_files(path, TASKS)


def test_decimal_label_names_are_read_from_numbers_and_text(tmp_path):
    halves = {"stars": ["0.5", "1", "1.5"]}
    from_json = write(tmp_path, "h.jsonl", '{"text": "a", "stars": 1.5}\n{"text": "b", "stars": 1.0}\n')
    from_csv = write(tmp_path, "h.csv", "text,stars\na,1.5\nb,1\n")
    assert label_matrix(load_files(from_json, halves)).tolist() == label_matrix(load_files(from_csv, halves)).tolist()
    assert label_matrix(load_files(from_json, halves)).tolist() == [[2], [1]]


def test_tsv_is_read_as_pandas_reads_it(tmp_path):
    # TSV is often written without quoting: a text may start with a quoted phrase
    path = write(
        tmp_path, "t.tsv", 'text\tcategory\n"Best phone ever" says everyone\tTech\n"a ""quoted"" vote"\tPolitics\n'
    )
    assert load_files(path, TASKS)["text"] == ["Best phone ever says everyone", 'a "quoted" vote']


def test_tsv_quoted_as_csv_writers_quote_it_keeps_its_tabs_and_line_breaks(tmp_path):
    path = tmp_path / "w.tsv"
    with path.open("w", newline="", encoding="utf-8") as handle:  # as csv.writer and pandas.to_csv(sep="\t") write it
        csv.writer(handle, delimiter="\t").writerows([["text", "category"], ["a\tb\nc", "Tech"], ["ok", "Sports"]])
    assert load_files(path, TASKS)["text"] == ["a\tb\nc", "ok"]


def test_tsv_with_an_open_quote_and_old_mac_line_endings_is_refused(tmp_path):
    path = write(tmp_path, "cr.tsv", 'text\tcategory\r"oops it\tTech\rsecond "row" x\tSports\rthird\tTech\r')
    with pytest.raises(DataError, match=r"cr.tsv: line \d+: a field holds a tab or a line break"):
        load_files(path, TASKS)


def test_json_lines_with_old_mac_line_endings(tmp_path):
    path = write(tmp_path, "cr.jsonl", '{"text": "a b", "category": "Tech"}\r{"text": "c d", "category": "Sports"}\r')
    assert load_files(path, TASKS)["text"] == ["a b", "c d"]


def test_a_task_spelled_like_the_text_column_is_no_misspelt_task(tmp_path):
    path = write(tmp_path, "r.jsonl", '{"review": "great phone", "Review": "good"}\n{"review": "a vote"}\n')
    dataset = load_files(path, {"Review": ["good", "bad"]}, text_column="review")
    assert label_matrix(dataset).tolist() == [[0], [IGNORE_INDEX]]


def test_a_task_named_like_the_text_column_is_refused(tmp_path):
    path = write(tmp_path, "r.jsonl", '{"review": "great phone", "category": "Tech"}\n')
    with pytest.raises(DataError, match="--text_column 'review' is also a task name"):
        load_files(path, {"review": ["good", "bad"]}, text_column="review")


def test_json_lines_strings_may_hold_unicode_line_separators(tmp_path):
    texts = ["first\u2028line", "next\u2029paragraph\x85end"]  # valid raw inside JSON strings
    lines = "".join(json.dumps({"text": t, "category": "Tech"}, ensure_ascii=False) + "\n" for t in texts)
    assert load_files(write(tmp_path, "u.jsonl", lines), TASKS)["text"] == texts


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such file"):
        load_files(tmp_path / "nope.jsonl", TASKS)


def test_a_task_without_any_label_is_refused(tmp_path):
    dataset = load_files(write(tmp_path, "t.csv", "text,category\nhello,Tech\n"), TASKS)
    with pytest.raises(DataError, match=r"no row has a label for task\(s\) \['sentiment'\]"):
        require_labels(dataset, TASKS, ["category", "sentiment"], "training data")
    require_labels(dataset, TASKS, ["category"], "training data")  # a frozen task need not be labelled


def test_labels_no_row_has_are_named_for_labelled_tasks_only(tmp_path, caplog):
    dataset = load_files(write(tmp_path, "t.csv", "text,category\nhello,Tech\nbye,Sports\n"), TASKS)
    with caplog.at_level(logging.WARNING, logger="mtl.data"):
        warn_missing_classes(dataset, TASKS, "t.csv")
    # sentiment has no label at all (a frozen task, or refused by require_labels): not three missing classes
    assert caplog.messages == [
        "t.csv: no training row has the category label(s) ['Politics']; the model cannot learn them."
    ]


def test_tokenize_truncates_and_does_not_pad(tmp_path, tiny_tokenizer):
    long_text = " ".join(["phone"] * 100)
    path = write(tmp_path, "t.jsonl", json.dumps({"text": long_text}) + "\n" + json.dumps({"text": "the app"}) + "\n")
    dataset = tokenize(load_files(path, TASKS), tiny_tokenizer, max_seq_length=16)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    assert lengths == [16, 4]  # [CLS] the app [SEP]: no padding
    assert "text" not in dataset.column_names
    assert set(dataset.column_names) >= {"input_ids", "attention_mask", "labels"}


def test_token_lengths_follow_the_rows_of_a_shuffled_selection(tiny_tokenizer):
    texts = [" ".join(["phone"] * n) for n in range(1, 30)]
    dataset = tokenize(datasets.Dataset.from_dict({"text": texts}), tiny_tokenizer, max_seq_length=16)
    view = dataset.shuffle(seed=0).select(range(5, 20))  # an indices mapping over the Arrow table
    assert token_lengths(view) == [len(ids) for ids in view["input_ids"]]
    assert token_lengths(dataset) == [min(n + 2, 16) for n in range(1, 30)]


def test_long_training_texts_give_one_row_per_window_with_their_labels(tmp_path, tiny_tokenizer):
    words = ["phone", "app", "chip", "laptop", "vote", "law", "match", "team", "goal", "coach"]
    rows = [
        # 40 words: windows of 14, 14 and 12
        {"text": " ".join(words * 4), "category": "Tech", "sentiment": "Neutral"},
        {"text": "the app", "category": "Sports", "sentiment": None},
        # 15 words: 14, then a window of 1 word (3 tokens with [CLS] and [SEP]: under a quarter of 16)
        {"text": " ".join((words * 2)[:15]), "category": None, "sentiment": "Positive"},
    ]
    path = write(tmp_path, "t.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    data = load_files(path, TASKS)
    windows = tokenize(data, tiny_tokenizer, max_seq_length=16, max_windows=3)
    cls, sep = tiny_tokenizer.cls_token_id, tiny_tokenizer.sep_token_id
    word_ids = tiny_tokenizer.convert_tokens_to_ids(words * 4)
    # the long text: its first window, then the next two, each [CLS] 14 words [SEP], in the text's order
    assert windows["input_ids"][:3] == [[cls, *word_ids[i : i + 14], sep] for i in (0, 14, 28)]
    assert windows["labels"][:3] == [data["labels"][0]] * 3
    # the short text as it was; the 15-word text without its 1-word tail
    assert windows["input_ids"][3] == tokenize(data, tiny_tokenizer, max_seq_length=16)["input_ids"][1]
    assert windows["input_ids"][4] == [cls, *word_ids[:14], sep] and windows["labels"][3:] == data["labels"][1:]
    assert len(windows) == 5
    # at most max_windows a text, and max_windows=1 is plain truncation
    assert len(tokenize(data, tiny_tokenizer, max_seq_length=16, max_windows=2)) == 4
    one = tokenize(data, tiny_tokenizer, max_seq_length=16, max_windows=1)
    assert one.to_list() == tokenize(data, tiny_tokenizer, max_seq_length=16).to_list()
    # a window must hold some text besides [CLS] and [SEP]
    with pytest.raises(ValueError, match=r"--max_train_windows 3 needs --max_seq_length above the 2 special tokens"):
        tokenize(data, tiny_tokenizer, max_seq_length=2, max_windows=3)
    assert len(tokenize(data, tiny_tokenizer, max_seq_length=3, max_windows=3)) == 3 + 2 + 3  # a word a window


def long_and_short_rows(tmp_path, tokenizer, max_length: int = 16):
    texts = [" ".join(["phone", "app", "chip", "laptop"] * 10), "the app"]
    path = write(tmp_path, "t.jsonl", "".join(json.dumps({"text": t, "category": "Tech"}) + "\n" for t in texts))
    return [dict(row) for row in tokenize(load_files(path, TASKS), tokenizer, max_seq_length=max_length)]


def test_random_truncation_cuts_only_truncated_rows_and_keeps_their_beginning(tmp_path, tiny_tokenizer):
    long_row, short_row = long_and_short_rows(tmp_path, tiny_tokenizer)
    cut = RandomTruncation(lambda features: features, 6, 16, tiny_tokenizer.all_special_ids)
    lengths = set()
    for _ in range(200):
        new_long, new_short = cut([long_row, short_row])
        assert new_short == short_row  # shorter than max_length: never cut
        ids = new_long["input_ids"]
        assert 6 <= len(ids) <= 16
        assert ids[:-1] == long_row["input_ids"][: len(ids) - 1]  # the beginning, [CLS] included, is kept
        assert ids[-1] == tiny_tokenizer.sep_token_id
        assert new_long["attention_mask"] == [1] * len(ids)
        assert len(new_long["token_type_ids"]) == len(ids)
        assert new_long["labels"] == long_row["labels"]
        lengths.add(len(ids))
    assert lengths == set(range(6, 17))  # every allowed length is drawn
    assert len(long_row["input_ids"]) == 16  # the dataset's row is not changed in place


def test_random_truncation_pads_the_cut_batch(tmp_path, tiny_tokenizer):
    rows = long_and_short_rows(tmp_path, tiny_tokenizer)
    collator = RandomTruncation(MultiTaskDataCollator(tiny_tokenizer), 6, 6, tiny_tokenizer.all_special_ids)
    batch = collator(rows)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].tolist() == [[1] * 6, [1] * 4 + [0] * 2]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("multiple", [None, 8])
@pytest.mark.parametrize("columns", ["ids-mask-labels", "with-token-types", "one-label", "no-labels"])
def test_the_collator_pads_as_the_tokenizer_pads(tiny_encoder_dir, side, multiple, columns):
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir, padding_side=side, pad_token_type_id=1)
    texts = ["the phone", "the new laptop is great and the app is amazing", "vote"]
    rows = [dict(tokenizer(text)) for text in texts]
    for index, row in enumerate(rows):
        if columns != "with-token-types":
            del row["token_type_ids"]
        if columns != "no-labels":
            row["labels"] = index if columns == "one-label" else [index, IGNORE_INDEX]
    expected = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)(rows)
    collator = MultiTaskDataCollator(tokenizer, pad_to_multiple_of=multiple)
    collator.padder = None  # the numpy path only
    batch = collator(rows)
    assert batch.keys() == expected.keys()
    for name, tensor in expected.items():
        assert batch[name].dtype == tensor.dtype and torch.equal(batch[name], tensor), name
    assert batch["input_ids"].shape == (3, 16 if multiple else 12)


def test_the_collator_leaves_other_columns_to_the_tokenizer(tiny_tokenizer):
    rows = [dict(tiny_tokenizer(text, return_special_tokens_mask=True)) for text in ["the phone", "vote for the law"]]
    batch = MultiTaskDataCollator(tiny_tokenizer)(rows)
    assert batch["special_tokens_mask"].tolist() == [[1, 0, 0, 1, 1, 1], [1, 0, 0, 0, 0, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]


@pytest.mark.parametrize(("low", "high"), [(1, 16), (17, 16)])
def test_random_truncation_refuses_bad_lengths(low, high):
    with pytest.raises(ValueError, match="min_length <= max_length"):
        RandomTruncation(lambda features: features, low, high)


def test_hub_class_labels_are_read_by_name_not_position(monkeypatch):
    # The Hub data set orders its classes differently from the task, and marks a missing label with -1.
    features = datasets.Features(
        {"text": datasets.Value("string"), "category": datasets.ClassLabel(names=["Politics", "Tech", "Sports"])}
    )
    hub = datasets.Dataset.from_dict(
        {"text": ["a vote", "a chip", "a goal", "?"], "category": [0, 1, 2, -1]}, features
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config: datasets.DatasetDict(train=hub))
    dataset = load_hub("user/news", "train", {"category": ["Tech", "Sports", "Politics"]})
    assert label_matrix(dataset)[:, 0].tolist() == [2, 0, 1, IGNORE_INDEX]
    with pytest.raises(MissingSplitError, match=r"'user/news' has no 'validation' split \(it has \['train'\]\)"):
        load_hub("user/news", "validation", {"category": ["Tech", "Sports", "Politics"]})


def test_training_rows_without_any_label_are_one_clear_error(tmp_path):
    dataset = load_files(write(tmp_path, "t.csv", "text,category,sentiment\nhello,,\n"), TASKS)
    assert label_matrix(dataset.select([])).shape == (0, 2)
    with pytest.raises(DataError, match=r"t\.csv: no row has a label for any task"):
        drop_unlabelled(dataset, "t.csv")
