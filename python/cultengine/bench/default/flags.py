"""National flags drawn from their geometric descriptions (simplified: emblems become circles/stars).

Each flag is a list of drawing operations in flag-relative coordinates (x, y in [0, 1] of width and
height); `draw` renders one onto a square canvas so a centre crop keeps the whole flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw

C = {
    "red": (206, 17, 38),
    "white": (255, 255, 255),
    "blue": (0, 56, 168),
    "navy": (0, 40, 104),
    "green": (0, 135, 81),
    "yellow": (252, 209, 22),
    "black": (0, 0, 0),
    "orange": (247, 127, 0),
    "sky": (117, 170, 219),
    "saffron": (255, 153, 51),
    "brown": (120, 80, 40),
    "aqua": (0, 119, 139),
}


@dataclass(frozen=True)
class Flag:
    country: str  # name as in countries.csv
    capital: str
    currency: str
    ops: tuple

    @property
    def shapes(self) -> set[str]:
        """Shapes other than stripes that appear on the flag (for scene questions)."""
        names = {
            "circle": "circle",
            "star": "star",
            "cross": "cross",
            "tri": "triangle",
            "crescent": "crescent",
            "rhombus": "diamond",
            "saltire": "diagonal cross",
            "rect": "rectangle",
        }
        return {names[op[0]] for op in self.ops if op[0] in names}

    @property
    def stripes(self) -> tuple[str, int] | None:
        """('horizontal' | 'vertical', count) when the flag is plain stripes."""
        if len(self.ops) == 1 and self.ops[0][0] in ("h", "v"):
            return ("horizontal" if self.ops[0][0] == "h" else "vertical"), len(self.ops[0][1])
        return None


def h(*colors, w=None):
    return ("h", colors, w)


def v(*colors, w=None):
    return ("v", colors, w)


def bg(color):
    return ("h", (color,), None)


def F(country, capital, currency, *ops):
    return Flag(country, capital, currency, ops)


FLAGS = [
    # Europe
    F("France", "Paris", "euro", v("blue", "white", "red")),
    F("Italy", "Rome", "euro", v("green", "white", "red")),
    F("Germany", "Berlin", "euro", h("black", "red", "yellow")),
    F("Netherlands", "Amsterdam", "euro", h("red", "white", "blue")),
    F("Russia", "Moscow", "ruble", h("white", "blue", "red")),
    F("Ireland", "Dublin", "euro", v("green", "white", "orange")),
    F("Belgium", "Brussels", "euro", v("black", "yellow", "red")),
    F("Austria", "Vienna", "euro", h("red", "white", "red")),
    F("Poland", "Warsaw", "złoty", h("white", "red")),
    F("Ukraine", "Kyiv", "hryvnia", h("blue", "yellow")),
    F("Hungary", "Budapest", "forint", h("red", "white", "green")),
    F("Romania", "Bucharest", "leu", v("blue", "yellow", "red")),
    F("Sweden", "Stockholm", "krona", bg("blue"), ("cross", "yellow", 0.375, 0.5, 0.2)),
    F("Denmark", "Copenhagen", "krone", bg("red"), ("cross", "white", 0.375, 0.5, 0.13)),
    F("Finland", "Helsinki", "euro", bg("white"), ("cross", "blue", 0.36, 0.5, 0.24)),
    F("Switzerland", "Bern", "Swiss franc", bg("red"), ("cross", "white", 0.5, 0.5, 0.18, (0.32, 0.2, 0.68, 0.8))),
    F(
        "Greece",
        "Athens",
        "euro",
        h(*["blue", "white"] * 4, "blue"),
        ("rect", "blue", 0, 0, 0.37, 0.56),
        ("cross", "white", 0.185, 0.28, 0.11, (0, 0, 0.37, 0.56)),
    ),
    # Asia
    F("Japan", "Tokyo", "yen", bg("white"), ("circle", "red", 0.5, 0.5, 0.3)),
    F("Bangladesh", "Dhaka", "taka", bg("green"), ("circle", "red", 0.45, 0.5, 0.33)),
    F("Indonesia", "Jakarta", "rupiah", h("red", "white")),
    F("Thailand", "Bangkok", "baht", h("red", "white", "navy", "white", "red", w=(1, 1, 2, 1, 1))),
    F("India", "New Delhi", "Indian rupee", h("saffron", "white", "green"), ("circle", "navy", 0.5, 0.5, 0.13)),
    F("Vietnam", "Hanoi", "đồng", bg("red"), ("star", "yellow", 0.5, 0.5, 0.3)),
    F(
        "China",
        "Beijing",
        "renminbi",
        bg("red"),
        ("star", "yellow", 0.17, 0.27, 0.15),
        *[("star", "yellow", x, y, 0.05) for x, y in ((0.33, 0.1), (0.4, 0.2), (0.4, 0.35), (0.33, 0.45))],
    ),
    F("Laos", "Vientiane", "kip", h("red", "navy", "red", w=(1, 2, 1)), ("circle", "white", 0.5, 0.5, 0.2)),
    F("Yemen", "Sanaa", "Yemeni rial", h("red", "white", "black")),
    F("Armenia", "Yerevan", "dram", h("red", "blue", "orange")),
    F(
        "Türkiye",
        "Ankara",
        "Turkish lira",
        bg("red"),
        ("crescent", "white", "red", 0.36, 0.5, 0.25),
        ("star", "white", 0.52, 0.5, 0.12),
    ),
    F("United Arab Emirates", "Abu Dhabi", "dirham", h("green", "white", "black"), ("rect", "red", 0, 0, 0.25, 1)),
    F("Myanmar", "Naypyidaw", "kyat", h("yellow", "green", "red"), ("star", "white", 0.5, 0.55, 0.36)),
    # Africa
    F("Nigeria", "Abuja", "naira", v("green", "white", "green")),
    F("Mali", "Bamako", "West African CFA franc", v("green", "yellow", "red")),
    F("Guinea", "Conakry", "Guinean franc", v("red", "yellow", "green")),
    F("Chad", "N'Djamena", "Central African CFA franc", v("navy", "yellow", "red")),
    F("Ghana", "Accra", "cedi", h("red", "yellow", "green"), ("star", "black", 0.5, 0.5, 0.16)),
    F("Sierra Leone", "Freetown", "leone", h("green", "white", "blue")),
    F("Gabon", "Libreville", "Central African CFA franc", h("green", "yellow", "blue")),
    F(
        "Cameroon",
        "Yaoundé",
        "Central African CFA franc",
        v("green", "red", "yellow"),
        ("star", "yellow", 0.5, 0.5, 0.15),
    ),
    F("Senegal", "Dakar", "West African CFA franc", v("green", "yellow", "red"), ("star", "green", 0.5, 0.5, 0.15)),
    F(
        "Benin",
        "Porto-Novo",
        "West African CFA franc",
        bg("green"),
        ("rect", "yellow", 0.4, 0, 1, 0.5),
        ("rect", "red", 0.4, 0.5, 1, 1),
    ),
    F(
        "Madagascar",
        "Antananarivo",
        "ariary",
        bg("white"),
        ("rect", "red", 1 / 3, 0, 1, 0.5),
        ("rect", "green", 1 / 3, 0.5, 1, 1),
    ),
    F("Côte d'Ivoire", "Yamoussoukro", "West African CFA franc", v("orange", "white", "green")),
    F("Somalia", "Mogadishu", "Somali shilling", bg("sky"), ("star", "white", 0.5, 0.5, 0.3)),
    F("Botswana", "Gaborone", "pula", h("sky", "white", "black", "white", "sky", w=(9, 1, 4, 1, 9))),
    F(
        "Algeria",
        "Algiers",
        "Algerian dinar",
        v("green", "white"),
        ("crescent", "red", "white", 0.5, 0.5, 0.25),
        ("star", "red", 0.58, 0.5, 0.1),
    ),
    F("Morocco", "Rabat", "Moroccan dirham", bg("red"), ("star", "green", 0.5, 0.5, 0.27)),
    F(
        "Tanzania",
        "Dodoma",
        "Tanzanian shilling",
        bg("blue"),
        ("tri", "green", ((0, 0), (1, 0), (0, 1))),
        ("saltire", "black", 0.22),
    ),
    # Americas
    F("Colombia", "Bogotá", "Colombian peso", h("yellow", "blue", "red", w=(2, 1, 1))),
    F("Peru", "Lima", "sol", v("red", "white", "red")),
    F("Argentina", "Buenos Aires", "Argentine peso", h("sky", "white", "sky"), ("circle", "yellow", 0.5, 0.5, 0.1)),
    F("Bolivia", "Sucre", "boliviano", h("red", "yellow", "green")),
    F(
        "Chile",
        "Santiago",
        "Chilean peso",
        h("white", "red"),
        ("rect", "blue", 0, 0, 1 / 3, 0.5),
        ("star", "white", 1 / 6, 0.25, 0.16),
    ),
    F(
        "Cuba",
        "Havana",
        "Cuban peso",
        h("blue", "white", "blue", "white", "blue"),
        ("tri", "red", ((0, 0), (0.43, 0.5), (0, 1))),
        ("star", "white", 0.15, 0.5, 0.13),
    ),
    F(
        "Brazil",
        "Brasília",
        "real",
        bg("green"),
        ("rhombus", "yellow", 0.5, 0.5, 0.42, 0.4),
        ("circle", "navy", 0.5, 0.5, 0.22),
    ),
    F("Costa Rica", "San José", "colón", h("blue", "white", "red", "white", "blue", w=(1, 1, 2, 1, 1))),
    F(
        "Bahamas",
        "Nassau",
        "Bahamian dollar",
        h("aqua", "yellow", "aqua"),
        ("tri", "black", ((0, 0), (0.4, 0.5), (0, 1))),
    ),
    F("Mexico", "Mexico City", "Mexican peso", v("green", "white", "red"), ("circle", "brown", 0.5, 0.5, 0.14)),
    F(
        "Panama",
        "Panama City",
        "balboa",
        bg("white"),
        ("rect", "red", 0.5, 0, 1, 0.5),
        ("rect", "blue", 0, 0.5, 0.5, 1),
        ("star", "blue", 0.25, 0.25, 0.12),
        ("star", "red", 0.75, 0.75, 0.12),
    ),
    F("Canada", "Ottawa", "Canadian dollar", v("red", "white", "red", w=(1, 2, 1)), ("star", "red", 0.5, 0.52, 0.3)),
    F(
        "United States",
        "Washington, D.C.",
        "US dollar",
        h(*["red", "white"] * 6, "red"),
        ("rect", "navy", 0, 0, 0.4, 7 / 13),
        *[("star", "white", 0.05 + 0.075 * i, 0.07 + 0.12 * j, 0.035) for i in range(5) for j in range(4)],
    ),
    # Oceania
    F("Palau", "Ngerulmud", "US dollar", bg("sky"), ("circle", "yellow", 0.45, 0.5, 0.3)),
    F(
        "Nauru",
        "Yaren",
        "Australian dollar",
        bg("navy"),
        ("rect", "yellow", 0, 0.46, 1, 0.54),
        ("star", "white", 0.25, 0.72, 0.12),
    ),
    F(
        "Micronesia",
        "Palikir",
        "US dollar",
        bg("sky"),
        *[("star", "white", 0.5 + dx, 0.5 + dy, 0.1) for dx, dy in ((0, -0.28), (0, 0.28), (-0.19, 0), (0.19, 0))],
    ),
    F(
        "Papua New Guinea",
        "Port Moresby",
        "kina",
        bg("red"),
        ("tri", "black", ((0, 0), (1, 1), (0, 1))),
        *[("star", "white", x, y, 0.07) for x, y in ((0.25, 0.55), (0.17, 0.7), (0.32, 0.72), (0.25, 0.86))],
    ),
    F(
        "Tonga",
        "Nukuʻalofa",
        "paʻanga",
        bg("red"),
        ("rect", "white", 0, 0, 0.42, 0.5),
        ("cross", "red", 0.21, 0.25, 0.12, (0.05, 0.05, 0.37, 0.45)),
    ),
    F(
        "Samoa",
        "Apia",
        "tālā",
        bg("red"),
        ("rect", "navy", 0, 0, 0.5, 0.5),
        *[("star", "white", x, y, 0.06) for x, y in ((0.25, 0.1), (0.15, 0.25), (0.35, 0.22), (0.25, 0.4))],
    ),
    F(
        "New Zealand",
        "Wellington",
        "New Zealand dollar",
        bg("navy"),
        ("rect", "white", 0, 0, 0.5, 0.5),
        ("cross", "red", 0.25, 0.25, 0.1, (0, 0, 0.5, 0.5)),
        *[("star", "red", x, y, 0.07) for x, y in ((0.75, 0.25), (0.68, 0.48), (0.84, 0.42), (0.75, 0.78))],
    ),
    F(
        "Australia",
        "Canberra",
        "Australian dollar",
        bg("navy"),
        ("rect", "white", 0, 0, 0.5, 0.5),
        ("cross", "red", 0.25, 0.25, 0.1, (0, 0, 0.5, 0.5)),
        ("star", "white", 0.25, 0.75, 0.14),
        *[("star", "white", x, y, 0.06) for x, y in ((0.75, 0.2), (0.62, 0.45), (0.88, 0.4), (0.75, 0.85))],
    ),
]


def _star(cx: float, cy: float, r: float, points: int = 5) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        rad = r if k % 2 == 0 else r * 0.4
        a = -math.pi / 2 + k * math.pi / points
        out.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return out


def draw(flag: Flag, size: int = 224) -> Image.Image:
    """The flag (3:2) centred on a square grey canvas."""
    W, H = size, size * 2 // 3
    img = Image.new("RGB", (W, H))
    d = ImageDraw.Draw(img)

    def px(x: float, y: float) -> tuple[float, float]:
        return x * W, y * H

    for op in flag.ops:
        kind = op[0]
        if kind in ("h", "v"):
            colors, weights = op[1], op[2] or (1,) * len(op[1])
            total, acc = sum(weights), 0
            for c, wgt in zip(colors, weights, strict=True):
                a, b = acc / total, (acc + wgt) / total
                box = (*px(0, a), *px(1, b)) if kind == "h" else (*px(a, 0), *px(b, 1))
                d.rectangle([box[0], box[1], box[2] - 1 if kind == "v" else box[2], box[3]], fill=C[c])
                acc += wgt
        elif kind == "rect":
            d.rectangle([*px(op[2], op[3]), *px(op[4], op[5])], fill=C[op[1]])
        elif kind == "circle":
            cx, cy = px(op[2], op[3])
            r = op[4] * H
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=C[op[1]])
        elif kind == "star":
            cx, cy = px(op[2], op[3])
            d.polygon(_star(cx, cy, op[4] * H), fill=C[op[1]])
        elif kind == "tri":
            d.polygon([px(x, y) for x, y in op[2]], fill=C[op[1]])
        elif kind == "rhombus":
            cx, cy, rx, ry = op[2], op[3], op[4], op[5]
            d.polygon([px(cx - rx, cy), px(cx, cy - ry), px(cx + rx, cy), px(cx, cy + ry)], fill=C[op[1]])
        elif kind == "cross":  # Nordic/centred cross at (cx, cy), bar thickness t (of height), within a box
            cx, cy, t = op[2], op[3], op[4]
            x0, y0, x1, y1 = op[5] if len(op) > 5 else (0, 0, 1, 1)
            d.rectangle([*px(cx - t * H / W / 2, y0), *px(cx + t * H / W / 2, y1)], fill=C[op[1]])
            d.rectangle([*px(x0, cy - t / 2), *px(x1, cy + t / 2)], fill=C[op[1]])
        elif kind == "crescent":
            cx, cy = px(op[3], op[4])
            r = op[5] * H
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=C[op[1]])
            o = r * 0.25
            d.ellipse([cx - r * 0.8 + o, cy - r * 0.8, cx + r * 0.8 + o, cy + r * 0.8], fill=C[op[2]])
        elif kind == "saltire":
            d.line([px(0, 1), px(1, 0)], fill=C["yellow"], width=int(op[2] * H * 1.4))
            d.line([px(0, 1), px(1, 0)], fill=C[op[1]], width=int(op[2] * H))
    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    canvas.paste(img, (0, (size - H) // 2))
    return canvas
