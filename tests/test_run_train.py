"""End to end: run_train.main and run_eval.main on a tiny model, and the CLIs' handling of bad input."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import run_eval
import run_train
from mtl.cli import run
from mtl.pipeline import MultiTaskPipeline
from tests.conftest import train_flags, write_jsonl

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_train_then_evaluate(tmp_path, tiny_encoder_dir, data_dir, capsys):
    output = tmp_path / "model"
    metrics = run_train.main(train_flags(tiny_encoder_dir, data_dir, output))
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "train_results.json",
        "eval_results.json",
        "test_results.json",
        "trainer_state.json",
    ):
        assert (output / name).is_file(), name
    evaluation = json.loads((output / "eval_results.json").read_text())
    for task in ("category", "sentiment"):
        assert 0.0 <= evaluation[f"eval_{task}_accuracy"] <= 1.0
        assert evaluation[f"eval_loss_{task}"] > 0
    assert metrics["eval"]["eval_loss"] == pytest.approx(evaluation["eval_loss"])
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 10  # 36 rows / 8 = 5 steps per epoch, 2 epochs
    assert any("loss_category" in entry and "loss_sentiment" in entry for entry in state["log_history"])
    assert sum("eval_category_accuracy" in entry for entry in state["log_history"]) == 2  # one per epoch

    # the local model card's code loads this model from where it was written, and its tokenizer config does not
    # record how this run loaded it
    snippets = re.findall(r"```python\n(.*?)```", (output / "README.md").read_text(), re.DOTALL)
    exec(snippets[-1], {})
    assert "'category_score'" in capsys.readouterr().out
    assert not {"local_files_only", "is_local"} & set(json.loads((output / "tokenizer_config.json").read_text()))
    # the model is saved with the length it trained at, so that prediction truncates there too
    assert json.loads((output / "tokenizer_config.json").read_text())["model_max_length"] == 32
    assert MultiTaskPipeline.from_pretrained(output).max_length == 32

    predictions = tmp_path / "not-yet" / "predictions.jsonl"  # its folder is created
    results = run_eval.main(
        [
            "--model_name_or_path",
            str(output),
            "--test_file",
            str(data_dir / "test.jsonl"),
            "--output_dir",
            str(tmp_path / "eval"),
            "--predictions_file",
            str(predictions),
        ]
    )
    written = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert written == results
    assert set(written) >= {
        f"{t}_{m}" for t in ("category", "sentiment") for m in ("accuracy", "macro_f1", "macro_recall")
    }
    # run_eval and the Trainer's evaluation agree on the same file and model
    assert written["category_accuracy"] == pytest.approx(metrics["test"]["test_category_accuracy"])
    report = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    assert report["sentiment"]["labels"] == ["Positive", "Negative", "Neutral"]
    assert sum(map(sum, report["category"]["confusion_matrix"])) == 12
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(lines) == 12
    assert lines[0]["category"] in ("Tech", "Sports", "Politics") and 0 < lines[0]["category_score"] <= 1


def test_random_truncation_cuts_long_training_rows_only(tmp_path, tiny_encoder_dir, data_dir, monkeypatch):
    long_rows = [{"text": " ".join(["the phone"] * 30), "category": "Tech", "sentiment": "Neutral"}] * 8
    write_jsonl(data_dir / "train.jsonl", long_rows)
    write_jsonl(data_dir / "validation.jsonl", long_rows[:4])
    widths = {"train": set(), "eval": set()}

    class Recording(run_train.MultiTaskTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            widths["train"].add(inputs["input_ids"].shape[1])
            return super().training_step(model, inputs, *args, **kwargs)

        def prediction_step(self, model, inputs, *args, **kwargs):
            widths["eval"].add(inputs["input_ids"].shape[1])
            return super().prediction_step(model, inputs, *args, **kwargs)

    monkeypatch.setattr(run_train, "MultiTaskTrainer", Recording)
    flags = ["--random_truncation_min_length", "8", "--num_train_epochs", "4", "--per_device_train_batch_size", "1"]
    run_train.main(train_flags(tiny_encoder_dir, data_dir, tmp_path / "model", *flags, test_file=False))
    assert widths["train"] <= set(range(8, 33)) and len(widths["train"]) > 5  # 32 long rows cut at random lengths
    assert widths["eval"] == {32}  # validation rows are never cut


def test_max_train_windows_trains_on_every_window_and_evaluates_on_the_beginning(
    tmp_path, tiny_encoder_dir, data_dir, monkeypatch
):
    # 8 training texts of 59 words; at --max_seq_length 16 their windows hold 14 words, 14, 14, 14 and 3
    words = ["phone", "vote", "match", "great", "awful", "law", "team", "app", "chip", "coach"]
    text = " ".join((words * 6)[:59])
    long_rows = [{"text": text, "category": "Tech", "sentiment": "Neutral"}] * 8
    write_jsonl(data_dir / "train.jsonl", long_rows)
    write_jsonl(data_dir / "validation.jsonl", long_rows[:4])
    seen = {"train": [], "eval": []}

    class Recording(run_train.MultiTaskTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            seen["train"] += [row[row != 0].tolist() for row in inputs["input_ids"]]
            return super().training_step(model, inputs, *args, **kwargs)

        def prediction_step(self, model, inputs, *args, **kwargs):
            seen["eval"] += [row[row != 0].tolist() for row in inputs["input_ids"]]
            return super().prediction_step(model, inputs, *args, **kwargs)

    monkeypatch.setattr(run_train, "MultiTaskTrainer", Recording)
    flags = ["--max_seq_length", "16", "--max_train_windows", "3", "--num_train_epochs", "1", "--test_file", ""]
    run_train.main(train_flags(tiny_encoder_dir, data_dir, tmp_path / "model", *flags, test_file=False))
    tokenizer = run_train.load_tokenizer(str(tiny_encoder_dir))
    ids = tokenizer.convert_tokens_to_ids(text.split())
    windows = [[tokenizer.cls_token_id, *ids[i : i + 14], tokenizer.sep_token_id] for i in (0, 14, 28)]
    assert sorted(seen["train"]) == sorted(windows * 8)  # three windows of each text, each once an epoch
    assert seen["eval"] == windows[:1] * 8  # validation (after the epoch, then at the end): each text's beginning


def test_the_other_processes_wait_for_the_main_ones_writing(tmp_path, tiny_encoder_dir, data_dir, monkeypatch):
    # Under `accelerate launch` the processes leave the process group together at the end (see test_cli.py), only
    # after the main process's last write, the model card.
    output = tmp_path / "model"
    calls = []
    monkeypatch.setattr(Accelerator, "wait_for_everyone", lambda self: calls.append((output / "README.md").exists()))
    run_train.main(train_flags(tiny_encoder_dir, data_dir, output, "--num_train_epochs", "1"))
    assert calls and calls[-1] is True


def test_partial_test_file_is_evaluated_on_its_tasks(tmp_path, tiny_encoder_dir, data_dir):
    output = tmp_path / "model"
    run_train.main(train_flags(tiny_encoder_dir, data_dir, output, "--num_train_epochs", "1"))
    topic_only = write_jsonl(tmp_path / "topic.jsonl", [{"text": "the vote", "category": "Politics"}])
    results = run_eval.main(
        ["--model_name_or_path", str(output), "--test_file", str(topic_only), "--output_dir", str(tmp_path / "eval")]
    )
    assert "category_accuracy" in results and "sentiment_accuracy" not in results


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path, tiny_encoder_dir, data_dir):
    full = tmp_path / "full"
    run_train.main(train_flags(tiny_encoder_dir, data_dir, full, "--save_strategy", "epoch", "--seed", "3"))
    resumed = tmp_path / "resumed"
    run_train.main(
        train_flags(
            tiny_encoder_dir,
            data_dir,
            resumed,
            "--save_strategy",
            "epoch",
            "--seed",
            "3",
            "--resume_from_checkpoint",
            str(full / "checkpoint-5"),
        )
    )
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["global_step"] == 10
    assert not any(entry.get("epoch", 2) < 1 and "loss" in entry for entry in state["log_history"])  # no redo
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_refuses_to_overwrite_a_trained_model(tmp_path, tiny_encoder_dir, data_dir, capsys):
    output = tmp_path / "model"
    run_train.main(train_flags(tiny_encoder_dir, data_dir, output, "--num_train_epochs", "1"))
    before = (output / "model.safetensors").read_bytes()
    assert run(run_train.main, train_flags(tiny_encoder_dir, data_dir, output)) == 1
    assert "already holds a trained model" in capsys.readouterr().err
    assert (output / "model.safetensors").read_bytes() == before
    # Overwritten without a test set: the earlier run's test results must not stay next to the new model.
    assert (output / "test_results.json").is_file()
    flags = ["--num_train_epochs", "1", "--overwrite_output_dir", "--test_file", ""]
    run_train.main(train_flags(tiny_encoder_dir, data_dir, output, *flags))
    assert not (output / "test_results.json").exists()
    assert not any(key.startswith("test_") for key in json.loads((output / "all_results.json").read_text()))


def test_an_earlier_runs_checkpoints_are_never_mixed_into_a_new_run(tmp_path, tiny_encoder_dir, data_dir, capsys):
    output = tmp_path / "model"
    run_train.main(train_flags(tiny_encoder_dir, data_dir, output, "--save_strategy", "epoch"))  # 2 epochs of 5 steps
    for name in ("config.json", "model.safetensors"):  # as if it had crashed before saving the final model
        (output / name).unlink()
    assert run(run_train.main, train_flags(tiny_encoder_dir, data_dir, output)) == 1
    assert "holds an earlier run's checkpoints (checkpoint-5, checkpoint-10)" in capsys.readouterr().err
    # Starting again: the old checkpoints go, so that none is resumed, rotated or averaged as if it were this run's.
    flags = ["--num_train_epochs", "1", "--save_strategy", "epoch", "--seed", "7", "--overwrite_output_dir"]
    run_train.main(train_flags(tiny_encoder_dir, data_dir, output, *flags))
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-5"]
    final, checkpoint = load_file(output / "model.safetensors"), load_file(output / "checkpoint-5/model.safetensors")
    assert all(torch.equal(final[key], checkpoint[key]) for key in final)


def test_resuming_with_other_tasks_is_refused(tmp_path, tiny_encoder_dir, data_dir, capsys):
    output = tmp_path / "model"
    run_train.main(train_flags(tiny_encoder_dir, data_dir, output, "--save_strategy", "epoch"))
    other = ["--tasks", '{"category": ["Tech", "Sports", "Politics"]}', "--resume_from_checkpoint", "latest"]
    assert run(run_train.main, train_flags(tiny_encoder_dir, data_dir, output, *other)) == 1
    err = capsys.readouterr().err
    assert "checkpoint-10 was trained with tasks" in err and "resume with the same --tasks" in err


def test_max_train_samples_is_applied_before_the_label_checks(tmp_path, tiny_encoder_dir, data_dir, capsys):
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    for row in rows[:4]:
        row["sentiment"] = None
    write_jsonl(data_dir / "train.jsonl", rows)
    argv = train_flags(tiny_encoder_dir, data_dir, tmp_path / "out", "--max_train_samples", "4")
    assert run(run_train.main, argv) == 1
    assert "no row has a label for task(s) ['sentiment']" in capsys.readouterr().err
    # a frozen head learns nothing, so its task needs no training label: the way out the error names
    assert run(run_train.main, [*argv, "--freeze", "sentiment", "--num_train_epochs", "1"]) == 0


BAD_TRAINING_FILES = [
    ('{"text": "x", "category": "Science", "sentiment": "Positive"}\n', "unknown category label 'Science'"),
    ('{"sentence": "x", "category": "Tech"}\n', "no 'text' column"),
    ('{"text": "", "category": "Tech", "sentiment": "Positive"}\n', "'text' value is empty"),
    ('{"text": "x", "category": "Tech"}\n{"text": \n', "line 2 is not valid JSON"),
    ('{"text": "x", "category": "Tech"}\n', "no row has a label for task(s) ['sentiment']"),
]


@pytest.mark.parametrize(("content", "message"), BAD_TRAINING_FILES)
def test_bad_training_data_is_one_clear_error(tmp_path, tiny_encoder_dir, data_dir, capsys, content, message):
    (data_dir / "train.jsonl").write_text(content)
    output = tmp_path / "never-written"
    assert run(run_train.main, train_flags(tiny_encoder_dir, data_dir, output)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "train.jsonl" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not output.exists()  # nothing half-written


def test_missing_training_file(tmp_path, tiny_encoder_dir, data_dir, capsys):
    (data_dir / "train.jsonl").unlink()
    assert run(run_train.main, train_flags(tiny_encoder_dir, data_dir, tmp_path / "out")) == 1
    assert "train.jsonl: no such file" in capsys.readouterr().err


def test_eval_refuses_labels_the_model_does_not_know(tmp_path, tiny_encoder_dir, data_dir, capsys):
    output = tmp_path / "model"
    run_train.main(train_flags(tiny_encoder_dir, data_dir, output, "--num_train_epochs", "1"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "the vote", "category": "Weather"}])
    argv = ["--model_name_or_path", str(output), "--test_file", str(bad), "--output_dir", str(tmp_path / "eval")]
    assert run(run_eval.main, argv) == 1
    err = capsys.readouterr().err
    assert "unknown category label 'Weather'" in err and "'Tech', 'Sports', 'Politics'" in err
    assert not (tmp_path / "eval").exists()


def test_cli_exit_code_and_no_traceback(tmp_path, data_dir):
    (data_dir / "train.jsonl").write_text('{"text": "x", "category": "Tech", "sentiment": "happy"}\n')
    completed = subprocess.run(
        [
            sys.executable,
            "run_train.py",
            "--train_file",
            str(data_dir / "train.jsonl"),
            "--output_dir",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 1
    assert "unknown sentiment label 'happy'" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_an_empty_validation_file_turns_evaluation_off(tmp_path, tiny_encoder_dir, data_dir, capsys):
    output = tmp_path / "model"
    metrics = run_train.main(train_flags(tiny_encoder_dir, data_dir, output, "--validation_file", ""))
    assert set(metrics) == {"train", "test"} and not (output / "eval_results.json").exists()
    state = json.loads((output / "trainer_state.json").read_text())
    assert not any(key.startswith("eval_") for entry in state["log_history"] for key in entry)
    flags = ["--validation_file", "", "--load_best_model_at_end"]
    assert run(run_train.main, train_flags(tiny_encoder_dir, data_dir, tmp_path / "best", *flags)) == 1
    assert "--load_best_model_at_end needs a validation set, but --validation_file is empty" in capsys.readouterr().err


def test_a_hub_data_set_gives_the_splits_it_has_and_explicit_files_win(
    tmp_path, tiny_encoder_dir, data_dir, monkeypatch, capsys
):
    import datasets

    from tests.conftest import make_rows

    hub = {"train": datasets.Dataset.from_list(make_rows(24)), "test": datasets.Dataset.from_list(make_rows(12))}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config: datasets.DatasetDict(hub))
    # fmt: off
    flags = [
        "--model_name_or_path", str(tiny_encoder_dir), "--dataset_name", "user/news", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "8", "--use_cpu", "--disable_tqdm", "true", "--max_seq_length", "32",
    ]
    # fmt: on
    metrics = run_train.main([*flags, "--output_dir", str(tmp_path / "hub")])
    assert set(metrics) == {"train", "test"} and "test_category_accuracy" in metrics["test"]
    assert "has no 'validation' split (it has ['test', 'train'])" in capsys.readouterr().err  # skipped, no crash
    assert json.loads((tmp_path / "hub" / "trainer_state.json").read_text())["global_step"] == 3  # 24 rows / 8

    best = ["--load_best_model_at_end", "--output_dir", str(tmp_path / "best")]
    assert run(run_train.main, [*flags, *best]) == 1  # the reason names the data set, not an empty file option
    assert "--load_best_model_at_end needs a validation set, but user/news has no validation split" in (
        capsys.readouterr().err
    )

    local = ["--validation_file", str(data_dir / "validation.jsonl"), "--output_dir", str(tmp_path / "local")]
    metrics = run_train.main([*flags, *local])  # a file given explicitly is read next to the Hub's splits
    assert set(metrics) == {"train", "eval", "test"}

    del hub["train"]
    assert run(run_train.main, [*flags, "--output_dir", str(tmp_path / "none")]) == 1
    assert "has no 'train' split (it has ['test']). Name the training split's file with --train_file" in (
        capsys.readouterr().err
    )


def test_eval_without_a_trained_default_model_says_to_train_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no outputs/mtl-minilm here; the Hub is not asked (it would retry for seconds)
    monkeypatch.setattr(MultiTaskPipeline, "from_pretrained", lambda *a, **k: pytest.fail("the Hub was asked"))
    assert run(run_eval.main, []) == 1
    assert "outputs/mtl-minilm: no such model directory; train one with `python run_train.py` first" in (
        capsys.readouterr().err
    )


def test_a_saved_model_trains_on_at_its_own_length(tmp_path, tiny_encoder_dir, data_dir, capsys):
    def train(source: Path, output: str, *extra: str) -> int:
        flags = train_flags(source, data_dir, tmp_path / output, "--num_train_epochs", "1")
        run_train.main([*flags[: flags.index("--max_seq_length")], *extra])  # --max_seq_length only if in `extra`
        return json.loads((tmp_path / output / "tokenizer_config.json").read_text())["model_max_length"]

    assert train(tiny_encoder_dir, "first", "--max_seq_length", "24") == 24
    assert train(tmp_path / "first", "second") == 24  # not given: the saved model's 24, not the default 128
    # a tokenizer saved by hand with its stock length (512) beyond the encoder's 64 positions: the encoder's limit
    stock = json.loads((tmp_path / "first" / "tokenizer_config.json").read_text())
    (tmp_path / "first" / "tokenizer_config.json").write_text(json.dumps({**stock, "model_max_length": 512}))
    assert train(tmp_path / "first", "third") == 64
    assert train(tiny_encoder_dir, "new") == 64  # a new model: 128, or the encoder's limit (64 here)
    capsys.readouterr()
    other_tasks = train_flags(tmp_path / "first", data_dir, tmp_path / "x", "--tasks", '{"topic": ["a", "b"]}')
    assert run(run_train.main, other_tasks) == 1  # not silently ignored: the saved model keeps its own tasks
    assert "--tasks cannot change the tasks of the saved mtl model" in capsys.readouterr().err


def test_torch_compile_trains_saves_plain_weights_and_keeps_the_encoder_frozen_while_asked(
    tmp_path, tiny_encoder_dir, data_dir
):
    # The compiled model is a wrapper (`_orig_mod.`) around ours: the freezing hooks must still run inside it, and
    # the saved weights must load as any model's.
    output = tmp_path / "model"
    flags = ["--torch_compile", "--unfreeze_encoder_after_epochs", "1", "--test_file", ""]
    metrics = run_train.main(train_flags(tiny_encoder_dir, data_dir, output, *flags))
    initial = load_file(tiny_encoder_dir / "model.safetensors")
    epoch1, epoch2 = (load_file(output / f"checkpoint-{step}" / "model.safetensors") for step in (5, 10))
    final = load_file(output / "model.safetensors")
    heads = {f"heads.{task}.{p}" for task in ("category", "sentiment") for p in ("weight", "bias")}
    assert set(final) == set(epoch1) == {f"encoder.{key}" for key in initial} | heads
    assert all(torch.equal(epoch1[f"encoder.{key}"], initial[key]) for key in initial)
    assert not all(torch.equal(epoch2[f"encoder.{key}"], initial[key]) for key in initial)
    assert all(torch.equal(final[key], epoch2[key]) for key in final)
    # The saved model predicts as the trainer's compiled model evaluated it.
    reloaded = run_eval.main(
        ["--model_name_or_path", str(output), "--test_file", str(data_dir / "validation.jsonl"),
         "--output_dir", str(tmp_path / "eval")]
    )  # fmt: skip
    assert reloaded["category_accuracy"] == pytest.approx(metrics["eval"]["eval_category_accuracy"])
    assert reloaded["sentiment_accuracy"] == pytest.approx(metrics["eval"]["eval_sentiment_accuracy"])
