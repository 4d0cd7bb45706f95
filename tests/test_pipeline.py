import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl import DataError
from mtl.cli import run
from mtl.pipeline import MultiTaskPipeline
from mtl.predict import iter_texts, main

TEXTS = ["the phone", "the match was great and the team played a good game today", "vote", "a law on tax"]


@pytest.fixture
def saved_model(tmp_path, tiny_model, tiny_tokenizer):
    tiny_model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def clf(saved_model):
    return MultiTaskPipeline.from_pretrained(saved_model, device="cpu", batch_size=2)


def test_results_follow_input_order_and_match_unbatched(clf, tiny_model, tiny_tokenizer):
    batched = clf.predict_logits(TEXTS)
    tiny_model.eval()
    with torch.no_grad():
        for i, text in enumerate(TEXTS):
            one = tiny_model(**tiny_tokenizer([text], return_tensors="pt")).logits
            for task_logits, expected in zip(batched, one, strict=True):
                np.testing.assert_allclose(task_logits[i], expected[0].numpy(), atol=1e-5)


def test_public_import(saved_model):
    from mtl import MultiTaskPipeline as Exported

    assert Exported is MultiTaskPipeline
    assert Exported.from_pretrained(saved_model, device="cpu")(["the vote"])[0]["text"] == "the vote"


def test_labels_and_scores(clf):
    results = clf(TEXTS)
    assert [r["text"] for r in results] == TEXTS
    for result in results:
        assert set(result) == {"text", "category", "category_score", "sentiment", "sentiment_score"}
        assert result["category"] in clf.tasks["category"]
        assert 1 / 3 <= result["sentiment_score"] <= 1.0  # the arg-max probability of 3 classes
    assert clf("the phone")[0]["text"] == "the phone"
    for task, logits in zip(clf.tasks, clf.predict_logits(TEXTS), strict=True):
        probabilities = torch.softmax(torch.from_numpy(logits), dim=1)
        assert [r[task] for r in results] == [clf.tasks[task][i] for i in logits.argmax(axis=1)]
        assert [r[f"{task}_score"] for r in results] == pytest.approx(probabilities.max(1).values.tolist(), abs=5e-5)


def test_a_model_in_training_mode_predicts_deterministically(tiny_model, tiny_tokenizer):
    pipeline = MultiTaskPipeline(tiny_model.train(), tiny_tokenizer, device="cpu")  # dropout would vary each call
    assert not tiny_model.training
    first = pipeline.predict_logits(TEXTS)
    for again, logits in zip(pipeline.predict_logits(TEXTS), first, strict=True):
        np.testing.assert_array_equal(again, logits)


def test_streaming_gives_the_same_results(clf):
    assert list(clf.iter_predictions(iter(TEXTS), chunk_size=3)) == clf(TEXTS)
    assert list(clf.iter_predictions(TEXTS[0])) == clf(TEXTS[0])  # one text, not one per character


def test_a_length_above_the_encoders_limit_is_capped_with_a_warning(tiny_model, tiny_tokenizer, caplog):
    with caplog.at_level("WARNING", logger="mtl.pipeline"):
        clf = MultiTaskPipeline(tiny_model, tiny_tokenizer, device="cpu", max_length=1000)
    assert clf.max_length == 64 and "max_length 1000 exceeds the encoder's limit of 64 tokens" in caplog.text


def test_very_long_text_is_truncated(clf):
    (result,) = clf([" ".join(["phone"] * 5000)])
    assert result["category"] in clf.tasks["category"]


