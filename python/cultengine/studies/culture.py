"""Country culture tables (Hofstede's six dimensions, World Values Survey means) and the default
nationality list of the stories study.

A table is a CSV with `ctr,country,Demonym` then numeric columns; `#NULL!` or an empty cell is missing.
A nationality is matched to a row by demonym, else by country (row names resolved through the bench
country table), so "Malaysian" finds Hofstede's "Malaysia" row although that table says "Malay".

Cultural distance is the Euclidean distance between two rows. Hofstede (six 0-100 scores): rows with any
missing dimension are skipped, as the study does. WVS (Q1..Q250 means): each column is z-scored over the
table's countries by default (the answer scales differ, and Q223 is a party code), and the few missing
means are skipped pairwise with rescaling (`stats.euclidean_matrix`).

Both tables ship with the package (`HOFSTEDE_CSV`, `WVS_CSV`; their source and licence are in
`studies/data/NOTICE.md`); a user's own files in the same layout can be read by path instead.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..bench import countries
from .stats import euclidean_matrix

MISSING = {"", "#NULL!", "NA", "NaN", "nan"}
_DATA = Path(str(resources.files(__package__).joinpath("data")))
HOFSTEDE_CSV = _DATA / "hofstede_6d.csv"  # Hofstede's six dimensions, 110 countries and regions
WVS_CSV = _DATA / "wvs_250d.csv"  # World Values Survey means Q1..Q250, 58 countries


@dataclass(frozen=True)
class Nationality:
    demonym: str

    @property
    def country(self) -> countries.Country | None:
        return countries.lookup(self.demonym)

    @property
    def region(self) -> str:
        c = self.country
        return c.region if c else "unknown"

    def sort_key(self) -> tuple[str, str, str]:
        c = self.country
        return (c.continent if c else "~", self.region, self.demonym)


def _demonym_lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def default_nationalities() -> list[Nationality]:
    """The 42 shipped demonyms (`studies/data/nationalities.txt`, where the choice is documented)."""
    text = (_DATA / "nationalities.txt").read_text(encoding="utf-8")
    return [Nationality(d) for d in _demonym_lines(text)]


def parse_nationalities(spec: str | None) -> list[Nationality]:
    """`None` -> the default list; a path to a file with one demonym a line; else comma-separated demonyms."""
    if not spec:
        return default_nationalities()
    path = Path(spec)
    names = _demonym_lines(path.read_text(encoding="utf-8-sig")) if path.is_file() else spec.split(",")
    return [Nationality(n.strip()) for n in names if n.strip()]


@dataclass
class CultureTable:
    name: str
    keys: list[tuple[str, str, str]]  # (ctr, country, demonym)
    columns: list[str]
    values: np.ndarray  # [rows, columns], NaN where missing

    @classmethod
    def read(cls, path: str | Path, name: str | None = None) -> CultureTable:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader)
            keys, rows = [], []
            for row in reader:
                if not row:
                    continue
                keys.append((row[0], row[1], row[2]))
                rows.append([float("nan") if v.strip() in MISSING else float(v) for v in row[3:]])
        return cls(name or Path(path).stem, keys, header[3:], np.asarray(rows, dtype=np.float64))

    def find(self, nationality: Nationality) -> int | None:
        """Row of a nationality: same demonym (case-insensitive), else the same country (row country names
        resolved through `bench/countries.csv`, so "Korea South" or "U.S.A." rows are found too)."""
        for i, (_, _, d) in enumerate(self.keys):
            if d.casefold() == nationality.demonym.casefold():
                return i
        target = nationality.country
        if target is None:
            return None
        for i, (_, country, _) in enumerate(self.keys):
            c = countries.lookup(country, demonyms=False)
            if c is not None and c.iso3 == target.iso3:
                return i
        return None

    def select(self, columns: list[str]) -> CultureTable:
        """The table restricted to the named columns that it has."""
        idx = [i for i, c in enumerate(self.columns) if c in set(columns)]
        return CultureTable(self.name, self.keys, [self.columns[i] for i in idx], self.values[:, idx])

    def distances(
        self, nationalities: list[Nationality], complete_rows: bool, standardize: bool = False
    ) -> tuple[list[Nationality], np.ndarray, list[str]]:
        """(nationalities with data, their distance matrix, demonyms lacking data).

        complete_rows: skip a country with any missing value (Hofstede); otherwise missing values are
        skipped pairwise (WVS). standardize: z-score each column over the table's rows first (WVS: the
        means are on different answer scales, and Q223 is a party code in the hundreds of thousands that
        would otherwise be the whole distance)."""
        values = self.values
        if standardize:
            sd = np.nanstd(values, axis=0)
            values = (values - np.nanmean(values, axis=0)) / np.where(sd > 0, sd, 1.0)
        found, idx, lacking = [], [], []
        for n in nationalities:
            i = self.find(n)
            ok = i is not None and not np.isnan(values[i]).all()
            if ok and complete_rows:
                ok = not np.isnan(values[i]).any()
            if ok:
                found.append(n)
                idx.append(i)
            else:
                lacking.append(n.demonym)
        return found, euclidean_matrix(values[idx]) if idx else np.zeros((0, 0)), lacking


def wvs_columns(n: int = 250) -> list[str]:
    """Q1..Qn: the study's 250 WVS means (the file carries a few more)."""
    return [f"Q{i}" for i in range(1, n + 1)]
