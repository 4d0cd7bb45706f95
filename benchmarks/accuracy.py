"""Accuracy on real public data: one multi-task model against one single-task model per task (same encoder, same
number of epochs over its training file) and against the frozen encoder with trained heads, side by side.

    python benchmarks/accuracy.py --data_dir ../shared/data/bench       # full run (one H200: about 7 min, estimated)
    python benchmarks/accuracy.py --data_dir ../shared/data/bench --max_train_samples 400 --max_eval_samples 500
    python benchmarks/accuracy.py --data_dir ../shared/data/bench --jobs 4   # on a GPU: the four trainings at once

Trains on train.jsonl, selects the best epoch on validation.jsonl (mean macro-recall of the tasks), and reports on
the held-out test and out-of-domain files (see ../shared/data/README.md). Each system is a run_train.py run (two for
"single": one per task), timed over the whole run_train.py run (data loading, tokenization, per-epoch and final
validation, saving, and for the frozen system the embedding of every row, included; interpreter start-up and imports
not); the table goes to stdout (logs to stderr) and, with --results_file, is appended to a Markdown file with the
command, hardware and date.
"""

import contextlib
import datetime
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import datasets
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import run_train
from mtl import MultiTaskConfig, load_files
from mtl.cli import ArgumentParser, parse_arguments, run, setup_logging
from mtl.data import label_matrix
from mtl.metrics import task_reports
from mtl.pipeline import MultiTaskPipeline

logger = logging.getLogger("benchmarks.accuracy")

ROOT = Path(__file__).resolve().parents[1]

# Columns of the table: (header, test file, task, metric).
COLUMNS = [
    ("BBC acc", "test_topic_bbc.jsonl", "category", "accuracy"),
    ("AG News x-domain acc", "xdomain_topic_agnews.jsonl", "category", "accuracy"),
    ("SemEval-2017 macro-recall", "test_sentiment_semeval2017.jsonl", "sentiment", "macro_recall"),
    ("SemEval-2017 acc", "test_sentiment_semeval2017.jsonl", "sentiment", "accuracy"),
    ("SemEval-2017 macro-F1", "test_sentiment_semeval2017.jsonl", "sentiment", "macro_f1"),
    ("FPB macro-recall", "xdomain_sentiment_fpb.jsonl", "sentiment", "macro_recall"),
    ("S140 macro-recall", "xdomain_sentiment_s140.jsonl", "sentiment", "macro_recall"),
]
SYSTEMS = ("multitask", "single", "frozen")
CHILD = "--run-train-child"  # first argument of a --jobs run's training process (not a user option)


