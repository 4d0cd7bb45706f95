import dataclasses
import json
import re

import pytest
import torch
import yaml
from transformers import HfArgumentParser

from mtl import DataArguments, ModelArguments, MultiTaskTrainingArguments
from mtl.cli import parse_arguments

FLAGS = [
    "--model_name_or_path",
    "some/encoder",
    "--train_file",
    "a.csv",
    "b.jsonl",
    "--max_seq_length",
    "64",
    "--output_dir",
    "out",
    "--freeze",
    "encoder,sentiment",
    "--task_weights",
    "1.0",
    "0.5",
    "--learning_rate",
    "3e-5",
    "--lr_gamma",
    "0.5",
    "--num_train_epochs",
    "2",
    "--seed",
    "7",
]
AS_DICT = {
    "model_name_or_path": "some/encoder",
    "train_file": ["a.csv", "b.jsonl"],
    "max_seq_length": 64,
    "output_dir": "out",
    "freeze": "encoder,sentiment",
    "task_weights": [1.0, 0.5],
    "learning_rate": 3e-5,
    "lr_gamma": 0.5,
    "num_train_epochs": 2,
    "seed": 7,
}


def parser():
    return HfArgumentParser((ModelArguments, DataArguments, MultiTaskTrainingArguments))


def comparable(parsed):
    model_args, data_args, training_args = parsed
    return vars(model_args), vars(data_args), training_args.to_dict()


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_config_file_gives_the_same_arguments_as_flags(tmp_path, suffix):
    path = tmp_path / f"config{suffix}"
    path.write_text(json.dumps(AS_DICT) if suffix == ".json" else yaml.safe_dump(AS_DICT))
    from_flags = comparable(parse_arguments(parser(), FLAGS))
    from_file = comparable(parse_arguments(parser(), [str(path)]))
    assert from_file == from_flags
    assert from_flags[1]["train_file"] == ["a.csv", "b.jsonl"]
    assert from_flags[2]["task_weights"] == [1.0, 0.5]


def test_a_config_file_may_write_tasks_as_a_mapping_lists_and_nulls(tmp_path, monkeypatch):
    monkeypatch.setattr("transformers.integrations.get_available_reporting_integrations", lambda: ["tensorboard"])
    path = tmp_path / "config.yaml"
    tasks = {"topic": ["World", "Sports"], "spam": ["no", "yes"]}
    settings = {"tasks": tasks, "use_cpu": True, "validation_file": None, "report_to": ["tensorboard"], "seed": "3"}
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    model_args, data_args, training_args = parse_arguments(parser(), [str(path)])
    assert model_args.parsed_tasks() == tasks
    assert training_args.use_cpu is True and training_args.seed == 3  # "3" converted as the flag would be
    assert data_args.validation_file is None  # null: no validation file, not the default one
    assert training_args.report_to == ["tensorboard"]  # a list where the dataclass takes one


