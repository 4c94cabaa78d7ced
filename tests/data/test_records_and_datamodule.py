"""Bad records under both policies, lazy image failures, and the DataModule's pool-index API."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_tive.data.datamodule import LlavaDataModule
from lightning_tive.data.records import BadRecordError, load_records, structure_problem


def good(i: int, image: str | None = "img/a.png", task: str | None = None) -> dict:
    first = ("<image>\n" if image else "") + f"Question {i}?"
    record = {"id": f"good-{i}", "conversations": [{"from": "human", "value": first}, {"from": "gpt", "value": "red"}]}
    if image:
        record["image"] = image
    if task:
        record["task"] = task
    return record


BAD_KINDS = {
    "malformed": ("not a record", "malformed structure"),
    "no_convs": ({"id": "no_convs", "conversations": "hi"}, "malformed structure"),
    "empty": ({"id": "empty", "conversations": []}, "empty conversation"),
    "gpt_first": (
        {"id": "gpt_first", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
        "first turn is not from human",
    ),
    "not_alternating": (
        {
            "id": "not_alternating",
            "conversations": [
                {"from": "human", "value": "a"},
                {"from": "human", "value": "b"},
                {"from": "gpt", "value": "c"},
            ],
        },
        "roles do not alternate",
    ),
    "missing_image": ({**good(0, "img/none.png"), "id": "missing_image"}, "not found"),
    "mark_without_image": (
        {"id": "mark_without_image", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        "without an image",
    ),
    "image_without_mark": (
        {"id": "image_without_mark", "image": "img/a.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        "appears 0 times",
    ),
    "two_marks": (
        {
            "id": "two_marks",
            "image": "img/a.png",
            "conversations": [{"from": "human", "value": "<image>\n<image>\nq"}, {"from": "gpt", "value": "a"}],
        },
        "appears 2 times",
    ),
    "too_long": (
        {"id": "too_long", "image": "img/a.png", "conversations": [{"from": "human", "value": "<image>\n" + "word " * 300}, {"from": "gpt", "value": "a"}]},
        "no supervised token left",
    ),
}


def write_pool(root: Path, records: list, name: str = "train.json") -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "img" / "a.png")
    path = root / name
    path.write_text(json.dumps(records))
    return path


def make_dm(tmp_path: Path, path: Path, processor, **kwargs) -> LlavaDataModule:
    dm = LlavaDataModule(
        train_path=str(path), image_folder=str(tmp_path), max_length=128, batch_size=4, output_dir=str(tmp_path / "out"), **kwargs
    )
    dm.attach_processor(processor)
    return dm


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_each_bad_kind_raises_naming_the_record(tmp_path, processor, kind):
    bad, reason = BAD_KINDS[kind]
    path = write_pool(tmp_path, [good(0), good(1), bad, good(2)])
    dm = make_dm(tmp_path, path, processor)
    with pytest.raises(BadRecordError) as info:
        dm.setup("fit")
    assert info.value.position == 2
    assert reason in info.value.reason
    expected_id = bad["id"] if isinstance(bad, dict) else "<no id, position 2>"
    assert f"id={expected_id!r}" in str(info.value) and "position 2" in str(info.value)


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_each_bad_kind_is_skipped_and_listed(tmp_path, processor, kind):
    bad, reason = BAD_KINDS[kind]
    path = write_pool(tmp_path, [good(0), bad, good(1), good(2, image=None)])
    dm = make_dm(tmp_path, path, processor, on_bad_record="skip")
    dm.setup("fit")
    assert dm.pool.ids == ["good-0", "good-1", "good-2"]  # no valid record lost, order kept
    assert dm.pool.positions.tolist() == [0, 2, 3]
    lines = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["position"] == 1 and reason in lines[0]["reason"]
    assert dm.skip_log.count == 1


def test_structure_checks_accept_valid_multi_turn_and_text_only():
    assert structure_problem(good(0)) is None
    assert structure_problem(good(0, image=None)) is None
    record = good(0)
    record["conversations"] += [{"from": "human", "value": "more?"}, {"from": "gpt", "value": "no"}]
    assert structure_problem(record) is None


def test_json_lines_with_a_broken_line_keeps_positions(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text(json.dumps(good(0)) + "\n{broken\n" + json.dumps(good(1)) + "\n")
    records = load_records(path)
    assert len(records) == 3
    assert "line 2 is not valid JSON" in structure_problem(records[1])
    assert records[2]["id"] == "good-1"


def test_image_that_breaks_after_setup_follows_the_policy(tmp_path, processor):
    records = [good(0), {**good(1, "img/b.png")}, good(2)]
    path = write_pool(tmp_path, records)
    Image.new("RGB", (30, 30), (0, 0, 255)).save(tmp_path / "img" / "b.png")
    dm = make_dm(tmp_path, path, processor, on_bad_record="skip")
    dm.setup("fit")
    (tmp_path / "img" / "b.png").write_bytes(b"not a png any more")
    batch = next(iter(dm.pool_dataloader([0, 1, 2], batch_size=3)))
    assert batch["pool_index"].tolist() == [0, 2]
    assert batch["skipped_pool_index"].tolist() == [1]
    lines = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert lines[-1]["id"] == "good-1" and lines[-1]["stage"] == "load" and "unreadable" in lines[-1]["reason"]

    strict = make_dm(tmp_path, path, processor)
    (tmp_path / "img" / "b.png").unlink()
    Image.new("RGB", (30, 30)).save(tmp_path / "img" / "b.png")
    strict.setup("fit")
    (tmp_path / "img" / "b.png").write_bytes(b"broken")
    with pytest.raises(BadRecordError, match="good-1"):
        next(iter(strict.pool_dataloader([1], batch_size=1)))


def test_pool_indices_round_trip_and_tasks(tmp_path, processor):
    records = [good(i, task="alpha" if i % 3 else "beta") for i in range(9)] + [good(9, image=None), good(10)]
    path = write_pool(tmp_path, records)
    dm = make_dm(tmp_path, path, processor)
    dm.setup("fit")
    assert dm.pool_size == 11
    # no task field: text-only is ShareGPT to the built-in labeller; an unrecognised image path is unknown
    assert dm.task_names == ["alpha", "beta", "sharegpt", "unknown"]
    expected = [r.get("task") for r in records[:9]] + ["sharegpt", "unknown"]
    assert [dm.task_names[t] for t in dm.pool_task_ids] == expected
    order = [7, 2, 9, 0, 5]
    seen = []
    for batch in dm.pool_dataloader(order, batch_size=2):
        seen += batch["pool_index"].tolist()
        for row, index in enumerate(batch["pool_index"].tolist()):
            assert batch["task_id"][row] == dm.pool_task_ids[index]
    assert seen == order
    assert dm.pool_record(9)["id"] == "good-9" and dm.pool_record(9)["task"] == "sharegpt"
    assert dm.pool_record(3)["task"] == "beta"


@pytest.mark.parametrize("group_by_length", [False, True])
def test_train_loader_serves_exactly_the_multiset(tmp_path, processor, group_by_length):
    records = [good(i, image=None if i % 4 == 0 else "img/a.png") for i in range(12)]
    path = write_pool(tmp_path, records)
    dm = make_dm(tmp_path, path, processor, group_by_length=group_by_length)
    dm.setup("fit")
    multiset = [0, 0, 3, 5, 5, 5, 11, 4]
    dm.set_train_indices(multiset)
    epochs = []
    for _ in range(2):
        served = [i for batch in dm.train_dataloader() for i in batch["pool_index"].tolist()]
        assert Counter(served) == Counter(multiset)
        epochs.append(served)
    again = make_dm(tmp_path, path, processor, group_by_length=group_by_length)
    again.setup("fit")
    again.set_train_indices(multiset)
    assert [i for b in again.train_dataloader() for i in b["pool_index"].tolist()] == epochs[0]  # seeded
    with pytest.raises(IndexError, match="out of range"):
        dm.set_train_indices([0, 12])


def test_state_dict_restores_the_training_multiset(tmp_path, processor):
    path = write_pool(tmp_path, [good(i) for i in range(5)])
    dm = make_dm(tmp_path, path, processor)
    dm.setup("fit")
    dm.set_train_indices([4, 4, 1])
    resumed = make_dm(tmp_path, path, processor)
    resumed.load_state_dict(dm.state_dict())
    resumed.setup("fit")
    assert resumed.train_indices.tolist() == [4, 4, 1]


def test_held_out_split_per_task_is_seeded_and_disjoint(tmp_path, processor):
    records = [good(i, task=["a", "b"][i % 2]) for i in range(40)]
    path = write_pool(tmp_path, records)
    dm = make_dm(tmp_path, path, processor, val_ratio=0.25)
    dm.setup("fit")
    assert dm.pool_size == 30 and len(dm.val_pool) == 10
    assert set(dm.pool.ids).isdisjoint(dm.val_pool.ids)
    assert Counter(dm.val_pool.task_ids.tolist()) == {0: 5, 1: 5}
    again = make_dm(tmp_path, path, processor, val_ratio=0.25)
    again.setup("fit")
    assert again.val_pool.ids == dm.val_pool.ids
    batch = next(iter(dm.val_dataloader()))
    assert batch["answers"][0] == "red" and batch["prompt_ids"].shape[0] == batch["input_ids"].shape[0]
    assert (batch["prompt_attention_mask"][:, -1] == 1).all()  # left padded


def test_demo_mixture_goes_through_the_same_reader(processor):
    from lightning_tive.data.demo import DemoConfig

    dm = LlavaDataModule(demo=DemoConfig(train_sizes={"color": 12, "text": 6, "caption": 4}, val_size=3), max_length=256)
    dm.attach_processor(processor)
    dm.setup("fit")
    assert Counter(dm.task_names[t] for t in dm.pool_task_ids) == {"color": 12, "text": 6, "caption": 4}
    assert dm.task_eval_kind("color") == "exact_match" and dm.task_eval_kind("caption") == "token_f1"
    batch = next(iter(dm.pool_dataloader(np.arange(dm.pool_size), batch_size=dm.pool_size)))
    assert batch["pixel_values"].shape[0] == 16  # the text task has no images


def test_train_path_required_without_demo():
    with pytest.raises(ValueError, match="train_path is required"):
        LlavaDataModule(demo=None)


def test_set_up_outside_a_run_never_touches_the_working_directory(tmp_path, processor, monkeypatch, caplog):
    path = write_pool(tmp_path / "data", [good(0), {"id": "bad", "conversations": []}])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "skipped.jsonl").write_text("a user's own file\n")
    dm = LlavaDataModule(train_path=str(path), image_folder=str(tmp_path / "data"), on_bad_record="skip")
    dm.attach_processor(processor)
    dm.setup("fit")
    assert "skipped record id='bad'" in caplog.text
    assert (tmp_path / "skipped.jsonl").read_text() == "a user's own file\n"
    assert dm.pool.ids == ["good-0"]


def _append_lines(path, start, count):
    from lightning_tive.data.records import SkipLog

    log = SkipLog(path)
    for k in range(start, start + count):
        log.write(f"r{k}", k, "x" * 300, stage="load")


def test_skip_log_lines_from_many_processes_are_whole_and_none_is_lost(tmp_path):
    import multiprocessing

    path = tmp_path / "skipped.jsonl"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_append_lines, args=(path, 1000 * w, 200)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(line["position"] for line in lines) == sorted(1000 * w + k for w in range(4) for k in range(200))


def test_images_broken_at_load_time_are_listed_from_loader_workers_and_other_ranks(tmp_path, processor):
    from lightning_tive.data.records import SkipLog

    records = [good(i, image=f"img/{i}.png") for i in range(8)]
    path = write_pool(tmp_path, records)
    for i in range(8):
        Image.new("RGB", (20, 20), (0, 0, 200)).save(tmp_path / "img" / f"{i}.png")
    for i in (2, 5):
        (tmp_path / "img" / f"{i}.png").write_bytes(b"not a png")  # exists, so set-up keeps it
    dm = make_dm(tmp_path, path, processor, on_bad_record="skip", num_workers=2)
    dm.setup("fit")
    assert dm.pool_size == 8
    seen = [i for batch in dm.pool_dataloader(batch_size=4) for i in batch["pool_index"].tolist()]
    assert sorted(seen) == [0, 1, 3, 4, 6, 7]
    listed = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["stage"]) for r in listed) == [("good-2", "load"), ("good-5", "load")]
    # a process other than the first lists what it met while loading, not the shared set-up skips
    other = SkipLog(tmp_path / "rank1.jsonl", write_setup=False)
    other.write("a", 0, "bad json", stage="train")
    other.write("b", 1, "broken image", stage="load")
    assert [json.loads(line)["id"] for line in (tmp_path / "rank1.jsonl").read_text().splitlines()] == ["b"]
    assert other.count == 2
