"""Bad input, interrupted training and safe loading."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import TrainerCallback

import run_eval
import run_train
from mtl import DEFAULT_TASKS, DataError, MultiTaskConfig, MultiTaskModel, MultiTaskTrainingArguments, load_files
from mtl.checkpointing import TrainingInterrupted, check_checkpoint_tasks, latest_checkpoint, resolve_checkpoint
from mtl.cli import run
from mtl.modeling import load_multitask_model, load_tokenizer
from tests.conftest import make_rows, train_flags, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


# ---- the data loader never fails with anything but its own error ----

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
label_values = st.sampled_from(["Tech", "tech", "Sports", "Positive", "Neutral", "", " ", None, 0, 2, 7, -1, True])
rows = st.lists(
    st.dictionaries(
        st.sampled_from(["text", "category", "sentiment", "other"]), label_values | json_values, max_size=4
    ),
    min_size=0,
    max_size=5,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=rows, raw=st.binary(max_size=60), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv"]))
def test_random_rows_are_accepted_or_refused_clearly(tmp_path_factory, records, raw, suffix):
    directory = tmp_path_factory.mktemp("random")
    structured = directory / f"rows{suffix}"
    if suffix in (".jsonl", ".json"):
        text = "".join(json.dumps(r) + "\n" for r in records) if suffix == ".jsonl" else json.dumps(records)
        structured.write_text(text)
    else:
        separator = "," if suffix == ".csv" else "\t"
        columns = sorted({key for record in records for key in record}) or ["text"]
        lines = [separator.join(columns)] + [separator.join(str(r.get(c, "")) for c in columns) for r in records]
        structured.write_text("\n".join(lines) + "\n")
    noise = directory / f"noise{suffix}"
    noise.write_bytes(raw)
    for path in (structured, noise):
        try:
            dataset = load_files(path, DEFAULT_TASKS)
        except DataError as error:
            assert str(path) in str(error)
        else:
            assert len(dataset) >= 1
            assert all(text.strip() for text in dataset["text"][:])


# ---- safe loading ----


def to_pickle(directory: Path) -> None:
    """Replace the safetensors weights with a pickle file holding the same state dict."""
    state = load_file(directory / "model.safetensors")
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path, tiny_model, tiny_tokenizer):
    tiny_model.save_pretrained(tmp_path)
    to_pickle(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"only pickle weights \(pytorch_model.bin\).*--allow_pickle"):
        load_multitask_model(tmp_path)
    loaded = load_multitask_model(tmp_path, allow_pickle=True).eval()
    inputs = tiny_tokenizer(["the phone"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits[0], tiny_model.eval()(**inputs).logits[0])


def test_sharded_pickle_weights_are_named_too(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    to_pickle(tmp_path)
    (tmp_path / "pytorch_model.bin").rename(tmp_path / "pytorch_model-00001-of-00001.bin")
    with pytest.raises(FileNotFoundError, match=r"only pickle weights \(pytorch_model-00001-of-00001.bin\)"):
        load_multitask_model(tmp_path)


def test_an_encoder_is_not_mistaken_for_an_mtl_model(tiny_encoder_dir):
    with pytest.raises(ValueError, match=r"config of a 'bert' model, not of an mtl model.*from_encoder"):
        MultiTaskModel.from_pretrained(tiny_encoder_dir)


def test_pickle_encoders_are_refused_unless_allowed(tmp_path, tiny_encoder_dir):
    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_encoder_dir, encoder)
    to_pickle(encoder)
    with pytest.raises(FileNotFoundError, match="--allow_pickle"):
        MultiTaskModel.from_encoder(encoder)
    assert MultiTaskModel.from_encoder(encoder, allow_pickle=True).config.encoder.hidden_size == 32


def test_no_torch_load_without_weights_only():
    sources = [*ROOT.glob("mtl/*.py"), *ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")]
    for source in sources:
        for call in re.findall(r"torch\.load\([^)]*\)", source.read_text()):
            assert "weights_only=True" in call, f"{source.name}: {call}"


def test_path_tricks_are_refused():
    with pytest.raises(ValueError, match="--hub_model_id"):
        MultiTaskTrainingArguments(output_dir="unused", hub_model_id="../outside")
    with pytest.raises(ValueError, match="not allowed"):
        from mtl import MultiTaskConfig

        MultiTaskConfig(tasks={"../x": ["a", "b"]})


def test_not_an_mtl_model_or_missing_weights(tmp_path, tiny_encoder_dir, tiny_model, capsys):
    assert run(run_eval.main, ["--model_name_or_path", str(tiny_encoder_dir), "--output_dir", str(tmp_path)]) == 1
    assert "is not an mtl model" in capsys.readouterr().err
    tiny_model.save_pretrained(tmp_path / "broken")
    (tmp_path / "broken" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no model weights"):
        load_multitask_model(tmp_path / "broken")


def test_predictions_are_written_only_to_a_jsonl_file(tmp_path, capsys):
    argv = ["--model_name_or_path", str(tmp_path), "--predictions_file", str(tmp_path / "preds.csv")]
    assert run(run_eval.main, argv) == 1  # refused before the model is read: the run would only end in a misnamed file
    assert (
        capsys.readouterr().err
        == f"error: --predictions_file {tmp_path / 'preds.csv'}: predictions are JSON lines; name the file *.jsonl.\n"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch_size", "0"], "--batch_size must be at least 1 text, got 0."),
        (["--max_seq_length", "1"], "--max_seq_length must be at least 2 tokens, got 1."),
    ],
)
def test_eval_bad_sizes_are_refused_before_the_model_is_read(capsys, flags, message):
    assert run(run_eval.main, ["--model_name_or_path", "no-such-org/no-such-model", *flags]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"


def test_a_missing_test_file_is_refused_before_the_model_is_read(tmp_path, capsys):
    missing = tmp_path / "tset.jsonl"
    argv = ["--model_name_or_path", "no-such-org/no-such-model", "--test_file", str(missing)]
    assert run(run_eval.main, argv) == 1  # a Hub id would be fetched first (with retries) if the file came second
    assert capsys.readouterr().err == (
        f"error: --test_file {missing}: no such file; pass a labelled CSV/TSV/JSON/JSON Lines file.\n"
    )


def test_an_encoder_without_tokenizer_files_is_refused(tmp_path, tiny_encoder_dir, data_dir, capsys):
    # transformers would build a tokenizer of special tokens only from the config: every word read as [UNK]
    encoder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_encoder_dir, encoder, ignore=shutil.ignore_patterns("*token*", "vocab*"))
    assert run(run_train.main, flags(encoder, data_dir, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "has no tokenizer files" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_without_its_vocabulary_is_refused(tmp_path, tiny_tokenizer):
    # transformers still builds one from tokenizer_config.json: its special tokens only, every word [UNK]
    tiny_tokenizer.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "vocab.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer files \(only \d+ special tokens were found\)"):
        load_tokenizer(tmp_path)


def test_a_model_saved_without_its_tokenizer_is_one_clear_error(tmp_path, tiny_model, capsys):
    tiny_model.save_pretrained(tmp_path / "model-only")  # the model alone: no tokenizer was saved with it
    capsys.readouterr()  # save_pretrained's progress bar
    argv = ["--model_name_or_path", str(tmp_path / "model-only"), "--output_dir", str(tmp_path / "eval")]
    assert run(run_eval.main, argv) == 1
    err = capsys.readouterr().err
    assert "'" + str(tmp_path / "model-only") + "' has no tokenizer files; save the encoder's tokenizer" in err
    assert err.count("\n") == 1


# ---- bad arguments: one line, nothing written ----


def flags(encoder, data_dir, output, *extra):
    return train_flags(encoder, data_dir, output, "--num_train_epochs", "1", *extra, test_file=False)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--freeze", "colour"], "unknown part(s) ['colour']"),
        (["--task_weights", "1", "2", "3"], "--task_weights has 3 value(s)"),
        (["--task_weights", "1", "-2"], "--task_weights must be non-negative"),
        (["--max_seq_length", "512"], "exceeds the encoder's limit of 64"),
        (
            ["--dataloader_drop_last", "true", "--per_device_train_batch_size", "64"],
            "--dataloader_drop_last drops every batch: training data (",
        ),
        (["--resume_from_checkpoint", "/nowhere/checkpoint-3"], "no such checkpoint folder"),
        (
            ["--load_best_model_at_end", "--save_strategy", "epoch", "--metric_for_best_model", "macro_recall"],
            "--metric_for_best_model 'macro_recall' is not a metric evaluation logs; choose one of ['loss', ",
        ),
    ],
)
def test_bad_arguments(tmp_path, tiny_encoder_dir, data_dir, capsys, extra, message):
    output = tmp_path / "out"
    assert run(run_train.main, flags(tiny_encoder_dir, data_dir, output, *extra)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1  # checked before any loading
    assert not output.exists()


@pytest.mark.parametrize(
    ("labels", "extra", "message"),
    [
        # the label column misnamed: evaluation would report a loss of 0 and keep the first checkpoint as "best"
        ({"topic": "Tech"}, ["--load_best_model_at_end"], "validation data ("),
        # a metric of a task the validation file does not label: the Trainer fails after the first epoch
        ({"category": "Tech"}, ["--load_best_model_at_end", "--metric_for_best_model", "sentiment_macro_recall"],
         "--metric_for_best_model 'sentiment_macro_recall' needs sentiment labels"),
    ],
)  # fmt: skip
def test_a_validation_file_must_label_what_evaluation_needs(tmp_path, tiny_encoder_dir, data_dir, capsys, labels,
                                                           extra, message):  # fmt: skip
    write_jsonl(data_dir / "validation.jsonl", [{"text": "the phone is great", **labels}] * 4)
    output = tmp_path / "out"
    assert run(run_train.main, flags(tiny_encoder_dir, data_dir, output, *extra)) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not output.exists()


def test_labels_no_training_row_has_are_named(tmp_path, tiny_encoder_dir, data_dir, capsys):
    rows = [row for row in make_rows(24) if row["category"] != "Politics"]
    write_jsonl(data_dir / "train.jsonl", rows)
    run_train.main(flags(tiny_encoder_dir, data_dir, tmp_path / "out"))  # its logging set-up writes to stderr
    assert "no training row has the category label(s) ['Politics']" in capsys.readouterr().err


# ---- interrupted training ----


def test_a_checkpoint_with_the_same_tasks_but_other_labels_is_refused(tmp_path):
    # same names, same head shapes: loaded as is, the labels would come out permuted without a word
    MultiTaskConfig(tasks={"topic": ["World", "Sports"]}).save_pretrained(tmp_path)
    check_checkpoint_tasks(tmp_path, {"topic": ["World", "Sports"]})
    with pytest.raises(ValueError, match=r"was trained with tasks \{'topic': \['World', 'Sports'\]\}, but this"):
        check_checkpoint_tasks(tmp_path, {"topic": ["Sports", "World"]})


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    for step, complete in ((5, True), (10, True), (15, False)):
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        (checkpoint / "model.safetensors").write_bytes(b"x")
        if complete:
            (checkpoint / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert resolve_checkpoint("latest", tmp_path) == str(tmp_path / "checkpoint-10")
    with pytest.raises(ValueError, match="incomplete"):
        resolve_checkpoint(str(tmp_path / "checkpoint-15"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(True, tmp_path / "checkpoint-15")
    for nothing in (None, False, ""):  # "" as in --resume_from_checkpoint "": no resume, like --validation_file ""
        assert resolve_checkpoint(nothing, tmp_path) is None


def long_run(encoder, data_dir, output, *extra: str) -> list[str]:
    return [
        sys.executable,
        "run_train.py",
        *flags(
            encoder,
            data_dir,
            output,
            "--max_steps",
            "400",
            "--save_strategy",
            "steps",
            "--save_steps",
            "20",
            "--save_total_limit",
            "3",
            "--eval_strategy",
            "no",
            "--seed",
            "11",
            "--logging_steps",
            "50",
            *extra,
        ),
    ]


def interrupt(command: list[str], output: Path, send: signal.Signals) -> subprocess.CompletedProcess:
    """Start training, wait for its first checkpoint, then send `send` mid-run."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while latest_checkpoint(output) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "training ended before it could be interrupted"
    process.send_signal(send)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory, tiny_encoder_dir):
    """The data, and per set of extra flags the model from an uninterrupted run of the same command (an evaluation
    draws from the random state, so the evaluation strategy changes the model)."""
    data_dir = tmp_path_factory.mktemp("data")
    write_jsonl(data_dir / "train.jsonl", make_rows(36))
    write_jsonl(data_dir / "validation.jsonl", make_rows(12))
    models = {}

    def reference(*extra: str) -> dict[str, torch.Tensor]:
        if extra not in models:
            output = data_dir / f"uninterrupted-{len(models)}"
            subprocess.run(
                long_run(tiny_encoder_dir, data_dir, output, *extra), cwd=ROOT, check=True, capture_output=True
            )
            models[extra] = weights(output)
        return models[extra]

    return data_dir, reference


