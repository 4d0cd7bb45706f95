"""Smoke tests of the benchmark scripts on a tiny slice with the tiny model."""

import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mtl import DEFAULT_TASKS
from tests.conftest import make_rows, write_jsonl

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

BENCH_FILES = {
    "test_topic_bbc.jsonl": "category",
    "xdomain_topic_agnews.jsonl": "category",
    "test_sentiment_semeval2017.jsonl": "sentiment",
    "xdomain_sentiment_fpb.jsonl": "sentiment",
    "xdomain_sentiment_s140.jsonl": "sentiment",
}


@pytest.fixture
def bench_dir(tmp_path) -> Path:
    """The benchmark folder's layout: topic-only and sentiment-only rows, one task per test file."""
    rows = make_rows(36)
    train = [{**row, "sentiment": None} if i % 2 else {**row, "category": None} for i, row in enumerate(rows)]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "validation.jsonl", train[:12])
    for name, task in BENCH_FILES.items():
        other = "sentiment" if task == "category" else "category"
        write_jsonl(tmp_path / name, [{**row, other: None} for row in rows[:9]])
    return tmp_path


class FirstClassPipeline:
    """Stands in for a trained model: predicts every task's first label (Tech, Positive) for every text."""

    def __init__(self):
        self.tasks = DEFAULT_TASKS

    def predict_logits(self, texts):
        logits = np.zeros((len(texts), 3), dtype=np.float32)
        logits[:, 0] = 1.0
        return [logits, logits]


def test_each_column_is_scored_on_its_own_file_and_metric(tmp_path, monkeypatch):
    import accuracy

    labels = {  # per file: its task's labels, so that predicting the first class gives a known score per column
        "test_topic_bbc.jsonl": ["Tech"] * 4,
        "xdomain_topic_agnews.jsonl": ["Tech", "Sports", "Sports", "Politics"],
        "test_sentiment_semeval2017.jsonl": ["Positive", "Negative", "Neutral", "Positive"],
        "xdomain_sentiment_fpb.jsonl": ["Positive", "Neutral", "Neutral", "Neutral"],
        "xdomain_sentiment_s140.jsonl": ["Positive", "Negative"],
    }
    for name, values in labels.items():
        write_jsonl(tmp_path / name, [{"text": f"text {i}", BENCH_FILES[name]: v} for i, v in enumerate(values)])
    monkeypatch.setattr(accuracy.MultiTaskPipeline, "from_pretrained", lambda *a, **k: FirstClassPipeline())
    args = accuracy.BenchmarkArguments.__new__(accuracy.BenchmarkArguments)  # no file checks: only these files
    args.data_dir, args.max_eval_samples, args.max_seq_length, args.seed = str(tmp_path), None, 32, 0
    scores, _ = accuracy.score(args, tmp_path)
    assert scores == pytest.approx(
        {
            "BBC acc": 100.0,
            "AG News x-domain acc": 25.0,
            "SemEval-2017 macro-recall": 100 / 3,  # Positive all found, the others never
            "SemEval-2017 acc": 50.0,
            "SemEval-2017 macro-F1": 100 * (2 / 3) / 3,  # Positive: precision 1/2, recall 1
            "FPB macro-recall": 50.0,  # two classes present: Positive 1, Neutral 0
            "S140 macro-recall": 50.0,
        }
    )


def test_max_eval_samples_scores_a_random_sample_not_the_first_rows(tmp_path, monkeypatch):
    import accuracy

    # test files come sorted by class: the first 10 rows would all be Tech, which the stand-in always predicts
    write_jsonl(tmp_path / "test_topic_bbc.jsonl", [{"text": f"t{i}", "category": c} for c in DEFAULT_TASKS["category"]
                                                    for i in range(20)])  # fmt: skip
    monkeypatch.setattr(accuracy.MultiTaskPipeline, "from_pretrained", lambda *a, **k: FirstClassPipeline())
    args = accuracy.BenchmarkArguments.__new__(accuracy.BenchmarkArguments)
    args.data_dir, args.max_eval_samples, args.max_seq_length, args.seed = str(tmp_path), 10, 32, 0
    report = accuracy.report_file(args, FirstClassPipeline(), "test_topic_bbc.jsonl")["category"]
    assert report["num_examples"] == 10 and report["accuracy"] < 1.0
    assert sum(report["support"]) == 10 and report["support"][1] + report["support"][2] > 0


