import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

import mtl.modeling
from mtl import MultiTaskConfig, MultiTaskModel
from mtl.modeling import (
    IGNORE_INDEX,
    READY_MASK_MODEL_TYPES,
    load_multitask_model,
    multitask_loss,
    ready_attention_mask,
    task_cross_entropy,
)
from tests.conftest import count_host_reads


def batch(tokenizer, texts=("the phone is great", "the match was awful today", "vote")):
    return tokenizer(list(texts), padding=True, return_tensors="pt")


def test_output_shapes_follow_the_tasks(tiny_encoder_dir, tiny_tokenizer):
    tasks = {"topic": ["a", "b", "c", "d"], "polarity": ["pos", "neg"], "spam": ["no", "yes"]}
    model = MultiTaskModel.from_encoder(tiny_encoder_dir, tasks=tasks).eval()
    output = model(**batch(tiny_tokenizer), output_pooled=True)
    assert [tuple(logits.shape) for logits in output.logits] == [(3, 4), (3, 2), (3, 2)]
    assert output.pooled_output.shape == (3, 32)
    assert output.loss is None
    assert list(model.heads) == list(tasks)


def test_single_task_model(tiny_encoder_dir, tiny_tokenizer):
    model = MultiTaskModel.from_encoder(tiny_encoder_dir, tasks={"only": ["x", "y", "z"]})
    output = model(**batch(tiny_tokenizer), labels=torch.tensor([[0], [2], [1]]))
    assert len(output.logits) == 1 and output.logits[0].shape == (3, 3)
    assert torch.isfinite(output.loss)


def test_loss_is_the_sum_of_per_task_cross_entropies(tiny_model, tiny_tokenizer):
    tiny_model.eval()
    labels = torch.tensor([[0, 1], [2, 0], [1, 2]])
    output = tiny_model(**batch(tiny_tokenizer), labels=labels)
    expected = F.cross_entropy(output.logits[0], labels[:, 0]) + F.cross_entropy(output.logits[1], labels[:, 1])
    torch.testing.assert_close(output.loss, expected)


def test_weighted_loss_with_missing_labels(tiny_model, tiny_tokenizer):
    tiny_model.eval()
    logits = tiny_model(**batch(tiny_tokenizer)).logits
    labels = torch.tensor([[0, IGNORE_INDEX], [IGNORE_INDEX, 0], [1, 2]])
    total, per_task = multitask_loss(logits, labels, task_weights=[0.25, 2.0])
    category = F.cross_entropy(logits[0][[0, 2]], labels[[0, 2], 0])  # rows labelled for category
    sentiment = F.cross_entropy(logits[1][[1, 2]], labels[[1, 2], 1])
    torch.testing.assert_close(per_task[0], category)
    torch.testing.assert_close(per_task[1], sentiment)
    torch.testing.assert_close(total, 0.25 * category + 2.0 * sentiment)


def test_task_without_labels_in_batch_contributes_zero_not_nan(tiny_model, tiny_tokenizer):
    labels = torch.tensor([[0, IGNORE_INDEX], [1, IGNORE_INDEX], [2, IGNORE_INDEX]])
    output = tiny_model(**batch(tiny_tokenizer), labels=labels)
    only_category = F.cross_entropy(output.logits[0], labels[:, 0])
    torch.testing.assert_close(output.loss, only_category)
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters() if p.grad is not None)
    assert torch.count_nonzero(tiny_model.heads["sentiment"].weight.grad) == 0


