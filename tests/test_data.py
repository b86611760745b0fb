"""Datasets: BBC News, the user's JSONL / folders, validation, splits, batches."""

from __future__ import annotations

import json

import pytest
import torch

from coalora.export.data import (
    Batches,
    DataError,
    TextDataset,
    classification_batches,
    lm_batches,
    lm_blocks,
    load_bbc_news,
    load_dataset,
    load_jsonl,
    load_text_folder,
    train_val_split,
)
from coalora.export.models import tiny_tokenizer


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_bbc_news_has_five_topics():
    ds = load_bbc_news()
    assert len(ds) == 2225
    assert ds.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert set(ds.labels) == set(range(5))
    assert all(t.strip() for t in ds.texts)
    lm = load_dataset("bbc", "lm")
    assert lm.labels is None and len(lm) == 2225


def test_jsonl_classification(tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [{"text": "good", "label": "pos"}, "", {"text": "bad", "label": "neg"}],
    )
    ds = load_dataset(path, "classify")
    assert ds.texts == ["good", "bad"]
    assert ds.label_names == ["neg", "pos"] and ds.labels == [1, 0]
    lm = load_jsonl(path, "lm")
    assert lm.task == "lm" and lm.num_labels == 0


def test_integer_labels_sort_numerically(tmp_path):
    rows = [{"text": f"t{i}", "label": i} for i in (10, 2, 2)]
    ds = load_jsonl(_write_jsonl(tmp_path / "d.jsonl", rows), "classify")
    assert ds.label_names == ["2", "10"] and ds.labels == [1, 0, 0]


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl: file is empty"):
        load_jsonl(path, "lm")


def test_bad_json_names_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}, '{"text": oops}'])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        load_jsonl(path, "lm")


def test_missing_field(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'label'"):
        load_jsonl(path, "classify")
    path = _write_jsonl(tmp_path / "e.jsonl", [{"body": "a"}])
    with pytest.raises(DataError, match=r"e\.jsonl:1: missing field 'text'"):
        load_jsonl(path, "lm")
    path = _write_jsonl(tmp_path / "f.jsonl", [[1, 2]])
    with pytest.raises(DataError, match=r"f\.jsonl:1: expected a JSON object"):
        load_jsonl(path, "lm")


def test_single_class(tmp_path):
    path = _write_jsonl(tmp_path / "one.jsonl", [{"text": t, "label": "x"} for t in "abc"])
    with pytest.raises(DataError, match="only one class"):
        load_jsonl(path, "classify")


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "nope.jsonl", "lm")
    with pytest.raises(DataError, match="unknown task"):
        load_dataset("bbc", "summarize")


def test_text_folder(tmp_path):
    for label, texts in {"cats": ["meow", "purr"], "dogs": ["woof"]}.items():
        (tmp_path / label).mkdir()
        for i, t in enumerate(texts):
            (tmp_path / label / f"{i}.txt").write_text(t)
    ds = load_text_folder(tmp_path, "classify")
    assert ds.label_names == ["cats", "dogs"] and ds.labels == [0, 0, 1]
    assert len(load_dataset(tmp_path, "lm")) == 3
    (tmp_path / "dogs" / "1.txt").write_text("  ")
    with pytest.raises(DataError, match=r"1\.txt: file is empty"):
        load_text_folder(tmp_path, "classify")
    with pytest.raises(DataError, match="no <label>"):
        load_text_folder(tmp_path / "cats", "classify")


def test_split_is_fixed_and_stratified():
    ds = TextDataset(
        texts=[str(i) for i in range(100)],
        labels=[i % 4 for i in range(100)],
        label_names=list("abcd"),
    )
    a = train_val_split(ds, 0.2, seed=7)
    b = train_val_split(ds, 0.2, seed=7)
    assert a.val_indices == b.val_indices
    assert a.val_indices != train_val_split(ds, 0.2, seed=8).val_indices
    assert sorted(a.train_indices + a.val_indices) == list(range(100))
    assert len(a.val) == 20 and sorted(set(a.val.labels)) == [0, 1, 2, 3]
    record = json.loads(json.dumps(a.to_dict()))
    assert record["seed"] == 7 and record["val_indices"] == a.val_indices


