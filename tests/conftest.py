import os
import sys

# Tests import shared helpers (random_trees.py) from this folder.
sys.path.insert(0, os.path.dirname(__file__))

# tests/test_triton.py runs the Triton sweeps on CPU tensors in Triton's
# interpreter. Triton reads TRITON_INTERPRET when it decorates a program, its
# standard library (tl.sum, ...) when it is first imported, which
# torch_geometric does while the test modules are collected: so the variable
# is set here, before that. Only where no CUDA device can run compiled Triton
# programs (the CPU backend of torch.compile does not use Triton), so no other
# test sees a difference; a value set by the caller wins.
if 'triton' not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault('TRITON_INTERPRET', '1')