def test_texts_are_cut_where_the_tokenizer_says_the_model_was_trained(saved_model, tiny_model, tiny_tokenizer):
    long_text = " ".join(["the phone", "the match"] * 20)
    assert MultiTaskPipeline.from_pretrained(saved_model).max_length == 64  # no recorded length: the position limit
    tiny_tokenizer.model_max_length = 8  # what run_train.py records for --max_seq_length 8
    tiny_tokenizer.save_pretrained(saved_model)
    clf = MultiTaskPipeline.from_pretrained(saved_model, device="cpu")
    assert clf.max_length == 8
    cut = tiny_tokenizer([long_text], truncation=True, max_length=8, return_tensors="pt")
    assert cut["input_ids"].shape[1] == 8
    tiny_model.eval()
    with torch.no_grad():
        expected = tiny_model(**cut).logits
    for task_logits, one in zip(clf.predict_logits([long_text]), expected, strict=True):
        np.testing.assert_allclose(task_logits[0], one[0].numpy(), atol=1e-5)
    assert MultiTaskPipeline.from_pretrained(saved_model, max_length=16).max_length == 16  # an explicit length wins
    assert MultiTaskPipeline.from_pretrained(saved_model, max_length=1000).max_length == 64


@pytest.mark.parametrize(
    ("texts", "message"), [([], "No texts"), (["ok", ""], "Input 1 is empty"), (["ok", 3], "Input 1 is a int")]
)
def test_bad_inputs(clf, texts, message):
    with pytest.raises(ValueError, match=message):
        clf(texts)


def test_cli_texts_and_files(tmp_path, saved_model, capsys):
    assert main([str(saved_model), "the phone", "the vote"]) == 2
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == ["the phone", "the vote"]
    assert main([str(saved_model), "the phone", "--batch_size", "2", "the vote", "--max_length", "8", "a law"]) == 3
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == ["the phone", "the vote", "a law"]  # texts after flags too
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['--colour'\]"):
        main([str(saved_model), "the phone", "--colour", "blue"])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['-o'\]"):  # not two texts "-o" and "preds.jsonl"
        main([str(saved_model), "the phone", "-o", "preds.jsonl"])
    assert main([str(saved_model), "--batch_size", "2", "-5", "-2.5e3"]) == 2  # negative numbers are texts
    assert [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == ["-5", "-2.5e3"]
    with pytest.raises(ValueError, match=r"--output .*preds\.csv: predictions are JSON lines"):
        main([str(saved_model), "the phone", "--output", str(tmp_path / "preds.csv")])
    assert not (tmp_path / "preds.csv").exists()

    inputs = {
        "in.txt": "the phone\n\nthe vote\n",
        "in.jsonl": '{"text": "the phone"}\n{"text": "the vote"}\n',
        "in.csv": 'id,text\n1,the phone\n2,"the vote"\n',
    }
    for name, content in inputs.items():
        (tmp_path / name).write_text(content)
        output = tmp_path / f"{name}.out.jsonl"
        assert main([str(saved_model), "--input", str(tmp_path / name), "--output", str(output)]) == 2
        assert [json.loads(x)["text"] for x in output.read_text().splitlines()] == ["the phone", "the vote"], name


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": 5}\n', "line 2: the text is a int (5)"),
        ("bad2.jsonl", '{"text": "ok"}\nnot json\n', "line 2 is not valid JSON"),
        ("bad.csv", "id,body\n1,x\n", "no 'text' column"),
        # an unquoted comma: read loosely, the text would be cut at it ("the phone is great") without a word
        ("comma.csv", "text\nthe phone is great, love it\n", "line 2 has 2 field(s) but the header has 1"),
        ("twice.csv", "text,text\na,b\n", "duplicate column name(s) ['text']"),
        ("empty.txt", "\n\n", "no texts to label"),
        ("in.parquet", "x", "unsupported input type"),
    ],
)
def test_cli_bad_files_leave_no_output(tmp_path, saved_model, capsys, name, content, message):
    (tmp_path / name).write_text(content)
    output = tmp_path / "out.jsonl"
    assert run(main, [str(saved_model), "--input", str(tmp_path / name), "--output", str(output)]) == 1
    assert message in capsys.readouterr().err
    assert not output.exists()
    assert not list(tmp_path.glob(".out.jsonl.partial"))


