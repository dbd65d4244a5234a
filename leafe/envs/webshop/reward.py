"""WebShop's goal reward (the original's `engine/goal.py`), with rapidfuzz.

R = r_type * (matched attributes + matched options + [price <= budget])
      / (|goal attributes| + |goal options| + 1)

* an attribute matches when a product attribute scores a fuzzy token-set ratio above 85, or
  it is a substring of the lowercased title, bullet points or description;
* an option matches when a chosen option scores above 85 against it, both first reduced to
  the first colour name they contain;
* r_type is 1, 0.5, 0.1 or 0 from the query, the category path and the share of the goal
  title's nouns found in the bought title's nouns (spaCy in the original; pluggable here).

Fuzzy scores reproduce thefuzz 0.19 (the original's): both strings lose characters 128-255,
non-word characters become spaces, lowercase, trimmed; the score is rounded to an integer.
A synthetic goal's options are (name, value) pairs, which the original compares as the
pair's Python text (`"('color', 'black')"`): kept, for parity.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from leafe.errors import UserError

#: Colour names in the order the original tries them (the first one contained wins).
COLOR_SET = (
    "alabaster apricot aqua ash asphalt azure banana beige black blue blush bordeaux bronze "
    "brown burgundy camel camo caramel champagne charcoal cheetah chestnut chocolate christmas "
    "coffee cognac copper coral cranberry cream crystal dark denim eggplant elephant espresso "
    "fuchsia gold granite grape graphite grass gray green grey heather indigo ivory ivy khaki "
    "lavender lemon leopard light lilac lime magenta maroon mauve merlot midnight mint mocha "
    "multicolor mushroom mustard natural navy nude olive orange peach pewter pink plum purple "
    "rainbow red rose royal rust sand sapphire seashell silver skull slate steel stone "
    "stonewash sunflower tan taupe teal tiger turquoise violet walnut wheat white wine yellow"
).split()

NOUN_TAGS = ("PNOUN", "NOUN", "PROPN")
_LATIN1 = {i: None for i in range(128, 256)}
_NON_WORD = re.compile(r"(?ui)\W")


def normalize_color(option: Any) -> Any:
    """The first colour name found in the option (substring; for a pair: an equal item)."""
    for color in COLOR_SET:
        if color in option:
            return color
    return option


def _process(s: Any) -> str:
    s = s if isinstance(s, str) else str(s)
    return _NON_WORD.sub(" ", s.translate(_LATIN1)).lower().strip()


def fuzzy_score(a: Any, b: Any) -> int:
    """thefuzz 0.19's `token_set_ratio(a, b)` (default processing), via rapidfuzz."""
    from rapidfuzz import fuzz

    pa, pb = _process(a), _process(b)
    if not pa or not pb:
        return 0
    return int(round(fuzz.token_set_ratio(pa, pb, processor=None)))


