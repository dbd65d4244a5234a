"""WebShop (Yao et al. 2022): the original text environment rebuilt over its official data.

Modules: `data` (official files, goals, splits, the synthetic catalogue), `pages` (page
text in the `text` / `text_rich` modes, clickables), `search` (BM25 with bm25s), `reward`
(the goal reward, rapidfuzz, noun taggers), `engine` (one session's action handling),
`adapter` (the `Env`), `parity` (the original's code in another interpreter).
"""

from leafe.envs.webshop.adapter import WebShopEnv
from leafe.envs.webshop.data import write_synthetic_catalogue

__all__ = ["WebShopEnv", "write_synthetic_catalogue"]