def test_labels_as_a_mapping_leave_out_tasks(tiny_model, tiny_tokenizer):
    tiny_model.eval()
    inputs = batch(tiny_tokenizer)
    as_dict = tiny_model(**inputs, labels={"sentiment": torch.tensor([0, 1, 2])}).loss
    as_tensor = tiny_model(**inputs, labels=torch.tensor([[IGNORE_INDEX, 0], [IGNORE_INDEX, 1], [IGNORE_INDEX, 2]]))
    torch.testing.assert_close(as_dict, as_tensor.loss)
    with pytest.raises(ValueError, match="unknown task"):
        tiny_model(**inputs, labels={"colour": torch.tensor([0, 1, 2])})
    with pytest.raises(ValueError, match="shape"):
        tiny_model(**inputs, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels is an empty mapping"):
        tiny_model(**inputs, labels={})


def test_a_label_matrix_must_have_one_column_per_task(tiny_model, tiny_tokenizer):
    inputs = batch(tiny_tokenizer)
    with pytest.raises(ValueError, match="labels"):  # a third column would be ignored without a word
        tiny_model(**inputs, labels=torch.zeros((3, 3), dtype=torch.long))


def test_forward_needs_texts_or_embeddings(tiny_model):
    with pytest.raises(ValueError, match=r"needs input_ids .* or pooled_embeddings"):
        tiny_model(attention_mask=torch.ones(1, 3, dtype=torch.long))


def test_class_weights_and_label_smoothing_match_torch():
    logits = torch.randn(5, 3)
    labels = torch.tensor([0, 2, IGNORE_INDEX, 1, 2])
    weights = torch.tensor([1.0, 3.0, 0.5])
    expected = F.cross_entropy(logits, labels, weight=weights, label_smoothing=0.1)
    torch.testing.assert_close(task_cross_entropy(logits, labels, weights, 0.1), expected)


def test_mean_and_cls_pooling(tiny_encoder_dir, tiny_tokenizer):
    inputs = batch(tiny_tokenizer)
    mean_model = MultiTaskModel.from_encoder(tiny_encoder_dir).eval()
    hidden = mean_model.encoder(**inputs).last_hidden_state
    pooled = mean_model(**inputs, output_pooled=True).pooled_output
    mask = inputs["attention_mask"]
    for row in range(3):
        torch.testing.assert_close(pooled[row], hidden[row, mask[row].bool()].mean(dim=0))
    cls_model = MultiTaskModel.from_encoder(tiny_encoder_dir, pooling="cls").eval()
    torch.testing.assert_close(cls_model(**inputs, output_pooled=True).pooled_output, hidden[:, 0])


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_dynamic_padding_trains_as_padding_to_max_length_does(tiny_encoder_dir, tiny_tokenizer, pooling):
    """Padding each batch to its longest row (the default) is a speed option only: the loss and every gradient equal
    those of the same batch padded to the maximum length, as padded tokens are masked out of attention and pooling."""
    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder(tiny_encoder_dir, pooling=pooling).eval()  # no dropout: nothing random
    labels = torch.tensor([[0, 1], [2, 0], [1, 2]])
    texts = ["the phone is great", "the match was awful today", "vote"]
    results = []
    for padding in ("longest", "max_length"):
        inputs = tiny_tokenizer(texts, padding=padding, max_length=32, return_tensors="pt")
        model.zero_grad()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        results.append((inputs["input_ids"].shape[1], loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (short, loss, grads), (long, padded_loss, padded_grads) = results
    assert short < long == 32
    torch.testing.assert_close(padded_loss, loss)
    for grad, padded_grad in zip(grads, padded_grads, strict=True):
        torch.testing.assert_close(padded_grad, grad, atol=1e-6, rtol=1e-4)


def test_save_and_load_round_trip(tmp_path, tiny_encoder_dir, tiny_tokenizer):
    tasks = {"topic": ["World", "Sports", "Business", "Tech"], "tone": ["calm", "angry"]}
    model = MultiTaskModel.from_encoder(tiny_encoder_dir, tasks=tasks, pooling="cls").eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = MultiTaskModel.from_pretrained(tmp_path).eval()
    assert loaded.config.tasks == tasks
    assert list(loaded.config.tasks) == ["topic", "tone"]  # order kept
    assert loaded.config.pooling == "cls"
    inputs = batch(tiny_tokenizer)
    with torch.no_grad():
        for before, after in zip(model(**inputs).logits, loaded(**inputs).logits, strict=True):
            assert torch.equal(before, after)


def test_auto_classes_load_a_saved_model(tmp_path, tiny_model, tiny_tokenizer):
    tiny_model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "mtl"
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, MultiTaskModel)
    inputs = batch(tiny_tokenizer)
    with torch.no_grad():
        assert torch.equal(tiny_model.eval()(**inputs).logits[1], loaded.eval()(**inputs).logits[1])


def test_config_rebuilds_the_encoder_without_its_source(tiny_model):
    config = MultiTaskConfig.from_dict(tiny_model.config.to_dict())
    rebuilt = MultiTaskModel(config)
    assert rebuilt.encoder.config.hidden_size == 32
    assert rebuilt.encoder.config.num_hidden_layers == 2
    assert {name for name, _ in rebuilt.named_parameters()} == {name for name, _ in tiny_model.named_parameters()}


def test_fresh_heads_are_initialised_from_the_encoder_range(tiny_model):
    for head in tiny_model.heads.values():
        assert torch.count_nonzero(head.bias) == 0
        assert 0.005 < head.weight.std().item() < 0.05  # normal(0, 0.02)


def test_encoder_weights_come_from_the_checkpoint(tiny_encoder_dir, tiny_model):
    reference = AutoModel.from_pretrained(tiny_encoder_dir, add_pooling_layer=False)
    for name, parameter in reference.state_dict().items():
        assert torch.equal(tiny_model.encoder.state_dict()[name], parameter), name


def test_encoder_runs_without_cudnn_attention(tiny_model, tiny_tokenizer):
    """cuDNN attention builds a plan per batch shape (slow with dynamic padding): off inside the encoder only."""
    seen = []
    hook = tiny_model.encoder.register_forward_pre_hook(
        lambda module, args: seen.append(
            (
                torch.backends.cuda.cudnn_sdp_enabled(),
                torch.backends.cuda.flash_sdp_enabled(),
                torch.backends.cuda.mem_efficient_sdp_enabled(),
            )
        )
    )
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        with torch.no_grad():
            logits = tiny_model.eval()(**batch(tiny_tokenizer)).logits
    finally:
        hook.remove()
    assert seen == [(False, True, True)]
    assert torch.backends.cuda.cudnn_sdp_enabled() == before  # restored for the caller's own attention
    with torch.no_grad():
        pooled = tiny_model.embed(**batch(tiny_tokenizer))[0]
    torch.testing.assert_close(logits[0], tiny_model.heads["category"](pooled))


def test_an_encoder_saved_in_half_precision_gives_one_float32_model(tmp_path, tiny_encoder_dir, tiny_tokenizer):
    AutoModel.from_pretrained(tiny_encoder_dir, add_pooling_layer=False).to(torch.bfloat16).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model = MultiTaskModel.from_encoder(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model(**batch(tiny_tokenizer)).logits[0].dtype == torch.float32
    for asked in (torch.bfloat16, "bfloat16"):  # asked for: the whole model
        halved = MultiTaskModel.from_encoder(tiny_encoder_dir, dtype=asked)
        assert {p.dtype for p in halved.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in MultiTaskModel.from_encoder(tmp_path, dtype="auto").parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="dtype 'half_float' is not a torch dtype"):
        MultiTaskModel.from_encoder(tiny_encoder_dir, dtype="half_float")


def test_an_incomplete_encoder_checkpoint_is_refused(tmp_path, tiny_encoder_dir):
    from safetensors.torch import load_file, save_file

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_encoder_dir / name).read_bytes())
    weights = load_file(tiny_encoder_dir / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layer.1." not in k}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks 16 weights .*encoder\.layer\.1\."):
        MultiTaskModel.from_encoder(tmp_path)


def test_a_truncated_weights_file_is_one_clear_error(tmp_path, tiny_encoder_dir, tiny_model, tiny_tokenizer):
    # what an interrupted copy or download, or a full disk, leaves: safetensors raises its own error type
    shutil.copytree(tiny_encoder_dir, tmp_path / "encoder")
    tiny_model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    for folder in ("encoder", "model"):
        weights = tmp_path / folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"'.*encoder': its safetensors weights are not readable .*save the model"):
        MultiTaskModel.from_encoder(tmp_path / "encoder")
    with pytest.raises(ValueError, match=r"'.*model': its safetensors weights are not readable"):
        load_multitask_model(tmp_path / "model")


