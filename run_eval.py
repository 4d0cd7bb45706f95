"""Evaluate a trained mtl model on a labelled file: per-task metrics, per-class scores, confusion matrices.

python run_eval.py                                   # outputs/mtl-minilm on data/test.jsonl
python run_eval.py --model_name_or_path DIR_OR_HUB_ID --test_file FILE --predictions_file preds.jsonl
"""

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mtl.args import DEFAULT_OUTPUT_DIR, InferenceArguments, check_max_length
from mtl.cli import ArgumentParser, parse_arguments, run, setup_logging
from mtl.data import label_matrix, load_files
from mtl.metrics import flat_metrics, format_report, task_reports
from mtl.pipeline import MultiTaskPipeline
from mtl.predict import check_predictions_file, write_predictions

logger = logging.getLogger("run_eval")


@dataclass
class EvalArguments(InferenceArguments):
    model_name_or_path: str = field(
        default=DEFAULT_OUTPUT_DIR, metadata={"help": "A directory written by run_train.py, or a Hub model id."}
    )
    test_file: str = field(
        default="data/test.jsonl",
        metadata={"help": "Labelled CSV/TSV/JSON/JSON Lines file; tasks it does not label are skipped."},
    )
    text_column: str = field(default="text", metadata={"help": "Name of the column holding the text."})
    output_dir: str = field(
        default="outputs/eval", metadata={"help": "Where eval_results.json and eval_report.json are written."}
    )
    predictions_file: str | None = field(
        default=None, metadata={"help": "Also write one JSON line per example: each task's label and probability."}
    )
    max_seq_length: int | None = field(
        default=None,
        metadata={"help": "Truncate texts to this many tokens (default: the length the model was trained at)."},
    )

    def __post_init__(self):
        super().__post_init__()
        check_max_length(self.max_seq_length, "--max_seq_length")
        self.predictions_file = self.predictions_file or None  # "" (a config file's way to say none)
        check_predictions_file(self.predictions_file, "--predictions_file")
        # Both before the model is read: a Hub id is fetched first (with network retries), so a mistyped path or a
        # model not yet trained should cost nothing.
        if self.model_name_or_path == DEFAULT_OUTPUT_DIR and not Path(DEFAULT_OUTPUT_DIR).exists():
            raise FileNotFoundError(
                f"{DEFAULT_OUTPUT_DIR}: no such model directory; train one with `python run_train.py` first, or pass "
                "--model_name_or_path DIR_OR_HUB_ID."
            )
        if not Path(self.test_file).is_file():
            raise FileNotFoundError(
                f"--test_file {self.test_file}: no such file; pass a labelled CSV/TSV/JSON/JSON Lines file."
            )


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_arguments(ArgumentParser(EvalArguments), argv)
    setup_logging()
    pipeline = MultiTaskPipeline.from_pretrained(
        args.model_name_or_path,
        device=args.device,
        batch_size=args.batch_size,
        max_length=args.max_seq_length,
        allow_pickle=args.allow_pickle,
    )
    tasks = pipeline.tasks
    dataset = load_files(args.test_file, tasks, args.text_column)  # an unknown label is an error naming it
    texts = dataset[args.text_column][:]
    logits = pipeline.predict_logits(texts, progress=True)
    reports = task_reports(tasks, logits, label_matrix(dataset))
    if not reports:
        raise ValueError(f"{args.test_file}: no row has a label for any of the model's tasks {list(tasks)}.")

    for task, report in reports.items():
        logger.info("\n%s", format_report(task, tasks[task], report))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = {**flat_metrics(reports), **{f"{t}_num_examples": r["num_examples"] for t, r in reports.items()}}
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    named = {task: {**report, "labels": tasks[task]} for task, report in reports.items()}
    (output_dir / "eval_report.json").write_text(json.dumps(named, indent=2) + "\n")
    if args.predictions_file:
        write_predictions(pipeline.postprocess(texts, logits), args.predictions_file)
    logger.info("Wrote %s", output_dir / "eval_results.json")
    return results


if __name__ == "__main__":
    sys.exit(run(main))