def test_lm_blocks_and_batches(tokenizer):
    # Distinct content everywhere, so distinct blocks have distinct ids.
    ds = TextDataset(texts=[" ".join(map(str, range(150))), " ".join(map(str, range(150, 300)))])
    blocks = lm_blocks(ds.texts, tokenizer, 16)
    assert blocks.dtype == torch.long and blocks.shape[1] == 16
    assert (blocks == tokenizer.eos_token_id).any()  # documents are separated
    batches = lm_batches(ds, tokenizer, 16, batch_size=4, seed=1)
    first = batches(0)
    assert first["input_ids"].shape == (4, 16)
    assert torch.equal(first["input_ids"], first["labels"])
    torch.testing.assert_close(batches(3)["input_ids"], batches(3)["input_ids"])
    # Every step of an epoch draws distinct blocks; sequential iteration covers all of them.
    epoch = torch.cat([batches(i)["input_ids"] for i in range(batches.steps_per_epoch)])
    assert len({tuple(r) for r in epoch.tolist()}) == len(epoch)
    assert sum(b["input_ids"].shape[0] for b in batches) == blocks.shape[0]
    with pytest.raises(DataError, match="fewer than one block"):
        lm_blocks(["hi"], tokenizer, 64)


def test_every_block_starts_as_the_tokenizer_starts_a_text():
    from coalora.runtime.data import lm_block_ids, text_lead

    assert text_lead([2, 10, 11], [10, 11]) == [2]  # Gemma: BOS first
    assert text_lead([10, 11], [10, 11]) == []  # SmolLM2: nothing
    assert text_lead([101, 10, 11, 102], [10, 11]) == [101]  # BERT: [CLS] before, [SEP] after
    blocks = lm_block_ids([[5, 6, 7], [8, 9]], [1], [2], 4)
    assert blocks.tolist() == [[2, 5, 6, 7], [2, 1, 8, 9]]
    assert lm_block_ids([[5, 6, 7], [8, 9]], [1], [], 3).tolist() == [[5, 6, 7], [1, 8, 9]]
    with pytest.raises(DataError, match="block_size must be >= 3"):
        lm_block_ids([[5] * 10], [1], [2], 2)


def test_the_exporter_and_the_device_cut_the_same_blocks_with_a_bos_tokenizer():
    from types import SimpleNamespace

    from tokenizers import processors

    from coalora.export.models import tiny_tokenizer
    from coalora.runtime import evaluate

    hf = tiny_tokenizer()
    hf.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", hf.bos_token_id)]
    )
    assert hf("hi")["input_ids"][0] == hf.bos_token_id
    texts = ["first article text", "a second, longer article about something else entirely"]
    exported = lm_blocks(texts, hf, 12)
    device = evaluate.lm_blocks(
        SimpleNamespace(tokenizer=hf.backend_tokenizer, eos_token_ids=[hf.eos_token_id]),
        texts,
        12,
    )
    assert exported.tolist() == device.tolist()
    assert (exported[:, 0] == hf.bos_token_id).all() and exported.shape[1] == 12


def test_classification_batches_trim_padding(tokenizer):
    ds = TextDataset(
        texts=["short", "a much longer text here", "mid text"] * 4,
        labels=[0, 1, 2] * 4,
        label_names=list("abc"),
    )
    batches = classification_batches(ds, tokenizer, max_length=64, batch_size=3)
    batch = next(iter(batches))
    width = batch["input_ids"].shape[1]
    assert width == int(batch["attention_mask"].sum(1).max()) < 64
    assert batch["labels"].tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="needs labels"):
        classification_batches(TextDataset(texts=["x"]), tokenizer, 8, 1)


def test_batches_validate_shapes():
    with pytest.raises(DataError, match="share their first dimension"):
        Batches({"a": torch.zeros(3, 2), "b": torch.zeros(4)}, batch_size=2)