# -- nouns ----------------------------------------------------------------------------------
#: Words the `simple` tagger never counts as nouns.
_FUNCTION_WORDS = frozenset(
    "a an and are as at be but by for from if in into is it its no not of on or such that the "
    "their then there these they this to was will with without all any each every per plus "
    "new pack set pcs count ounce oz inch inches lb lbs size".split()
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*")


def simple_nouns(text: str) -> list[str]:
    """The `simple` tagger: every alphabetic word (lowercased) outside a short list of
    function and unit words counts as a noun. Adjectives count too, so title scores run
    higher than spaCy's; use it only where spaCy's model cannot be installed."""
    return [w.lower() for w in _WORD.findall(text) if w.lower() not in _FUNCTION_WORDS]


_SPACY: dict[str, Any] = {}


def spacy_nouns(model: str = "en_core_web_sm") -> Callable[[str], list[str]]:
    """The original's tagger: spaCy's part-of-speech tags NOUN / PROPN, lowercased words."""
    if model not in _SPACY:
        try:
            import spacy
        except ImportError as e:
            raise UserError(
                "webshop: noun_tagger 'spacy' needs spaCy and its English model: pip install "
                f"spacy && python -m spacy download {model}; or set the env option "
                "`noun_tagger: simple` (a rougher fallback, see leafe.envs.webshop.reward)"
            ) from e
        try:
            _SPACY[model] = spacy.load(model)
        except OSError as e:
            raise UserError(
                f"webshop: noun_tagger 'spacy' needs the spaCy model {model!r}, which is not "
                f"installed: python -m spacy download {model}; or set the env option "
                "`noun_tagger: simple` (a rougher fallback, see leafe.envs.webshop.reward)"
            ) from e
    nlp = _SPACY[model]

    def nouns(text: str) -> list[str]:
        return [t.text.lower() for t in nlp(text) if t.pos_ in NOUN_TAGS]

    return nouns


def make_tagger(name: str, spacy_model: str = "en_core_web_sm") -> Callable[[str], list[str]]:
    """The noun tagger named by the env option `noun_tagger`."""
    if name == "spacy":
        return spacy_nouns(spacy_model)
    if name == "simple":
        return simple_nouns
    raise UserError(f"webshop: unknown noun_tagger {name!r}; use spacy or simple")


# -- the reward -----------------------------------------------------------------------------
def type_reward(product: dict[str, Any], goal: dict[str, Any],
                nouns: Callable[[str], list[str]]) -> dict[str, Any]:
    """r_type and its parts: query match, category overlap (>= 2 path parts), title score."""
    query_match = product["query"] == goal["query"]
    bought_path = {x.strip() for x in product["product_category"].split("›")}
    goal_path = {x.strip() for x in goal["product_category"].split("›")}
    category_match = len(bought_path & goal_path) >= 2
    bought, wanted = nouns(product["name"]), nouns(goal["name"])
    title_score = 0.2 if not wanted else len(set(bought) & set(wanted)) / len(wanted)
    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return {"r_type": r_type, "query_match": query_match, "category_match": category_match,
            "title_score": title_score}


def attribute_matches(product: dict[str, Any], goal_attributes: list[str]) -> int:
    texts = (product["Title"].lower(), " ".join(product["BulletPoints"]).lower(),
             product["Description"].lower())
    n = 0
    for g in goal_attributes:
        if any(fuzzy_score(p, g) > 85 for p in product["Attributes"]) or any(g in t for t in texts):
            n += 1
    return n


def option_matches(chosen: list[Any], goal_options: list[Any]) -> int:
    chosen = [normalize_color(o) for o in chosen]
    n = 0
    for g in (normalize_color(o) for o in goal_options):
        if any(fuzzy_score(p, g) > 85 for p in chosen):
            n += 1
    return n


def goal_reward(product: dict[str, Any], goal: dict[str, Any], price: float,
                options: dict[str, str], nouns: Callable[[str], list[str]]
                ) -> tuple[float, dict[str, Any]]:
    """(R, parts) for buying `product` at `price` with the chosen `options`."""
    rt = type_reward(product, goal, nouns)
    goal_options = goal["goal_options"]
    goal_list = list(goal_options.items()) if isinstance(goal_options, dict) else list(goal_options)
    n_attr = attribute_matches(product, goal["attributes"])
    n_opt = option_matches(list(options.values()), goal_list)
    r_price = price <= goal["price_upper"]
    denom = len(goal["attributes"]) + len(goal_list) + 1
    reward = (n_attr + n_opt + int(r_price)) / denom * rt["r_type"]
    info = {**rt, "r_att": n_attr / len(goal["attributes"]), "w_att": len(goal["attributes"]) / denom,
            "r_price": r_price, "w_price": 1 / denom}
    if goal_list:
        info["r_option"] = n_opt / len(goal_list)
        info["w_option"] = len(goal_list) / denom
    return reward, info