def test_labels_added_to_a_saved_config_are_one_clear_error(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tasks"][0][1].append("Science")  # a fourth category, which the saved head has no row for
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"do not fit its config.json .*keep the labels its head was trained with"):
        load_multitask_model(tmp_path)


def test_from_encoder_applies_the_attention_implementation(tiny_encoder_dir, tiny_tokenizer):
    model = MultiTaskModel.from_encoder(tiny_encoder_dir, attn_implementation="eager").eval()
    assert model.encoder.config._attn_implementation == "eager"
    attentions = model(**batch(tiny_tokenizer), output_attentions=True).attentions
    assert len(attentions) == 2 and attentions[0].shape[1] == 2  # one per layer, one map per head


def test_a_local_encoder_path_is_not_written_into_the_config(tmp_path, tiny_model, tiny_encoder_dir):
    tiny_model.save_pretrained(tmp_path)
    assert str(tiny_encoder_dir) not in (tmp_path / "config.json").read_text()


@pytest.mark.parametrize("model_type", sorted(READY_MASK_MODEL_TYPES))
def test_a_ready_mask_gives_the_same_encoding_without_reading_the_mask(model_type):
    """transformers reads a (batch, length) mask on the host to look for padding (a wait on a GPU); the ready 4D mask
    it takes as it is, with the same result."""
    config = AutoConfig.for_model(
        model_type, vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    encoder = AutoModel.from_config(config).eval()
    input_ids = torch.randint(3, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = mask[2, 2:] = 0
    ready = ready_attention_mask(mask, encoder.config)
    assert ready.shape == (3, 1, 9, 9) and ready.dtype == torch.bool
    with torch.no_grad(), count_host_reads() as plain_reads:
        expected = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    with torch.no_grad(), count_host_reads() as ready_reads:
        encoded = encoder(input_ids=input_ids, attention_mask=ready).last_hidden_state
    assert plain_reads and not ready_reads
    torch.testing.assert_close(encoded, expected, rtol=0, atol=0)


def test_other_attention_implementations_keep_their_mask(tiny_encoder_dir):
    mask = torch.ones(2, 5, dtype=torch.long)
    eager = MultiTaskModel.from_encoder(tiny_encoder_dir, attn_implementation="eager")
    assert ready_attention_mask(mask, eager.encoder.config) is mask
    other = AutoConfig.for_model("mpnet", vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    assert ready_attention_mask(mask, other) is mask


def test_on_a_gpu_the_model_hands_the_encoder_a_ready_mask(tiny_model, tiny_tokenizer, monkeypatch):
    inputs = batch(tiny_tokenizer)
    with torch.no_grad():
        expected = tiny_model.eval()(**inputs).logits
    monkeypatch.setattr(mtl.modeling, "host_reads_wait", lambda device: True)  # the GPU path, run on the CPU
    seen = []
    tiny_model.encoder.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    with torch.no_grad(), count_host_reads() as reads:
        logits = tiny_model(**inputs).logits
    assert not reads and seen[0]["attention_mask"].shape == (3, 1, 7, 7)
    for got, want in zip(logits, expected, strict=True):
        torch.testing.assert_close(got, want)
