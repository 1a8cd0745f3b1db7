r"""Pictures of a hierarchy: the tree, and the block structure of its HSA
attention matrix. Uses matplotlib's Agg canvas directly (no pyplot, no
display, no global state), so it works in scripts, tests and CI."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from hsa_geo.extras import require
from hsa_geo.hierarchy import Hierarchy


def leaf_order(hierarchy: Hierarchy) -> List[int]:
    r"""Leaves in depth-first order (children by id, trees by root id), so
    the leaves of every subtree are contiguous: the order in which the tree
    and the attention blocks are drawn."""
    parent = hierarchy.parent.tolist()
    children: List[List[int]] = [[] for _ in parent]
    for node, up in enumerate(parent):
        if up >= 0:
            children[up].append(node)
    order: List[int] = []
    for root in (node for node, up in enumerate(parent) if up < 0):
        stack = [root]
        while stack:
            node = stack.pop()
            if node < hierarchy.num_leaves:
                order.append(node)
            stack.extend(reversed(children[node]))
    return order


def plot_hierarchy(hierarchy: Hierarchy, path: Optional[Union[str, Path]] = None,
                   q: Optional[Tensor] = None, k: Optional[Tensor] = None, head: int = 0,
                   labels: Optional[Sequence[str]] = None, title: Optional[str] = None,
                   max_leaves: int = 1000, dpi: int = 120):
    r"""Draws the tree and the block structure of HSA's attention matrix.

    Left: the tree, leaves along the bottom in :func:`leaf_order`, every
    cluster above the middle of its children at height = its depth. Right:
    with queries and keys, the dense HSA attention matrix
    (:func:`hsa_geo.functional.hsa_dense`, head :obj:`head`) in the same
    leaf order; without them, the depth of the lowest common ancestor of
    every leaf pair, which is what makes a block. Squares outline the leaves
    of each cluster; HSA's attention is constant on each block between two
    sibling squares.

    Args:
        hierarchy (Hierarchy): The tree (or forest) to draw.
        path (str or Path, optional): Where to save the figure (format from
            the suffix, e.g. ``.png``, ``.pdf``, ``.svg``).
            (default: :obj:`None`, not saved)
        q (torch.Tensor, optional): Queries ``[N, D]`` or ``[N, H, D]``.
        k (torch.Tensor, optional): Keys, same shape as :obj:`q`.
        head (int, optional): Head to draw for multi-head input.
            (default: :obj:`0`)
        labels (list of str, optional): Leaf names for the tree's x-axis
            (drawn when :math:`N \leq 80`). (default: leaf ids)
        title (str, optional): Figure title.
        max_leaves (int, optional): Refuse larger hierarchies (the matrix
            is :math:`N \times N`). (default: :obj:`1000`)
        dpi (int, optional): Resolution of a saved raster image.
            (default: :obj:`120`)

    Returns:
        matplotlib.figure.Figure: The figure (two axes).

    Complexity: :math:`O(N^2)` for the matrix; :func:`hsa_dense` is a
    reference implementation, so keep :math:`N` in the hundreds.

    Example::

        >>> import networkx as nx, torch
        >>> from hsa_geo.hierarchy import from_networkx
        >>> from hsa_geo.plot import plot_hierarchy
        >>> h = from_networkx(nx.karate_club_graph(), max_children=8)
        >>> q = k = torch.randn(34, 8, generator=torch.Generator().manual_seed(0))
        >>> fig = plot_hierarchy(h, q=q, k=k, title='karate club')
        >>> [ax.get_title() for ax in fig.axes[:2]]
        ['tree (34 leaves, 14 clusters)', 'HSA attention (head 0)']
    """
    FigureCanvasAgg = require('matplotlib.backends.backend_agg', 'plot').FigureCanvasAgg
    Figure = require('matplotlib.figure', 'plot').Figure

    if not isinstance(hierarchy, Hierarchy):
        raise ValueError(f"Expected a Hierarchy (got {type(hierarchy).__name__})")
    num_leaves = hierarchy.num_leaves
    if num_leaves > max_leaves:
        raise ValueError(f"The hierarchy has {num_leaves} leaves; the plot draws an N x N "
                         f"matrix, so it is limited to max_leaves={max_leaves}")
    if (q is None) != (k is None):
        raise ValueError("Give both q and k (or neither)")
    hierarchy = hierarchy.to('cpu')
    order = leaf_order(hierarchy)
    position = np.empty(num_leaves, dtype=np.int64)
    position[order] = np.arange(num_leaves)
    parent = hierarchy.parent.numpy()
    depth = hierarchy.depth.numpy()
    span = _leaf_spans(hierarchy, position)

    figure = Figure(figsize=(12, 5.5))
    FigureCanvasAgg(figure)
    tree_ax, matrix_ax = figure.subplots(1, 2, gridspec_kw={'width_ratios': [1.3, 1]})
    _draw_tree(tree_ax, hierarchy, position, parent, depth, labels, order)
    tree_ax.set_title(f'tree ({num_leaves} leaves, {hierarchy.num_clusters} clusters)')

    if q is not None:
        from hsa_geo.functional import hsa_dense

        with torch.no_grad():
            matrix = hsa_dense(q.detach().cpu().to(torch.float64),
                               k.detach().cpu().to(torch.float64), hierarchy)
        if matrix.dim() == 3:
            matrix = matrix[head]
        matrix = matrix.numpy()[np.ix_(order, order)]
        image = matrix_ax.imshow(matrix, cmap='viridis', interpolation='nearest')
        matrix_ax.set_title(f'HSA attention (head {head})')
    else:
        matrix = _lca_depth(hierarchy)[np.ix_(order, order)]
        image = matrix_ax.imshow(matrix, cmap='magma', interpolation='nearest')
        matrix_ax.set_title('depth of the lowest common ancestor')
    figure.colorbar(image, ax=matrix_ax, fraction=0.046, pad=0.04)
    for node in range(num_leaves, hierarchy.num_nodes):
        start, end = span[node]
        matrix_ax.add_patch(_square(start, end, linewidth=0.8 if parent[node] >= 0 else 1.2))
    matrix_ax.set_xlabel('key (leaf order)')
    matrix_ax.set_ylabel('query (leaf order)')
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=dpi)
    return figure


def _leaf_spans(hierarchy: Hierarchy, position: np.ndarray) -> np.ndarray:
    r"""``[N + M, 2]``: first and one-past-last leaf position below each
    node (contiguous in :func:`leaf_order`)."""
    parent = hierarchy.parent.numpy()
    span = np.empty((hierarchy.num_nodes, 2), dtype=np.int64)
    span[:, 0] = np.iinfo(np.int64).max
    span[:, 1] = -1
    span[:hierarchy.num_leaves, 0] = position
    span[:hierarchy.num_leaves, 1] = position + 1
    for node in np.argsort(-hierarchy.depth.numpy(), kind='stable').tolist():
        up = parent[node]
        if up >= 0:
            span[up, 0] = min(span[up, 0], span[node, 0])
            span[up, 1] = max(span[up, 1], span[node, 1])
    return span


def _lca_depth(hierarchy: Hierarchy) -> np.ndarray:
    parent = hierarchy.parent.tolist()
    depth = hierarchy.depth.tolist()
    paths = []
    for leaf in range(hierarchy.num_leaves):
        path, node = [], leaf
        while node >= 0:
            path.append(node)
            node = parent[node]
        paths.append(set(path))
    ancestors = np.zeros((hierarchy.num_leaves, hierarchy.num_nodes), dtype=bool)
    for leaf, path in enumerate(paths):
        ancestors[leaf, list(path)] = True
    shared = ancestors[:, None, :] & ancestors[None, :, :]
    depth_of = np.asarray(depth, dtype=np.float64)
    lca = np.where(shared, depth_of[None, None, :], -1.0).max(-1)
    lca[lca < 0] = np.nan  # different trees: no attention
    return lca


def _draw_tree(ax, hierarchy, position, parent, depth, labels, order):
    x = np.zeros(hierarchy.num_nodes)
    x[:hierarchy.num_leaves] = position
    count = np.zeros(hierarchy.num_nodes)
    total = np.zeros(hierarchy.num_nodes)
    for node in np.argsort(-depth, kind='stable').tolist():
        if node >= hierarchy.num_leaves:
            x[node] = total[node] / count[node]
        up = parent[node]
        if up >= 0:
            total[up] += x[node]
            count[up] += 1
    for node in range(hierarchy.num_nodes):
        up = parent[node]
        if up >= 0:
            ax.plot([x[node], x[node], x[up]], [-depth[node], -depth[up], -depth[up]],
                    color='0.35', linewidth=0.8)
    leaves = np.arange(hierarchy.num_leaves)
    clusters = np.arange(hierarchy.num_leaves, hierarchy.num_nodes)
    ax.scatter(x[leaves], -depth[leaves], s=12, color='tab:blue', zorder=3, label='leaf')
    ax.scatter(x[clusters], -depth[clusters], s=22, color='tab:orange', zorder=3,
               label='cluster')
    if hierarchy.num_leaves <= 80:
        names = [str(labels[leaf]) if labels is not None else str(leaf) for leaf in order]
        ax.set_xticks(np.arange(hierarchy.num_leaves))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
    else:
        ax.set_xticks([])
    ax.set_xlabel('leaves')
    ax.set_ylabel('- depth')
    ax.legend(loc='best', fontsize=8)


def _square(start: int, end: int, linewidth: float):
    from matplotlib.patches import Rectangle

    return Rectangle((start - 0.5, start - 0.5), end - start, end - start, fill=False,
                     edgecolor='white', linewidth=linewidth)