def test_accuracy_table_marks_the_columns_a_system_has_no_task_for():
    import accuracy

    rows = [{"system": "single", "BBC acc": 99.64, "AG News x-domain acc": 92.9, "train_s": 161.4, "eval_s": 3.2}]
    cells = accuracy.markdown(rows).splitlines()[-1].strip("| ").split(" | ")
    assert cells == ["single", "99.6", "92.9", "-", "-", "-", "-", "-", "161", "3"]  # under their own headers


def test_accuracy_benchmark_refuses_a_data_folder_without_its_test_files(bench_dir):
    import accuracy

    (bench_dir / "xdomain_sentiment_s140.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no \['xdomain_sentiment_s140.jsonl'\]"):
        accuracy.main(["--data_dir", str(bench_dir)])


def test_accuracy_benchmark(tmp_path, bench_dir, tiny_encoder_dir, capsys):
    import accuracy

    results = tmp_path / "RESULTS.md"
    rows = accuracy.main(
        [
            "--data_dir",
            str(bench_dir),
            "--model_name_or_path",
            str(tiny_encoder_dir),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_train_samples",
            "8",
            "--num_train_epochs",
            "1",
            "--frozen_epochs",
            "1",
            "--max_seq_length",
            "32",
            "--batch_size",
            "4",
            "--frozen_batch_size",
            "16",
            "--results_file",
            str(results),
        ]
    )
    assert [row["system"] for row in rows] == ["multitask", "single", "frozen"]
    # each system's row is logged as soon as it is scored, so a run cut short keeps what it finished
    captured = capsys.readouterr()
    log = captured.err  # the script's own logging setup writes to stderr
    for row in rows:
        assert f"INFO benchmarks.accuracy: {row['system']}: {{" in log
    assert captured.out.startswith("| system |") and "train metrics" not in captured.out  # stdout: the table only
    # the frozen system embedded its rows into a cache of its own run: a cache of an earlier run would save it time
    assert list((tmp_path / "out" / "frozen" / "datasets-cache" / "mtl_embeddings").glob("*"))
    batch_sizes = {
        name: json.loads((tmp_path / "out" / name / "model" / "trainer_state.json").read_text())["train_batch_size"]
        for name in ("multitask", "single-category", "frozen")
    }
    assert batch_sizes == {"multitask": 4, "single-category": 4, "frozen": 16}
    for row in rows:
        for header, *_ in accuracy.COLUMNS:
            assert 0.0 <= row[header] <= 100.0, (row["system"], header)
        assert row["train_s"] > 0
    # the per-task training subsets really hold at most 8 rows per task
    subset = (tmp_path / "out" / "single-category" / "train.jsonl").read_text().splitlines()
    assert len(subset) == 8 and all('"sentiment"' not in line for line in subset)
    # and a single-task model trains on the multi-task model's rows of its task, not on another sample
    for task in ("category", "sentiment"):
        multitask = [json.loads(line) for line in (tmp_path / "out" / "multitask" / "train.jsonl").open()]
        single = [json.loads(line) for line in (tmp_path / "out" / f"single-{task}" / "train.jsonl").open()]
        assert [r["text"] for r in multitask if r[task] is not None] == [r["text"] for r in single]
    text = results.read_text()
    assert "| multitask |" in text and "python benchmarks/accuracy.py" in text


def test_accuracy_benchmark_on_one_task(tmp_path, bench_dir, tiny_encoder_dir, monkeypatch):
    import accuracy

    argv = ["--data_dir", str(bench_dir), "--model_name_or_path", str(tiny_encoder_dir)]
    argv += ["--output_dir", str(tmp_path / "out"), "--max_train_samples", "8", "--num_train_epochs", "1"]
    argv += ["--max_seq_length", "32", "--batch_size", "4", "--systems", "single", "--tasks", "category"]
    argv += ["--random_truncation_min_length", "8", "--max_train_windows", "2"]
    calls, train = [], accuracy.run_train.main
    monkeypatch.setattr(accuracy.run_train, "main", lambda flags: calls.append(flags) or train(flags))
    (row,) = accuracy.main(argv)
    (flags,) = calls
    assert flags[flags.index("--random_truncation_min_length") + 1] == "8"  # passed on to run_train.py
    assert flags[flags.index("--max_train_windows") + 1] == "2"
    assert 0.0 <= row["BBC acc"] <= 100.0 and 0.0 <= row["AG News x-domain acc"] <= 100.0
    assert "SemEval-2017 macro-recall" not in row  # the sentiment task was left out
    assert not (tmp_path / "out" / "single-sentiment").exists()


