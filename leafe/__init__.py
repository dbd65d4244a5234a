"""leafe: the reference implementation of LEAFE (arXiv 2603.16843).

Reflect on environment feedback, roll back to the step that went wrong, explore a revised
branch, then distil the corrections into the weights; compare with baselines by Pass@k.
"""

__version__ = "0.2.0"

__all__ = ["__version__"]
