import csv

from cultengine.bench import countries

TERRITORIES = {
    "ESH",
    "MYT",
    "REU",
    "SHN",
    "PRI",
    "ABW",
    "CUW",
    "CYM",
    "VGB",
    "VIR",
    "GLP",
    "MTQ",
    "GUF",
    "FLK",
    "GRL",
    "BMU",
    "HKG",
    "MAC",
    "TWN",
    "PSE",
    "FRO",
    "IMN",
    "JEY",
    "GGY",
    "ALA",
    "GIB",
    "VAT",
    "XKX",
    "NCL",
    "GUM",
    "MNP",
    "ASM",
    "COK",
    "PYF",
    "NIU",
}


def test_table_covers_un_members():
    rows = list(csv.DictReader(countries.CSV_PATH.open(encoding="utf-8")))
    iso3 = {r["iso3"] for r in rows}
    assert len(iso3) == len(rows)
    assert len(iso3 - TERRITORIES) == 193
    for r in rows:
        assert r["continent"] in {"Africa", "Asia", "Europe", "North America", "South America", "Oceania"}
        assert r["un_region"] in {"Africa", "Americas", "Asia", "Europe", "Oceania"}
        assert r["region"] and r["western"] in {"0", "1"}


def test_lookup_names_aliases_demonyms():
    assert countries.lookup("Japan").region == "Eastern Asia"
    assert countries.lookup("  japan ").iso3 == "JPN"
    assert countries.lookup("JPN").name == "Japan"
    assert countries.lookup("Russian Federation").name == "Russia"
    assert countries.lookup("Turkey").name == "Türkiye"
    assert countries.lookup("Ivory Coast").region == "Western Africa"
    assert countries.lookup("Japanese").name == "Japan"
    assert countries.lookup("Japanese", demonyms=False) is None
    assert countries.lookup("Atlantis") is None
    assert countries.lookup("") is None


def test_regions_continents_and_western_flag():
    assert countries.lookup("Brazil").continent == "South America"
    assert countries.lookup("Mexico").continent == "North America"
    assert countries.lookup("Kenya").region == "Eastern Africa"
    assert countries.lookup("France").western and countries.lookup("Australia").western
    assert not countries.lookup("Russia").western and not countries.lookup("India").western
    assert len(countries.all_countries()) == 228
