"""Seeds derived from the master seed and a path of names (stable across processes:
never Python's salted `hash()`)."""

import hashlib


def derive_seed(master: int, *parts: object) -> int:
    h = hashlib.sha256(repr((master,) + tuple(str(p) for p in parts)).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF
