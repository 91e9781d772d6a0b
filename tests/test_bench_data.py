import base64
import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench_helpers import png_bytes
from cultengine.bench import data, rows
from cultengine.cli import main


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" if isinstance(r, dict) else r for r in recs))


@pytest.fixture
def canonical(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes())
    (tmp_path / "img" / "bad.png").write_bytes(b"not an image")
    write_jsonl(
        tmp_path / "b.jsonl",
        [
            {
                "id": "ok1",
                "image": "img/a.png",
                "question": "Q?",
                "options": ["x", "y"],
                "answer": "B",
                "country": "Japan",
                "category": "food",
                "extra": 7,
            },
            {
                "id": "ok2",
                "images": [{"bytes": base64.b64encode(png_bytes()).decode()}],
                "question": "Q2?",
                "options": ["x", "y", "z"],
                "answer": 2,
                "country": "Kenya",
            },
            {"id": "ok3", "question": "text only?", "options": ["x", "y"], "answer": "y"},
            {"id": "missing", "image": "img/none.png", "question": "Q", "options": ["x", "y"], "answer": "A"},
            {"id": "broken", "image": "img/bad.png", "question": "Q", "options": ["x", "y"], "answer": "A"},
            {"id": "badans", "question": "Q", "options": ["x", "y"], "answer": "C"},
            "{this is not json\n",
            {"id": "ok1", "question": "dup", "options": ["x", "y"], "answer": 0},
            {"id": "open", "question": "Capital of Japan?", "answer": ["Tokyo", "東京"]},
            {"id": "unl", "question": "Q", "options": ["x", "y"]},
        ],
    )
    return tmp_path / "b.jsonl"


def test_canonical_rows_and_bad_rows(canonical):
    ds = data.load([canonical])
    ids = [r.id for r in ds.rows]
    assert ids == ["ok1", "ok2", "ok3", "open", "unl"]
    r = ds.rows[0]
    assert r.answer == 1 and r.images[0].endswith("img/a.png") and r.meta == {"extra": 7}
    assert (r.region, r.continent, r.western) == ("Eastern Asia", "Asia", False)
    assert ds.rows[1].answer == 2 and isinstance(ds.rows[1].images[0], bytes)
    assert ds.rows[1].region == "Eastern Africa"
    assert ds.rows[2].answer == 1
    assert ds.rows[3].answer == ["Tokyo", "東京"] and ds.rows[4].answer is None
    bad = {(s.line, s.id): s.reason for s in ds.skipped}
    assert "missing image" in bad[(4, "missing")]
    assert "unreadable image" in bad[(5, "broken")]
    assert "not among options" in bad[(6, "badans")]
    assert "malformed JSON" in bad[(7, "")]
    assert bad[(8, "ok1")] == "duplicate id"


def test_cli_validate_exit_code(canonical, capsys):
    assert main(["data", "validate", str(canonical)]) == 1
    out = capsys.readouterr()
    assert "5 rows ok, 5 skipped" in out.out and "b.jsonl:4 id=missing" in out.err


def test_convert_roundtrip_jsonl_and_parquet(canonical, tmp_path):
    ds = data.load([canonical])
    for name in ("out/c.jsonl", "out/c.parquet"):
        data.write(ds.rows, tmp_path / name)
        back = data.load([tmp_path / name])
        assert not back.skipped
        assert [(r.id, r.options, r.answer, r.country, r.region) for r in back.rows] == [
            (r.id, r.options, r.answer, r.country, r.region) for r in ds.rows
        ]
        assert back.rows[0].meta == {"extra": 7}
    assert main(["data", "sample", str(canonical), "-o", str(tmp_path / "s.jsonl"), "-n", "2"]) == 0
    assert len(data.load([tmp_path / "s.jsonl"]).rows) == 2


def test_vlmeval_tsv(tmp_path):
    b64 = base64.b64encode(png_bytes()).decode()
    with (tmp_path / "v.tsv").open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category"])
        w.writerow([10, b64, "Which dish?", "", "Sushi", "Tacos", "Injera", "", "A", "food", "recognition"])
        w.writerow([11, "10", "Same image?", "a hint", "yes", "no", "", "", "B", "food", "reasoning"])
        w.writerow([12, b64, "Bad answer", "", "x", "y", "", "", "D", "food", "r"])
    ds = data.load([tmp_path / "v.tsv"])
    assert [r.id for r in ds.rows] == ["10", "11"]
    assert ds.rows[0].options == ["Sushi", "Tacos", "Injera"] and ds.rows[0].answer == 0
    assert ds.rows[1].images == ds.rows[0].images and ds.rows[1].hint == "a hint"
    assert ds.rows[0].question_type == "recognition"
    assert ds.skipped[0].id == "12" and ds.skipped[0].line == 4