def test_accuracy_benchmark_tries_checkpoint_averaging(tmp_path, bench_dir, tiny_encoder_dir):
    import json

    import accuracy

    argv = ["--data_dir", str(bench_dir), "--model_name_or_path", str(tiny_encoder_dir)]
    argv += ["--output_dir", str(tmp_path / "out"), "--max_train_samples", "8", "--num_train_epochs", "3"]
    argv += ["--max_seq_length", "32", "--batch_size", "4", "--systems", "multitask", "--average_checkpoints", "2"]
    (row,) = accuracy.main(argv)
    assert 0.0 <= row["SemEval-2017 macro-recall"] <= 100.0
    model_dir = tmp_path / "out" / "multitask" / "model"
    assert len(list(model_dir.glob("checkpoint-*"))) == 3  # every epoch kept: the last two and the best
    history = json.loads((model_dir / "trainer_state.json").read_text())["log_history"]
    assert any("eval_averaged_mean_macro_recall" in entry for entry in history)  # the mean was scored on validation


def test_accuracy_benchmark_runs_trainings_in_parallel(tmp_path, bench_dir, tiny_encoder_dir):
    import accuracy

    def argv(jobs: int) -> list[str]:
        flags = ["--data_dir", str(bench_dir), "--model_name_or_path", str(tiny_encoder_dir), "--jobs", str(jobs)]
        flags += ["--output_dir", str(tmp_path / f"jobs{jobs}"), "--max_train_samples", "8", "--num_train_epochs", "1"]
        return [*flags, "--max_seq_length", "32", "--batch_size", "4", "--systems", "multitask", "single"]

    sequential = accuracy.main(argv(1))
    parallel = accuracy.main(argv(3))  # the three trainings (multitask, single-category, single-sentiment) at once
    assert [row["system"] for row in parallel] == ["multitask", "single"]

    def scores(rows: list[dict]) -> list[dict]:
        return [{key: value for key, value in row.items() if not key.endswith("_s")} for row in rows]  # no timings

    # the same seeded runs, so the same scores, whether trained in this process or in their own
    assert scores(sequential) == scores(parallel)
    for name in ("multitask", "single-category", "single-sentiment"):
        assert (tmp_path / "jobs3" / name / "model" / "model.safetensors").is_file()
        assert "***** train metrics *****" in (tmp_path / "jobs3" / name / "run_train.log").read_text()
    # each process timed its own run_train.main, as the in-process path does (interpreter start-up left out)
    seconds = {name: float((tmp_path / "jobs3" / name / "run_train.seconds").read_text()) for name in ("multitask",)}
    assert parallel[0]["train_s"] == seconds["multitask"] > 0


def test_accuracy_benchmark_reports_a_failed_parallel_run(tmp_path, bench_dir):
    import accuracy

    argv = ["--data_dir", str(bench_dir), "--model_name_or_path", str(tmp_path / "no-such-model")]
    argv += ["--output_dir", str(tmp_path / "out"), "--systems", "single", "--jobs", "2"]
    # the run's own one-line error, and where its whole log is
    with pytest.raises(ValueError, match=r"single-\w+: run_train\.py exited with 1 \(error: .*no-such-model.*log: "):
        accuracy.main(argv)


def test_accuracy_benchmark_stops_the_other_runs_when_one_fails(tmp_path, bench_dir, tiny_encoder_dir):
    import accuracy

    argv = ["--data_dir", str(bench_dir), "--model_name_or_path", str(tiny_encoder_dir), "--jobs", "3"]
    argv += ["--output_dir", str(tmp_path / "out"), "--max_train_samples", "8", "--max_seq_length", "32"]
    # The single-task runs would train for minutes; the multi-task run, scored after them, fails at once.
    argv += ["--systems", "single", "multitask", "--num_train_epochs", "2000", "--mixing_temperature", "0"]
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"multitask: run_train\.py exited with 1 \(error: --mixing_temperature"):
        accuracy.main(argv)
    assert time.perf_counter() - start < 60
    for name in ("single-category", "single-sentiment"):  # stopped, not left training: no final model
        assert not (tmp_path / "out" / name / "model" / "model.safetensors").exists()


def test_accuracy_benchmark_refuses_an_unknown_task(bench_dir):
    import accuracy

    with pytest.raises(ValueError, match=r"--tasks: unknown \['topic'\]; choose from \['category', 'sentiment'\]"):
        accuracy.BenchmarkArguments(data_dir=str(bench_dir), tasks=["topic"])


