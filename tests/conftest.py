import os

import torch

# Without a GPU, run Triton kernels on the CPU through Triton's interpreter.
# Must happen before anything imports a module that defines @triton.jit kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