@pytest.mark.slow
@pytest.mark.parametrize(
    ("send", "extra"),
    [
        (signal.SIGKILL, ()),
        (signal.SIGTERM, ()),
        (signal.SIGINT, ()),
        # the defaults' strategies: a stop mid-epoch must neither evaluate there nor save after such an evaluation
        # (its draw from the random state would be in the checkpoint), as the uninterrupted run does neither
        (signal.SIGTERM, ("--eval_strategy", "epoch", "--save_strategy", "epoch")),
    ],
    ids=["kill", "term", "int", "term-epoch-strategies"],
)
def test_interrupted_training_resumes_to_the_same_model(tmp_path, tiny_encoder_dir, reference_weights, send, extra):
    data_dir, reference = reference_weights
    expected = reference(*extra)
    output = tmp_path / "run"
    command = long_run(tiny_encoder_dir, data_dir, output, *extra)
    stopped = interrupt(command, output, send)
    if send == signal.SIGKILL:
        assert stopped.returncode == -signal.SIGKILL
    else:  # a clean stop: checkpoint saved at the current step, one clear line, exit 130
        assert stopped.returncode == 130, stopped.stderr[-2000:]
        assert "--resume_from_checkpoint latest" in stopped.stderr and "Traceback" not in stopped.stderr
    assert not (output / "model.safetensors").exists()  # no final model from an interrupted run
    step = int(latest_checkpoint(output).name.split("-")[1])
    assert 0 < step < 400
    resumed = subprocess.run(
        [*command, "--resume_from_checkpoint", "latest"], cwd=ROOT, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 400
    final = weights(output)
    assert all(torch.equal(final[name], expected[name]) for name in expected)


@pytest.mark.parametrize(("stop_at", "evaluated"), [(3, [1.0]), (4, [1.0, 2.0])], ids=["mid-epoch", "epoch-end"])
def test_a_stop_evaluates_only_where_the_run_would_have(tiny_model, make_trainer, tmp_path, stop_at, evaluated):
    # 16 rows in batches of 8: 2 steps an epoch. The checkpoint of a stop at step 3 must hold the random state of
    # step 3, not of an evaluation the Trainer would run on leaving the epoch; at step 4 the epoch's own evaluation
    # comes first, as in an uninterrupted run.
    trainer = make_trainer(tiny_model, num_train_epochs=4, eval_strategy="epoch", save_strategy="epoch")

    class Signal(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer's GracefulStop: finish the step, stop

    trainer.add_callback(Signal())
    with pytest.raises(TrainingInterrupted, match=f"at step {stop_at}"):
        trainer.train()
    checkpoint = tmp_path / "out" / f"checkpoint-{stop_at}"
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    assert [entry["epoch"] for entry in history if "eval_loss" in entry] == evaluated


# ---- one clear line for the mistakes users make ----


def test_a_missing_model_directory_is_named_without_asking_the_hub(tmp_path):
    for name in (tmp_path / "nope", "./outputs/none", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="no such model directory"):
            load_multitask_model(name)


def test_a_device_that_is_not_there_is_one_error(tmp_path, tiny_model, tiny_tokenizer):
    from mtl.pipeline import MultiTaskPipeline

    with pytest.raises(ValueError, match=r"device \(--device\) 'gpu0' is not a torch device"):
        MultiTaskPipeline(tiny_model, tiny_tokenizer, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch finds no CUDA GPU here"):
            MultiTaskPipeline(tiny_model, tiny_tokenizer, device="cuda")


def test_an_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path, tiny_encoder_dir, data_dir, capsys):
    (tmp_path / "afile").write_text("")
    assert run(run_train.main, train_flags(tiny_encoder_dir, data_dir, tmp_path / "afile")) == 1
    assert "error: --output_dir" in (err := capsys.readouterr().err) and "is a file, not a folder" in err


def test_an_unreachable_hub_data_set_is_one_error(monkeypatch):
    import datasets

    from mtl.data import load_hub

    def offline(name, config):
        raise ConnectionError("Couldn't reach 'user/x' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="--dataset_name 'user/x': cannot reach the Hub"):
        load_hub("user/x", "train", DEFAULT_TASKS)


def test_overwriting_a_folder_without_a_model_keeps_its_readme(tmp_path):
    from mtl.checkpointing import remove_earlier_run

    (tmp_path / "README.md").write_text("my notes")
    remove_earlier_run(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my notes"
