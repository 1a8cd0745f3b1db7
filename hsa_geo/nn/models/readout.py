r"""Graph readout from the root of the hierarchy."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor
from torch.nn import Linear, Module, Parameter
from torch_geometric.nn import global_add_pool, global_mean_pool
from torch_geometric.utils import scatter

from hsa_geo.hierarchy import Hierarchy


def leaf_ancestor_pairs(hierarchy: Hierarchy) -> Tuple[Tensor, Tensor]:
    r"""All pairs (leaf, node on the leaf's path to its root, both included):
    two index tensors of length :math:`\sum_i (\mathrm{depth}(i) + 1)`
    (:meth:`hsa_geo.Hierarchy.leaf_ancestor_pairs`, cached there)."""
    return hierarchy.leaf_ancestor_pairs()


def hierarchy_leaf_weights(score: Tensor, hierarchy: Hierarchy) -> Tensor:
    r"""Leaf weights of a top-down softmax over the tree.

    The root holds mass 1; every cluster splits its mass among its children
    in proportion to :math:`\exp(\text{score})`, so a leaf's weight is
    :math:`w_i = \prod_{X \in \mathrm{path}(\mathrm{root} \to i],
    X \neq \mathrm{root}} \mathrm{softmax}_{\mathrm{siblings}}(s)_X`, and
    the weights of each tree sum to 1. With constant scores every cluster is
    the mean of its children (a "mean of means").

    Args:
        score (torch.Tensor): Score of every node ``[N + M]`` or ``[N + M, H]``.
        hierarchy (Hierarchy): The tree or forest.

    Returns:
        ``[N]`` (or ``[N, H]``) leaf weights.
    """
    parent = hierarchy.parent
    child = (parent >= 0).nonzero().view(-1)
    group = parent[child]
    s = score[child]
    # log-softmax among siblings, stable via the per-family maximum
    top = scatter(s, group, dim=0, dim_size=hierarchy.num_nodes, reduce='max')
    shifted = s - top[group]
    log_z = scatter(shifted.exp(), group, dim=0, dim_size=hierarchy.num_nodes,
                    reduce='sum').log()
    log_share = score.new_zeros(score.shape)
    log_share[child] = shifted - log_z[group]
    leaf, node = leaf_ancestor_pairs(hierarchy)
    log_weight = scatter(log_share[node], leaf, dim=0, dim_size=hierarchy.num_leaves,
                         reduce='sum')
    return log_weight.exp()


def subtree_means(x: Tensor, hierarchy: Hierarchy) -> Tensor:
    r"""Mean of the leaf features below every node, ``[N + M, F]``
    (:meth:`hsa_geo.Hierarchy.subtree_means`)."""
    return hierarchy.subtree_means(x)


class HierarchyReadout(Module):
    r"""Graph-level readout of leaf features.

    :obj:`mode="hierarchy"` (default) reads the graph out at the root of its
    hierarchy: a learned query :math:`\mathbf{q}` scores every node by its
    subtree mean :math:`s_X = \langle \mathbf{q}, \mathbf{W}_k
    \bar{\mathbf{x}}_X \rangle / \sqrt{d}`, every cluster splits its mass
    among its children by a softmax of these scores
    (:func:`hierarchy_leaf_weights`), and

    .. math::
        \mathbf{r}_g = \sum_{i \in g} w_i\, \mathbf{x}_i,
        \qquad \sum_{i \in g} w_i = 1.

    At initialisation :math:`\mathbf{q} = 0`, so it starts as the
    hierarchy-weighted mean (each cluster the mean of its children). On a
    flat tree it is softmax attention pooling. :obj:`"mean"` and
    :obj:`"sum"` ignore the hierarchy.

    Args:
        channels (int): Width of the leaf features.
        mode (str, optional): :obj:`"hierarchy"`, :obj:`"mean"` or
            :obj:`"sum"`. (default: :obj:`"hierarchy"`)
        heads (int, optional): Query heads of :obj:`"hierarchy"` mode, each
            pooling :obj:`channels / heads` features. (default: :obj:`1`)
    """

    MODES = ('hierarchy', 'mean', 'sum')

    def __init__(self, channels: int, mode: str = 'hierarchy', heads: int = 1):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Unknown readout {mode!r}; expected one of {self.MODES}")
        if channels % heads != 0:
            raise ValueError(f"heads ({heads}) must divide channels ({channels})")
        self.channels = channels
        self.mode = mode
        self.heads = heads
        if mode == 'hierarchy':
            self.lin_key = Linear(channels, channels, bias=False)
            self.query = Parameter(torch.empty(heads, channels // heads))
        else:
            self.lin_key = None
            self.register_parameter('query', None)
        self.reset_parameters()

    def reset_parameters(self):
        if self.lin_key is not None:
            self.lin_key.reset_parameters()
            torch.nn.init.zeros_(self.query)

    def forward(self, x: Tensor, hierarchy: Optional[Hierarchy] = None,
                batch: Optional[Tensor] = None, num_graphs: Optional[int] = None,
                return_leaf_weights: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        r"""Pools leaf features :math:`(N, C)` into graph features
        :math:`(B, C)`; with :obj:`return_leaf_weights=True` (hierarchy mode)
        also the leaf weights :math:`(N, H)`."""
        if batch is None and hierarchy is not None:
            batch = hierarchy.leaf_batch
        if batch is None:
            batch = x.new_zeros(x.size(0), dtype=torch.long)
        if num_graphs is None:
            num_graphs = int(batch.max()) + 1 if batch.numel() else 0
        if self.mode == 'mean':
            return global_mean_pool(x, batch, num_graphs)
        if self.mode == 'sum':
            return global_add_pool(x, batch, num_graphs)
        if hierarchy is None:
            raise ValueError("readout 'hierarchy' needs the hierarchy")
        heads, dim = self.heads, self.channels // self.heads
        # a node's score is the query against the mean key below it. It is
        # linear in the key, and the key linear in x: it is the mean of the
        # leaves' own scores x_i . (W_k^T q) per head, so no [N, C] key is
        # formed and the scatter carries H numbers per pair, not C
        weight = self.lin_key.weight.view(heads, dim, self.channels)
        direction = torch.einsum('hd,hdc->ch', self.query, weight) * dim ** -0.5  # [C, H]
        score = subtree_means(x @ direction, hierarchy)  # [N + M, H]
        weight = hierarchy_leaf_weights(score, hierarchy)  # [N, H]
        pooled = (x.view(-1, heads, dim) * weight.unsqueeze(-1)).view(-1, self.channels)
        out = global_add_pool(pooled, batch, num_graphs)
        return (out, weight) if return_leaf_weights else out

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}({self.channels}, mode={self.mode!r})'
