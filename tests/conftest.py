"""Shared fixtures."""

from __future__ import annotations

import torch

# Small tensors: two threads make small steps slower, and CI has 2 cores.
torch.set_num_threads(1)
