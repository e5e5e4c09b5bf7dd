"""Shared test settings."""

import torch

# One torch thread: on a loaded 2-core machine two threads are several times slower.
torch.set_num_threads(1)