@dataclass
class BenchmarkArguments:
    data_dir: str = field(default="../shared/data/bench", metadata={"help": "Folder with the benchmark files."})
    output_dir: str = field(default="outputs/bench-accuracy", metadata={"help": "Models and scores go here."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Encoder (default all-MiniLM-L6-v2)."})
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS), metadata={"help": f"Any of {SYSTEMS}."})
    tasks: list[str] | None = field(
        default=None, metadata={"help": "Only these tasks, e.g. 'category' (default: every task of the config)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "At most N training rows per task."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "At most N rows per test file, and per task of validation.jsonl."}
    )
    # The defaults of the fine-tuned systems are the best recipe found on validation.jsonl (RESULTS.md, runs 2-12).
    num_train_epochs: float = field(default=4.0, metadata={"help": "Epochs of every fine-tuned system."})
    frozen_epochs: float = field(default=10.0, metadata={"help": "Epochs of the frozen-encoder system."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (fine-tuned systems)."})
    frozen_learning_rate: float = field(default=3e-3, metadata={"help": "Learning rate of the heads-only system."})
    frozen_batch_size: int = field(
        default=256,
        metadata={
            "help": "Batch size of the heads-only system: it trains on cached embeddings, where each step costs the "
            "Trainer's fixed overhead and little else (on an H200, 15,000 steps at 32 took 100 s)."
        },
    )
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Scheduler of every system."})
    layerwise_lr_decay: float = field(
        default=0.7, metadata={"help": "Layer-wise learning-rate decay of the fine-tuned systems (1.0: off)."}
    )
    head_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the heads (fine-tuned systems; default: --learning_rate)."}
    )
    unfreeze_encoder_after_epochs: int | None = field(
        default=None,
        metadata={"help": "Fine-tuned systems train their heads alone on the frozen encoder for N epochs first."},
    )
    warmup_steps: float = field(default=0.06, metadata={"help": "Warm-up, as a fraction of the steps if < 1."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per text."})
    random_truncation_min_length: int | None = field(
        default=None,
        metadata={"help": "Fine-tuned systems: cut texts longer than --max_seq_length at a random length >= N."},
    )
    max_train_windows: int = field(
        default=1,
        metadata={"help": "Fine-tuned systems: train on up to N windows of --max_seq_length tokens of a long text."},
    )
    task_mixing: str = field(default="temperature", metadata={"help": "Task mixing of the multi-task model."})
    mixing_temperature: float = field(default=2.0, metadata={"help": "T of the temperature mixing."})
    label_smoothing_factor: float = field(default=0.1, metadata={"help": "Label smoothing of every system."})
    class_weights: str = field(
        default="balanced",
        metadata={"help": "'balanced' weighs each class by its inverse training frequency (every system); 'none'."},
    )
    metric_for_best_model: str = field(
        default="mean_macro_recall",
        metadata={"help": "Validation metric that picks each run's best epoch (the tasks' mean macro-recall)."},
    )
    average_checkpoints: int | None = field(
        default=None,
        metadata={
            "help": "Fine-tuned systems: try the mean of the last N epochs' weights, kept if better on validation."
        },
    )
    seed: int = field(default=0, metadata={"help": "Random seed of every run."})
    jobs: int = field(
        default=1,
        metadata={
            "help": "Training runs at once. 1: one after another, in this process. N > 1: up to N run_train.py "
            "processes at once (each logs to its folder's run_train.log), for a GPU that one run at batch 32 leaves "
            "mostly idle. Each run's time then includes the others' load."
        },
    )
    results_file: str | None = field(default=None, metadata={"help": "Append the table to this Markdown file."})

    def __post_init__(self):
        unknown = set(self.systems) - set(SYSTEMS)
        if unknown:
            raise ValueError(f"--systems: unknown {sorted(unknown)}; choose from {list(SYSTEMS)}.")
        known = list(MultiTaskConfig().tasks)
        if self.tasks and set(self.tasks) - set(known):
            raise ValueError(f"--tasks: unknown {sorted(set(self.tasks) - set(known))}; choose from {known}.")
        if self.jobs < 1:
            raise ValueError(f"--jobs must be at least 1 (runs at once), got {self.jobs}.")
        # Every file up front: a missing test file must not surface only after the training it would score.
        needed = ["train.jsonl", "validation.jsonl", *dict.fromkeys(file for _, file, _, _ in COLUMNS)]
        missing = [name for name in needed if not Path(self.data_dir, name).is_file()]
        if missing:
            raise FileNotFoundError(f"--data_dir {self.data_dir} has no {missing}; see ../shared/data/README.md.")


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_subset(rows: list[dict], tasks: list[str], limit: int | None, path: Path, seed: int) -> Path:
    """Rows labelled for any of `tasks` (other tasks' labels removed), at most `limit` per task, in file order. A
    task's sample depends on the seed and the task alone, so a single-task run gets the multi-task run's rows."""
    keep = []
    for task in tasks:
        labelled = [i for i, row in enumerate(rows) if row.get(task) is not None]
        if limit and len(labelled) > limit:
            rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
            labelled = sorted(rng.choice(labelled, size=limit, replace=False).tolist())
        keep.extend(labelled)
    with path.open("w", encoding="utf-8") as handle:
        for i in sorted(set(keep)):
            handle.write(json.dumps({"text": rows[i]["text"], **{t: rows[i].get(t) for t in tasks}}) + "\n")
    return path


def prepare(args: BenchmarkArguments, name: str, tasks: dict, extra: list[str]) -> tuple[Path, list[str]]:
    """Write one run's training and validation subsets; returns its folder and its run_train.py arguments."""
    work = Path(args.output_dir, name)
    work.mkdir(parents=True, exist_ok=True)
    source = Path(args.data_dir)
    train_file = write_subset(
        read_rows(source / "train.jsonl"), list(tasks), args.max_train_samples, work / "train.jsonl", args.seed
    )
    validation_file = write_subset(
        read_rows(source / "validation.jsonl"),
        list(tasks),
        args.max_eval_samples,
        work / "validation.jsonl",
        args.seed,
    )
    argv = [
        "--train_file",
        str(train_file),
        "--validation_file",
        str(validation_file),
        "--test_file",
        "",
        "--tasks",
        json.dumps(tasks),
        "--output_dir",
        str(work / "model"),
        "--overwrite_output_dir",
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--max_seq_length",
        str(args.max_seq_length),
        "--lr_scheduler_type",
        args.lr_scheduler_type,
        "--warmup_steps",
        str(args.warmup_steps),
        "--label_smoothing_factor",
        str(args.label_smoothing_factor),
        "--class_weights",
        args.class_weights,
        "--seed",
        str(args.seed),
        "--save_strategy",
        "epoch",
        "--save_total_limit",
        str(args.average_checkpoints + 1 if args.average_checkpoints else 1),
        "--load_best_model_at_end",
        "--metric_for_best_model",
        args.metric_for_best_model,
        "--logging_steps",
        "50",
        "--report_to",
        "none",
        *extra,  # last: a system's own values win (argparse keeps the last of a repeated flag)
    ]
    if args.model_name_or_path:
        argv += ["--model_name_or_path", args.model_name_or_path]
    # No --bf16 or loader workers here: MultiTaskTrainingArguments turns both on when a GPU is present.
    return work, argv


class Processes:
    """The training processes of a --jobs run, stopped together: once `stop()` ran, none is started any more (a
    thread about to start one when another run failed would otherwise escape it)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._started: list[subprocess.Popen] = []
        self._stopped = False

    def start(self, command: list[str], log, env: dict[str, str] | None = None) -> subprocess.Popen:
        with self._lock:
            if self._stopped:
                raise RuntimeError("not started: another run failed")
            process = subprocess.Popen(command, stdout=log, stderr=log, env={**os.environ, **(env or {})})
            self._started.append(process)
            return process

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for process in self._started:
                process.terminate()


def execute(args: BenchmarkArguments, work: Path, argv: list[str], processes: Processes | None = None) -> float:
    """Train one run: in this process, or (with --jobs > 1) as its own process, started through `processes` so that
    it can be stopped if another run fails. Returns the time `run_train.main` took."""
    logger.info("%s: python run_train.py %s", work.name, shlex.join(argv))
    # Each run embeds its rows afresh (the frozen system): embeddings cached by an earlier benchmark run would leave
    # the encoder's cost out of its time.
    cache = work / "datasets-cache"
    shutil.rmtree(cache, ignore_errors=True)
    if args.jobs == 1:
        with mock.patch.object(datasets.config, "HF_DATASETS_CACHE", str(cache)):
            seconds = timed_run_train(argv)
    else:
        log, timing = work / "run_train.log", work / "run_train.seconds"
        command = [sys.executable, __file__, CHILD, str(timing), *argv]
        with log.open("w", encoding="utf-8") as handle:
            process = (processes or Processes()).start(command, handle, {"HF_DATASETS_CACHE": str(cache)})
            code = process.wait()
        if code:
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
            raise ValueError(f"{work.name}: run_train.py exited with {code} ({' '.join(tail)}); full log: {log}")
        seconds = float(timing.read_text())
    logger.info("%s: trained in %.0f s", work.name, seconds)
    return seconds


def timed_run_train(argv: list[str]) -> float:
    """Seconds of one `run_train.main(argv)`, its printed metrics sent to stderr: stdout carries only the table."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        run_train.main(argv)
    return time.perf_counter() - start


def child(timing_file: str, argv: list[str]) -> int:
    """One training of a --jobs run, in its own process: timed as in process, the time written to `timing_file`."""

    def train(argv: list[str]) -> None:
        Path(timing_file).write_text(f"{timed_run_train(argv)}\n")

    return run(train, argv)


def score(args: BenchmarkArguments, model_dir: Path) -> tuple[dict[str, float], float]:
    """The table's columns this model can fill (its tasks), and the evaluation wall time."""
    start = time.perf_counter()
    pipeline = MultiTaskPipeline.from_pretrained(model_dir, batch_size=256, max_length=args.max_seq_length)
    reports = {}  # per test file, computed once for all of its columns
    scores = {}
    for header, file_name, task, metric in COLUMNS:
        if task not in pipeline.tasks:
            continue
        if file_name not in reports:
            reports[file_name] = report_file(args, pipeline, file_name)
        if task in reports[file_name]:
            scores[header] = 100 * reports[file_name][task][metric]
    return scores, time.perf_counter() - start


def report_file(args: BenchmarkArguments, pipeline: MultiTaskPipeline, file_name: str) -> dict[str, dict]:
    """Every task's metrics on one test file; with --max_eval_samples, on a seeded random sample of its rows (the
    files are ordered, e.g. by class, so their first rows would not be representative)."""
    dataset = load_files(Path(args.data_dir, file_name), pipeline.tasks)
    if args.max_eval_samples and len(dataset) > args.max_eval_samples:
        dataset = dataset.shuffle(seed=args.seed).select(range(args.max_eval_samples))
    logits = pipeline.predict_logits(dataset["text"][:])
    return task_reports(pipeline.tasks, logits, label_matrix(dataset))


def plan_system(args: BenchmarkArguments, system: str, tasks: dict) -> list[tuple[Path, list[str]]]:
    """The run(s) of one system: (folder, run_train.py arguments) each."""
    common = [
        "--num_train_epochs",
        str(args.num_train_epochs),
        "--learning_rate",
        str(args.learning_rate),
        "--layerwise_lr_decay",
        str(args.layerwise_lr_decay),
    ]
    if args.head_learning_rate:
        common += ["--head_learning_rate", str(args.head_learning_rate)]
    if args.unfreeze_encoder_after_epochs:
        common += ["--unfreeze_encoder_after_epochs", str(args.unfreeze_encoder_after_epochs)]
    if args.average_checkpoints:
        common += ["--average_checkpoints", str(args.average_checkpoints)]
    if args.random_truncation_min_length:
        common += ["--random_truncation_min_length", str(args.random_truncation_min_length)]
    if args.max_train_windows > 1:
        common += ["--max_train_windows", str(args.max_train_windows)]
    if system == "multitask":
        extra = [*common, "--task_mixing", args.task_mixing, "--mixing_temperature", str(args.mixing_temperature)]
        return [prepare(args, system, tasks, extra)]
    if system == "frozen":
        extra = [
            "--freeze",
            "encoder",
            "--num_train_epochs",
            str(args.frozen_epochs),
            "--learning_rate",
            str(args.frozen_learning_rate),
            "--per_device_train_batch_size",
            str(args.frozen_batch_size),
            "--task_mixing",
            args.task_mixing,
            "--mixing_temperature",
            str(args.mixing_temperature),
        ]
        return [prepare(args, system, tasks, extra)]
    # one model per task, each with the multi-task model's budget
    return [prepare(args, f"single-{task}", {task: labels}, common) for task, labels in tasks.items()]


def score_system(args: BenchmarkArguments, system: str, runs: list[Path], train_seconds: list[float]) -> dict:
    """One row of the table: every run's scores (each run fills its tasks' columns) and the summed times."""
    row = {"system": system, "train_s": sum(train_seconds), "eval_s": 0.0}
    for work in runs:
        scores, seconds = score(args, work / "model")
        row.update(scores)
        row["eval_s"] += seconds
    # Logged as soon as known, so that a run cut short (e.g. by a time limit) still leaves each finished system's row.
    logger.info(
        "%s: %s",
        system,
        json.dumps({key: round(value, 2) if isinstance(value, float) else value for key, value in row.items()}),
    )
    return row


def run_systems(args: BenchmarkArguments, tasks: dict) -> list[dict]:
    """Train and score every system. With --jobs > 1 the trainings overlap, and each system is scored as soon as its
    own runs are done (in the order of --systems)."""
    plans = {system: plan_system(args, system, tasks) for system in args.systems}
    if args.jobs == 1:
        return [
            score_system(args, system, [work for work, _ in runs], [execute(args, *run) for run in runs])
            for system, runs in plans.items()
        ]
    processes = Processes()
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    try:
        futures = {
            system: [pool.submit(execute, args, work, argv, processes) for work, argv in runs]
            for system, runs in plans.items()
        }
        pending = {future for system_futures in futures.values() for future in system_futures}
        rows = []
        for system, runs in plans.items():
            while not all(future.done() for future in futures[system]):
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()  # a failed run stops everything now, not when its system's turn comes
            seconds = [future.result() for future in futures[system]]
            rows.append(score_system(args, system, [work for work, _ in runs], seconds))
        return rows
    except BaseException:
        # One run failed (or Ctrl-C): do not leave the others training for minutes behind an error message.
        pool.shutdown(wait=False, cancel_futures=True)
        processes.stop()
        raise
    finally:
        pool.shutdown()


def markdown(rows: list[dict]) -> str:
    headers = ["system", *(c[0] for c in COLUMNS), "train time (s)", "eval time (s)"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [row["system"], *(f"{row[c[0]]:.1f}" if c[0] in row else "-" for c in COLUMNS)]
        lines.append("| " + " | ".join([*cells, f"{row['train_s']:.0f}", f"{row['eval_s']:.0f}"]) + " |")
    return "\n".join(lines)


def hardware() -> str:
    if torch.cuda.is_available():
        return f"1x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), torch {torch.__version__}"


def main(argv=None) -> list[dict]:
    (args,) = parse_arguments(ArgumentParser(BenchmarkArguments), argv)
    setup_logging()
    tasks = {task: labels for task, labels in MultiTaskConfig().tasks.items() if not args.tasks or task in args.tasks}
    start = time.perf_counter()
    rows = run_systems(args, tasks)
    total = time.perf_counter() - start
    table = markdown(rows)
    logger.info("All systems trained and scored in %.0f s (--jobs %d)", total, args.jobs)
    sys.stdout.write(table + "\n")
    if args.results_file:
        command = "python benchmarks/accuracy.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        with open(args.results_file, "a", encoding="utf-8") as handle:
            handle.write(f"\n### Accuracy, {datetime.date.today()}, {hardware()}\n\n`{command}`\n\n{table}\n")
            handle.write(f"\nWall time of the whole run: {total:.0f} s (--jobs {args.jobs}).\n")
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == [CHILD]:
        sys.exit(child(sys.argv[2], sys.argv[3:]))
    sys.exit(run(main))
