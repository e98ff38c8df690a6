"""The Triton kernels run on the CPU under Triton's interpreter, which is read from the environment when triton
is imported: switch it on before any test module imports the kernels (tests/conftest.py does the same, whatever
order pytest imports things in)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
