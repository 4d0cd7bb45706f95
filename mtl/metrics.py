"""Per-task classification metrics, as an `evaluate` metric module that ships with the package (no Hub download)."""

from collections.abc import Callable, Sequence

import datasets
import evaluate
import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from transformers import EvalPrediction

from .modeling import IGNORE_INDEX, task_cross_entropy

_DESCRIPTION = """Accuracy, macro-averaged F1/recall/precision, per-class precision/recall/F1/support and the
confusion matrix of a single-label multi-class classification."""

_INPUTS = """
Args:
    predictions (`list[int]`): predicted label ids.
    references (`list[int]`): gold label ids.
    num_labels (`int`): the number of classes: the per-class lists have one entry per class, even for a class absent
        from both lists. Macro scores average over the classes present in `references`.
Returns:
    accuracy, macro_f1, macro_recall, macro_precision (floats); precision, recall, f1, support (lists, one entry per
    class id); confusion_matrix (rows: gold class, columns: predicted class).
"""


class ClassificationMetrics(evaluate.Metric):
    """Every number a multi-class report needs, computed in one pass with scikit-learn."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, num_labels: int) -> dict:
        labels = list(range(num_labels))
        precision, recall, f1, support = precision_recall_fscore_support(
            references, predictions, labels=labels, average=None, zero_division=0
        )
        # Macro scores over the classes present in the references, as SemEval's macro-recall is defined: a class with
        # no gold example has no recall to average (scikit-learn would also count a class only predicted, as 0).
        present = np.isin(labels, references)
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "macro_f1": float(f1[present].mean()),
            "macro_recall": float(recall[present].mean()),
            "macro_precision": float(precision[present].mean()),
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": [int(count) for count in support],
            "confusion_matrix": confusion_matrix(references, predictions, labels=labels).tolist(),
        }


def task_reports(
    tasks: dict[str, list[str]],
    logits: Sequence[np.ndarray],
    label_ids: np.ndarray,
    class_weights: Sequence[torch.Tensor] | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, dict]:
    """Full metrics (plus the cross-entropy `loss`) for every task that has at least one label in `label_ids`. With
    the training run's class weights and label smoothing, `loss` is the task's training objective (what the
    training logs' `loss_<task>` and the Trainer's `eval_loss` measure); without, the plain cross-entropy."""
    metric = ClassificationMetrics()
    reports = {}
    for index, (task, names) in enumerate(tasks.items()):
        labelled = label_ids[:, index] != IGNORE_INDEX
        if not labelled.any():  # a test file may label only some tasks
            continue
        gold = label_ids[labelled, index]
        task_logits = np.asarray(logits[index], dtype=np.float64)[labelled]
        report = metric.compute(predictions=task_logits.argmax(axis=1), references=gold, num_labels=len(names))
        weights = None if class_weights is None else class_weights[index].cpu()
        loss = task_cross_entropy(torch.from_numpy(task_logits), torch.from_numpy(gold), weights, label_smoothing)
        report["loss"] = loss.item()
        report["num_examples"] = int(labelled.sum())
        reports[task] = report
    return reports


SCALAR_METRICS = ("accuracy", "macro_f1", "macro_recall")


def metric_names(task_names: Sequence[str]) -> list[str]:
    """Every metric an evaluation logs (without its `eval_` prefix): what --metric_for_best_model may name."""
    per_task = [f"{task}_{name}" for task in task_names for name in SCALAR_METRICS]
    return ["loss", *(f"loss_{task}" for task in task_names), *per_task, *(f"mean_{n}" for n in SCALAR_METRICS)]


def flat_metrics(reports: dict[str, dict]) -> dict[str, float]:
    """`{task}_{metric}` scalars and `loss_{task}` (as the training logs name it): what the Trainer logs and
    `eval_results.json` stores."""
    flat = {}
    for task, report in reports.items():
        flat[f"loss_{task}"] = report["loss"]
        flat.update({f"{task}_{name}": report[name] for name in SCALAR_METRICS})
    return flat


def build_compute_metrics(
    tasks: dict[str, list[str]], class_weights: Sequence[torch.Tensor] | None = None, label_smoothing: float = 0.0
) -> Callable[[EvalPrediction], dict[str, float]]:
    """A `compute_metrics` for the Trainer: per-task accuracy, macro-F1, macro-recall and loss (with the training
    run's class weights and label smoothing, as `eval_loss`), and each metric's mean over the tasks
    (`mean_macro_recall`, ...: one number to pick the best checkpoint by, with `--metric_for_best_model
    mean_macro_recall`)."""

    def compute_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        if not isinstance(logits, (tuple, list)):  # a single task comes back unwrapped from some code paths
            logits = (logits,)
        reports = task_reports(tasks, logits, np.asarray(eval_prediction.label_ids), class_weights, label_smoothing)
        metrics = flat_metrics(reports)
        if reports:
            metrics.update(
                {f"mean_{name}": float(np.mean([r[name] for r in reports.values()])) for name in SCALAR_METRICS}
            )
        return metrics

    return compute_metrics


def format_summary(tasks: dict[str, list[str]], metrics: dict[str, float], prefix: str = "") -> str:
    """One row per task of `{prefix}{task}_{metric}` values: accuracy, macro-F1 and macro-recall."""
    rows = [f"{'task':<16}{'accuracy':>10}{'macro_f1':>10}{'macro_recall':>14}"]
    for task in tasks:
        if f"{prefix}{task}_accuracy" in metrics:
            values = [metrics[f"{prefix}{task}_{name}"] for name in SCALAR_METRICS]
            rows.append(f"{task:<16}{values[0]:>10.4f}{values[1]:>10.4f}{values[2]:>14.4f}")
    return "\n".join(rows)


def format_report(task: str, labels: list[str], report: dict) -> str:
    """A readable per-class table and confusion matrix (rows: gold, columns: predicted) for one task."""
    width = max(12, *(len(label) + 2 for label in labels))
    lines = [
        f"== {task} ({report['num_examples']} examples): accuracy {report['accuracy']:.4f}, "
        f"macro-F1 {report['macro_f1']:.4f}, macro-recall {report['macro_recall']:.4f}",
        f"{'label':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}",
    ]
    for i, label in enumerate(labels):
        p, r, f, s = report["precision"][i], report["recall"][i], report["f1"][i], report["support"][i]
        lines.append(f"{label:<{width}}{p:>10.4f}{r:>10.4f}{f:>10.4f}{s:>10d}")
    lines.append("confusion matrix (rows: gold, columns: predicted)")
    lines.append(" " * width + "".join(f"{label:>{width}}" for label in labels))
    for label, row in zip(labels, report["confusion_matrix"], strict=True):
        lines.append(f"{label:<{width}}" + "".join(f"{count:>{width}d}" for count in row))
    return "\n".join(lines)
