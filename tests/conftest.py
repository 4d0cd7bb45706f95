"""Shared fixtures: a tiny random BERT with a tiny word vocabulary, saved like a Hub encoder, fully offline."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the a new phone app chip code laptop software match team goal coach player win league vote law election "
    "minister party senate tax great awful good bad love hate boring amazing terrible okay is was it this that "
    "announced today released played passed and of to in on"
).split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]

# Rows a tiny model can learn quickly: the topic word decides the category, the opinion word the sentiment.
TOPIC_WORDS = {
    "Tech": ["phone", "app", "chip", "laptop"],
    "Sports": ["match", "team", "goal", "coach"],
    "Politics": ["vote", "law", "election", "senate"],
}
OPINION_WORDS = {
    "Positive": ["great", "amazing", "love"],
    "Negative": ["awful", "terrible", "hate"],
    "Neutral": ["announced", "released", "today"],
}


def make_rows(n: int = 36) -> list[dict]:
    rows = []
    for i in range(n):
        category = list(TOPIC_WORDS)[i % 3]
        sentiment = list(OPINION_WORDS)[(i // 3) % 3]
        topic = TOPIC_WORDS[category][i % 4]
        opinion = OPINION_WORDS[sentiment][(i // 9) % 3]
        rows.append({"text": f"the {topic} is {opinion}", "category": category, "sentiment": sentiment})
    return rows


def train_flags(encoder, data_dir: Path, output_dir: Path, *extra: str, test_file: bool = True) -> list[str]:
    """run_train.py flags for a quick CPU run of the tiny model on `data_dir`'s files; `extra` flags win."""
    test = str(data_dir / "test.jsonl") if test_file else ""
    # fmt: off
    return [
        "--model_name_or_path", str(encoder), "--train_file", str(data_dir / "train.jsonl"),
        "--validation_file", str(data_dir / "validation.jsonl"), "--test_file", test, "--output_dir", str(output_dir),
        "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--use_cpu",
        "--disable_tqdm", "true", "--max_seq_length", "32", *extra,
    ]
    # fmt: on


def free_port() -> int:
    """A port nothing listens on, so that runs of the suite side by side do not meet on a default port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_processes(
    script_args: list[str], env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`accelerate launch` a script with two CPU processes (DDP over gloo), as `subprocess.run` would, except that a
    run still going after `timeout` seconds fails the test with every process's Python stack: a rank left waiting
    at a collective says where, and no process outlives the test."""
    # fmt: off
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
        *script_args,
    ]
    # fmt: on
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        pass
    stacks = stop_with_stacks(process)
    pytest.fail(f"`accelerate launch` still running after {timeout} s; the processes' stacks:\n{stacks[-8000:]}")


def stop_with_stacks(process: subprocess.Popen) -> str:
    """Make each rank under the launcher `process` print its Python stack (faulthandler, on SIGABRT), kill them all,
    and return their stderr. The launcher is paused first: it would otherwise end the other ranks (SIGTERM, no stack)
    as soon as the first one aborts. It starts each rank in a session of its own, so they are found as its children."""
    launcher = psutil.Process(process.pid)
    launcher.suspend()
    ranks = launcher.children(recursive=True)
    for rank in ranks:  # one at a time, so that their stacks do not interleave
        with contextlib.suppress(psutil.NoSuchProcess):
            rank.send_signal(signal.SIGABRT)
            psutil.wait_procs([rank], timeout=5)
    for each in [*ranks, launcher]:
        with contextlib.suppress(psutil.NoSuchProcess):
            each.kill()
    return process.communicate()[1]


# The ways Python code reads a tensor's values on the host; on a GPU each one waits for all the work queued so far.
HOST_READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy", "cpu")


@contextlib.contextmanager
def count_host_reads():
    """Count the host reads of tensor values (a Counter of 'method at file:line', its caller's) made inside."""
    import collections
    import traceback

    reads = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name):
        def read(tensor, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            reads[f"{name} at {Path(caller.filename).name}:{caller.lineno}"] += 1
            return originals[name](tensor, *args, **kwargs)

        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, counting(name))
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT and its tokenizer, saved like any pretrained encoder."""
    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)}, do_lower_case=True)
    assert tokenizer.unk_token_id not in tokenizer("the phone is great")["input_ids"]
    tokenizer.save_pretrained(directory)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_model(tiny_encoder_dir):
    from mtl import MultiTaskModel

    torch.manual_seed(0)
    return MultiTaskModel.from_encoder(tiny_encoder_dir)


@pytest.fixture
def tiny_tokenizer(tiny_encoder_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_encoder_dir)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """train/validation/test JSON Lines files in the project's format."""
    rows = make_rows(36)
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", rows[:12])
    write_jsonl(tmp_path / "test.jsonl", rows[12:24])
    return tmp_path


@pytest.fixture
def make_trainer(tmp_path, tiny_tokenizer):
    """Build a MultiTaskTrainer over the tiny rows; keyword arguments go to MultiTaskTrainingArguments."""
    from mtl import MultiTaskTrainer, MultiTaskTrainingArguments, load_files, tokenize

    def build(model, rows=None, **overrides):
        path = write_jsonl(tmp_path / "rows.jsonl", rows or make_rows(16))
        dataset = tokenize(load_files(path, model.config.tasks), tiny_tokenizer, 32)
        settings = {
            "output_dir": str(tmp_path / "out"),
            "per_device_train_batch_size": 8,
            "num_train_epochs": 1,
            "learning_rate": 1e-2,
            "save_strategy": "no",
            "eval_strategy": "no",
            "logging_steps": 1,
            "disable_tqdm": True,
            "use_cpu": True,
            "seed": 0,
            **overrides,
        }
        return MultiTaskTrainer(
            model=model,
            args=MultiTaskTrainingArguments(**settings),
            train_dataset=dataset,
            eval_dataset=dataset,
            processing_class=tiny_tokenizer,
        )

    return build
