"""The training library methods use: what TRL's trainers need around them (resuming from
their checkpoints, reading their logs). Imports no torch, transformers or TRL at import time."""
