r"""Hierarchies over image pixels or patches: quadtrees on an H×W grid."""
from __future__ import annotations

from typing import Optional

import numpy as np

from hsa_geo.hierarchy.builders.limits import (DEFAULT_MAX_CHILDREN, check_positive_int,
                                               finalize)
from hsa_geo.hierarchy.builders.partitions import tree_from_levels
from hsa_geo.hierarchy.hierarchy import Hierarchy


def grid_quadtree(height: int, width: int, block: int = 2,
                  max_children: Optional[int] = DEFAULT_MAX_CHILDREN,
                  keep_chains: bool = False) -> Hierarchy:
    r"""Builds the quadtree (for :obj:`block` = 2; a :math:`b^2`-ary tree in
    general) of an :obj:`height` × :obj:`width` grid.

    Leaf :math:`r \cdot W + c` is the cell in row :math:`r`, column
    :math:`c` (row-major, as ``x.flatten(0, 1)`` or a ViT's patch sequence
    orders them). Level :math:`l \geq 1` groups the cells into aligned
    squares of side :math:`b^l`; squares cut by the right or bottom border
    are smaller, so any :math:`H, W` work, and a square of one cell is not
    wrapped (unless :obj:`keep_chains`). Levels stop at the square that
    covers the grid, the root.

    Args:
        height (int): Rows :math:`H \geq 1`.
        width (int): Columns :math:`W \geq 1`.
        block (int, optional): Side :math:`b \geq 2` of the square grouped
            at each level, so a cluster has up to :math:`b^2` children.
            (default: :obj:`2`)
        max_children (int, optional): Most children of one cluster, or
            :obj:`None` for no bound; families of :math:`b^2` above it are
            split into runs. (default: :obj:`32`)
        keep_chains (bool, optional): Keep single-child clusters.
            (default: :obj:`False`)

    Returns:
        Hierarchy: One tree of depth :math:`\lceil \log_b \max(H, W) \rceil`
        over the :math:`HW` cells, :attr:`~hsa_geo.Hierarchy.ordered`: the
        sub-squares of a square are ordered by their top-left cell, i.e. in
        raster order (top-left, top-right, bottom-left, bottom-right for
        :math:`b = 2`). A position is the rank among the sub-squares that
        exist, so in a square cut by the right border the bottom-left
        sub-square is sibling 1, not 2.

    Complexity: :math:`O(HW)` per level, vectorised.

    Example::

        >>> from hsa_geo.hierarchy import grid_quadtree
        >>> h = grid_quadtree(4, 4)
        >>> h.parent[:8].tolist()  # cells 0, 1, 4, 5 form the top-left square
        [16, 16, 17, 17, 16, 16, 17, 17]
        >>> h.num_clusters, h.max_depth
        (5, 2)
    """
    height = check_positive_int(height, 'height')
    width = check_positive_int(width, 'width')
    block = check_positive_int(block, 'block', 2)
    row = np.repeat(np.arange(height, dtype=np.int64), width)
    col = np.tile(np.arange(width, dtype=np.int64), height)
    labels = []
    side = block
    while True:
        columns = -(-width // side)
        labels.append((row // side) * columns + col // side)
        if side >= height and side >= width:
            break
        side *= block
    return finalize(tree_from_levels(labels, height * width), height * width, max_children,
                    keep_chains, ordered=True)
