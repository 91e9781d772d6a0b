"""Published benchmark schemas, Hugging Face folders and column maps, each built here from its schema."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench_helpers import png_bytes
from cultengine.bench import data, formats
from cultengine.bench.cli import register


def opts(**kw):
    return formats.ImportOptions(**kw)


def load(path, **kw):
    return data.load([path], opts=opts(**kw))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def cvqa_row(i, label=1, subset="('Japanese', 'Japan')", image=None, **kw):
    return {
        "image": image or {"bytes": png_bytes(), "path": None},
        "ID": f"q{i}",
        "Subset": subset,
        "Question": "これは何ですか?",
        "Translated Question": "What is this?",
        "Options": ["寿司", "ラーメン", "天ぷら", "うどん"],
        "Translated Options": ["sushi", "ramen", "tempura", "udon"],
        "Label": label,
        "Category": "Cooking and food",
        "Image Type": "Self",
        "Image Source": "own",
        "License": "CC BY-SA",
        **kw,
    }


@pytest.fixture
def cvqa_file(tmp_path):
    rows = [
        cvqa_row(0),
        cvqa_row(1, label=-1, subset="('Spanish', 'Mexico')"),
        cvqa_row(2, label=7),
        cvqa_row(4, image={"bytes": None, "path": None}),
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test-00000-of-00001.parquet")
    return tmp_path / "test-00000-of-00001.parquet"


def test_cvqa_mapping_languages_and_bad_rows(cvqa_file):
    ds = load(cvqa_file)
    a, b = ds.rows
    assert (a.id, a.question, a.options, a.answer) == (
        "q0",
        "これは何ですか?",
        ["寿司", "ラーメン", "天ぷら", "うどん"],
        1,
    )
    assert (a.country, a.language, a.region, a.continent, a.category) == (
        "Japan",
        "Japanese",
        "Eastern Asia",
        "Asia",
        "Cooking and food",
    )
    assert a.question_type == "cvqa" and isinstance(a.images[0], bytes) and a.meta["License"] == "CC BY-SA"
    assert a.meta["prompt_lang"] == "local" and a.meta["Image Source"] == "own"
    assert (b.country, b.language, b.answer, b.labeled) == ("Mexico", "Spanish", None, False)
    why = {s.id: (s.line, s.reason) for s in ds.skipped}
    assert why["q2"][0] == 3 and "Label 7 out of range for 4 options" in why["q2"][1]
    assert why["q4"][0] == 4 and "missing image" in why["q4"][1]
    (cvqa_file.parent / "p.png").write_bytes(png_bytes())
    local = {"bytes": None, "path": "p.png"}  # JSON holds the image as a path beside the file
    write_jsonl(
        cvqa_file.with_name("cvqa.jsonl"),
        [{**cvqa_row(3, Options="sushi, ramen"), "image": local}, {**cvqa_row(6), "image": local}],
    )
    loaded = data.load([cvqa_file.with_name("cvqa.jsonl")], fmt="cvqa")
    bad = loaded.skipped[0]
    assert (bad.line, bad.id) == (1, "q3") and "Options is not a list" in bad.reason
    assert [r.id for r in loaded.rows] == ["q6"] and loaded.rows[0].images == [str(cvqa_file.parent / "p.png")]

    en = load(cvqa_file, lang="en").rows[0]
    assert (en.question, en.options, en.answer, en.language) == (
        "What is this?",
        ["sushi", "ramen", "tempura", "udon"],
        1,
        "Japanese",
    )
    assert en.meta["prompt_lang"] == "en"
    both = load(cvqa_file, lang="both").rows
    assert [r.id for r in both] == ["q0|local", "q0|en", "q1|local", "q1|en"]
    assert both[1].question == "What is this?" and both[0].question == "これは何ですか?"
    assert both[1].meta["source_id"] == "q0" and both[1].meta["prompt_lang"] == "en"
    untranslated = {**cvqa_row(5), "Translated Options": None, "image": local}
    write_jsonl(cvqa_file.with_name("untranslated.jsonl"), [untranslated, {**cvqa_row(6), "image": local}])
    skip = data.load([cvqa_file.with_name("untranslated.jsonl")], fmt="cvqa", opts=opts(lang="en")).skipped[0]
    assert "--cvqa-lang en: no Translated Question / Translated Options" in skip.reason


def test_cvqa_submission_for_unlabelled_rows(cvqa_file):
    rows = load(cvqa_file, lang="both").rows
    recs = [{"id": r.id, "pred_index": i % 4} for i, r in enumerate(rows)]
    subs = formats.submissions(rows, recs)
    assert subs == {"cvqa_submission_local.json": {"q1": 2}, "cvqa_submission_en.json": {"q1": 3}}


def test_almbench_all_question_types(tmp_path):
    img = {"bytes": png_bytes(), "path": "a.png"}
    base = {"file_name": img, "Language": "Urdu", "Category": "Food", "Image_Url": "https://x.org/a.png"}
    rows = [
        {
            **base,
            "ID": "m1",
            "Question_Type": "Multiple Choice Questions",
            "English_Question": "Which dish is shown? A. Biryani B. Sushi C. Pizza D. Tacos",
            "English_Answer": "A. Biryani",
            "Translated_Question": "کون سی ڈش ہے؟ A. بریانی B. سوشی C. پیزا D. ٹاکو",
            "Translated_Answer": "A. بریانی",
        },
        {
            **base,
            "ID": "t1",
            "Question_Type": "True False Question",
            "English_Question": "Is this biryani?",
            "English_Answer": "True",
            "Translated_Question": "کیا یہ بریانی ہے؟",
            "Translated_Answer": "درست",
        },
        {
            **base,
            "ID": "s1",
            "Question_Type": "Short Questions",
            "English_Question": "Name the dish.",
            "English_Answer": "Biryani",
            "Translated_Question": "ڈش کا نام بتائیں۔",
            "Translated_Answer": "بریانی",
        },
        {
            **base,
            "ID": "l1",
            "Question_Type": "LVQA",
            "English_Question": "Describe the dish.",
            "English_Answer": "A rice dish with spices.",
            "Translated_Question": "",
            "Translated_Answer": "",
        },
        {**base, "ID": "u1", "Question_Type": "Essay", "English_Question": "?", "English_Answer": "x"},
        {**base, "ID": "m2", "Question_Type": "MCQ", "English_Question": "Which dish?", "English_Answer": "A"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "alm.parquet")
    ds = load(tmp_path / "alm.parquet")
    m, t, s, lq = ds.rows
    assert (m.question, m.options, m.answer, m.question_type) == (
        "کون سی ڈش ہے؟",
        ["بریانی", "سوشی", "پیزا", "ٹاکو"],
        0,
        "MCQ",
    )
    assert m.language == "Urdu" and m.category == "Food" and m.meta["Question_Type"] == "Multiple Choice Questions"
    assert m.meta["english_question"].startswith("Which dish") and isinstance(m.images[0], bytes)
    assert (t.options, t.answer, t.question_type) == (["True", "False"], 0, "T/F")  # the English answer labels it
    assert (s.question, s.options, s.answer, s.question_type) == ("ڈش کا نام بتائیں۔", [], ["بریانی"], "SVQA")
    assert (lq.question, lq.answer, lq.question_type) == ("Describe the dish.", ["A rice dish with spices."], "LVQA")
    why = {x.id: x.reason for x in ds.skipped}
    assert "unknown Question_Type 'Essay'" in why["u1"] and "without lettered options" in why["m2"]
    en = load(tmp_path / "alm.parquet", lang="en").rows
    assert en[0].options == ["Biryani", "Sushi", "Pizza", "Tacos"] and en[2].answer == ["Biryani"]


def test_worldcuisines_prompt_options_and_image_root(tmp_path):
    root = tmp_path / "kb_images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "Nasi_goreng.jpg").write_bytes(png_bytes())
    url2 = "https://upload.wikimedia.org/x/y/Rendang%20daging.jpg?width=300"
    (root / (hashlib.sha1(url2.encode()).hexdigest() + ".png")).write_bytes(png_bytes())  # named by a hash
    prompt = (
        "What is the name of this dish?\n1. Rendang\n2. Nasi goreng\n3. Sate\n4. Gado-gado\n5. Soto\n"
        "Answer with the option's number."
    )
    rows = [
        {
            "qa_id": "1",
            "lang": "en",
            "image_url": "https://upload.wikimedia.org/a/b/Nasi_goreng.jpg",
            "multi_choice_prompt": prompt,
            "multi_choice_answer": 2,
            "open_ended_prompt": "What is this dish?",
            "answer": "Nasi goreng",
            "prompt_type": "dish name",
            "food_id": "7",
        },
        {
            "qa_id": "2",
            "lang": "id",
            "image_url": url2,
            "multi_choice_prompt": prompt,
            "multi_choice_answer": 1,
            "open_ended_prompt": "Apa nama hidangan ini?",
            "answer": "Rendang",
        },
        {
            "qa_id": "3",
            "lang": "en",
            "image_url": "https://example.org/missing.jpg",
            "multi_choice_prompt": prompt,
            "multi_choice_answer": 1,
            "open_ended_prompt": "?",
            "answer": "x",
        },
        {
            "qa_id": "4",
            "lang": "en",
            "image_url": "https://upload.wikimedia.org/a/b/Nasi_goreng.jpg",
            "multi_choice_prompt": "Name it.",
            "multi_choice_answer": 1,
            "open_ended_prompt": "?",
            "answer": "x",
        },
    ]
    f = write_jsonl(tmp_path / "wc.jsonl", rows)
    ds = load(f, image_root=root)
    a, b = ds.rows
    assert (a.id, a.question, a.options, a.answer) == (
        "1",
        "What is the name of this dish?",
        ["Rendang", "Nasi goreng", "Sate", "Gado-gado", "Soto"],
        1,
    )
    assert a.images == [str(root / "sub" / "Nasi_goreng.jpg")] and a.language == "en"
    assert a.meta["instruction"] == "Answer with the option's number." and a.meta["answer_text"] == "Nasi goreng"
    assert a.category == "dish name" and a.question_type == "worldcuisines-mc"
    assert b.images[0].endswith(".png") and b.answer == 0
    why = {x.id: x.reason for x in ds.skipped}
    assert "missing image https://example.org/missing.jpg" in why["3"] and "options found" in why["4"]
    given = load(f, image_root=root, mc_prompt="as-given").rows[0]
    assert (given.question, given.options, given.answer) == (prompt, ["1", "2", "3", "4", "5"], 1)
    assert given.meta["prompt_as_given"] is True
    open_ = load(f, image_root=root, open_answers=True).rows[0]
    assert (open_.question, open_.options, open_.answer) == ("What is this dish?", [], ["Nasi goreng"])
    (tmp_path / "local.png").write_bytes(png_bytes())
    write_jsonl(tmp_path / "wc2.jsonl", [{**rows[0], "qa_id": "9", "image_path": "local.png"}, rows[1]])
    no_root = load(tmp_path / "wc2.jsonl")
    assert [r.id for r in no_root.rows] == ["9"] and "need --image-root" in no_root.skipped[0].reason


def test_seavqa(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "t.png").write_bytes(png_bytes())
    rows = [
        {
            "question": "What festival is this?",
            "choice_a": "Songkran",
            "choice_b": "Loy Krathong",
            "choice_c": "Diwali",
            "choice_d": "Tet",
            "correct_answer": "b",
            "image_path": "imgs/t.png",
            "country": "Thailand",
            "category": "Festival",
        },
        {
            "question": "Which one?",
            "choice_a": "x",
            "choice_b": "y",
            "choice_c": "z",
            "choice_d": "w",
            "correct_answer": "e",
            "image_path": "imgs/t.png",
            "country": "Thailand",
        },
    ]
    ds = load(write_jsonl(tmp_path / "sea.jsonl", rows))
    (r,) = ds.rows
    assert (r.question, r.options, r.answer) == (
        "What festival is this?",
        ["Songkran", "Loy Krathong", "Diwali", "Tet"],
        1,
    )
    assert (r.country, r.region, r.category, r.images) == (
        "Thailand",
        "South-eastern Asia",
        "Festival",
        [str(tmp_path / "imgs" / "t.png")],
    )
    assert ds.skipped[0].line == 2 and "not among options" in ds.skipped[0].reason


def test_blend_multiple_choice_and_short_answer(tmp_path):
    mc = [
        {
            "MCQID": "Al-en-06_1",
            "ID": "Al-en-06",
            "country": "South_Korea",
            "prompt": "What is a common school cafeteria food in South Korea? Without any explanation, choose only "
            "one from the given alphabet choices(e.g., A, B, C). Provide as JSON format: "
            '{"answer_choice":""}\n\nA. kimchi\nB. tacos\nC. paella\nD. injera\n\nAnswer:',
            "choices": json.dumps({"A": "kimchi", "B": "tacos", "C": "paella", "D": "injera"}),
            "choice_countries": json.dumps({"A": "South_Korea", "B": "Mexico", "C": "Spain", "D": "Ethiopia"}),
            "answer_idx": "A",
        },
        {
            "MCQID": "x_2",
            "ID": "x",
            "country": "West_Java",
            "prompt": "Q? Without any explanation",
            "choices": "[1, 2]",
            "choice_countries": "{}",
            "answer_idx": "A",
        },
    ]
    (tmp_path / "mc.json").write_text(json.dumps(mc))
    ds = load(tmp_path / "mc.json")
    (r,) = ds.rows
    assert (r.id, r.question, r.options, r.answer) == (
        "Al-en-06_1",
        "What is a common school cafeteria food in South Korea?",
        ["kimchi", "tacos", "paella", "injera"],
        0,
    )
    assert (r.country, r.language, r.images, r.question_type) == ("South Korea", "English", [], "blend-mc")
    assert r.meta["choice_countries"]["B"] == "Mexico" and r.meta["blend_region"] == "South_Korea"
    assert ds.skipped[0].id == "x_2" and "choices is not an object" in ds.skipped[0].reason
    as_given = load(tmp_path / "mc.json", mc_prompt="as-given").rows[0]
    assert as_given.options == ["A", "B", "C", "D"] and as_given.question == mc[0]["prompt"]

    short = {
        "Al-en-06": {
            "question": "대한민국 학교 급식에서 흔히 볼 수 있는 음식은 무엇인가요?",
            "en_question": "What is a common school cafeteria food in your country?",
            "annotations": [
                {"answers": ["밥", "쌀밥"], "en_answers": ["rice"], "count": 3},
                {"answers": ["김치"], "en_answers": ["kimchi"], "count": 4},
            ],
            "idks": {"idk": 0, "no-answer": 0, "not-applicable": 0},
        }
    }
    (tmp_path / "South_Korea_data.json").write_text(json.dumps(short, ensure_ascii=False), encoding="utf-8")
    s = load(tmp_path / "South_Korea_data.json").rows[0]
    assert (s.id, s.question, s.answer) == (
        "South_Korea:Al-en-06",
        short["Al-en-06"]["question"],
        ["김치", "밥", "쌀밥"],
    )
    assert (s.country, s.language, s.options, s.question_type) == ("South Korea", "Korean", [], "blend-short")
    assert s.meta["annotation_counts"] == [4, 3]
    en = load(tmp_path / "South_Korea_data.json", lang="en").rows[0]
    assert (en.question, en.answer) == ("What is a common school cafeteria food in your country?", ["kimchi", "rice"])


def test_culturalvqa_predictions_only(tmp_path):
    img = png_bytes()
    pq.write_table(
        pa.Table.from_pylist([{"u_id": "c1", "image": img, "question": "What is served?", "country": "Ethiopia"}]),
        tmp_path / "cv.parquet",
    )  # the image as a plain binary column
    (r,) = load(tmp_path / "cv.parquet").rows
    assert (r.id, r.question, r.answer, r.country, r.region, r.question_type) == (
        "c1",
        "What is served?",
        None,
        "Ethiopia",
        "Eastern Africa",
        "culturalvqa",
    )
    assert r.images == [img] and not r.labeled


def test_columns_map_any_table(tmp_path):
    (tmp_path / "p.png").write_bytes(png_bytes())
    write_jsonl(
        tmp_path / "any.jsonl",
        [
            {
                "qid": "k1",
                "Q": "Which city?",
                "Opts": ["Lima", "Quito"],
                "Label": 1,
                "Nation": "Peru",
                "img": "p.png",
                "extra": "kept",
            },
            {"qid": "k2", "Q": "Which?", "Opts": 3, "Label": 0, "Nation": "Peru", "img": "p.png", "extra": ""},
        ],
    )
    cols = formats.ImportOptions.parse_columns("id=qid,question=Q,options=Opts,answer=Label,country=Nation,image=img")
    ds = load(tmp_path / "any.jsonl", columns=cols)
    (r,) = ds.rows
    assert (r.id, r.question, r.options, r.answer, r.country, r.region) == (
        "k1",
        "Which city?",
        ["Lima", "Quito"],
        1,
        "Peru",
        "South America",
    )
    assert r.images == [str(tmp_path / "p.png")] and r.meta["extra"] == "kept"
    assert ds.skipped[0].id == "k2" and "must be a list of strings" in ds.skipped[0].reason
    joined = formats.ImportOptions.parse_columns("question=question,options=choice_a+choice_b,answer=ans")
    write_jsonl(
        tmp_path / "j.jsonl", [{"question": "Q?", "choice_a": "x", "choice_b": "y", "ans": "B"}, {"Nope": "Q2?"}]
    )
    assert load(tmp_path / "j.jsonl", columns=joined).rows[0].options == ["x", "y"]
    bad = load(tmp_path / "j.jsonl", columns=formats.ImportOptions.parse_columns("question=Nope"))
    assert "no column 'Nope'" in bad.skipped[0].reason and bad.rows[0].question == "Q2?"
    with pytest.raises(ValueError, match="FIELD=COLUMN"):
        formats.ImportOptions.parse_columns("colour=x")


def test_numbered_options():
    q, labels, options, rest = formats.numbered_options("Q?\nA) one\nB) two\nC) three\nPick a letter.")
    assert (q, labels, options, rest) == ("Q?", ["A", "B", "C"], ["one", "two", "three"], "Pick a letter.")
    assert formats.numbered_options("no options here")[2] == []
    inline = formats._mc_from_prompt("Which dish? A. Pho B. Banh mi", opts(), "Banh mi")
    assert inline == ("Which dish?", ["Pho", "Banh mi"], 1, {})


def _cvqa_table(n=3):
    return pa.Table.from_pylist([cvqa_row(i) for i in range(n)])


def test_hub_cache_snapshot_resolved_offline(tmp_path, monkeypatch):
    repo = tmp_path / "hf" / "hub" / "datasets--afaji--cvqa"
    snap = repo / "snapshots" / "0123abcd"
    (snap / "data").mkdir(parents=True)
    blob = repo / "blobs" / "deadbeef"
    blob.parent.mkdir()
    pq.write_table(_cvqa_table(3), blob)
    (snap / "data" / "test-00000-of-00002.parquet").symlink_to(blob)  # the hub cache links snapshot files to blobs
    pq.write_table(pa.Table.from_pylist([cvqa_row(9)]), snap / "data" / "test-00001-of-00002.parquet")
    (snap / "README.md").write_text("---\nconfigs: []\n---\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert [p.name for p in formats.expand(["afaji/cvqa"])] == [
        "test-00000-of-00002.parquet",
        "test-00001-of-00002.parquet",
    ]
    ds = data.load(["afaji/cvqa"])
    assert [r.id for r in ds.rows] == ["q0", "q1", "q2", "q9"] and ds.rows[0].country == "Japan"
    assert [r.id for r in data.load([snap]).rows] == ["q0", "q1", "q2", "q9"]  # the snapshot path itself
    assert data.load([snap], opts=opts(split="test")).rows and pytest.raises(
        FileNotFoundError, formats.expand, [snap], "train"
    )
    with pytest.raises(FileNotFoundError, match="hub cache"):
        formats.expand(["nobody/nothing"])


def _save_to_disk_layout(folder, table, split):
    """What `datasets.Dataset.save_to_disk` writes (datasets 5.x): Arrow stream shards, state.json,
    dataset_info.json with the features (an image column is a {bytes, path} struct)."""
    folder.mkdir(parents=True)
    name = "data-00000-of-00001.arrow"
    features = {"image": {"_type": "Image"}, "ID": {"dtype": "string", "_type": "Value"}}
    schema = table.schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
        w.write_table(table.cast(schema))
    (folder / "state.json").write_text(
        json.dumps(
            {
                "_data_files": [{"filename": name}],
                "_fingerprint": "1d62a3f5c74c025a",
                "_format_columns": None,
                "_format_kwargs": {},
                "_format_type": None,
                "_output_all_columns": False,
                "_split": split,
            }
        )
    )
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": features}))


def test_save_to_disk_folders(tmp_path):
    _save_to_disk_layout(tmp_path / "one", _cvqa_table(2), None)
    assert [r.id for r in data.load([tmp_path / "one"]).rows] == ["q0", "q1"]
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    _save_to_disk_layout(tmp_path / "dd" / "train", pa.Table.from_pylist([cvqa_row(7)]), "train")
    _save_to_disk_layout(tmp_path / "dd" / "test", _cvqa_table(2), "test")
    assert [r.id for r in data.load([tmp_path / "dd"], opts=opts(split="test")).rows] == ["q0", "q1"]
    assert len(data.load([tmp_path / "dd"]).rows) == 3


def test_real_datasets_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features(
        {
            "image": datasets.Image(),
            "ID": datasets.Value("string"),
            "Subset": datasets.Value("string"),
            "Question": datasets.Value("string"),
            "Options": datasets.Sequence(datasets.Value("string")),
            "Label": datasets.Value("int64"),
            "Category": datasets.Value("string"),
        }
    )
    rows = [{k: cvqa_row(i)[k] for k in feats} for i in range(2)]
    ds = datasets.Dataset.from_list(rows, features=feats)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "saved"))
    loaded = data.load([tmp_path / "saved"])
    assert [r.id for r in loaded.rows] == ["q0", "q1"] and isinstance(loaded.rows[0].images[0], bytes)


def run_cli(argv):
    import argparse

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="cmd"))
    args = p.parse_args(argv)
    return args.func(args)


def test_validate_report(cvqa_file, capsys):
    assert run_cli(["data", "validate", str(cvqa_file)]) == 1
    out = capsys.readouterr()
    assert "2 rows ok, 2 skipped" in out.out
    assert "question_type: cvqa 2" in out.out and "country: Japan 1, Mexico 1" in out.out
    assert "language: Japanese 1, Spanish 1" in out.out
    assert "skipped by reason:" in out.out and "out of range" in out.out
    assert "--suite vqa would skip 2" in out.out
    assert "q2" in out.err and ":3 " in out.err  # each bad row with its file, line and id


def test_bench_run_cvqa_both_languages_gap_and_submission(tmp_path, monkeypatch):
    from bench_helpers import FakeEngine, bench_args
    from cultengine.bench.run import RunError, run

    monkeypatch.setenv("CULTENGINE_CACHE", str(tmp_path / "cache"))
    rows = [
        cvqa_row(i, label=i % 4, subset=s)
        for i, s in enumerate(["('Japanese', 'Japan')"] * 3 + ["('Spanish', 'Mexico')"] * 3)
    ]
    rows += [cvqa_row(10 + i, label=-1) for i in range(2)]
    rows.append({**cvqa_row(20), "image": {"bytes": None, "path": "https://example.org/gone.jpg"}})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "cvqa.parquet")
    out = tmp_path / "run"
    args = bench_args(data=[str(tmp_path / "cvqa.parquet")], output_dir=str(out), cvqa_lang="both")
    assert run(args, make_engine=lambda *a: FakeEngine()) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["samples"]["evaluated"] == 16 and s["samples"]["labeled"] == 12 and s["samples"]["missing_images"] == 1
    g = s["language_gap"]
    assert set(g["by"]["country"]) == {"Japan", "Mexico"} and g["by"]["country"]["Japan"]["n_en"] == 3
    for v in g["by"]["country"].values():
        assert v["gap"] == pytest.approx(v["en"] - v["local"], abs=1e-6)
    recs = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    sub = json.loads((out / "cvqa_submission_en.json").read_text())
    assert sub == {"q10": recs["q10|en"]["pred_index"], "q11": recs["q11|en"]["pred_index"]}
    assert set(json.loads((out / "cvqa_submission_local.json").read_text())) == {"q10", "q11"}
    assert "## English vs local language" in (out / "report.md").read_text()
    assert "English minus local language, by country" in (out / "report.html").read_text()
    # the same file in the open-answer suite: every row is multiple choice, so the suite is refused with the reason
    vqa = tmp_path / "vqa"
    with pytest.raises(RunError, match="--suite vqa does not fit .* the row is multiple choice"):
        run(
            bench_args(data=[str(tmp_path / "cvqa.parquet")], output_dir=str(vqa), suite="vqa"),
            make_engine=lambda *a: pytest.fail("the model loaded for a suite that fits no row"),
        )
    assert not (vqa / "summary.json").exists()


def test_csv_canonical_with_url_images_and_hub_subpath(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "kimono.png").write_bytes(png_bytes())
    (tmp_path / "t.csv").write_text(
        "id,question,answer,country,image\n"
        "r1,What is she wearing?,kimono,Japan,https://cdn.example.org/pics/kimono.png\n"
        "r2,What is this?,x,Japan,https://cdn.example.org/pics/absent.png\n"
    )
    ds = load(tmp_path / "t.csv", image_root=root)
    (r,) = ds.rows
    assert (r.id, r.answer, r.images, r.region) == ("r1", ["kimono"], [str(root / "kimono.png")], "Eastern Asia")
    assert ds.skipped[0].line == 3 and "missing image https://cdn.example.org/pics/absent.png" in ds.skipped[0].reason

    snap = tmp_path / "hub" / "datasets--worldcuisines--vqa" / "snapshots" / "abc"
    (snap / "task1").mkdir(parents=True)
    (snap / "task2").mkdir()
    pq.write_table(_cvqa_table(1), snap / "task1" / "test_small-00000-of-00001.parquet")
    pq.write_table(_cvqa_table(2), snap / "task2" / "test_small-00000-of-00001.parquet")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    files = formats.expand(["worldcuisines/vqa/task1"])
    assert files == [snap / "task1" / "test_small-00000-of-00001.parquet"]
    assert len(formats.expand(["worldcuisines/vqa"], split="task2")) == 1


def test_the_format_registry_is_the_only_list_of_formats():
    """Each name in `importers.NAMES` is one module declaring the whole format; `--format`'s choices, the
    readable-formats message and detection derive from it."""
    import argparse

    from cultengine import cli
    from cultengine.bench import importers

    for name in importers.NAMES:
        mod = importers.module(name)
        assert mod.SUMMARY and isinstance(mod.ID_KEYS, tuple) and callable(mod.detect) and callable(mod.to_row)
        assert mod.SUMMARY in importers.known_formats()
    bench = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["bench"]
    (fmt,) = [a for a in bench._actions if "--format" in a.option_strings]
    assert tuple(fmt.choices) == ("auto", *importers.NAMES)
    assert importers.detect({"qa_id", "multi_choice_prompt"}, ".jsonl") == "worldcuisines"
    assert importers.detect({"question", "A", "B"}, ".tsv") == "vlmeval"
    assert importers.detect({"question"}, ".csv") == "canonical"
    with pytest.raises(ValueError, match="unknown format 'nope'"):
        importers.module("nope")
