"""WebShop's catalogue and goals, read from the official data files.

The official files (Yao et al. 2022; scraped listings, never shipped with leafe) are
`items_shuffle(_1000).json` (products), `items_ins_v2(_1000).json` (attributes and synthetic
instructions per ASIN) and `items_human_ins.json` (human instructions per ASIN). Loading
follows the original's `load_products` / `get_goals` semantics (field names, price parsing,
option normalisation, ASIN filtering, goal order, the seed-233 shuffle), so goal indices and
texts line up with the original.

One deliberate difference: the original draws ranged prices and the goals' price bounds from
Python's *unseeded* global RNG, so its instruction texts vary between processes. leafe makes
the same draws, in the same order, from `random.Random(price_seed)`.

`write_synthetic_catalogue` writes a small invented catalogue in the official formats (for
tests and offline runs).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from leafe import paths
from leafe.errors import UserError

#: Price bounds a goal may name ("price lower than X dollars").
PRICE_RANGE = [10.0 * i for i in range(1, 100)]
#: The bound of a goal whose product is too expensive for two candidate bounds.
NO_PRICE_BOUND = 1000000
#: The seed of the original's goal shuffle.
GOAL_SHUFFLE_SEED = 233
#: Where to get the official files.
DOWNLOAD_HINT = (
    "get them with `leafe data get webshop` (subset full: `leafe data get webshop-full`; "
    "without internet: `--from` a copy), which installs them where leafe reads them when "
    "`data_dir` is unset; or set `data_dir` to the data/ folder of the original's "
    "`./setup.sh -d small|all`; or use the offline synthetic catalogue (`synthetic_products: N`)"
)


def product_files(data_dir: Path, subset: str) -> dict[str, Path]:
    """Paths of the three official files for `subset` (`small`: the `_1000` files)."""
    suffix = "_1000" if subset == "small" else ""
    return {
        "products": data_dir / f"items_shuffle{suffix}.json",
        "attributes": data_dir / f"items_ins_v2{suffix}.json",
        "human": data_dir / "items_human_ins.json",
    }


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UserError(f"webshop: {what} file {path} not found; {DOWNLOAD_HINT}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"webshop: {path} is not valid JSON ({e}); download it again") from e


def parse_pricing(pricing: Any) -> tuple[list[float], str]:
    """(prices, price tag) as the original shows them: no pricing is $100.0, a range keeps
    its first two numbers."""
    if not pricing:
        return [100.0], "$100.0"
    values = [float(Decimal(re.sub(r"[^\d.]", "", p))) for p in str(pricing).split("$")[1:]]
    if len(values) == 1:
        return values, f"${values[0]}"
    return values[:2], f"${values[0]} to ${values[1]}"


def normalise_options(customization: Any) -> dict[str, list[str]]:
    """Option name -> values, lowercased, '/' shown as ' | ' (as the original's pages)."""
    options: dict[str, list[str]] = {}
    for name, contents in (customization or {}).items():
        if contents is None:
            continue
        options[name.lower()] = [
            c["value"].strip().replace("/", " | ").lower() for c in contents
        ]
    return options


@dataclass
class Catalogue:
    """Products (by ASIN, in file order), their prices and the goals (shuffled as the
    original's)."""

    products: list[dict[str, Any]]
    by_asin: dict[str, dict[str, Any]]
    prices: dict[str, float]
    goals: list[dict[str, Any]]
    files: dict[str, str] = field(default_factory=dict)


def load_products(
    products_raw: list[dict[str, Any]],
    attributes: dict[str, Any],
    human: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """The products the original serves: ASINs 'nan' or longer than 10 characters and
    repeated ASINs are skipped; display fields (Title, Description, BulletPoints, Price,
    options, Attributes) are derived as the original's `load_products` does."""
    seen: set[str] = set()
    out = []
    for i, raw in enumerate(products_raw):
        try:
            asin = raw["asin"]
            if asin == "nan" or len(asin) > 10 or asin in seen:
                continue
            seen.add(asin)
            bullets = raw["small_description"]
            pricing, price_tag = parse_pricing(raw.get("pricing"))
            attrs = attributes.get(asin) or {}
            p = {
                "asin": asin,
                "name": raw["name"],
                "category": raw["category"],
                "query": raw["query"].lower().strip(),
                "product_category": raw["product_category"],
                "Title": raw["name"],
                "Description": raw["full_description"],
                "BulletPoints": bullets if isinstance(bullets, list) else [bullets],
                "Reviews": [],  # the original never loads reviews
                "Rating": "N.A.",
                "pricing": pricing,
                "Price": price_tag,
                "options": normalise_options(raw.get("customization_options")),
                "Attributes": attrs["attributes"] if "attributes" in attrs else ["DUMMY_ATTR"],
                "MainImage": (raw.get("images") or [None])[0],
            }
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(
                f"webshop: product #{i} of the products file lacks or mistypes field {e}; "
                "is it an official items_shuffle file?"
            ) from e
        if human is not None:
            if asin in human:
                p["instructions"] = human[asin]
        else:
            p["instruction_text"] = attrs.get("instruction")
            p["instruction_attributes"] = attrs.get("instruction_attributes")
        out.append(p)
    return out


def product_prices(products: list[dict[str, Any]], rng: random.Random) -> dict[str, float]:
    """One price per product: a range draws uniformly inside it (consuming `rng`)."""
    prices = {}
    for p in products:
        pricing = p["pricing"]
        if not pricing:
            prices[p["asin"]] = 100.0
        elif len(pricing) == 1:
            prices[p["asin"]] = pricing[0]
        else:
            prices[p["asin"]] = rng.uniform(*pricing[:2])
    return prices


def _price_bound(price: float, rng: random.Random) -> tuple[float, str]:
    candidates = [b for b in PRICE_RANGE if b > price][:4]
    if len(candidates) >= 2:
        _, upper = sorted(rng.sample(candidates, 2))
        return upper, f", and price lower than {upper:.2f} dollars"
    return NO_PRICE_BOUND, ""


def _goal(p: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "asin": p["asin"],
        "category": p["category"],
        "query": p["query"],
        "name": p["name"],
        "product_category": p["product_category"],
        **fields,
    }


def human_goals(products, prices, rng: random.Random) -> list[dict[str, Any]]:
    """One goal per human instruction with attributes, in product order."""
    goals = []
    for p in products:
        for ins in p.get("instructions", []):
            attributes = ins["instruction_attributes"]
            if not attributes:
                continue
            upper, price_text = _price_bound(prices[p["asin"]], rng)
            goals.append(_goal(
                p,
                instruction_text=ins["instruction"].strip(".") + price_text,
                attributes=attributes,
                price_upper=upper,
                goal_options=ins["instruction_options"],
            ))
    return goals


def synthetic_goals(products, prices, rng: random.Random) -> list[dict[str, Any]]:
    """One goal per product with a synthetic instruction × combination of its options."""
    goals = []
    for p in products:
        if p.get("instruction_text") is None:
            continue
        attributes = p["instruction_attributes"]
        if not attributes:
            raise UserError(f"webshop: product {p['asin']} has an instruction but no "
                            "instruction_attributes in the attributes file")
        upper, price_text = _price_bound(prices[p["asin"]], rng)
        names = sorted(p["options"])
        for combo in itertools.product(*(p["options"][n] for n in names)):
            chosen = dict(zip(names, combo))
            text = ", and ".join(f"{k}: {v}" for k, v in chosen.items())
            text = f" with {text}" if text else ""
            goals.append(_goal(
                p,
                instruction_text=f"{p['instruction_text']}{text}{price_text}",
                attributes=attributes,
                price_upper=upper,
                goal_options=chosen,
            ))
    return goals


_CACHE: dict[tuple, Catalogue] = {}


def load_catalogue(data_dir: Path, subset: str, goals: str, price_seed: int) -> Catalogue:
    """The catalogue and shuffled goals of the official files in `data_dir` (cached per
    process: environments of one run share it)."""
    files = product_files(data_dir, subset)
    stamp = tuple(
        (str(p), p.stat().st_mtime_ns) if p.is_file() else (str(p), None) for p in files.values()
    )
    key = (stamp, subset, goals, price_seed)
    if key in _CACHE:
        return _CACHE[key]
    raw = _read_json(files["products"], "products (items_shuffle)")
    attributes = _read_json(files["attributes"], "attributes (items_ins_v2)")
    human = _read_json(files["human"], "human instructions") if goals == "human" else None
    products = load_products(raw, attributes, human)
    rng = random.Random(price_seed)
    prices = product_prices(products, rng)
    goal_list = (human_goals if goals == "human" else synthetic_goals)(products, prices, rng)
    random.Random(GOAL_SHUFFLE_SEED).shuffle(goal_list)
    cat = Catalogue(products, {p["asin"]: p for p in products}, prices, goal_list,
                    {k: str(v) for k, v in files.items()})
    _CACHE[key] = cat
    return cat


def split_ranges(n_goals: int, test_size: int, eval_size: int) -> dict[str, range]:
    """The original's human-goal split over the shuffled goals: test = [0, test_size),
    eval = [test_size, test_size + eval_size), train = the rest (500 and 1000 officially)."""
    test_end = min(test_size, n_goals)
    eval_end = min(test_size + eval_size, n_goals)
    return {
        "train": range(eval_end, n_goals),
        "eval": range(test_end, eval_end),
        "test": range(0, test_end),
    }


# -- the synthetic catalogue ----------------------------------------------------------------
#: Invented product families: (category, query, product category path, nouns, attributes,
#: options). Every word is ours; no listing is scraped.
_FAMILIES = [
    ("fashion", "walking shoes", "Clothing › Shoes › Walking",
     ["walking shoes", "trail sneakers", "canvas loafers"],
     ["rubber sole", "non slip", "lightweight", "breathable mesh", "arch support"],
     {"Color": ["Black", "Navy Blue", "Grey/White", "Olive Green"],
      "Size": ["7", "8", "9", "10"]}),
    ("grocery", "herbal tea", "Grocery › Beverages › Tea",
     ["herbal tea", "green tea bags", "chai blend"],
     ["caffeine free", "organic", "gluten free", "non gmo", "individually wrapped"],
     {"Flavor Name": ["Mint", "Lemon Ginger", "Chamomile"], "Size": ["20 Count", "40 Count"]}),
    ("home", "desk lamp", "Home › Lighting › Desk Lamps",
     ["desk lamp", "reading light", "clip lamp"],
     ["dimmable", "usb charging", "energy saving", "easy assemble", "eye care"],
     {"Color": ["Matte Black", "Silver", "Rose Gold"]}),
    ("home", "throw pillow", "Home › Bedding › Pillows",
     ["throw pillow", "cushion cover", "lumbar pillow"],
     ["machine washable", "hidden zipper", "super soft", "double sided"],
     {"Color": ["Beige", "Dark Teal", "Mustard Yellow"], "Size": ["18x18 inch", "20x20 inch"]}),
    ("beauty", "face serum", "Beauty › Skin Care › Serums",
     ["face serum", "night cream", "eye gel"],
     ["paraben free", "cruelty free", "fine lines", "dry skin", "travel size"],
     {}),
    ("electronics", "phone case", "Electronics › Accessories › Cases",
     ["phone case", "tablet sleeve", "wallet case"],
     ["shockproof", "wireless charging", "card slot", "slim fit"],
     {"Color": ["Clear", "Midnight Blue", "Coral Pink"]}),
]
_ADJECTIVES = ["classic", "premium", "everyday", "compact", "deluxe", "modern", "soft", "bold"]
_BRANDS = ["Arvelo", "Brindle", "Cobalto", "Dunmore", "Elkwood", "Fenwick", "Galloway",
           "Hollis"]
_ASIN_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"


def synthetic_catalogue(n_products: int = 60, seed: int = 0) -> dict[str, Any]:
    """The three official files' contents for `n_products` invented products."""
    if n_products < 1:
        raise ValueError("n_products must be at least 1")
    rng = random.Random(f"leafe-webshop-synthetic|{seed}")
    items, ins_v2, human = [], {}, {}
    asins: set[str] = set()
    for i in range(n_products):
        cat, query, path, nouns, attr_pool, option_pool = _FAMILIES[i % len(_FAMILIES)]
        while True:
            asin = "B0" + "".join(rng.choice(_ASIN_CHARS) for _ in range(8))
            if asin not in asins:
                asins.add(asin)
                break
        noun = nouns[(i // len(_FAMILIES)) % len(nouns)]
        adjective = _ADJECTIVES[rng.randrange(len(_ADJECTIVES))]
        brand = _BRANDS[rng.randrange(len(_BRANDS))]
        attributes = sorted(rng.sample(attr_pool, 3))
        title = f"{brand} {adjective.title()} {noun.title()} with {attributes[0].title()}"
        low = rng.randrange(5, 80) + rng.choice([0.0, 0.49, 0.99])
        kind = i % 5
        if kind == 3:
            pricing = ""
        elif kind == 4:
            pricing = f"${low:.2f} - ${low + rng.randrange(3, 15):.2f}"
        else:
            pricing = f"${low:.2f}"
        options = {}
        for name, values in option_pool.items():
            if rng.random() < 0.85:
                kept = sorted(rng.sample(values, max(1, len(values) - rng.randrange(2))),
                              key=values.index)
                options[name] = [{"value": v, "image": f"https://example.invalid/{asin}/{v}"}
                                 for v in kept]
        items.append({
            "asin": asin,
            "name": title,
            "full_description": (
                f"The {brand} {noun} is {adjective} and {attributes[1]}. "
                f"Made for {query} lovers; {attributes[2]}."
            ),
            "small_description": [f"{a.capitalize()} design" for a in attributes],
            "pricing": pricing,
            "customization_options": options,
            "category": cat,
            "query": query,
            "product_category": path,
            "images": [f"https://example.invalid/{asin}.jpg"],
            "brand": brand,
        })
        picked = sorted(rng.sample(attributes, 2))
        ins_v2[asin] = {
            "attributes": attributes,
            "instruction": f"i want {' and '.join(picked)} {noun}",
            "instruction_attributes": picked,
        }
        chosen = [vals[rng.randrange(len(vals))]["value"].replace("/", " | ").lower()
                  for vals in options.values()]
        with_text = f" in {' and '.join(chosen)}" if chosen else ""
        human[asin] = [{
            "instruction": f"i'm looking for {picked[0]} {noun}{with_text}.",
            "instruction_attributes": picked[:1] if i % 7 else [],  # some skipped, as real
            "instruction_options": chosen,
            "assignment_id": f"synthetic-{i}",
        }, {
            "instruction": f"find me a {adjective} {noun} that is {picked[-1]}",
            "instruction_attributes": [picked[-1]],
            "instruction_options": chosen[:1],
            "assignment_id": f"synthetic-{i}-b",
        }]
    return {"items_shuffle": items, "items_ins_v2": ins_v2, "items_human_ins": human}


SYNTHETIC_VERSION = 1


def write_synthetic_catalogue(directory: str | os.PathLike, n_products: int = 60,
                              seed: int = 0) -> Path:
    """Write an invented catalogue of `n_products` in the official file formats
    (`items_shuffle.json`, `items_shuffle_1000.json`, `items_ins_v2.json`,
    `items_ins_v2_1000.json`, `items_human_ins.json`) into `directory`; returns it.
    Atomic per file, so concurrent writers of the same catalogue do not clash."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    data = synthetic_catalogue(n_products, seed)
    contents = {
        "items_shuffle.json": data["items_shuffle"],
        "items_shuffle_1000.json": data["items_shuffle"][:1000],
        "items_ins_v2.json": data["items_ins_v2"],
        "items_ins_v2_1000.json": {p["asin"]: data["items_ins_v2"][p["asin"]]
                                   for p in data["items_shuffle"][:1000]},
        "items_human_ins.json": data["items_human_ins"],
    }
    for name, obj in contents.items():
        tmp = out / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
        os.replace(tmp, out / name)
    return out


def synthetic_dir(n_products: int, seed: int = 0) -> Path:
    """The synthetic catalogue's folder in the cache, written on first use."""
    d = paths.cache_root() / "webshop" / f"synthetic-v{SYNTHETIC_VERSION}-{n_products}-{seed}"
    if not (d / "items_human_ins.json").is_file():
        write_synthetic_catalogue(d, n_products, seed)
    return d