def test_accuracy_benchmark_refuses_zero_jobs(bench_dir):
    import accuracy

    with pytest.raises(ValueError, match=r"--jobs must be at least 1 \(runs at once\), got 0"):
        accuracy.BenchmarkArguments(data_dir=str(bench_dir), jobs=0)


def test_speed_is_timed_on_the_whole_second_epoch():
    import speed

    timer = speed.StepTimer()
    timer.times = [0.0, 1.0, 2.0, 3.0, 5.0, 7.0]  # 3 steps per epoch; the first epoch's cost is left out
    assert timer.second_epoch_throughput(rows=30) == pytest.approx(30 / (7.0 - 2.0))
    timer.times.append(8.0)
    with pytest.raises(ValueError, match="two equal epochs"):
        timer.second_epoch_throughput(rows=30)


def test_the_gpus_busy_time_counts_overlapping_kernels_once():
    import speed

    span = collections.namedtuple("span", "start end")
    assert speed.covered_time([span(0, 10), span(5, 12), span(20, 25), span(21, 22)]) == 17
    assert speed.covered_time([]) == 0


def test_speed_table_marks_a_missing_value():
    import speed

    rows = [{"system": "cached", "seconds": 1.5, "category acc": 90.0}]  # an eval file labelling one task only
    assert speed.table(rows, ["system", "seconds", "category acc", "sentiment acc"]).splitlines()[-1] == (
        "| cached | 1.5 | 90.0 | - |"
    )


def test_speed_benchmark(tmp_path, data_dir, tiny_encoder_dir):
    import speed

    results = tmp_path / "RESULTS.md"
    report = speed.main(
        [
            "--model_name_or_path",
            str(tiny_encoder_dir),
            "--data_file",
            str(data_dir / "train.jsonl"),
            "--eval_file",
            str(data_dir / "test.jsonl"),
            "--batch_size",
            "4",
            "--max_seq_length",
            "32",
            "--train_steps",
            "3",
            "--frozen_epochs",
            "2",
            "--results_file",
            str(results),
            "--profile_dir",
            str(tmp_path / "profile"),
            "--profile_steps",
            "2",
        ]
    )
    assert len(report["training"]) == 4 and all(row["samples/s"] > 0 for row in report["training"])
    # our trainer and the dynamically padded Trainer, profiled on the first epoch's last 2 steps
    for name in ("mtl", "trainer-dynamic"):
        summary = (tmp_path / "profile" / f"{name}.txt").read_text()
        assert summary.startswith("2 steps, ") and "GPU busy: no GPU" in summary and "aten::" in summary
    assert sorted(path.name for path in (tmp_path / "profile").iterdir()) == ["mtl.txt", "trainer-dynamic.txt"]
    ours = report["training"][0]["samples/s"]  # the speed-ups are ours over theirs: above 1 when mtl is faster
    assert [row["mtl speed-up"] for row in report["training"]] == [ours / r["samples/s"] for r in report["training"]]
    assert report["training"][0]["mtl speed-up"] == 1.0
    uncached, cached = report["frozen"]
    assert cached["system"].endswith("cache=True") and cached["speed-up"] == uncached["seconds"] / cached["seconds"]
    pipeline, sentence_transformer = report["inference"]
    assert sentence_transformer["mtl speed-up"] == pipeline["samples/s"] / sentence_transformer["samples/s"]
    assert 0 <= cached["category acc"] <= 100
    assert [row["samples/s"] > 0 for row in report["inference"]] == [True, True]
    assert "### Speed" in results.read_text()


def test_speed_benchmark_compiles_both_trainer_systems_and_not_the_plain_loop(
    tmp_path, data_dir, tiny_encoder_dir, monkeypatch
):
    import speed
    import torch

    compiled = []  # what accelerate hands to torch.compile; returned as it is, so that the test need not compile

    def record(model, **kwargs):
        compiled.append(type(model).__name__)
        return model

    monkeypatch.setattr(torch, "compile", record)
    # fmt: off
    report = speed.main([
        "--model_name_or_path", str(tiny_encoder_dir), "--data_file", str(data_dir / "train.jsonl"),
        "--eval_file", str(data_dir / "test.jsonl"), "--batch_size", "4", "--max_seq_length", "32",
        "--train_steps", "2", "--frozen_epochs", "1", "--torch_compile",
    ])
    # fmt: on
    assert compiled == ["MultiTaskModel", "BertForSequenceClassification", "BertForSequenceClassification"]
    assert [row["system"].endswith("(torch.compile)") for row in report["training"]] == [True, True, True, False]


