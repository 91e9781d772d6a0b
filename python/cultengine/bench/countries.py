"""Country -> UN M49 region, continent and Western flag, from the package's `countries.csv`.

The table holds every UN member state plus common territories (Hong Kong, Taiwan, Puerto Rico, ...).
Columns: iso3, iso2, name, aliases, demonyms (`|`-separated), un_region (M49 region), region, continent,
western.

- `region` is the M49 sub-region, or the M49 intermediate region where one exists (Eastern Africa,
  Caribbean, South America, ...), since "Sub-Saharan Africa" and "Latin America" are too coarse to compare.
- `continent` is the M49 region with the Americas split into North America (Northern America, Central
  America, Caribbean) and South America.
- `western` = 1 for members of the EU, EFTA, the United Kingdom, the European micro-states (Andorra,
  Monaco, San Marino, Holy See), their European dependencies, and the United States, Canada, Australia and
  New Zealand; 0 for everything else. It is one common political definition, not a judgement; edit the
  CSV to use another.
"""

from __future__ import annotations

import csv
import unicodedata
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CSV_PATH = Path(__file__).with_name("countries.csv")


@dataclass(frozen=True)
class Country:
    iso3: str
    iso2: str
    name: str
    un_region: str
    region: str
    continent: str
    western: bool


def _key(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold().strip()
    return " ".join(text.replace("_", " ").split())


@cache
def _tables() -> tuple[dict[str, Country], dict[str, Country]]:
    """(names, codes and aliases -> Country, demonyms -> Country)."""
    names: dict[str, Country] = {}
    demonyms: dict[str, Country] = {}
    with CSV_PATH.open(encoding="utf-8", newline="") as f:
        for rec in csv.DictReader(f):
            c = Country(
                rec["iso3"],
                rec["iso2"],
                rec["name"],
                rec["un_region"],
                rec["region"],
                rec["continent"],
                rec["western"] == "1",
            )
            for alias in [c.name, c.iso3, c.iso2, *filter(None, rec["aliases"].split("|"))]:
                names[_key(alias)] = c
            for d in filter(None, rec["demonyms"].split("|")):
                demonyms.setdefault(_key(d), c)
    return names, demonyms


def all_countries() -> list[Country]:
    return sorted({c.iso3: c for c in _tables()[0].values()}.values(), key=lambda c: c.name)


def lookup(text: str | None, demonyms: bool = True) -> Country | None:
    """The country named by `text` (name, ISO code, alias, or with `demonyms` a demonym), else None."""
    if not text:
        return None
    names, dems = _tables()
    k = _key(str(text))
    return names.get(k) or (dems.get(k) if demonyms else None)
