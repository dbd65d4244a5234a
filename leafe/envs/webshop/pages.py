"""WebShop's pages as the original's text environment shows them.

The original renders an HTML page and reads back its visible text nodes with BeautifulSoup.
leafe builds the same sequence of text nodes directly, each tagged with what holds it (a
button, an option label, a product link, or plain text), and turns it into either mode:

* `text`: the nodes, stripped, joined by ` [SEP] `;
* `text_rich`: one node per line, buttons as `[button] x [button_]`, the chosen options and
  visited products as `[clicked button] x [clicked button_]`, and `You have clicked x.`
  lines put in front for every chosen option.

Whitespace follows the HTML parser the original uses: a text node that is only whitespace
becomes a single newline (dropped) when it holds a newline, else a single space.
The page's URL is kept as the original builds it, because the original reads it back (which
option counts as chosen in `text_rich`, which page `< Prev` / `Next >` act on).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

BASE_URL = "http://127.0.0.1:3000"
#: Results per page and the most results a search returns.
PRODUCT_WINDOW = 10
SEARCH_RETURN_N = 50
#: Button texts.
BUY_NOW = "Buy Now"
NEXT_PAGE = "Next >"
PREV_PAGE = "< Prev"
BACK_TO_SEARCH = "Back to Search"
SUB_PAGES = ("Description", "Features", "Reviews", "Attributes")

#: Page names (as the original's URLs name them; "index" is the search page).
INDEX, RESULTS, ITEM, SUB_PAGE, DONE = "index", "search_results", "item_page", "item_sub_page", "done"

_WS = " \t\n\r\f"


@dataclass
class PageState:
    """Everything a page depends on (small: snapshots copy it)."""

    page: str = INDEX
    """One of index, search_results, item_page, item_sub_page, done."""
    url: str = ""
    """The URL as the original builds it."""
    keywords: list[str] | None = None
    """The last search's keywords (the lowercased query split on single spaces)."""
    page_num: int | None = None
    """Results page number of the last search."""
    results: list[str] = field(default_factory=list)
    """ASINs of the last search's results (at most 50, best first)."""
    asin: str | None = None
    """The product being viewed."""
    asins: list[str] = field(default_factory=list)
    """Products visited since the last `Back to Search` (shown as clicked in text_rich)."""
    options: dict[str, str] = field(default_factory=dict)
    """Chosen options of the viewed product: option name -> value, in click order."""
    sub_page: str | None = None
    """Description, Features, Reviews or Attributes on a sub page."""
    reward: float | None = None
    """The goal reward after `Buy Now`."""
    reward_info: dict[str, Any] | None = None
    """Its parts (r_type, r_att, ...)."""

    def copy(self) -> PageState:
        return PageState(self.page, self.url, None if self.keywords is None else list(self.keywords),
                         self.page_num, list(self.results), self.asin, list(self.asins),
                         dict(self.options), self.sub_page, self.reward,
                         None if self.reward_info is None else dict(self.reward_info))


@dataclass(frozen=True)
class Node:
    """A visible text node and what holds it: text, button, label (option) or link (ASIN)."""

    text: str
    kind: str = "text"


@dataclass(frozen=True)
class Clickable:
    """Something `click[...]` can name: a button, a product link or an option radio."""

    kind: str
    """button, link or option."""
    text: str
    """Its name as the page shows it."""
    option: str | None = None
    """For an option, the option's name (e.g. `color`)."""


def _node(text: str, kind: str = "text") -> Node | None:
    """A text node as the HTML parser yields it (None: no node at all)."""
    if text == "":
        return None
    if text.strip(_WS) == "":
        return Node("\n" if "\n" in text else " ", kind)
    return Node(text, kind)