def test_a_config_file_must_be_the_only_argument(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("seed: 3\n")
    with pytest.raises(ValueError, match=r"a config file \(.*config.yaml\) must be the only argument; write "):
        parse_arguments(parser(), [str(path), "--num_train_epochs", "3"])


def test_a_config_file_may_give_one_value_for_a_list_option(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("task_weights: 2.0\ntrain_file: a.csv\n")
    _, data_args, training_args = parse_arguments(parser(), [str(path)])
    assert training_args.task_weights == [2.0] and data_args.train_file == ["a.csv"]  # as `--task_weights 2.0`


@pytest.mark.parametrize(
    ("suffix", "content", "message"),
    [
        (".yaml", "seed: [1\n", r"config\.yaml is not valid YAML"),
        (".json", "{", r"config\.json is not valid JSON: Expecting"),
        (".yaml", "", "must map option names to values .*got nothing"),
        (".yaml", "- seed\n", "must map option names to values .*got list"),
    ],
)
def test_a_broken_config_file_is_a_value_error(tmp_path, suffix, content, message):
    path = tmp_path / f"config{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        parse_arguments(parser(), [str(path)])


def test_defaults_train_minilm_on_the_default_data():
    model_args, data_args, training_args = parse_arguments(parser(), [])
    assert model_args.model_name_or_path is None  # the packaged all-MiniLM-L6-v2
    assert data_args.train_file == ["data/train.jsonl"]
    assert data_args.validation_file == "data/validation.jsonl"
    assert data_args.max_seq_length is None  # 128 for a new model, the saved length for a saved one (run_train)
    assert training_args.output_dir == "outputs/mtl-minilm"
    assert training_args.eval_strategy == "epoch"


@pytest.mark.parametrize(("flags", "expected"), [([], False), (["--bf16", "false"], False), (["--bf16"], True)])
def test_bf16_flag_alone_means_true(flags, expected):
    # A bare --bf16 parses as true, as the Trainer's own flag does; on this CPU machine it then needs --use_cpu.
    *_, training_args = parse_arguments(parser(), [*flags, "--use_cpu"] if expected else flags)
    assert training_args.bf16 is expected


def test_every_option_has_help():
    for action in parser()._actions:
        if action.dest != "help":
            assert action.help, f"--{action.dest} has no help text"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr_gamma": 0.0}, "lr_gamma"),
        ({"lr_step_epochs": -1.0}, "lr_step_epochs"),
        ({"freeze": "none,encoder"}, "freeze"),
        ({"unfreeze_encoder_after_epochs": 0}, "unfreeze_encoder_after_epochs"),
        ({"unfreeze_encoder_after_epochs": 1, "freeze": "all"}, "cannot be combined"),
        ({"unfreeze_encoder_after_epochs": 1, "ddp_find_unused_parameters": False}, "ddp_find_unused_parameters"),
        # NaN passes a plain `<= 0` check; infinities would overflow the sampler or the loss.
        ({"mixing_temperature": float("nan")}, "mixing_temperature"),
        ({"mixing_temperature": float("inf")}, "mixing_temperature"),
        ({"lr_step_epochs": float("nan")}, "lr_step_epochs"),
        ({"task_weights": [1.0, float("nan")]}, "task_weights must be non-negative and finite"),
        ({"task_weights": [1.0, float("inf")]}, "task_weights must be non-negative and finite"),
        ({"head_learning_rate": float("inf")}, "head_learning_rate"),
        # the mixing sampler draws the rows itself: the strategy would be ignored without a word
        ({"task_mixing": "temperature", "train_sampling_strategy": "sequential"}, "would be ignored"),
        ({"task_mixing": "round_robin", "train_sampling_strategy": "batch_rebalance"}, "would be ignored"),
        # would train nothing and exit 0, or fail with a traceback at the first step
        ({"num_train_epochs": 0}, r"--num_train_epochs must be a positive number \(or set --max_steps\), got 0"),
        ({"num_train_epochs": -1}, "--num_train_epochs must be a positive number"),
        ({"per_device_train_batch_size": 0}, "--per_device_train_batch_size must be at least 1 example, got 0"),
        ({"per_device_eval_batch_size": -8}, "--per_device_eval_batch_size must be at least 1 example, got -8"),
        ({"gradient_accumulation_steps": 0}, "--gradient_accumulation_steps must be at least 1 batch, got 0"),
        ({"label_smoothing_factor": 1.5}, r"--label_smoothing_factor must be in \[0, 1\), got 1.5"),
        ({"label_smoothing_factor": -0.1}, "--label_smoothing_factor must be in"),
        ({"report_to": "tensorbord"}, r"--report_to 'tensorbord' is not one of \['none', 'all', .*'tensorboard'"),
    ],
)
def test_invalid_training_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        MultiTaskTrainingArguments(output_dir="unused", **overrides)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--pooling", "max"], r"--pooling must be one of \['mean', 'cls'\], got 'max'"),
        (["--classifier_dropout", "1.5"], r"--classifier_dropout must be in \[0, 1\), got 1.5"),
        (["--classifier_dropout", "nan"], r"--classifier_dropout must be in \[0, 1\), got nan"),
    ],
)
def test_invalid_model_arguments(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_arguments(parser(), flags)


def bare_args_on_a_bf16_gpu(monkeypatch, **fields) -> MultiTaskTrainingArguments:
    """Arguments with the GPU defaults unset, as if on a bf16 GPU. A bare instance: TrainingArguments.__post_init__
    itself would look for the GPU that this machine does not have."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    args = MultiTaskTrainingArguments.__new__(MultiTaskTrainingArguments)
    settings = {"use_cpu": False, "fp16": False, "bf16": None, "dataloader_num_workers": None}
    settings |= {"dataloader_pin_memory": True, "accelerator_config": None, **fields}
    for name, value in settings.items():
        setattr(args, name, value)
    return args


@pytest.mark.parametrize(
    ("use_cpu", "fp16", "expected"),
    [(False, False, (True, 2)), (False, True, (False, 2)), (True, False, (False, 0))],
    ids=["gpu", "gpu-fp16", "use-cpu"],
)
def test_gpu_defaults(monkeypatch, use_cpu, fp16, expected):
    # bf16 autocast and 2 loader workers on a bf16 GPU, unless --use_cpu; never bf16 on top of --fp16.
    args = bare_args_on_a_bf16_gpu(monkeypatch, use_cpu=use_cpu, fp16=fp16)
    args._gpu_defaults()
    assert (args.bf16, args.dataloader_num_workers) == expected
    # Batches are copied to the GPU without blocking (pinned memory makes that safe); nothing changes on the CPU.
    assert args.accelerator_config == (None if use_cpu else {"non_blocking": True})
    args.bf16, args.dataloader_num_workers = False, 5  # what the user chose stays
    args._gpu_defaults()
    assert (args.bf16, args.dataloader_num_workers) == (False, 5)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, {"non_blocking": True}),
        ({"split_batches": True}, {"non_blocking": True, "split_batches": True}),
        ('{"non_blocking": false}', {"non_blocking": False}),
        ({"non_blocking": False}, {"non_blocking": False}),
        ("accelerator.json", "accelerator.json"),
    ],
    ids=["default", "other-keys", "json-off", "dict-off", "file"],
)
def test_gpu_batches_are_copied_without_blocking_unless_the_user_says(monkeypatch, given, expected):
    args = bare_args_on_a_bf16_gpu(monkeypatch, accelerator_config=given)
    args._gpu_defaults()
    assert args.accelerator_config == expected
    args.dataloader_pin_memory, args.accelerator_config = False, None  # from pageable memory the copy blocks anyway
    args._gpu_defaults()
    assert args.accelerator_config is None


def test_a_null_output_dir_is_the_default_one(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("output_dir: null\nseed: 3\n")
    assert parse_arguments(parser(), [str(path)])[2].output_dir == "outputs/mtl-minilm"


def test_epochs_may_be_zero_when_max_steps_decides():
    assert MultiTaskTrainingArguments(output_dir="unused", num_train_epochs=0, max_steps=5).max_steps == 5


def test_a_logger_that_is_not_installed_is_refused_before_training(monkeypatch):
    # TensorBoardCallback would raise a RuntimeError once the Trainer is built, after the data and model loaded
    monkeypatch.setattr("transformers.integrations.get_available_reporting_integrations", lambda: ["wandb"])
    with pytest.raises(ValueError, match=r"--report_to tensorboard: its package is not installed.*\['wandb'\]"):
        MultiTaskTrainingArguments(output_dir="unused", report_to="tensorboard")
    assert MultiTaskTrainingArguments(output_dir="unused", report_to="wandb").report_to == ["wandb"]
    assert MultiTaskTrainingArguments(output_dir="unused", report_to="all").report_to == ["wandb"]
    assert MultiTaskTrainingArguments(output_dir="unused", report_to="none").report_to == []


def test_a_dataset_configuration_needs_a_dataset():
    with pytest.raises(ValueError, match="--dataset_config_name 'en' needs --dataset_name"):
        DataArguments(dataset_config_name="en")
    assert DataArguments(dataset_name="ag_news", dataset_config_name="en").dataset_config_name == "en"


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "step"])
def test_arguments_survive_dataclasses_replace(scheduler):
    # TrainingArguments turns the scheduler name into a SchedulerType: validating a copy must accept that.
    args = MultiTaskTrainingArguments(output_dir="unused", lr_scheduler_type=scheduler)
    copy = dataclasses.replace(args, seed=3)
    assert (copy.seed, str(getattr(copy.lr_scheduler_type, "value", copy.lr_scheduler_type))) == (3, scheduler)


@pytest.mark.parametrize("train_file", [[], None, ""])
def test_no_training_file_is_refused(train_file):
    with pytest.raises(ValueError, match="--train_file names no file"):
        DataArguments(train_file=train_file)
    assert DataArguments(train_file="a.csv").train_file == ["a.csv"]  # one name, as a config file may give it


@pytest.mark.parametrize("low", [1, 65])
def test_random_truncation_must_fit_the_sequence_length(low):
    with pytest.raises(ValueError, match=r"--random_truncation_min_length must be between 2 and --max_seq_length"):
        DataArguments(max_seq_length=64, random_truncation_min_length=low)
    assert DataArguments(max_seq_length=64, random_truncation_min_length=64).random_truncation_min_length == 64


@pytest.mark.parametrize("windows", [0, -2])
def test_max_train_windows_is_at_least_one(windows):
    with pytest.raises(
        ValueError, match=rf"--max_train_windows must be at least 1 \(1: truncation only\), got {windows}"
    ):
        DataArguments(max_train_windows=windows)
    assert DataArguments().max_train_windows == 1


def test_tasks_from_json_text_and_files(tmp_path):
    tasks = {"topic": ["World", "Sports"], "tone": ["calm", "angry", "sad"]}
    assert ModelArguments(tasks=json.dumps(tasks)).parsed_tasks() == tasks
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump(tasks, sort_keys=False))
    assert list(ModelArguments(tasks=str(path)).parsed_tasks().items()) == list(tasks.items())
    with pytest.raises(FileNotFoundError, match="neither a JSON mapping nor an existing file"):
        ModelArguments(tasks="missing.yaml").parsed_tasks()
    with pytest.raises(ValueError, match="at least 2"):
        ModelArguments(tasks='{"topic": ["one"]}').parsed_tasks()
    # numbers are label names, as the data's numeric labels are read (star ratings)
    assert ModelArguments(tasks='{"stars": [1, 2, 3]}').parsed_tasks() == {"stars": ["1", "2", "3"]}
    assert ModelArguments(tasks='{"stars": [0.5, 1.0, 1.5]}').parsed_tasks() == {"stars": ["0.5", "1", "1.5"]}
    tabbed = tmp_path / "tabbed.json"  # valid JSON that PyYAML cannot read
    tabbed.write_text('{\n\t"topic": ["World", "Sports"]\n}\n')
    assert ModelArguments(tasks=str(tabbed)).parsed_tasks() == {"topic": ["World", "Sports"]}


@pytest.mark.parametrize("text", ['{"topic": ["a", "b"], "topic": ["c", "d"]}', "topic: [a, b]\ntopic: [c, d]\n"])
def test_a_task_named_twice_is_refused(tmp_path, text):
    path = tmp_path / "tasks.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"--tasks names the task\(s\) \['topic'\] twice"):
        ModelArguments(tasks=str(path)).parsed_tasks()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("num_train_epochs: abc\n", "config.yaml: num_train_epochs: 'abc' is not a valid float"),
        ("max_train_samples: 3.5\n", "config.yaml: max_train_samples: 3.5 is not a valid int"),
        ("lr_scheduler_type: sometimes\n", "--lr_scheduler_type 'sometimes' is not one of ['step', 'linear'"),
        ("colour: blue\n", "colour"),
        ("use_cpu: maybe\n", "config.yaml: use_cpu: 'maybe' is not a valid boolean (true or false)"),
        ("num_train_epochs: [1, 2]\n", "config.yaml: num_train_epochs: takes one value, got the list [1, 2]"),
        ("learning_rate: [0.01]\n", "config.yaml: learning_rate: takes one value"),
    ],
)
def test_a_config_file_value_is_checked_like_a_flag(tmp_path, content, message):
    path = tmp_path / "config.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):  # before any data or model is read
        parse_arguments(parser(), [str(path)])