def test_cli_needs_texts_or_input(tmp_path, saved_model, capsys):
    assert run(main, [str(saved_model)]) == 1
    assert "either texts on the command line or --input" in capsys.readouterr().err
    (tmp_path / "in.txt").write_text("the phone\n")
    assert run(main, [str(saved_model), "the vote", "--input", str(tmp_path / "in.txt")]) == 1  # not one ignored
    assert "(one of them, not both)" in capsys.readouterr().err


def test_cli_refuses_a_file_name_given_as_a_text(tmp_path, saved_model, capsys, monkeypatch):
    # --input forgotten: labelling the words "texts.txt" would exit 0 with a useless answer
    monkeypatch.chdir(tmp_path)
    Path("texts.txt").write_text("the phone\n")
    assert run(main, [str(saved_model), "texts.txt"]) == 1
    assert (
        "texts.txt is a file, not a text to label; to label its texts, use --input texts.txt"
        in capsys.readouterr().err
    )
    assert main([str(saved_model), "notes.txt"]) == 1  # no such file: a text like any other
    assert json.loads(capsys.readouterr().out)["text"] == "notes.txt"


def test_iter_texts_is_lazy(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("".join(f"text {i}\n" for i in range(1000)))
    stream = iter_texts(path)
    assert next(stream) == "text 0"  # nothing else was read or checked yet


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("bom.txt", "\ufeffthe phone\nthe vote\n"),  # a byte-order mark, as Notepad and Excel write one
        ("bom.jsonl", '\ufeff{"text": "the phone"}\n{"text": "the vote"}\n'),
        ("bom.csv", "\ufefftext\nthe phone\nthe vote\n"),
        ("spaced.csv", "id, text\n1,the phone\n2,the vote\n"),  # header names are stripped, as in training
    ],
)
def test_iter_texts_reads_what_training_reads(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8"))
    assert list(iter_texts(path)) == ["the phone", "the vote"]


def test_iter_texts_refuses_an_open_quote(tmp_path):
    path = tmp_path / "quote.csv"
    path.write_text('text\n"the phone\nthe vote\n')  # the quote would swallow the rest of the file
    with pytest.raises(DataError, match=r"quote.csv: line \d+: .*close every quote"):
        list(iter_texts(path))


def test_iter_texts_rejects_non_text(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": ["a"]}\n')
    with pytest.raises(DataError, match=r"the text is a list \(\['a'\]\), not text"):
        list(iter_texts(path))


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"batch_size": 0}, r"--batch_size\) must be at least 1"), ({"max_length": 1}, "max_length must leave room")],
)
def test_bad_sizes_are_refused(saved_model, settings, message):
    with pytest.raises(ValueError, match=message):
        MultiTaskPipeline.from_pretrained(saved_model, device="cpu", **settings)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--chunk_size", "0"], "--chunk_size must be at least 1 text, got 0."),
        (["--batch_size", "0"], "--batch_size must be at least 1 text, got 0."),
        (["--max_length", "1"], "--max_length must be at least 2 tokens, got 1."),
    ],
)
def test_cli_bad_sizes_are_one_error_before_the_model_is_read(tmp_path, capsys, flags, message):
    assert run(main, [str(tmp_path / "never-read"), "some text", *flags]) == 1  # no model there: not looked for
    assert capsys.readouterr().err == f"error: {message}\n"


def test_roberta_style_encoders_are_cut_below_their_padding_offset(tmp_path, tiny_tokenizer):
    from transformers import RobertaConfig, RobertaModel

    from mtl import MultiTaskModel
    from mtl.configuration import token_limit

    config = RobertaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=34, pad_token_id=0, type_vocab_size=2,
    )  # fmt: skip
    RobertaModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    assert token_limit(config) == 33  # positions start after the padding index 0
    model = MultiTaskModel.from_encoder(tmp_path)
    assert token_limit(model.config) == 33
    (result,) = MultiTaskPipeline(model, tiny_tokenizer, device="cpu")([" ".join(["phone"] * 100)])
    assert result["category"] in model.config.tasks["category"]