def test_cvqa_parquet(tmp_path):
    img = png_bytes()
    table = pa.Table.from_pylist(
        [
            {
                "ID": "1",
                "image": {"bytes": img, "path": None},
                "Subset": "('Japanese', 'Japan')",
                "Question": "これは何?",
                "Options": ["a", "b", "c", "d"],
                "Label": 2,
                "Category": "Food",
                "Translated Question": "What is this?",
            },
            {
                "ID": "2",
                "image": {"bytes": img, "path": None},
                "Subset": "Mexico-Spanish",
                "Question": "¿Qué?",
                "Options": ["a", "b", "c", "d"],
                "Label": -1,
                "Category": "Food",
                "Translated Question": "What?",
            },
            {
                "ID": "3",
                "image": {"bytes": b"junk", "path": None},
                "Subset": "Kenya-Swahili",
                "Question": "Nini?",
                "Options": ["a", "b"],
                "Label": 0,
                "Category": "Food",
                "Translated Question": "What?",
            },
        ]
    )
    pq.write_table(table, tmp_path / "cvqa.parquet")
    ds = data.load([tmp_path / "cvqa.parquet"])
    a, b = ds.rows
    assert (a.country, a.language, a.answer, a.region) == ("Japan", "Japanese", 2, "Eastern Asia")
    assert (b.country, b.language, b.answer, b.continent) == ("Mexico", "Spanish", None, "North America")
    assert a.meta["Translated Question"] == "What is this?"
    assert ds.skipped[0].id == "3" and "unreadable" in ds.skipped[0].reason


def test_parse_subset():
    assert rows.parse_subset("('Egyptian Arabic', 'Egypt')") == ("Egypt", "Egyptian Arabic")
    assert rows.parse_subset("Spanish-Mexico") == ("Mexico", "Spanish")
    assert rows.parse_subset("Indonesia-Javanese") == ("Indonesia", "Javanese")


def test_almbench_and_culturalvqa(tmp_path):
    (tmp_path / "i.png").write_bytes(png_bytes())
    write_jsonl(
        tmp_path / "alm.jsonl",
        [
            {
                "ID": "a1",
                "file_name": "i.png",
                "Language": "Urdu",
                "Country": "Pakistan",
                "Category": "Food",
                "Question_Type": "Multiple Choice Questions",
                "English_Question": "Which dish is shown? A. Biryani B. Sushi C. Pizza D. Tacos",
                "English_Answer": "A. Biryani",
            },
            {
                "ID": "a2",
                "file_name": "i.png",
                "Language": "Urdu",
                "Category": "Food",
                "Question_Type": "True False Question",
                "English_Question": "Is this biryani?",
                "English_Answer": "True",
            },
            {
                "ID": "a3",
                "file_name": "i.png",
                "Language": "Urdu",
                "Category": "Food",
                "Question_Type": "Short Questions",
                "English_Question": "Name the dish.",
                "English_Answer": "Biryani",
            },
        ],
    )
    ds = data.load([tmp_path / "alm.jsonl"])
    a1, a2, a3 = ds.rows
    assert a1.question == "Which dish is shown?" and a1.options == ["Biryani", "Sushi", "Pizza", "Tacos"]
    assert a1.answer == 0 and a1.region == "Southern Asia"
    assert a2.options == ["True", "False"] and a2.answer == 0
    assert a3.options == [] and a3.answer == ["Biryani"]
    write_jsonl(
        tmp_path / "cv.jsonl",
        [
            {
                "u_id": "c1",
                "image": "i.png",
                "question": "What is served?",
                "answers": ["injera", "bread"],
                "country": "Ethiopia",
            },
            {"u_id": "c2", "image": "i.png", "question": "What is this?", "country": "Brazil"},
        ],
    )
    cv = data.load([tmp_path / "cv.jsonl"])
    assert cv.rows[0].answer == ["injera", "bread"] and cv.rows[0].region == "Eastern Africa"
    assert cv.rows[1].answer is None
