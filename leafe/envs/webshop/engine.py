"""One WebShop session: the original text environment's action handling.

* `search[q]` works on every page (even where no search bar is shown); the query is
  lowercased and split on single spaces; results start at page 1; the chosen product and
  options are cleared.
* `click[x]` needs x (lowercased) among the page's clickables; `click[search]` does nothing.
* anything else (`Search[x]`, `click[]`, a missing bracket) leaves the page as it was, with
  reward 0. Parsing is the original's: `name[arg]` with a greedy name, anchored at the start
  only (text after the closing bracket is ignored).
* `Buy Now` ends the episode with the goal reward; `Back to Search` also forgets the
  visited products; `< Prev` goes to the results from an item page (clearing its options)
  and to the item page from a sub page; `Next >` goes past the last results page to an
  empty one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from leafe.envs.webshop import pages as P
from leafe.envs.webshop.pages import PageState

_ACTION = re.compile(r"(.+)\[(.+)\]")


def parse_action(action: str) -> tuple[str, str | None]:
    """(name, argument or None), as the original parses actions."""
    m = _ACTION.match(action)
    if m is None:
        return action, None
    return m.group(1), m.group(2)


@dataclass
class StepResult:
    reward: float
    done: bool
    valid: bool
    """False when the action changed nothing because it was not understood or not
    clickable (the original answers those with the same page and reward 0)."""


class Session:
    """The pages of one goal, driven by actions. `state` is all that changes."""

    def __init__(self, session_id: str, goal: dict[str, Any], products: dict[str, dict[str, Any]],
                 prices: dict[str, float], search: Callable[[str], list[str]],
                 reward: Callable[..., tuple[float, dict[str, Any]]], show_attrs: bool = False):
        self.session_id = session_id
        self.goal = goal
        self.products = products
        self.prices = prices
        self._search = search
        self._reward = reward
        self.show_attrs = show_attrs
        self.state = PageState(page=P.INDEX, url=P.index_url(session_id))

    @property
    def instruction(self) -> str:
        return self.goal["instruction_text"]

    def observation(self, mode: str = "text") -> str:
        return P.render(self.state, self.instruction, self.products, mode, self.show_attrs)

    def clickables(self) -> dict[str, P.Clickable]:
        return P.clickables(self.state, self.products, self.show_attrs)

    def available_actions(self) -> dict[str, Any]:
        """The original's `get_available_actions()`: search bar shown, clickable names."""
        return {"has_search_bar": self.state.page == P.INDEX,
                "clickables": list(self.clickables())}

    # -- actions ----------------------------------------------------------------------------
    def step(self, action: str) -> StepResult:
        name, arg = parse_action(action)
        if arg is not None:
            arg = arg.lower()
        targets = self.clickables()
        if name == "search" and arg:
            self._show_results(arg.split(" "), 1)
            return StepResult(0.0, False, True)
        if name == "click" and arg in targets and arg != "search":
            return self._click(arg, targets[arg])
        return StepResult(0.0, False, False)

    def _show_results(self, keywords: list[str], page_num: int) -> None:
        s = self.state
        if keywords != s.keywords:  # the search is deterministic: reuse its results
            s.results = self._search(" ".join(keywords))
        s.keywords, s.page_num = keywords, page_num
        s.asin, s.options = None, {}
        s.page, s.sub_page = P.RESULTS, None
        s.url = P.results_url(self.session_id, keywords, page_num)

    def _show_item(self) -> None:
        s = self.state
        s.page, s.sub_page = P.ITEM, None
        s.url = P.item_url(self.session_id, s.asin, s.keywords, s.page_num, s.options)

    def _click(self, name: str, target: P.Clickable) -> StepResult:
        s = self.state
        where = P.page_name(s.url)
        if name == P.BUY_NOW.lower():
            product = self.products[s.asin]
            reward, info = self._reward(product, self.goal, self.prices.get(s.asin), s.options)
            s.page, s.reward, s.reward_info = P.DONE, reward, info
            s.url = P.done_url(self.session_id, s.asin, s.options)
            return StepResult(reward, True, True)
        if name == P.BACK_TO_SEARCH.lower():
            self.state = PageState(page=P.INDEX, url=P.index_url(self.session_id))
        elif name == P.NEXT_PAGE.lower() and where == P.RESULTS:
            self._show_results(s.keywords, s.page_num + 1)
        elif name == P.PREV_PAGE.lower() and where == P.RESULTS:
            self._show_results(s.keywords, s.page_num - 1)
        elif name == P.PREV_PAGE.lower() and where == P.SUB_PAGE:
            self._show_item()
        elif name == P.PREV_PAGE.lower() and where == P.ITEM:
            self._show_results(s.keywords, s.page_num)
        elif name in [p.lower() for p in P.SUB_PAGES]:
            s.sub_page = next(p for p in P.SUB_PAGES if p.lower() == name)
            s.page = P.SUB_PAGE
            s.url = P.sub_page_url(self.session_id, s.asin, s.keywords, s.page_num, s.sub_page,
                                   s.options)
        else:
            if target.kind == "link":
                s.asin = name.upper()
                if s.asin not in s.asins:
                    s.asins.append(s.asin)
            elif target.kind == "option":
                s.options[target.option.lower()] = name
            self._show_item()
        return StepResult(0.0, False, True)
