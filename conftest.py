"""Test-session environment, for the tests and the notebooks (nbmake kernels inherit it)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MISFEAT_PROGRESS", "0")
# organisms built by the tests live in the checkout (ignored by git), reused across local runs
os.environ.setdefault("MISFEAT_HOME", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "misfeat"))
