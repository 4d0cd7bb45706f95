"""Embed a data set once with a frozen encoder, so training the heads never runs the encoder again.

While `freeze` keeps the encoder frozen for the whole run its output never changes: the trainer computes every pooled
embedding once (length-sorted batches, no gradients), stores them in the `datasets` cache under a fingerprint of the
encoder weights and the token ids, and trains the heads on them.
"""

import logging
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
import xxhash
from tqdm.auto import tqdm

from .data import EMBEDDINGS_COLUMN, TOKEN_COLUMNS, pad_rows, token_lengths
from .modeling import MultiTaskModel

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "mtl_embeddings"


def fingerprint(model: MultiTaskModel, dataset: datasets.Dataset, autocast_dtype: torch.dtype | None = None) -> str:
    """Changes whenever the encoder weights, the pooling, the precision or the token ids change."""
    digest = xxhash.xxh3_128(f"{model.config.pooling} {autocast_dtype}".encode())  # the weights are hashed too
    for name, tensor in model.encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    # The rows as the data set exposes them (after any select/shuffle), not its underlying table.
    table = dataset.select_columns(["input_ids", "attention_mask"]).with_format("arrow")[:]
    for column in table.columns:
        digest.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).tobytes())
        digest.update(pc.list_flatten(column).to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()[:32]


@torch.inference_mode()
def compute_embeddings(
    model: MultiTaskModel, dataset: datasets.Dataset, batch_size: int = 256, autocast_dtype: torch.dtype | None = None
) -> np.ndarray:
    """Pooled embeddings of every row, in row order; batches are length-sorted so little padding is computed. With
    `autocast_dtype` (bf16/fp16 training) the encoder runs under that autocast, as it would in the training step."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = dataset["input_ids"][:]
    lengths = np.asarray(token_lengths(dataset), dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    embeddings = np.empty((len(ids), model.config.hidden_size), dtype=np.float32)
    for start in tqdm(range(0, len(ids), batch_size), desc="Embedding (frozen encoder)", unit="batch"):
        rows = order[start : start + batch_size]
        width = int(lengths[rows].max())
        input_ids = torch.from_numpy(pad_rows([ids[i] for i in rows], width, pad_value=0))
        attention_mask = torch.from_numpy(np.arange(width) < lengths[rows, None]).long()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pooled, _ = model.embed(input_ids.to(device), attention_mask.to(device))
        embeddings[rows] = pooled.float().cpu().numpy()
    model.train(was_training)
    return embeddings


def cache_embeddings(
    model: MultiTaskModel,
    dataset: datasets.Dataset,
    batch_size: int = 256,
    cache_dir: Path | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> datasets.Dataset:
    """`dataset` with its token columns replaced by the frozen encoder's pooled embeddings (from cache if present),
    computed under `autocast_dtype` if given."""
    path = (cache_dir or default_cache_dir()) / f"{fingerprint(model, dataset, autocast_dtype)}.npy"
    if path.exists():
        logger.info("Frozen-encoder embeddings loaded from %s", path)
        embeddings = np.load(path, allow_pickle=False)
    else:
        embeddings = compute_embeddings(model, dataset, batch_size, autocast_dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npy")
        np.save(partial, embeddings, allow_pickle=False)
        partial.replace(path)  # never a half-written cache file
        logger.info("Frozen-encoder embeddings of %d rows cached in %s", len(embeddings), path)
    kept = dataset.remove_columns([c for c in TOKEN_COLUMNS if c in dataset.column_names])
    # numpy rows: batches of cached embeddings are collated by stacking arrays, not by converting float lists.
    return kept.add_column(EMBEDDINGS_COLUMN, list(embeddings)).with_format("numpy")