def test_speed_benchmark_times_our_trainer_once_per_variant(tmp_path, data_dir, tiny_encoder_dir, monkeypatch):
    import speed

    trained = []  # each Trainer system's arguments, in order; not timed, to keep the test short

    def record(trainer, *profiling):
        trained.append(trainer.args)
        return 100.0 / len(trained), 0.0

    monkeypatch.setattr(speed, "time_trainer", record)
    # fmt: off
    report = speed.main([
        "--model_name_or_path", str(tiny_encoder_dir), "--data_file", str(data_dir / "train.jsonl"),
        "--eval_file", str(data_dir / "test.jsonl"), "--batch_size", "4", "--max_seq_length", "32",
        "--train_steps", "2", "--frozen_epochs", "1",
        "--mtl_variants", '{"dataloader_drop_last": true}', '{"task_mixing": "round_robin", "seed": 7}',
    ])
    # fmt: on
    ours, *_, drop_last, mixed = report["training"]
    assert len(report["training"]) == 6  # the four systems, then one row per variant
    assert drop_last["system"].endswith('defaults + {"dataloader_drop_last": true}')
    assert mixed["system"].endswith('defaults + {"task_mixing": "round_robin", "seed": 7}')
    default_args, variant_args = trained[0], trained[3:]
    assert not default_args.dataloader_drop_last and default_args.task_mixing == "proportional"
    assert variant_args[0].dataloader_drop_last and variant_args[0].task_mixing == "proportional"
    assert (variant_args[1].task_mixing, variant_args[1].seed, variant_args[1].dataloader_drop_last) == (
        "round_robin", 7, False
    )  # fmt: skip
    # each on top of the benchmark's own settings for our trainer, and timed against its default row
    assert all(a.lr_scheduler_type == default_args.lr_scheduler_type == "constant" for a in variant_args)
    assert mixed["mtl speed-up"] == ours["samples/s"] / mixed["samples/s"]


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"learning_rat": 0.1}', r"\['learning_rat'\] are not MultiTaskTrainingArguments fields"),
        ('{"task_mixing": "bogus"}', "--task_mixing 'bogus' is not one of"),
        ('{"average_checkpoints": 2}', "--average_checkpoints needs checkpoints"),  # the benchmark saves none
        ('{"output_dir": "x"}', "output_dir is the benchmark's own"),
    ],
)
def test_speed_benchmark_refuses_a_bad_variant_before_running(variant, message):
    import speed

    with pytest.raises(ValueError, match=rf"--mtl_variants .*{message}"):
        speed.main(["--mtl_variants", variant, "--data_file", "does-not-matter.jsonl"])


def test_accuracy_benchmark_passes_linear_probing_options(tmp_path, bench_dir, tiny_encoder_dir):
    import accuracy
    import torch

    argv = ["--data_dir", str(bench_dir), "--model_name_or_path", str(tiny_encoder_dir)]
    argv += ["--output_dir", str(tmp_path / "out"), "--max_train_samples", "8", "--num_train_epochs", "2"]
    argv += ["--max_seq_length", "32", "--batch_size", "4", "--systems", "multitask"]
    argv += ["--unfreeze_encoder_after_epochs", "1", "--head_learning_rate", "0.01"]
    (row,) = accuracy.main(argv)
    assert 0.0 <= row["BBC acc"] <= 100.0
    trained = torch.load(tmp_path / "out" / "multitask" / "model" / "training_args.bin", weights_only=False)
    assert trained.unfreeze_encoder_after_epochs == 1
    assert trained.head_learning_rate == pytest.approx(0.01)


def carry_part(root: Path, payload: bytes, index: int) -> None:
    """Put part `index` of a two-part kit (the layout benchmarks/gpu/pack.sh writes) beside the checkout, alone."""
    shutil.rmtree(root / ".gpu", ignore_errors=True)
    half = len(payload) // 2
    folder = root / ".gpu" / f"p{index}"
    folder.mkdir(parents=True)
    (folder / f"part{index}").write_bytes(payload[:half] if index == 0 else payload[half:])
    (folder / "manifest").write_text(f"parts=2\nsha256={hashlib.sha256(payload).hexdigest()}\n")


