import json

from cultengine import runlog
from cultengine.bench import results


def test_torn_last_line_dropped_and_repaired(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "pre')
    assert [r["id"] for r in runlog.read(p)] == ["a", "b"]
    w = runlog.ResultLog(p)  # repairs before appending
    w.write([{"id": "c"}])
    w.close()
    assert [r["id"] for r in runlog.read(p)] == ["a", "b", "c"]
    assert p.read_text().endswith('{"id": "c"}\n')


def test_merge_orders_dedupes_and_drops_shards(tmp_path):
    (tmp_path / "results.shard-0-of-2.jsonl").write_text('{"id": "b", "v": 1}\n{"id": "a", "v": 1}\n')
    (tmp_path / "results.shard-1-of-2.jsonl").write_text('{"id": "c", "v": 1}\n')
    merged = results.merge(tmp_path, ["a", "b", "c", "d"], extra=[{"id": "d", "v": 2}, {"id": "a", "v": 3}])
    assert [(r["id"], r["v"]) for r in merged] == [("a", 1), ("b", 1), ("c", 1), ("d", 2)]
    assert [p.name for p in results.result_files(tmp_path)] == ["results.jsonl"]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "b", "c", "d"]


def test_shard_file_names(tmp_path):
    assert results.shard_file(tmp_path, None).name == "results.jsonl"
    assert results.shard_file(tmp_path, (1, 4)).name == "results.shard-1-of-4.jsonl"
