import numpy as np
import pytest
from transformers import EvalPrediction

from mtl import ClassificationMetrics, build_compute_metrics
from mtl.metrics import format_report, task_reports

TASKS = {"topic": ["A", "B", "C"], "tone": ["pos", "neg"]}


def test_classification_metrics_by_hand():
    report = ClassificationMetrics().compute(
        predictions=[0, 0, 1, 2, 2, 1], references=[0, 1, 1, 2, 2, 2], num_labels=3
    )
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["recall"] == pytest.approx([1.0, 0.5, 2 / 3])
    assert report["precision"] == pytest.approx([0.5, 0.5, 1.0])
    assert report["macro_recall"] == pytest.approx((1.0 + 0.5 + 2 / 3) / 3)
    f1 = [2 * p * r / (p + r) for p, r in zip(report["precision"], report["recall"], strict=True)]
    assert report["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert report["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 1, 2]]
    assert report["support"] == [1, 2, 3]


def test_macro_scores_average_over_the_classes_with_gold_examples():
    # class 2 has no gold example (only a wrong prediction): it has no recall to average, as SemEval defines it
    report = ClassificationMetrics().compute(predictions=[0, 1, 1, 2], references=[0, 0, 1, 1], num_labels=3)
    assert report["recall"] == pytest.approx([0.5, 0.5, 0.0])
    assert report["precision"] == pytest.approx([1.0, 0.5, 0.0])
    assert report["macro_recall"] == pytest.approx(0.5)  # (0.5 + 0.5) / 2, not / 3
    assert report["macro_precision"] == pytest.approx(0.75)
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert report["support"] == [2, 2, 0]


def test_unlabelled_rows_and_tasks_are_skipped():
    topic_logits = np.array([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [3.0, 0, 0]])
    tone_logits = np.array([[1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0]])
    labels = np.array([[0, -100], [1, -100], [0, -100], [-100, -100]])
    reports = task_reports(TASKS, [topic_logits, tone_logits], labels)
    assert list(reports) == ["topic"]  # tone has no label at all: not reported
    assert reports["topic"]["num_examples"] == 3
    assert reports["topic"]["accuracy"] == pytest.approx(2 / 3)


def test_compute_metrics_keys_and_loss():
    logits = (np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])), np.log(np.array([[0.9, 0.1], [0.4, 0.6]])))
    labels = np.array([[0, 0], [1, -100]])
    metrics = build_compute_metrics(TASKS)(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics["topic_accuracy"] == 1.0
    assert metrics["loss_topic"] == pytest.approx(-(np.log(0.7) + np.log(0.8)) / 2)
    assert metrics["loss_tone"] == pytest.approx(-np.log(0.9))
    assert set(metrics) == {
        f"{prefix}"
        for prefix in [
            "loss_topic",
            "topic_accuracy",
            "topic_macro_f1",
            "topic_macro_recall",
            "loss_tone",
            "tone_accuracy",
            "tone_macro_f1",
            "tone_macro_recall",
            "mean_accuracy",
            "mean_macro_f1",
            "mean_macro_recall",
        ]
    }
    assert metrics["mean_accuracy"] == pytest.approx((metrics["topic_accuracy"] + metrics["tone_accuracy"]) / 2)
    assert metrics["mean_macro_recall"] == pytest.approx(
        (metrics["topic_macro_recall"] + metrics["tone_macro_recall"]) / 2
    )


def test_report_table_names_the_labels():
    report = task_reports(TASKS, [np.eye(3), np.zeros((3, 2))], np.array([[0, 0], [1, 0], [2, 1]]))["topic"]
    table = format_report("topic", TASKS["topic"], report)
    assert "accuracy 1.0000" in table
    assert table.splitlines()[-4].split() == ["A", "B", "C"]
    assert table.splitlines()[-3].split() == ["A", "1", "0", "0"]
