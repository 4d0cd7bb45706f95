"""Training and inference throughput against what users would pick instead, side by side in one process.

    python benchmarks/speed.py                                   # our default data, all-MiniLM-L6-v2, batch 32
    python benchmarks/speed.py --data_file ../shared/data/bench/validation.jsonl --results_file benchmarks/RESULTS.md

Same texts, encoder, batch size and hardware for every system:
1. training, steady-state samples/s (each system trains two epochs of the same texts and is timed on the second,
   whole, so that start-up is left out and every batch length is in): our MultiTaskTrainer on both tasks; the stock
   Trainer + AutoModelForSequenceClassification on one task, padded to max length (as run_classification.py does by
   default) and dynamically padded; a plain PyTorch loop in the seed's style (fp32, Adam, padded to max length);
2. the frozen encoder: 10 epochs of head training, with and without caching the pooled embeddings (end to end);
3. inference: MultiTaskPipeline (both tasks) against SentenceTransformer.encode (one embedding, no heads).
Peak memory is the peak resident set (CPU) or allocated memory (GPU) above the level before each system ran.
Each "mtl speed-up" is our default trainer's samples/s over the row's; `--mtl_variants` adds rows of our trainer with
other settings (under 1.0 where a variant is faster than the defaults).
"""

import contextlib
import ctypes
import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import psutil
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import mtl.caching
from mtl import MultiTaskConfig, MultiTaskModel, MultiTaskTrainer, MultiTaskTrainingArguments, load_files
from mtl.args import GPU_DATALOADER_WORKERS
from mtl.cli import ArgumentParser, parse_arguments, run, setup_logging
from mtl.data import tokenize
from mtl.metrics import task_reports
from mtl.modeling import resolve_encoder_name
from mtl.pipeline import MultiTaskPipeline

logger = logging.getLogger("benchmarks.speed")
SINGLE_TASK = "sentiment"  # the task the single-task systems train on


