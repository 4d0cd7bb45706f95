"""mtl: one shared sentence encoder, several classification heads, trained together on the Hugging Face stack."""

from .args import DataArguments, ModelArguments, MultiTaskTrainingArguments
from .configuration import DEFAULT_TASKS, MultiTaskConfig
from .data import DataError, load_files, tokenize
from .metrics import ClassificationMetrics, build_compute_metrics
from .modeling import (
    MultiTaskModel,
    MultiTaskOutput,
    MultiTaskPreTrainedModel,
    default_encoder_path,
    load_multitask_model,
    register_auto_classes,
)
from .pipeline import MultiTaskPipeline
from .trainer import MultiTaskTrainer

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TASKS",
    "ClassificationMetrics",
    "DataArguments",
    "DataError",
    "ModelArguments",
    "MultiTaskConfig",
    "MultiTaskModel",
    "MultiTaskOutput",
    "MultiTaskPipeline",
    "MultiTaskPreTrainedModel",
    "MultiTaskTrainer",
    "MultiTaskTrainingArguments",
    "build_compute_metrics",
    "default_encoder_path",
    "load_files",
    "load_multitask_model",
    "tokenize",
]
