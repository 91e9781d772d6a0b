"""A clone anywhere works: nothing in the repository names a path outside it, the culture tables ship inside."""

from pathlib import Path

import cultengine
from cultengine.studies import culture

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {
    ".git",
    ".venv",
    "target",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".benchmarks",
    "build",
    "dist",
    "cultengine-runs",
    ".whl",
}
# Built from pieces so this file does not match itself.
MACHINE_PATHS = ("../" + "shared", "/" + "work/")


def _text_files(root: Path):
    for p in root.iterdir():
        if p.name in SKIP_DIRS:  # `.git` is a file in a git worktree
            continue
        if p.is_dir() and not p.is_symlink():
            yield from _text_files(p)
        elif p.is_file() and p.stat().st_size < 5_000_000:
            try:
                yield p, p.read_text(encoding="utf-8")
            except UnicodeDecodeError:  # images, parquet, compiled extensions
                continue


def test_no_file_names_a_path_outside_the_clone():
    hits = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p, text in _text_files(ROOT)
        for n, line in enumerate(text.splitlines(), 1)
        if any(m in line for m in MACHINE_PATHS)
    ]
    assert not hits, "machine paths outside the repository:\n" + "\n".join(hits)


def test_culture_tables_ship_in_the_package():
    # Under the README's test command this is the installed wheel: the tables must have come with it.
    package_data = Path(cultengine.__file__).resolve().parent / "studies" / "data"
    source_data = ROOT / "python" / "cultengine" / "studies" / "data"
    for table in (culture.HOFSTEDE_CSV, culture.WVS_CSV):
        assert table.resolve().parent == package_data
        assert table.read_bytes() == (source_data / table.name).read_bytes()
    assert culture.HOFSTEDE_CSV.read_text(encoding="utf-8").startswith("ctr,country,Demonym,pdi,idv,mas,uai")
    assert culture.WVS_CSV.read_text(encoding="utf-8").startswith("ctr,country,Demonym,Q1,")
    notice = (package_data / "NOTICE.md").read_text(encoding="utf-8")
    assert "MIT-licensed" in notice and "Hofstede" in notice and "World Values Survey" in notice