@dataclass
class SpeedArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Encoder (default all-MiniLM-L6-v2)."})
    data_file: str = field(default="data/train.jsonl", metadata={"help": "Labelled texts (both tasks) to train on."})
    eval_file: str = field(default="data/test.jsonl", metadata={"help": "Accuracy check of the speed options."})
    batch_size: int = field(default=32, metadata={"help": "Batch size of every system."})
    max_seq_length: int = field(default=128, metadata={"help": "Truncation (and padding) length."})
    train_steps: int = field(
        default=40,
        metadata={
            "help": "Optimizer steps per epoch: each training system runs two epochs of train_steps x batch_size "
            "texts (fewer if the file has fewer), the first as warm-up, and is timed on the second."
        },
    )
    frozen_epochs: int = field(default=10, metadata={"help": "Epochs of the frozen-encoder comparison."})
    bf16: bool = field(
        default=False,
        metadata={
            "help": "bf16 autocast (GPU) for the training systems but the plain loop, which is fp32 as the seed was; "
            "prediction uses bf16 on GPUs that support it either way (as MultiTaskPipeline does)."
        },
    )
    torch_compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the model of both Trainer systems (ours and the stock Trainer's, as "
            "--torch_compile does in training); compilation falls in the untimed first epoch. The plain loop stays "
            "eager, as the seed was."
        },
    )
    mtl_variants: list[str] = field(
        default_factory=list,
        metadata={
            "help": "More rows for our trainer: each a JSON object of MultiTaskTrainingArguments set on top of its "
            'defaults, e.g. \'{"accelerator_config": {"non_blocking": false}}\' \'{"dataloader_num_workers": 4}\'; '
            "timed like the other systems, so that one run (one GPU call) compares several settings."
        },
    )
    profile_dir: str | None = field(
        default=None,
        metadata={
            "help": "Write a torch.profiler summary of our trainer (defaults) and of the stock Trainer with dynamic "
            "padding to this folder: the last --profile_steps steps of the untimed first epoch, their operators by "
            "self time, the wall time per step and how busy the GPU was."
        },
    )
    profile_steps: int = field(default=10, metadata={"help": "Steps profiled with --profile_dir."})
    results_file: str | None = field(default=None, metadata={"help": "Append the tables to this Markdown file."})

    def __post_init__(self):
        for name in ("batch_size", "train_steps", "frozen_epochs", "profile_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        self.variants = [parse_variant(text, self) for text in self.mtl_variants]


def parse_variant(text: str, args: "SpeedArguments") -> dict:
    """One --mtl_variants value: a JSON object whose keys are MultiTaskTrainingArguments fields, checked with the
    benchmark's own settings of our trainer."""
    try:
        variant = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--mtl_variants {text!r} is not valid JSON: {error}.") from None
    if not isinstance(variant, dict) or not variant:
        raise ValueError(
            f"--mtl_variants {text!r} must be a JSON object of training arguments, e.g. '{{\"seed\": 1}}'."
        )
    known = {f.name for f in dataclasses.fields(MultiTaskTrainingArguments)}
    unknown = sorted(set(variant) - known)
    if unknown:
        raise ValueError(f"--mtl_variants {text!r}: {unknown} are not MultiTaskTrainingArguments fields.")
    if "output_dir" in variant:
        raise ValueError(f"--mtl_variants {text!r}: output_dir is the benchmark's own (a temporary folder).")
    try:  # a bad value, or one that conflicts with the benchmark's settings, is refused before any system runs
        multitask_args(args, tempfile.gettempdir(), variant)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--mtl_variants {text!r}: {error}") from None
    return variant


def release_memory() -> None:
    """Give freed memory back to the OS, so that the next system's peak is not hidden by the last one's leftovers."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory above the starting level while the block runs (RSS sampled every 20 ms on CPU)."""

    def __enter__(self):
        release_memory()
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.process, self.running = psutil.Process(), True
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        if self.cuda:
            self.mib = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self.running = False
            self.thread.join()
            self.mib = (self.peak - self.start) / 2**20


class StepTimer(TrainerCallback):
    """The wall-clock time at the end of every optimizer step."""

    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        self.tick()

    def tick(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def second_epoch_throughput(self, rows: int) -> float:
        """Samples/s of the second of two equal epochs: from the end of the first one's last step to the end of the
        second one's, so start-up, first-batch and warm-up costs stay in the first epoch."""
        if len(self.times) % 2:
            raise ValueError(f"expected two equal epochs of steps, got {len(self.times)} steps in all")
        steps = len(self.times) // 2
        return rows / (self.times[-1] - self.times[steps - 1])


class StepProfiler(TrainerCallback):
    """torch.profiler over the last `steps` steps of the first of two epochs (untimed: its cost stays out of the
    timed epoch), written to `path`: wall time per step, the GPU's busy share and the operators by self time."""

    def __init__(self, path: Path, steps: int):
        self.path, self.steps, self.profiler, self.start = path, steps, None, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == max(0, state.max_steps // 2 - self.steps):
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is None or state.global_step != state.max_steps // 2:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.start
        self.profiler.stop()
        steps = min(self.steps, state.max_steps // 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(profile_summary(self.profiler, wall, steps), encoding="utf-8")
        self.profiler = None


def profile_summary(profiler: torch.profiler.profile, wall: float, steps: int) -> str:
    kernels = [e.time_range for e in profiler.events() if e.device_type == DeviceType.CUDA]
    busy = f"{covered_time(kernels) / 1e6 / wall:.0%} of the wall time" if kernels else "no GPU"
    events = profiler.key_averages()
    sorts = (["self_device_time_total"] if kernels else []) + ["self_cpu_time_total"]  # the GPU's work, the host's
    tables = "\n".join(f"By {sort}:\n{events.table(sort_by=sort, row_limit=40)}\n" for sort in sorts)
    return f"{steps} steps, {wall / steps * 1000:.2f} ms a step (profiled); GPU busy: {busy}\n\n{tables}"


def covered_time(spans) -> float:
    """The length of the union of intervals (objects with .start and .end): overlapping kernels count once."""
    covered, end = 0.0, -math.inf
    for span in sorted(spans, key=lambda span: span.start):
        covered += max(0.0, span.end - max(span.start, end))
        end = max(end, span.end)
    return covered


def step_profiler(args: "SpeedArguments", name: str) -> StepProfiler | None:
    """With --profile_dir, the profiler of one system, writing `<profile_dir>/<name>.txt`."""
    return StepProfiler(Path(args.profile_dir) / f"{name}.txt", args.profile_steps) if args.profile_dir else None


def encoder_path(args: SpeedArguments) -> str:
    return resolve_encoder_name(args.model_name_or_path)


def loader_workers() -> int:
    """Every system loads its batches the same way: with mtl's GPU default of workers, none on a CPU."""
    return GPU_DATALOADER_WORKERS if torch.cuda.is_available() else 0


def hf_args(args: SpeedArguments, output_dir: str, cls=TrainingArguments, **overrides) -> TrainingArguments:
    settings = {
        "output_dir": output_dir,
        "per_device_train_batch_size": args.batch_size,
        "num_train_epochs": 2,
        "dataloader_num_workers": loader_workers(),
        "dataloader_pin_memory": torch.cuda.is_available(),  # (pinning helps only copies to a GPU, and warns without)
        "learning_rate": 1e-4,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "logging_strategy": "no",
        "bf16": args.bf16,
        "seed": 0,
        **overrides,
    }
    return cls(**settings)


def time_trainer(trainer: Trainer, profiler: StepProfiler | None = None) -> tuple[float, float]:
    if profiler is not None:  # (first: its end of profiling falls before the timer's first tick)
        trainer.add_callback(profiler)
    timer = StepTimer()
    trainer.add_callback(timer)
    with PeakMemory() as memory:
        trainer.train()
    return timer.second_epoch_throughput(len(trainer.train_dataset)), memory.mib


def multitask_args(args, work: str, variant: dict | None = None) -> MultiTaskTrainingArguments:
    """Our trainer's arguments in the benchmark: its shared settings, a constant rate, then the variant's."""
    settings = {"lr_scheduler_type": "constant", "torch_compile": args.torch_compile, **(variant or {})}
    return hf_args(args, work, MultiTaskTrainingArguments, **settings)


def multitask_training(args, data, tokenizer, work, variant: dict | None = None) -> tuple[float, float]:
    model = MultiTaskModel.from_encoder(encoder_path(args))
    training_args = multitask_args(args, work, variant)
    trainer = MultiTaskTrainer(
        model=model, args=training_args, train_dataset=data["multitask"], processing_class=tokenizer
    )
    return time_trainer(trainer, None if variant else step_profiler(args, "mtl"))


def single_task_training(args, data, tokenizer, work, pad_to_max: bool) -> tuple[float, float]:
    model = AutoModelForSequenceClassification.from_pretrained(encoder_path(args), num_labels=data["num_labels"])
    dataset = data["single_padded" if pad_to_max else "single"]
    trainer = Trainer(
        model=model,
        args=hf_args(args, work, torch_compile=args.torch_compile),
        train_dataset=dataset,
        processing_class=tokenizer,
        # As run_classification.py pads in mixed precision, and as mtl's collator does: multiples of 8 tokens.
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if args.bf16 else None),
    )
    return time_trainer(trainer, None if pad_to_max else step_profiler(args, "trainer-dynamic"))


def plain_loop_training(args, data, tokenizer, work) -> tuple[float, float]:
    """The seed's style: a fixed-length padded tensor data set, fp32, Adam 1e-4, a hand-written loop."""
    model = AutoModelForSequenceClassification.from_pretrained(encoder_path(args), num_labels=data["num_labels"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    columns = data["single_padded"].with_format("torch")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(
        columns, batch_size=args.batch_size, shuffle=True, num_workers=loader_workers(), pin_memory=device == "cuda"
    )
    timer = StepTimer()
    with PeakMemory() as memory:
        for _ in range(2):  # two epochs, timed on the second, as the Trainer systems
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                timer.tick()
    return timer.second_epoch_throughput(len(columns)), memory.mib


def frozen_training(args, data, tokenizer, work, cache: bool) -> tuple[float, float, MultiTaskModel]:
    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder(encoder_path(args))
    training_args = hf_args(
        args,
        work,
        MultiTaskTrainingArguments,
        num_train_epochs=args.frozen_epochs,
        freeze="encoder",
        cache_frozen_embeddings=cache,
        learning_rate=3e-3,
    )
    trainer = MultiTaskTrainer(model=model, args=training_args, train_dataset=data["all"], processing_class=tokenizer)
    # A fresh cache folder: the cached run pays for computing the embeddings.
    with (
        tempfile.TemporaryDirectory() as cache_dir,
        mock.patch.object(mtl.caching, "default_cache_dir", lambda: Path(cache_dir)),
        PeakMemory() as memory,
    ):
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return seconds, memory.mib, model


def inference(args, texts: list[str]) -> list[dict]:
    from sentence_transformers import SentenceTransformer

    rows = []
    clf = MultiTaskPipeline(
        MultiTaskModel.from_encoder(encoder_path(args)),
        AutoTokenizer.from_pretrained(encoder_path(args)),
        batch_size=args.batch_size,
        max_length=args.max_seq_length,
    )
    encoder = SentenceTransformer(encoder_path(args), device=str(clf.device))
    encoder.max_seq_length = args.max_seq_length

    def encode() -> object:
        # In the pipeline's precision: it uses bf16 autocast on GPUs that support it.
        with torch.autocast(clf.device.type, dtype=torch.bfloat16, enabled=clf.bf16):
            return encoder.encode(texts, batch_size=args.batch_size)

    precision = " (bf16 autocast)" if clf.bf16 else ""
    systems: list[tuple[str, Callable]] = [
        (f"MultiTaskPipeline (both tasks){precision}", lambda: clf.predict_logits(texts)),
        (f"SentenceTransformer.encode (embedding only){precision}", encode),
    ]
    for name, call in systems:
        call()  # warm-up
        with PeakMemory() as memory:
            start = time.perf_counter()
            call()
            seconds = time.perf_counter() - start
        rows.append({"system": name, "samples/s": len(texts) / seconds, "peak MiB": memory.mib})
    return rows


def accuracy(model: MultiTaskModel, tokenizer, args) -> dict[str, float]:
    dataset = load_files(args.eval_file, model.config.tasks)
    clf = MultiTaskPipeline(model, tokenizer, batch_size=128, max_length=args.max_seq_length)
    logits = clf.predict_logits(dataset["text"][:])
    reports = task_reports(model.config.tasks, logits, torch.tensor(dataset["labels"][:]).numpy())
    return {task: 100 * report["accuracy"] for task, report in reports.items()}


def prepare(args: SpeedArguments, tokenizer) -> dict:
    tasks = MultiTaskConfig().tasks
    everything = load_files(args.data_file, tasks)
    tokens = tokenize(everything, tokenizer, args.max_seq_length)
    # An epoch of the training comparison: the same random texts for every system, a real length mix whatever the
    # file's order. The frozen-encoder comparison and inference use the whole file.
    rows = np.random.default_rng(0).permutation(len(everything))[: args.train_steps * args.batch_size]
    raw, multitask = everything.select(rows), tokens.select(rows)
    column = list(tasks).index(SINGLE_TASK)
    single = multitask.map(lambda row: {"labels": row["labels"][column]})  # one task, one integer label
    padded = raw.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=args.max_seq_length, padding="max_length"),
        batched=True,
        remove_columns=["text"],
    )
    padded = padded.map(lambda row: {"labels": row["labels"][column]})
    return {
        "texts": everything["text"][:],
        "all": tokens,
        "multitask": multitask,
        "single": single,
        "single_padded": padded,
        "num_labels": len(tasks[SINGLE_TASK]),
    }


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        # "-" where a row has no value, e.g. the accuracy of a task the --eval_file does not label
        cells = [f"{row[c]:,.1f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hardware() -> str:
    if torch.cuda.is_available():
        return f"1x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    return f"CPU ({os.cpu_count()} cores, {platform.machine()}), torch {torch.__version__}, {threads} threads"


def main(argv=None) -> dict:
    (args,) = parse_arguments(ArgumentParser(SpeedArguments), argv)
    setup_logging(logging.WARNING)
    tokenizer = AutoTokenizer.from_pretrained(encoder_path(args))
    data = prepare(args, tokenizer)
    work = tempfile.mkdtemp(prefix="mtl-speed-")

    compiled = " (torch.compile)" if args.torch_compile else ""
    training = []
    for name, call in [
        (
            f"mtl MultiTaskTrainer, 2 tasks, defaults (dynamic padding, length-grouped batches){compiled}",
            lambda: multitask_training(args, data, tokenizer, work),
        ),
        (
            f"Trainer + AutoModelForSequenceClassification, 1 task, dynamic padding{compiled}",
            lambda: single_task_training(args, data, tokenizer, work, pad_to_max=False),
        ),
        (
            f"Trainer + AutoModelForSequenceClassification, 1 task, padded to max length{compiled}",
            lambda: single_task_training(args, data, tokenizer, work, pad_to_max=True),
        ),
        (
            "plain PyTorch loop, 1 task, padded to max length, fp32 (seed style)",
            lambda: plain_loop_training(args, data, tokenizer, work),
        ),
    ] + [
        (
            f"mtl MultiTaskTrainer, 2 tasks, defaults{compiled} + {json.dumps(variant)}",
            lambda variant=variant: multitask_training(args, data, tokenizer, work, variant),
        )
        for variant in args.variants
    ]:
        samples, mib = call()
        training.append({"system": name, "samples/s": samples, "peak MiB": mib})
        logger.warning("%s: %.1f samples/s", name, samples)
    ours = training[0]["samples/s"]
    for row in training:
        row["mtl speed-up"] = ours / row["samples/s"]

    frozen = []
    for cache in (False, True):
        seconds, mib, model = frozen_training(args, data, tokenizer, work, cache)
        frozen.append(
            {
                "system": f"freeze=encoder, {args.frozen_epochs} epochs, cache={cache}",
                "seconds": seconds,
                "peak MiB": mib,
                **{f"{t} acc": a for t, a in accuracy(model, tokenizer, args).items()},
            }
        )
    frozen[1]["speed-up"] = frozen[0]["seconds"] / frozen[1]["seconds"]
    frozen[0]["speed-up"] = 1.0

    predicting = inference(args, data["texts"])
    predicting[0]["mtl speed-up"] = 1.0
    predicting[1]["mtl speed-up"] = predicting[0]["samples/s"] / predicting[1]["samples/s"]

    report = "\n\n".join(
        [
            table(training, ["system", "samples/s", "mtl speed-up", "peak MiB"]),
            table(
                frozen, ["system", "seconds", "speed-up", "peak MiB", *(f"{t} acc" for t in MultiTaskConfig().tasks)]
            ),
            table(predicting, ["system", "samples/s", "mtl speed-up", "peak MiB"]),
        ]
    )
    sys.stdout.write(report + "\n")
    if args.results_file:
        command = "python benchmarks/speed.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        with open(args.results_file, "a", encoding="utf-8") as handle:
            handle.write(f"\n### Speed, {datetime.date.today()}, {hardware()}\n\n`{command}`\n\n{report}\n")
    return {"training": training, "frozen": frozen, "inference": predicting, "config": json.dumps(vars(args))}


if __name__ == "__main__":
    sys.exit(run(main))
