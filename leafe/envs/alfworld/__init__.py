"""ALFWorld (text) over the real `alfworld` and `textworld` packages; see `adapter`."""

from leafe.envs.alfworld.adapter import AlfworldEnv
from leafe.envs.alfworld.generator import TASK_TYPES

__all__ = ["AlfworldEnv", "TASK_TYPES"]