def test_gpu_kit_staging_starts_over_when_a_part_of_another_kit_comes(tmp_path):
    root = tmp_path / "checkout"
    (root / "benchmarks" / "gpu").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "gpu" / "run.sh", root / "benchmarks" / "gpu" / "run.sh")
    env = {**os.environ, "KIT_DIR": str(tmp_path / "kit"), "OUT": str(tmp_path / "out")}

    def stage() -> str:
        done = subprocess.run(
            ["bash", "benchmarks/gpu/run.sh", "stage"], cwd=root, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    old, new = b"an older kit" * 100, b"a newer kit" * 100
    carry_part(root, old, 0)
    assert "staged 1 of 2 kit parts" in stage()
    carry_part(root, new, 1)  # a part of another kit: the older kit's part must not be combined with it
    output = stage()
    assert "staging starts over" in output and "staged 1 of 2 kit parts" in output
    assert sorted(path.name for path in (tmp_path / "kit" / "parts").iterdir()) == ["manifest", "part1"]
    assert hashlib.sha256(new).hexdigest() in (tmp_path / "kit" / "parts" / "manifest").read_text()


def test_no_training_process_starts_once_the_runs_are_stopped(tmp_path):
    import accuracy

    processes = accuracy.Processes()
    with (tmp_path / "log").open("w") as log:
        sleeper = processes.start([sys.executable, "-c", "import time; time.sleep(60)"], log)
        processes.stop()
        assert sleeper.wait(timeout=30) != 0  # terminated
        with pytest.raises(RuntimeError, match="another run failed"):
            processes.start([sys.executable, "-c", "pass"], log)


def test_layer_probe_of_a_plain_encoder(tmp_path, tiny_encoder_dir, capsys):
    import probe_layers

    rows = make_rows(36)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    sentiment_only = write_jsonl(tmp_path / "sentiment.jsonl", [{**row, "category": None} for row in rows])
    argv = ["--model_name_or_path", str(tiny_encoder_dir), "--task", "category", "--train_file", str(train)]
    argv += ["--inverse_regularization", "1000"]  # nearly unregularised: the rows are few, the features unit-length
    table = probe_layers.main([*argv, "--test_files", str(train)])
    # The embeddings and each of the tiny BERT's two layers; the topic word alone decides the category, so the
    # pooled word embeddings separate the training rows.
    assert [row["layer"] for row in table] == [0, 1, 2]
    assert table[0]["train.jsonl acc"] == pytest.approx(100.0)
    assert all(0.0 <= value <= 100.0 for row in table for key, value in row.items() if key != "layer")
    assert "| embeddings | 100.0 | 100.0 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"sentiment\.jsonl: no row has a 'category' label"):
        probe_layers.main([*argv, "--test_files", str(sentiment_only)])
    with pytest.raises(ValueError, match=r"choose from \['category', 'sentiment'\]"):
        probe_layers.main([*argv[:2], "--task", "topic", *argv[4:], "--test_files", str(train)])


def test_layer_probe_reads_a_saved_models_tasks_and_pooling(tmp_path, tiny_encoder_dir, tiny_tokenizer, monkeypatch):
    import probe_layers

    from mtl import MultiTaskModel

    topics = ["Tech", "Sports", "Politics"]
    model = MultiTaskModel.from_encoder(tiny_encoder_dir, tasks={"topic": topics}, pooling="cls")
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": r["text"], "topic": r["category"]} for r in make_rows(18)])
    poolings = []
    real_pool = probe_layers.pool
    monkeypatch.setattr(probe_layers, "pool", lambda *a: poolings.append(a[2]) or real_pool(*a))
    argv = ["--model_name_or_path", str(tmp_path / "model"), "--task", "topic", "--train_file", str(rows)]
    table = probe_layers.main([*argv, "--test_files", str(rows)])
    assert len(table) == 3 and set(poolings) == {"cls"}
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        probe_layers.main([*argv, "--test_files", str(tmp_path / "missing.jsonl")])
    (tmp_path / "copy").mkdir()
    copy = write_jsonl(tmp_path / "copy" / "rows.jsonl", [])
    with pytest.raises(ValueError, match="two files share a name"):
        probe_layers.main([*argv, "--test_files", str(rows), str(copy)])
    with pytest.raises(ValueError, match="--max_seq_length must be at least 2 tokens, got 1"):
        probe_layers.main([*argv, "--test_files", str(rows), "--max_seq_length", "1"])
    with pytest.raises(ValueError, match="--batch_size must be at least 1 text, got 0"):
        probe_layers.main([*argv, "--test_files", str(rows), "--batch_size", "0"])
    # Without --task: the model's first (here only) task.
    assert probe_layers.main([*argv[:2], *argv[4:], "--test_files", str(rows)]) == table
