"""The data index: built once and reused, keyed by what changes it, faithful to the encoder, bad records kept in view."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_records_and_datamodule import BAD_KINDS, good, make_dm, write_pool

from lightning_tive.data import index as index_module
from lightning_tive.data.records import BadRecordError


@pytest.fixture
def builds(monkeypatch):
    """Counts index builds."""
    calls = []
    real = index_module._write_index
    monkeypatch.setattr(index_module, "_write_index", lambda *a, **k: calls.append(a[1].source) or real(*a, **k))
    return calls


def records_with_problems() -> list:
    return [good(0), BAD_KINDS["too_long"][0], good(1, image=None), BAD_KINDS["missing_image"][0], good(2)]


def test_an_index_is_built_once_and_mapped_by_later_setups(tmp_path, processor, builds):
    path = write_pool(tmp_path, records_with_problems())
    first = make_dm(tmp_path, path, processor, on_bad_record="skip", index_dir=str(tmp_path / "index"))
    first.prepare_data()
    first.setup("fit")
    again = make_dm(tmp_path, path, processor, on_bad_record="skip", index_dir=str(tmp_path / "index"))
    again.setup("fit")
    assert builds == [str(path)]
    assert again.pool.ids == first.pool.ids == ["good-0", "good-1", "good-2"]
    assert again.pool_digest == first.pool_digest
    # the cached problems still go through the policy: listed again, or raised
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [s["position"] for s in skipped] == [1, 3] and "not found" in skipped[1]["reason"]
    strict = make_dm(tmp_path, path, processor, index_dir=str(tmp_path / "index"))
    with pytest.raises(BadRecordError, match="position 1.*no supervised token left"):
        strict.setup("fit")
    assert builds == [str(path)]


def test_what_changes_the_content_names_another_index(tmp_path, processor, builds):
    path = write_pool(tmp_path, [good(0), good(1)])
    root = str(tmp_path / "index")
    base = make_dm(tmp_path, path, processor, index_dir=root)
    base.setup("fit")
    shorter = make_dm(tmp_path, path, processor, index_dir=root)
    shorter.max_length = 64
    shorter.setup("fit")
    make_dm(tmp_path, path, processor, index_dir=root, task_rules=[{"task": "q", "prompt_regex": "Question"}]).setup("fit")
    changed = make_dm(tmp_path, write_pool(tmp_path, [good(0), good(5)]), processor, index_dir=root)
    changed.setup("fit")
    assert len(builds) == 4 and len(list((tmp_path / "index").glob("train-*"))) == 4
    assert changed.pool_digest != base.pool_digest


def test_cached_tokens_are_what_the_encoder_gives(tmp_path, processor):
    records = [good(i, image=None if i % 3 == 0 else "img/a.png") for i in range(7)]
    records[4]["conversations"] += [{"from": "human", "value": "and then?"}, {"from": "gpt", "value": "blue it is"}]
    dm = make_dm(tmp_path, write_pool(tmp_path, records), processor, index_dir=str(tmp_path / "index"))
    dm.setup("fit")
    for i in range(dm.pool_size):
        expected = dm.encoder.encode([records[i]])[0]
        item = dm._dataset[i]
        np.testing.assert_array_equal(item["input_ids"].numpy(), expected.input_ids)
        np.testing.assert_array_equal(item["labels"].numpy(), expected.labels)
        assert dm.pool.lengths[i] == len(expected.input_ids)
    assert dm.pool.has_image.tolist() == [r.get("image") is not None for r in records]
    assert [dm.pool_record(i)["conversations"] for i in range(7)] == [r["conversations"] for r in records]


def test_the_pool_digest_follows_records_and_tasks(tmp_path, processor):
    root = str(tmp_path / "index")
    path = write_pool(tmp_path, [good(0, task="a"), good(1, task="b")])
    one = make_dm(tmp_path, path, processor, index_dir=root)
    one.setup("fit")
    relabelled = make_dm(tmp_path, write_pool(tmp_path, [good(0, task="a"), good(1, task="a")]), processor, index_dir=root)
    relabelled.setup("fit")
    assert one.pool_digest != relabelled.pool_digest
    same = make_dm(tmp_path, write_pool(tmp_path, [good(0, task="a"), good(1, task="b")], name="copy.json"), processor,
                   index_dir=root)
    same.setup("fit")
    assert same.pool_digest == one.pool_digest  # content, not the file's name
