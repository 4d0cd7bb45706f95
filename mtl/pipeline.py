"""`MultiTaskPipeline`: batched, length-sorted inference that labels every text for every task in one pass."""

import logging
import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from scipy.special import softmax
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .configuration import token_limit
from .data import MultiTaskDataCollator, check_text
from .modeling import MultiTaskModel, load_multitask_model, load_tokenizer

logger = logging.getLogger(__name__)


def check_texts(texts: Iterable) -> list[str]:
    texts = list(texts)
    if not texts:
        raise ValueError("No texts to classify: give at least one non-empty text.")
    for index, text in enumerate(texts):
        check_text(text, f"Input {index}")
    return texts


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, checked (a typo or a GPU this machine lacks is a clear error); by default cuda when present."""
    try:
        resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(
            f"device (--device) {device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:1'."
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device (--device) {device!r}: torch finds no CUDA GPU here; use --device cpu.")
    return resolved


class MultiTaskPipeline:
    """Label texts with every task of a `MultiTaskModel`.

    >>> clf = MultiTaskPipeline.from_pretrained("outputs/mtl-minilm")
    >>> clf(["The new phone's battery is fantastic."])
    [{'text': ..., 'category': 'Tech', 'category_score': 0.98, 'sentiment': 'Positive', 'sentiment_score': 0.95}]

    Texts are tokenized once, sorted by length and batched, so each batch pads to a similar length; results come
    back in input order. Texts longer than `max_length` tokens are truncated; by default at the tokenizer's
    `model_max_length`, which `run_train.py` sets to the length the model was trained at (`--max_seq_length`).
    """

    def __init__(
        self,
        model: MultiTaskModel,
        tokenizer: PreTrainedTokenizerBase,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        max_length: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size (--batch_size) must be at least 1 text, got {batch_size}.")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must leave room for a token between [CLS] and [SEP], got {max_length}.")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.collator = MultiTaskDataCollator(tokenizer)  # pads as tokenizer.pad does, without its per-row Python
        self.batch_size = batch_size
        # bf16 autocast on GPUs that support it: about twice the throughput, labels unchanged in practice.
        self.bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        limit = token_limit(model.config) or 512
        if max_length is not None and max_length > limit:
            logger.warning("max_length %d exceeds the encoder's limit of %d tokens: texts are cut at %d.", max_length,
                           limit, limit)  # fmt: skip
        # A tokenizer without a recorded length reports a huge `model_max_length`: the position limit caps it.
        self.max_length = min(max_length or tokenizer.model_max_length or limit, limit)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: str | torch.device | None = None,
        allow_pickle: bool = False,
        **kwargs,
    ) -> "MultiTaskPipeline":
        """From a directory written by `run_train.py`/`save_pretrained`, or a Hub id (safetensors weights only
        unless `allow_pickle`)."""
        tokenizer = load_tokenizer(name_or_path)  # first: a missing tokenizer is found before the weights are read
        model = load_multitask_model(name_or_path, allow_pickle=allow_pickle)
        return cls(model, tokenizer, device=device, **kwargs)

    @property
    def tasks(self) -> dict[str, list[str]]:
        return self.model.config.tasks

    @torch.inference_mode()
    def predict_logits(self, texts: Iterable[str], progress: bool = False) -> list[np.ndarray]:
        """One `(len(texts), num_labels)` float array per task, rows in input order."""
        texts = check_texts(texts)
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")
        outputs = [np.empty((len(texts), len(labels)), dtype=np.float32) for labels in self.tasks.values()]
        starts = range(0, len(texts), self.batch_size)
        for start in tqdm(starts, desc="Predicting", disable=not progress, unit="batch"):
            rows = order[start : start + self.batch_size]
            batch = self.collator([{key: values[i] for key, values in encoded.items()} for i in rows])
            batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits_per_task = self.model(**batch).logits
            for output, logits in zip(outputs, logits_per_task, strict=True):
                output[rows] = logits.float().cpu().numpy()
        return outputs

    def __call__(self, texts: str | Iterable[str]) -> list[dict]:
        """Each text's label and probability per task: {"text", "<task>", "<task>_score", ...}."""
        texts = [texts] if isinstance(texts, str) else check_texts(texts)
        return list(self.postprocess(texts, self.predict_logits(texts)))

    def iter_predictions(self, texts: Iterable[str], chunk_size: int = 4096) -> Iterator[dict]:
        """Label a stream of texts chunk by chunk, so memory stays flat however long the stream is."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size (--chunk_size) must be at least 1 text, got {chunk_size}.")
        if isinstance(texts, str):  # one text, as for __call__: not a stream of its characters
            texts = [texts]
        chunk = []
        for text in texts:
            chunk.append(text)
            if len(chunk) == chunk_size:
                yield from self(chunk)
                chunk = []
        if chunk:
            yield from self(chunk)

    def postprocess(self, texts: list[str], logits: list[np.ndarray]) -> Iterator[dict]:
        """Turn per-task logits into {"text", "<task>": label, "<task>_score": probability} records."""
        probabilities = [softmax(task_logits, axis=1) for task_logits in logits]
        best = [p.argmax(axis=1) for p in probabilities]
        for row, text in enumerate(texts):
            result = {"text": text}
            for (task, labels), p, b in zip(self.tasks.items(), probabilities, best, strict=True):
                result[task] = labels[b[row]]
                result[f"{task}_score"] = round(float(p[row, b[row]]), 4)
            yield result