def htmlsafe_json(obj: Any) -> str:
    """JSON as a Jinja `tojson` filter prints it (sorted keys, HTML-unsafe characters
    escaped)."""
    return (json.dumps(obj, sort_keys=True).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026").replace("'", "\\u0027"))


def _head(instruction: str, first_page: bool) -> list[Node | None]:
    if first_page:
        return [_node("WebShop"), _node("Instruction: "), _node(instruction)]
    return [_node("Instruction:"), _node(instruction), _node(BACK_TO_SEARCH, "button")]


def page_nodes(state: PageState, instruction: str, products: dict[str, dict[str, Any]],
               show_attrs: bool = False) -> list[Node]:
    """The page's visible text nodes in document order."""
    p = state.page
    out: list[Node | None]
    if p == INDEX:
        out = [*_head(instruction, True), _node("Search", "button")]
    elif p == RESULTS:
        page_num = state.page_num or 1
        out = [*_head(instruction, False),
               _node(f"Page {page_num} (Total results: {len(state.results)})")]
        if page_num > 1:
            out.append(_node(PREV_PAGE, "button"))
        out.append(_node(NEXT_PAGE, "button"))
        start = (page_num - 1) * PRODUCT_WINDOW
        for asin in state.results[start:start + PRODUCT_WINDOW]:
            item = products[asin]
            out += [_node(item["asin"], "link"), _node(item["Title"]), _node(item["Price"])]
    elif p == ITEM:
        item = products[state.asin]
        out = [*_head(instruction, False), _node(PREV_PAGE, "button")]
        for name, values in item["options"].items():
            out.append(_node(name))
            out += [_node(v, "label") for v in values]
        out += [_node(item["Title"]), _node(f"Price: {item['Price']}"),
                _node(f"Rating: {item['Rating']}")]
        out += [_node(s, "button") for s in SUB_PAGES[:3]]
        if show_attrs:
            out.append(_node("Attributes", "button"))
        out.append(_node(BUY_NOW, "button"))
    elif p == SUB_PAGE:
        item = products[state.asin]
        out = [*_head(instruction, False), _node(PREV_PAGE, "button")]
        if state.sub_page == "Description":
            out.append(_node(item["Description"]))
        elif state.sub_page == "Features":
            out += [_node(f" {b}") for b in item["BulletPoints"]]
        elif state.sub_page == "Attributes":
            out += [_node(f" {a}") for a in item["Attributes"]]
            out += [_node(str(item[k])) for k in ("category", "query", "product_category")]
        # Reviews: the original loads no reviews, so the page lists none.
    elif p == DONE:
        out = _done_nodes(state)
    else:
        raise ValueError(f"unknown page {p!r}")
    return [n for n in out if n is not None]


def _done_nodes(state: PageState) -> list[Node | None]:
    """The purchase page: the original fills only asin, options and reward; the other fields
    print as `None` or nothing (they are in a hidden block, but still text nodes)."""
    return [
        _node("Thank you for shopping with us!"), _node("Your code: "), _node("None"),
        _node(" (Paste it in your MTurk interface.)"), _node("Purchased"),
        _node("asin"), _node(str(state.asin)), _node("options"), _node(htmlsafe_json(state.options)),
        _node("attrs"), _node("None"), _node("category"), _node("None"),
        _node("query"), _node("None"), _node("product category"), _node("None"),
        _node("Target"), _node("asin"), _node("options"), _node("attrs"), _node("price upper"),
        _node("instuction text"), _node("category"), _node("product category"), _node("query"),
        _node("Goal "), _node("None"), _node("Reward"),
        _node("Your score (min 0.0, max 1.0)"), _node(str(state.reward)),
        _node("Reward Details "), _node("None"),
    ]


def to_text(nodes: list[Node]) -> str:
    """The `text` observation: stripped nodes joined by ` [SEP] `."""
    return " [SEP] ".join(n.text.strip() for n in nodes if n.text != "\n")


def to_text_rich(nodes: list[Node], state: PageState) -> str:
    """The `text_rich` observation (see the module docstring)."""
    obs = ""
    for n in nodes:
        t = n.text
        if t == "\n":
            continue
        if n.kind == "button":
            line = f"[button] {t} [button_]"
        elif n.kind == "label":
            # The original tests the quoted value against the URL (its JSON of the options).
            if f'"{t}"' in state.url:
                line = f"  [clicked button] {t} [clicked button_]"
                obs = f"You have clicked {t}.\n" + obs
            else:
                line = f"  [button] {t} [button_]"
        elif n.kind == "link":
            mark = "clicked button" if t in state.asins else "button"
            line = f"\n[{mark}] {t} [{mark}_]"
        else:
            line = t
        obs += line + "\n"
    return obs


def render(state: PageState, instruction: str, products: dict[str, dict[str, Any]],
           mode: str = "text", show_attrs: bool = False) -> str:
    """The observation of `state` in `mode` (`text` or `text_rich`)."""
    nodes = page_nodes(state, instruction, products, show_attrs)
    if mode == "text":
        return to_text(nodes)
    if mode == "text_rich":
        return to_text_rich(nodes, state)
    raise ValueError(f"unknown observation mode {mode!r}; use text or text_rich")


def clickables(state: PageState, products: dict[str, dict[str, Any]],
               show_attrs: bool = False) -> dict[str, Clickable]:
    """What `click[...]` accepts on this page, keyed by its (lowercased) name, in the
    original's order: buttons, then product links, then option values (a later entry with
    the same name replaces an earlier one, keeping its place)."""
    buttons: list[str] = []
    links: list[str] = []
    radios: list[tuple[str, str]] = []
    p = state.page
    if p == INDEX:
        buttons = ["Search"]
    elif p == RESULTS:
        buttons = [BACK_TO_SEARCH] + ([PREV_PAGE] if (state.page_num or 1) > 1 else []) + [NEXT_PAGE]
        start = ((state.page_num or 1) - 1) * PRODUCT_WINDOW
        links = [products[a]["asin"] for a in state.results[start:start + PRODUCT_WINDOW]]
    elif p == ITEM:
        buttons = [BACK_TO_SEARCH, PREV_PAGE, *SUB_PAGES[:3]]
        buttons += ["Attributes"] if show_attrs else []
        buttons.append(BUY_NOW)
        item = products[state.asin]
        radios = [(name, v) for name, values in item["options"].items() for v in values]
    elif p == SUB_PAGE:
        buttons = [BACK_TO_SEARCH, PREV_PAGE]
    out: dict[str, Clickable] = {}
    for b in buttons:
        out[b.lower()] = Clickable("button", b)
    for a in links:
        out[a.lower()] = Clickable("link", a)
    for name, v in radios:
        out[v] = Clickable("option", v, name)
    return out


def page_name(url: str | None) -> str | None:
    """Which page the original takes a URL for: the first page name found in it."""
    if url is None:
        return None
    for name in (RESULTS, ITEM, SUB_PAGE, DONE):
        if name in url:
            return name
    return ""


def index_url(session: str) -> str:
    return f"{BASE_URL}/{session}"


def results_url(session: str, keywords: list[str], page_num: int) -> str:
    return f"{BASE_URL}/search_results/{session}/{'+'.join(keywords)}/{page_num}"


def item_url(session: str, asin: str, keywords: list[str], page_num: int,
             options: dict[str, str]) -> str:
    return (f"{BASE_URL}/item_page/{session}/{asin}/{'+'.join(keywords)}/{page_num}/"
            f"{json.dumps(options)}")


def sub_page_url(session: str, asin: str, keywords: list[str], page_num: int, sub: str,
                 options: dict[str, str]) -> str:
    return (f"{BASE_URL}/item_sub_page/{session}/{asin}/{'+'.join(keywords)}/{page_num}/"
            f"{sub}/{options}")


def done_url(session: str, asin: str, options: dict[str, str]) -> str:
    return f"{BASE_URL}/done/{session}/{asin}/{options}"
