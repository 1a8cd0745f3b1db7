r"""Pure functions of HSA over tensors; :mod:`hsa_geo.nn` wraps them."""
from hsa_geo.functional.attention import (BlockAttention, block_attention_to_dense, hsa,
                                          hsa_block_weights, hsa_log_partition, hsa_propagate)
from hsa_geo.functional.dense import hsa_dense
from hsa_geo.functional.engines import ENGINES, engine, kernel_runs, node_major_inputs, prepare
from hsa_geo.functional.layer import attention_on_edges, project_qkv

__all__ = [
    'hsa',
    'hsa_dense',
    'hsa_log_partition',
    'hsa_block_weights',
    'block_attention_to_dense',
    'BlockAttention',
    'project_qkv',
    'hsa_propagate',
    'attention_on_edges',
    'engine',
    'ENGINES',
    'kernel_runs',
    'node_major_inputs',
    'prepare',
]
