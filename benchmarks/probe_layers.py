"""Where an encoder holds a task's information: a linear probe on every layer's pooled states.

    python benchmarks/probe_layers.py  # all-MiniLM-L6-v2, the first default task, on data/train.jsonl and test.jsonl
    python benchmarks/probe_layers.py --model_name_or_path outputs/bench-accuracy/multitask/model --task category \
        --train_file ../shared/data/bench/train.jsonl --test_files ../shared/data/bench/xdomain_topic_agnews.jsonl

For each hidden state of the encoder (the embeddings, then each layer) the texts are pooled as the model pools them
(mean or [CLS]) and L2-normalised, and a logistic regression is fitted on the training file's rows labelled for
`--task`; the table gives its accuracy and macro-recall on each test file. The encoder is read, never changed: a
saved mtl model (its task heads are not used), or a plain encoder such as all-MiniLM-L6-v2 (the default). If a
fine-tuned multi-task model's last layer probes worse than a layer below it, its top layer has moved towards another
task (benchmarks/RESULTS.md).
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import normalize
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mtl import MultiTaskConfig, MultiTaskModel, load_files
from mtl.args import DEFAULT_DATA_FILES, InferenceArguments, check_max_length
from mtl.cli import ArgumentParser, parse_arguments, run, setup_logging
from mtl.data import label_matrix
from mtl.metrics import ClassificationMetrics
from mtl.modeling import load_config, load_multitask_model, load_tokenizer, pool, resolve_encoder_name
from mtl.pipeline import resolve_device

logger = logging.getLogger("benchmarks.probe_layers")


@dataclass
class ProbeArguments(InferenceArguments):
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved mtl model, or an encoder (default: all-MiniLM-L6-v2)."}
    )
    task: str | None = field(
        default=None,
        metadata={
            "help": "The task to probe (default: the model's first; for a plain encoder, of the default tasks)."
        },
    )
    train_file: str = field(
        default=DEFAULT_DATA_FILES["train"],
        metadata={"help": "Labelled file to fit the probes on (its rows labelled for --task)."},
    )
    test_files: list[str] = field(
        default_factory=lambda: [DEFAULT_DATA_FILES["test"]],
        metadata={"help": "Labelled files to score the probes on (their rows labelled for --task)."},
    )
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per text."})
    inverse_regularization: float = field(
        default=10.0, metadata={"help": "C of the logistic regression (larger: weaker L2 penalty)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "At most N training rows (seeded sample)."})
    seed: int = field(default=0, metadata={"help": "Seed of the training sample."})

    def __post_init__(self):
        super().__post_init__()
        check_max_length(self.max_seq_length, "--max_seq_length")
        missing = [path for path in (self.train_file, *self.test_files) if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"No such file(s): {missing}; pass labelled CSV/TSV/JSON/JSON Lines files.")
        names = [Path(path).name for path in self.test_files]
        if len(set(names)) < len(names):  # the table's columns are named by file name
            raise ValueError(f"--test_files: two files share a name ({names}); copy or link one under another name.")
        if self.inverse_regularization <= 0:
            raise ValueError(f"--inverse_regularization must be > 0, got {self.inverse_regularization}.")


def load_encoder(args: ProbeArguments) -> tuple[torch.nn.Module, MultiTaskConfig, object]:
    """The encoder (on --device), the mtl config that says how it pools and which tasks exist, and the tokenizer."""
    path = resolve_encoder_name(args.model_name_or_path)
    if isinstance(load_config(path), MultiTaskConfig):
        model = load_multitask_model(path, allow_pickle=args.allow_pickle)
    else:
        model = MultiTaskModel.from_encoder(path, allow_pickle=args.allow_pickle)
    return model.encoder.to(resolve_device(args.device)).eval(), model.config, load_tokenizer(path)


@torch.inference_mode()
def layer_features(encoder, tokenizer, texts: list[str], pooling: str, args: ProbeArguments) -> np.ndarray:
    """`(len(texts), num_layers + 1, hidden_size)`: each text pooled at the embeddings and after every layer."""
    encoded = tokenizer(texts, truncation=True, max_length=args.max_seq_length)
    order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")  # less padding
    features = None
    for start in tqdm(range(0, len(texts), args.batch_size), desc="Encoding", unit="batch"):
        rows = order[start : start + args.batch_size]
        batch = tokenizer.pad([{key: values[i] for key, values in encoded.items()} for i in rows], return_tensors="pt")
        batch = batch.to(encoder.device)
        states = encoder(**batch, output_hidden_states=True).hidden_states
        pooled = torch.stack([pool(state, batch["attention_mask"], pooling) for state in states], dim=1)
        if features is None:
            features = np.empty((len(texts), *pooled.shape[1:]), dtype=np.float32)
        features[rows] = pooled.float().cpu().numpy()
    return features


def labelled(path: str, config: MultiTaskConfig, task: str, limit: int | None = None, seed: int = 0):
    """The texts of `path` labelled for `task` and their label ids (at most `limit`, a seeded sample)."""
    dataset = load_files(path, config.tasks)
    ids = label_matrix(dataset)[:, config.task_names.index(task)]
    keep = np.flatnonzero(ids >= 0)
    if limit and len(keep) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(keep, size=limit, replace=False))
    if not len(keep):
        raise ValueError(f"{path}: no row has a {task!r} label; pass a file labelled for --task {task}.")
    texts = dataset["text"][:]
    return [texts[i] for i in keep], ids[keep]


def probe(args: ProbeArguments) -> list[dict]:
    """One row per hidden state: {"layer": k, "<file> acc": ..., "<file> macro-recall": ...} (percentages)."""
    encoder, config, tokenizer = load_encoder(args)
    task = args.task or config.task_names[0]
    if task not in config.tasks:
        raise ValueError(f"--task {task!r} is not a task of the model; choose from {config.task_names}.")
    texts, train_ids = labelled(args.train_file, config, task, args.max_train_samples, args.seed)
    if len(np.unique(train_ids)) < 2:
        raise ValueError(f"{args.train_file}: the {task!r} labels have one class only; a probe needs two.")
    train = layer_features(encoder, tokenizer, texts, config.pooling, args)
    tests = {}
    for path in args.test_files:
        test_texts, test_ids = labelled(path, config, task)
        tests[Path(path).name] = (layer_features(encoder, tokenizer, test_texts, config.pooling, args), test_ids)
    metric = ClassificationMetrics()
    rows = []
    for layer in range(train.shape[1]):
        classifier = LogisticRegression(C=args.inverse_regularization, max_iter=5000)
        classifier.fit(normalize(train[:, layer]), train_ids)
        row = {"layer": layer}
        for name, (features, gold) in tests.items():
            predicted = classifier.predict(normalize(features[:, layer]))
            scores = metric.compute(
                predictions=predicted.tolist(), references=gold.tolist(), num_labels=len(config.tasks[task])
            )
            row[f"{name} acc"] = 100 * scores["accuracy"]
            row[f"{name} macro-recall"] = 100 * scores["macro_recall"]
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    headers = list(rows[0])
    lines = ["| " + " | ".join(["hidden state", *headers[1:]]) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        name = "embeddings" if row["layer"] == 0 else f"layer {row['layer']}"
        lines.append("| " + " | ".join([name, *(f"{row[h]:.1f}" for h in headers[1:])]) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    (args,) = parse_arguments(ArgumentParser(ProbeArguments), argv)
    setup_logging()
    rows = probe(args)
    sys.stdout.write(markdown(rows) + "\n")
    return rows


if __name__ == "__main__":
    sys.exit(run(main))
