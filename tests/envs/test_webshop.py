"""Tests of the webshop adapter over small catalogues written by the tests (offline, fast).

A hand-made three-product catalogue (official file formats) pins exact pages; leafe's
synthetic catalogue exercises goals, splits, the expert and snapshots at a larger scale.
Expected strings follow the original's templates and its BeautifulSoup text extraction.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest

from leafe import envs
from leafe.envs.base import Snapshot
from leafe.envs.webshop import WebShopEnv, write_synthetic_catalogue
from leafe.envs.webshop import data as D
from leafe.envs.webshop.engine import parse_action
from leafe.envs.webshop.reward import (
    fuzzy_score,
    goal_reward,
    make_tagger,
    normalize_color,
    simple_nouns,
    type_reward,
)
from leafe.envs.webshop.search import SearchEngine
from leafe.errors import UserError

pytest.importorskip("bm25s")
pytest.importorskip("rapidfuzz")

SHOES, TEA, ROAD = "B000000001", "B000000002", "B000000003"

PRODUCTS = [
    {"asin": SHOES, "name": "Trail Runner Shoes", "full_description": "Light shoes for trails.",
     "small_description": ["Rubber sole", "Mesh upper"], "pricing": "$25.99",
     "customization_options": {"Color": [{"value": "Navy Blue"}, {"value": "Grey/White"}],
                               "Size": [{"value": "9"}, {"value": "10"}]},
     "category": "fashion", "query": "Running Shoes ", "product_category":
     "Clothing › Shoes › Running", "images": ["https://example.invalid/1.jpg"], "brand": "X"},
    {"asin": TEA, "name": "Green Tea Bags", "full_description": "Organic green tea.",
     "small_description": "Caffeine light", "pricing": "$4.50 - $6.00",
     "customization_options": {}, "category": "grocery", "query": "tea",
     "product_category": "Grocery › Beverages › Tea", "images": ["https://example.invalid/2"]},
    {"asin": ROAD, "name": "Road Runner Shoes & Socks", "full_description": "Road shoes.",
     "small_description": ["Cushioned"], "pricing": "",
     "customization_options": {"Color": [{"value": "Black"}]}, "category": "fashion",
     "query": "running shoes", "product_category": "Clothing › Shoes › Road",
     "images": ["https://example.invalid/3"]},
    {"asin": "nan", "name": "skipped", "full_description": "", "small_description": [""],
     "pricing": "", "customization_options": {}, "category": "", "query": "",
     "product_category": "", "images": [""]},
]
ATTRIBUTES = {
    SHOES: {"attributes": ["rubber sole", "lightweight"], "instruction": "i want trail shoes",
            "instruction_attributes": ["rubber sole"]},
    TEA: {"attributes": ["organic"], "instruction": "i want organic tea",
          "instruction_attributes": ["organic"]},
    ROAD: {"attributes": ["cushioned"], "instruction": "i want road shoes",
           "instruction_attributes": ["cushioned"]},
}
HUMAN = {
    SHOES: [{"instruction": "i need lightweight trail shoes with a rubber sole.",
             "instruction_attributes": ["lightweight", "rubber sole"],
             "instruction_options": ["navy blue", "10"]}],
    TEA: [{"instruction": "no attributes: skipped", "instruction_attributes": [],
           "instruction_options": []},
          {"instruction": "organic green tea", "instruction_attributes": ["organic"],
           "instruction_options": []}],
}


def _write(d: Path, small: bool = True) -> Path:
    suffix = "_1000" if small else ""
    (d / f"items_shuffle{suffix}.json").write_text(json.dumps(PRODUCTS), encoding="utf-8")
    (d / f"items_ins_v2{suffix}.json").write_text(json.dumps(ATTRIBUTES), encoding="utf-8")
    (d / "items_human_ins.json").write_text(json.dumps(HUMAN), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def hand_dir(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("webshop-hand"))


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    return write_synthetic_catalogue(tmp_path_factory.mktemp("webshop-synth"), n_products=48)


def hand_env(hand_dir: Path, **kw) -> WebShopEnv:
    opts = dict(data_dir=str(hand_dir), noun_tagger="simple", test_size=1, eval_size=0)
    opts.update(kw)
    return envs.make("webshop", **opts)


def synth_env(synth_dir: Path, **kw) -> WebShopEnv:
    opts = dict(data_dir=str(synth_dir), synthetic_products=48, noun_tagger="simple",
                test_size=8, eval_size=12)
    opts.update(kw)
    return envs.make("webshop", **opts)


def _task_of(env: WebShopEnv, asin: str) -> str:
    for split in env.splits():
        for t in env.tasks(split):
            if env.goal(t)["asin"] == asin:
                return t
    raise AssertionError(asin)


# -- data, goals, splits --------------------------------------------------------------------
def test_products_are_loaded_as_the_original(hand_dir):
    cat = D.load_catalogue(hand_dir, "small", "human", 0)
    assert [p["asin"] for p in cat.products] == [SHOES, TEA, ROAD]  # 'nan' skipped
    shoes, tea, road = (cat.by_asin[a] for a in (SHOES, TEA, ROAD))
    assert shoes["options"] == {"color": ["navy blue", "grey | white"], "size": ["9", "10"]}
    assert shoes["Price"] == "$25.99" and cat.prices[SHOES] == 25.99
    assert tea["Price"] == "$4.5 to $6.0" and 4.5 <= cat.prices[TEA] <= 6.0
    assert road["Price"] == "$100.0" and cat.prices[ROAD] == 100.0
    assert tea["BulletPoints"] == ["Caffeine light"] and shoes["query"] == "running shoes"
    assert shoes["Rating"] == "N.A." and shoes["Reviews"] == []
    # Human goals: the instruction without attributes is skipped; a bound above the price.
    assert len(cat.goals) == 2
    g = next(g for g in cat.goals if g["asin"] == SHOES)
    assert re.fullmatch(r"i need lightweight trail shoes with a rubber sole, and price lower "
                        r"than (30|40|50|60)\.00 dollars", g["instruction_text"])
    assert g["price_upper"] in (30.0, 40.0, 50.0, 60.0) and g["price_upper"] > 25.99
    assert g["goal_options"] == ["navy blue", "10"]


def test_missing_files_give_a_clear_error(tmp_path):
    env = hand_env(tmp_path)
    with pytest.raises(UserError, match=r"items_shuffle_1000\.json not found.*setup\.sh"):
        env.tasks("test")
    with pytest.raises(UserError, match="data_dir"):
        envs.make("webshop").tasks("test")


def test_full_subset_reads_the_unsuffixed_files(tmp_path):
    _write(tmp_path, small=False)
    assert len(hand_env(tmp_path, subset="full").catalogue.products) == 3
    with pytest.raises(UserError, match="items_shuffle_1000"):
        hand_env(tmp_path, subset="small").catalogue


def test_synthetic_goals_are_one_per_option_combination(hand_dir):
    cat = D.load_catalogue(hand_dir, "small", "synthetic", 0)
    shoes = sorted(g["instruction_text"].split(", and price")[0]
                   for g in cat.goals if g["asin"] == SHOES)
    assert shoes == [f"i want trail shoes with color: {c}, and size: {s}"
                     for c in ("grey | white", "navy blue") for s in ("10", "9")]
    assert [g["goal_options"] for g in cat.goals if g["asin"] == TEA] == [{}]


def test_goal_shuffle_is_the_originals_seed_233_and_deterministic(synth_dir):
    a = D.load_catalogue(synth_dir, "small", "human", 0)
    D._CACHE.clear()
    b = D.load_catalogue(synth_dir, "small", "human", 0)
    assert a is not b and a.goals == b.goals
    # Rebuild the unshuffled list and shuffle it as the original does (random.seed(233)).
    raw = json.loads((synth_dir / "items_shuffle_1000.json").read_text())
    attrs = json.loads((synth_dir / "items_ins_v2_1000.json").read_text())
    human = json.loads((synth_dir / "items_human_ins.json").read_text())
    products = D.load_products(raw, attrs, human)
    rng = random.Random(0)
    goals = D.human_goals(products, D.product_prices(products, rng), rng)
    state = random.getstate()
    random.seed(233)
    random.shuffle(goals)
    random.setstate(state)
    assert goals == a.goals
    # Another price seed changes bounds, not the goal order.
    c = D.load_catalogue(synth_dir, "small", "human", 1)
    assert [g["asin"] for g in c.goals] == [g["asin"] for g in a.goals]


def test_splits_follow_the_original_ranges(synth_dir):
    env = synth_env(synth_dir)
    n = len(env.catalogue.goals)
    assert n > 40
    assert len(env.tasks("test")) == 8 and len(env.tasks("eval")) == 12
    assert len(env.tasks("train")) == n - 20
    assert env.goal_index("test-00000") == 0 and env.goal_index("eval-00000") == 8
    assert env.goal_index("train-00000") == 20
    # The official sizes: test 0-500, eval 500-1500, train the rest.
    assert D.split_ranges(2000, 500, 1000) == {"train": range(1500, 2000),
                                               "eval": range(500, 1500), "test": range(0, 500)}
    assert D.split_ranges(100, 500, 1000)["test"] == range(0, 100)
    with pytest.raises(ValueError, match="unknown task id"):
        env.goal_index("test-00008")
    with pytest.raises(ValueError, match="valid splits"):
        env.tasks("valid")


def test_synthetic_catalogue_is_deterministic_and_in_official_format(tmp_path):
    a = write_synthetic_catalogue(tmp_path / "a", n_products=12, seed=3)
    b = write_synthetic_catalogue(tmp_path / "b", n_products=12, seed=3)
    for name in ("items_shuffle.json", "items_shuffle_1000.json", "items_ins_v2.json",
                 "items_ins_v2_1000.json", "items_human_ins.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    items = json.loads((a / "items_shuffle.json").read_text())
    assert len(items) == 12 and all(len(p["asin"]) == 10 for p in items)
    assert {"asin", "name", "full_description", "small_description", "pricing",
            "customization_options", "category", "query", "product_category",
            "images"} <= set(items[0])


def test_offline_default_builds_the_synthetic_catalogue_in_the_cache(leafe_cache):
    env = envs.make("webshop", synthetic_products=18, noun_tagger="simple", test_size=4,
                    eval_size=4)
    assert env.data_dir().parent == leafe_cache / "webshop"
    assert (env.data_dir() / "items_human_ins.json").is_file()
    assert len(env.tasks("test")) == 4


# -- pages ----------------------------------------------------------------------------------
def _instr(env, task):
    return env.goal(task)["instruction_text"]


def test_every_page_text_mode(hand_dir):
    env = hand_env(hand_dir)
    t = _task_of(env, SHOES)
    i = _instr(env, t)
    obs = env.reset(t)
    assert obs.text == f"WebShop [SEP] Instruction: [SEP] {i} [SEP] Search"
    assert obs.task == i
    s = env.step("search[Running Shoes]")
    assert s.observation.text == (
        f"Instruction: [SEP] {i} [SEP] Back to Search [SEP] Page 1 (Total results: 2) [SEP] "
        f"Next > [SEP] {ROAD} [SEP] Road Runner Shoes & Socks [SEP] $100.0 [SEP] "
        f"{SHOES} [SEP] Trail Runner Shoes [SEP] $25.99")
    assert (s.reward, s.done, s.valid) == (0.0, False, True)
    s = env.step("click[next >]")
    assert s.observation.text == (f"Instruction: [SEP] {i} [SEP] Back to Search [SEP] Page 2 "
                                  "(Total results: 2) [SEP] < Prev [SEP] Next >")
    env.step("click[< prev]")
    item = env.step(f"click[{SHOES.lower()}]").observation.text
    assert item == (
        f"Instruction: [SEP] {i} [SEP] Back to Search [SEP] < Prev [SEP] color [SEP] "
        "navy blue [SEP] grey | white [SEP] size [SEP] 9 [SEP] 10 [SEP] Trail Runner Shoes "
        "[SEP] Price: $25.99 [SEP] Rating: N.A. [SEP] Description [SEP] Features [SEP] "
        "Reviews [SEP] Buy Now")
    head = f"Instruction: [SEP] {i} [SEP] Back to Search [SEP] < Prev"
    assert env.step("click[description]").observation.text == f"{head} [SEP] Light shoes for trails."
    env.step("click[< prev]")
    assert env.step("click[features]").observation.text == f"{head} [SEP] Rubber sole [SEP] Mesh upper"
    env.step("click[< prev]")
    assert env.step("click[reviews]").observation.text == head
    assert env.step("click[< prev]").observation.text == item
    env.step("click[navy blue]")
    env.step("click[10]")
    done = env.step("click[buy now]")
    assert done.done and done.observation.text == (
        "Thank you for shopping with us! [SEP] Your code: [SEP] None [SEP] (Paste it in your "
        "MTurk interface.) [SEP] Purchased [SEP] asin [SEP] B000000001 [SEP] options [SEP] "
        '{"color": "navy blue", "size": "10"} [SEP] attrs [SEP] None [SEP] category [SEP] None '
        "[SEP] query [SEP] None [SEP] product category [SEP] None [SEP] Target [SEP] asin [SEP] "
        "options [SEP] attrs [SEP] price upper [SEP] instuction text [SEP] category [SEP] "
        "product category [SEP] query [SEP] Goal [SEP] None [SEP] Reward [SEP] Your score "
        "(min 0.0, max 1.0) [SEP] 1.0 [SEP] Reward Details [SEP] None")


def test_every_page_text_rich_mode(hand_dir):
    env = hand_env(hand_dir, observation_mode="text_rich", show_attrs=True)
    t = _task_of(env, SHOES)
    i = _instr(env, t)
    assert env.reset(t).text == f"WebShop\nInstruction: \n{i}\n[button] Search [button_]\n"
    res = env.step("search[running shoes]").observation.text
    assert res == (
        f"Instruction:\n{i}\n[button] Back to Search [button_]\nPage 1 (Total results: 2)\n"
        f"[button] Next > [button_]\n\n[button] {ROAD} [button_]\nRoad Runner Shoes & Socks\n"
        f"$100.0\n\n[button] {SHOES} [button_]\nTrail Runner Shoes\n$25.99\n")
    env.step(f"click[{SHOES.lower()}]")
    item = env.step("click[grey | white]").observation.text
    assert item == (
        f"You have clicked grey | white.\nInstruction:\n{i}\n[button] Back to Search [button_]\n"
        "[button] < Prev [button_]\ncolor\n  [button] navy blue [button_]\n"
        "  [clicked button] grey | white [clicked button_]\nsize\n  [button] 9 [button_]\n"
        "  [button] 10 [button_]\nTrail Runner Shoes\nPrice: $25.99\nRating: N.A.\n"
        "[button] Description [button_]\n[button] Features [button_]\n"
        "[button] Reviews [button_]\n[button] Attributes [button_]\n[button] Buy Now [button_]\n")
    head = f"Instruction:\n{i}\n[button] Back to Search [button_]\n[button] < Prev [button_]\n"
    assert env.step("click[features]").observation.text == f"{head} Rubber sole\n Mesh upper\n"
    env.step("click[< prev]")
    assert env.step("click[attributes]").observation.text == (
        f"{head} rubber sole\n lightweight\nfashion\nrunning shoes\nClothing › Shoes › Running\n")
    env.step("click[< prev]")
    # Back on the results, the visited product is marked as clicked.
    res2 = env.step("click[< prev]").observation.text
    assert f"\n[clicked button] {SHOES} [clicked button_]\n" in res2
    assert f"\n[button] {ROAD} [button_]\n" in res2
    # Back to Search forgets the visited products.
    env.step("click[back to search]")
    assert f"[button] {SHOES} [button_]" in env.step("search[running shoes]").observation.text


def test_clickables_and_admissible_per_page(hand_dir):
    env = hand_env(hand_dir)
    t = _task_of(env, SHOES)
    assert env.reset(t).admissible == ["search[<your query>]", "click[search]"]
    s = env.step("search[running shoes]")
    assert s.observation.admissible == ["click[back to search]", "click[next >]",
                                        f"click[{ROAD.lower()}]", f"click[{SHOES.lower()}]"]
    assert env.step("click[next >]").observation.admissible == [
        "click[back to search]", "click[< prev]", "click[next >]"]
    env.step("click[< prev]")
    item = env.step(f"click[{SHOES.lower()}]").observation
    assert item.admissible == ["click[back to search]", "click[< prev]", "click[description]",
                               "click[features]", "click[reviews]", "click[buy now]",
                               "click[navy blue]", "click[grey | white]", "click[9]",
                               "click[10]"]
    sub = env.step("click[description]").observation
    assert sub.admissible == ["click[back to search]", "click[< prev]"]
    assert sub.info["page"] == "item_sub_page"


# -- actions --------------------------------------------------------------------------------
def test_action_parsing_quirks():
    assert parse_action("search[red shoes]") == ("search", "red shoes")
    assert parse_action("click[a[b]]") == ("click[a", "b]")  # greedy name
    assert parse_action("search[x] trailing") == ("search", "x")
    assert parse_action("search[]") == ("search[]", None)
    assert parse_action("buy") == ("buy", None)


def test_action_quirks(hand_dir):
    env = hand_env(hand_dir)
    t = _task_of(env, SHOES)
    start = env.reset(t).text
    # click[search] is a no-op; invalid actions leave the page with reward 0.
    for bad in ("click[search]", "Search[shoes]", "search[]", "click[buy now]", "jump",
                " search[shoes]", f"click[{SHOES.lower()}]"):
        s = env.step(bad)
        assert (s.observation.text, s.reward, s.done, s.valid) == (start, 0.0, False, False), bad
    # Arguments are lowercased: click[NEXT >] works, search[RUNNING] finds lowercase text.
    res = env.step("search[RUNNING Shoes]").observation.text
    assert "Page 1 (Total results: 2)" in res
    assert "Page 2" in env.step("click[NEXT >]").observation.text
    env.step("click[< prev]")
    env.step(f"click[{SHOES}]")  # upper-case ASIN: lowercased, still clickable
    item = env.step("click[Navy Blue]").observation
    assert item.info["page"] == "item_page"
    # search works on any page, even without a search bar; it clears the chosen options.
    res2 = env.step("search[tea]").observation
    assert "Green Tea Bags" in res2.text and res2.info["page"] == "search_results"
    env.step(f"click[{TEA.lower()}]")
    s = env.step("click[buy now]")
    assert s.done and s.observation.info["R"] == s.reward and s.reward < 1


def test_buy_now_ends_with_reward_and_success(hand_dir):
    env = hand_env(hand_dir)
    t = _task_of(env, SHOES)
    env.reset(t)
    for a in ("search[trail runner shoes]", f"click[{SHOES.lower()}]", "click[navy blue]",
              "click[10]"):
        assert env.step(a).reward == 0.0
    s = env.step("click[buy now]")
    assert (s.reward, s.done, s.success) == (1.0, True, True)
    info = s.observation.info
    assert info["R"] == 1.0 and info["success"] is True and info["noun_tagger"] == "simple"
    assert info["reward_info"]["r_type"] == 1.0 and info["reward_info"]["r_option"] == 1.0
    # The same purchase without the size option: (2 + 1 + 1) / 5.
    env.reset(t)
    for a in ("search[trail runner shoes]", f"click[{SHOES.lower()}]", "click[navy blue]"):
        env.step(a)
    s = env.step("click[buy now]")
    assert s.reward == pytest.approx(4 / 5) and not s.success


# -- reward ---------------------------------------------------------------------------------
def _product(**kw):
    p = {"asin": "B1", "name": "Trail Runner Shoes", "Title": "Trail Runner Shoes",
         "query": "running shoes", "product_category": "Clothing › Shoes › Running",
         "BulletPoints": ["Rubber sole"], "Description": "Light shoes.",
         "Attributes": ["lightweight", "breathable mesh"]}
    p.update(kw)
    return p


def _goal(**kw):
    g = {"asin": "B1", "name": "Trail Runner Shoes", "query": "running shoes",
         "product_category": "Clothing › Shoes › Running",
         "attributes": ["lightweight", "rubber sole"], "goal_options": ["navy blue", "10"],
         "price_upper": 30.0}
    g.update(kw)
    return g


def _R(product, goal, price=20.0, options=None, nouns=simple_nouns):
    opts = {"color": "navy blue", "size": "10"} if options is None else options
    return goal_reward(product, goal, price, opts, nouns)[0]


def test_reward_cases_by_hand():
    p, g = _product(), _goal()
    # attributes: 'lightweight' fuzzy-matches an attribute, 'rubber sole' is in the bullets.
    assert _R(p, g) == 1.0                                            # (2 + 2 + 1) / 5
    assert _R(p, g, options={"color": "navy blue"}) == pytest.approx(4 / 5)
    assert _R(p, g, options={}) == pytest.approx(3 / 5)               # no options chosen
    assert _R(p, g, price=30.01) == pytest.approx(4 / 5)              # over budget
    assert _R(p, g, price=30.0) == 1.0                                # price <= bound
    partial = _product(BulletPoints=["Mesh"], Attributes=["lightweight"])
    assert _R(partial, g, options={"size": "9", "color": "navy blue"}) == pytest.approx(3 / 5)
    no_opts = _goal(goal_options=[])
    assert _R(p, no_opts, options={}) == 1.0                          # (2 + 0 + 1) / 3
    assert _R(p, no_opts, options={}, price=99) == pytest.approx(2 / 3)


def test_reward_type_branches():
    def nouns_of(table):
        return lambda text: table[text]

    g = _goal(name="G")
    cases = [
        # (bought query, bought path, bought nouns, goal nouns, expected r_type)
        ("running shoes", "A › B", ["shoes"], ["shoes", "trail"], 1.0),        # query match
        ("x", "Clothing › Shoes › Road", ["a"], ["a", "b", "c", "d", "e"], 1.0),  # category, 0.2
        ("x", "Other › Path", ["a"], ["a", "b", "c", "d", "e"], 0.5),          # 0.2, no match
        ("x", "Other › Path", ["a", "b"], ["a", "b", "c", "d", "e"], 1.0),     # 0.4 > 0.2
        ("running shoes", "A › B", ["a"], list("abcdefghijk"), 0.1),           # 1/11 < 0.1
        ("running shoes", "A › B", ["z"], ["a", "b"], 0.0),                    # no noun shared
        ("x", "Other › Path", ["z"], [], 0.5),                                 # no goal nouns: 0.2
        ("running shoes", "A › B", ["z"], [], 1.0),
    ]
    for query, path, bought, wanted, expected in cases:
        p = _product(name="P", query=query, product_category=path)
        rt = type_reward(p, g, nouns_of({"P": bought, "G": wanted}))
        assert rt["r_type"] == expected, (query, path, bought, wanted, rt)
        r = goal_reward(p, g, 20.0, {"c": "navy blue", "s": "10"},
                        nouns_of({"P": bought, "G": wanted}))[0]
        assert r == pytest.approx(expected)


def test_colour_normalisation_and_fuzzy_matching():
    assert normalize_color("light grey heather") == "grey"   # first colour in list order
    assert normalize_color("navy blue") == "blue"             # 'blue' comes before 'navy'
    assert normalize_color("10") == "10"
    p = _product()
    g = _goal(goal_options=["grey"])
    assert _R(p, g, options={"color": "greyish"}) == 1.0      # greyish -> grey
    assert fuzzy_score("greyish", "grey") <= 85               # not without normalisation
    assert _R(p, _goal(goal_options=["navy"]), options={"color": "navy blue"}) == pytest.approx(3 / 4)
    # thefuzz processing: punctuation ignored, case folded, rounded to an integer.
    assert fuzzy_score("Rubber-Sole!", "rubber sole") == 100
    assert fuzzy_score("abcdefgh", "abcdefgx") == 88 and fuzzy_score("", "x") == 0
    # Synthetic goals' options are (name, value) pairs, compared as the pair's text.
    synthetic = _goal(goal_options={"color": "black", "size": "large"}, attributes=["lightweight"])
    assert _R(p, synthetic, options={"color": "black", "size": "large"}) == 1.0
    assert _R(p, synthetic, options={"size": "large"}) == pytest.approx(3 / 4)


def test_noun_taggers():
    assert simple_nouns("The Trail Runner Shoes for Men, 2 Pack") == ["trail", "runner", "shoes", "men"]
    with pytest.raises(UserError, match="unknown noun_tagger"):
        make_tagger("nltk")
    spacy = pytest.importorskip("spacy")
    if spacy.util.is_package("en_core_web_sm"):
        nouns = make_tagger("spacy")
        assert "shoes" in nouns("Trail running shoes for men")
    with pytest.raises(UserError, match=r"python -m spacy download no_such_model.*noun_tagger: simple"):
        make_tagger("spacy", spacy_model="no_such_model")


def test_spacy_tagger_error_at_reset(hand_dir):
    env = hand_env(hand_dir, noun_tagger="spacy", spacy_model="no_such_model")
    with pytest.raises(UserError, match="spacy download"):
        env.reset(env.tasks("test")[0])


# -- search ---------------------------------------------------------------------------------
def test_bm25_scores_by_hand():
    docs = ["red shoes", "red red hat", "blue shoes shoes hat extra"]
    engine = SearchEngine(["a", "b", "c"], docs, stem=False)
    N, k1, b = 3, 0.9, 0.4
    lengths = [2, 3, 5]
    avgdl = sum(lengths) / N

    def term(tf, dl, df):
        idf = math.log(1 + (N - df + 0.5) / (df + 0.5))
        # Lucene >= 8 (and bm25s) drop the constant (k1 + 1) factor of the textbook formula.
        return idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl)) / (k1 + 1)

    red = engine.scores("red")
    assert red[0] == pytest.approx(term(1, 2, 2), rel=1e-6)
    assert red[1] == pytest.approx(term(2, 3, 2), rel=1e-6)
    assert red[2] == 0
    sh = engine.scores("shoes hat")
    assert sh[2] == pytest.approx(term(2, 5, 2) + term(1, 5, 2), rel=1e-6)
    assert sh[0] == pytest.approx(term(1, 2, 2), rel=1e-6)
    # Repeated query terms count again (Anserini boosts them); unknown terms add nothing.
    assert engine.scores("red red zebra")[1] == pytest.approx(2 * term(2, 3, 2), rel=1e-6)
    assert engine.search("red") == ["b", "a"]
    assert engine.search("hat shoes") == ["c", "a", "b"]
    assert engine.search("zebra") == []
    assert engine.search("shoes hat", k=1) == ["c"]


def test_search_ties_break_by_catalogue_order_and_analyzer():
    engine = SearchEngine(["x", "y", "z"], ["lamp desk", "desk lamp", "lamp desk"], stem=False)
    assert engine.search("lamp") == ["x", "y", "z"]
    stemmed = SearchEngine(["x"], ["The Dog's running shoes: 3.5oz, 1,000 pairs"])
    # Possessive dropped, stop words removed, Porter stems, numbers kept whole.
    assert stemmed.analyze("The Dog's running shoes: 3.5oz, 1,000 pairs") == [
        "dog", "run", "shoe", "3.5oz", "1,000", "pair"]
    assert stemmed.search("shoe") == ["x"]


def test_search_returns_at_most_50_and_pages_of_10(synth_dir):
    env = synth_env(synth_dir)
    env.reset("test-00000")
    obs = env.step("search[with]").observation.text  # a stop word matches nothing
    assert "Page 1 (Total results: 0)" in obs
    text = env.step("search[shoes tea lamp pillow serum case]").observation.text
    total = int(re.search(r"Total results: (\d+)", text).group(1))
    assert 10 < total <= 48
    assert text.count("[SEP] B0") == 10


# -- expert, snapshots ----------------------------------------------------------------------
def test_expert_buys_the_goal_with_R_1(synth_dir, hand_dir):
    env = synth_env(synth_dir)
    tasks = env.tasks("test") + env.tasks("train")[:12]
    for t in tasks:
        plan = env.expert(t)
        assert plan[0].startswith("search[") and plan[-1] == "click[buy now]"
        env.reset(t)
        for a in plan:
            s = env.step(a)
            assert s.valid, (t, a)
        assert s.done and s.success and s.reward == 1.0, (t, plan)
    hand = hand_env(hand_dir)
    t = _task_of(hand, SHOES)
    assert hand.expert(t) == ["search[trail runner shoes]", f"click[{SHOES.lower()}]",
                              "click[navy blue]", "click[10]", "click[buy now]"]


@pytest.mark.parametrize("mode", ["text", "text_rich"])
def test_restore_reproduces_the_future(synth_dir, mode):
    env = synth_env(synth_dir, observation_mode=mode)
    t = env.tasks("train")[3]
    plan = env.expert(t)
    actions = plan[:1] + ["click[next >]", "click[< prev]"] + plan[1:2] + [
        "click[features]", "click[< prev]"] + plan[2:]
    env.reset(t)
    k = 4
    for a in actions[:k]:
        env.step(a)
    snap = env.snapshot()
    assert snap.native is not None
    future = [env.step(a) for a in actions[k:]]
    assert future[-1].done and future[-1].success

    def replay_from(restored_env, snapshot):
        obs = restored_env.restore(snapshot)
        assert restored_env.actions == actions[:k]
        return obs, [restored_env.step(a) for a in actions[k:]]

    for other, s in ((env, snap), (synth_env(synth_dir, observation_mode=mode), snap),
                     (env, Snapshot(snap.task_id, snap.actions, snap.obs_hash))):  # replay
        obs, again = replay_from(other, s)
        assert [(x.observation.text, x.reward, x.done, x.success, x.observation.admissible)
                for x in again] == [(x.observation.text, x.reward, x.done, x.success,
                                     x.observation.admissible) for x in future]
    # Native restore and replay land on the same observation.
    native_obs = env.restore(snap).text
    assert env.restore(Snapshot(snap.task_id, snap.actions, snap.obs_hash)).text == native_obs


def test_snapshot_is_independent_of_later_steps(hand_dir):
    env = hand_env(hand_dir)
    t = _task_of(env, SHOES)
    env.reset(t)
    env.step("search[trail runner shoes]")
    env.step(f"click[{SHOES.lower()}]")
    snap = env.snapshot()
    before = env._last_obs.text
    env.step("click[navy blue]")
    env.step("click[back to search]")
    assert env.restore(snap).text == before
    s = env.step("click[buy now]")  # the options clicked after the snapshot are gone
    assert s.done and s.reward == pytest.approx(3 / 5)
    assert env.step("click[buy now]").valid is False  # the episode is over: no clickables


def test_options_validation():
    with pytest.raises(Exception, match="needs `python`"):
        envs.make("webshop", source="original")
    with pytest.raises(Exception, match="extra"):
        envs.make("webshop", unknown=1)
    assert "webshop" in envs.names()


# -- presets and specs ----------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("spec_name", ["webshop.yaml", "webshop-offline.yaml"])
def test_specs_load_with_the_paper_cap(spec_name):
    from leafe.spec.loader import load_spec

    loaded = load_spec(ROOT / "specs" / spec_name)
    assert loaded.spec.env.adapter == "webshop"
    assert isinstance(loaded.env_options, WebShopEnv.Options)
    if spec_name == "webshop.yaml":
        assert loaded.spec.env.max_steps == 15 and loaded.env_options.noun_tagger == "spacy"
    else:
        assert loaded.env_options.synthetic_products == 60
        assert loaded.env_options.noun_tagger == "simple"


@pytest.mark.parametrize("preset", ["webshop", "webshop-verl-agent"])
def test_prompts_render_and_expert_actions_round_trip(preset, tmp_path, synth_dir):
    from leafe.loop import render_action, render_conversation
    from leafe.parsing import parse_action as parse_reply
    from leafe.spec.loader import load_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text("leafe: 1\nname: t\n"
                    f"env: {{use: {preset}, options: {{data_dir: {synth_dir}, synthetic_products: 48,"
                    " noun_tagger: simple, test_size: 8, eval_size: 12}}\n"
                    "models: {policy: {name: leafe:tiny-qwen2}}\nmethods: {base: {}}\n")
    loaded = load_spec(spec)
    env_spec = loaded.spec.env
    assert env_spec.max_steps == 15
    env = WebShopEnv(loaded.env_options)
    obs = env.reset("test-00001")
    step = env.step(env.expert("test-00001")[0])
    history = [{"action": env.actions[0], "observation": step.observation.text}]
    user = render_conversation(env_spec, step.observation, history, 1)[-1]["content"]
    assert obs.task in user and step.observation.text in user
    if preset == "webshop-verl-agent":
        assert all(f"'{a}'," in user for a in step.observation.admissible)
    for action in env.expert("test-00001"):
        assert parse_reply(render_action(env_spec, action), env_spec.action.pattern) == action
