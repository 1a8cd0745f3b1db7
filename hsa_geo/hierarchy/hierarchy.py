"""The nested signal's tree: leaves ``0..N-1`` and cluster nodes ``N..N+M-1``."""
from __future__ import annotations

import numbers
import weakref
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from hsa_geo.hierarchy.native_tables import TreeAnalysis, analyse_tree
from hsa_geo.hierarchy.plan import (PAIRS_PER_BLOCK, FamilyBlock, FamilyTables, SweepPlan,
                                    build_family_tables, build_sweep_plan)


#: every live hierarchy by the identity of its parent tensor, weakly both
#: ways (see :meth:`Hierarchy.of_parent`)
_BY_PARENT: 'WeakTensorKeyDictionary' = WeakTensorKeyDictionary()


@dataclass
class TreeCache:
    r"""What a :class:`Hierarchy` derives from its parent pointers on
    first use (checked against their version before every read)."""
    first_leaf: Optional[Tensor] = None  #: ``[N + M]``, see :attr:`Hierarchy.first_leaf`
    last_leaf: Optional[Tensor] = None  #: ``[N + M]``, see :attr:`Hierarchy.last_leaf`
    num_children: Optional[Tensor] = None  #: ``[N + M]``
    #: see :meth:`Hierarchy.leaf_ancestor_pairs`
    leaf_ancestor_pairs: Optional[Tuple[Tensor, Tensor]] = None
    num_sibling_pairs: Optional[int] = None


@dataclass(frozen=True)
class Attachment:
    r"""State that a layer above derives from a hierarchy and keeps beside
    it (the engines' caches, :func:`hsa_geo.functional.engines.engine_cache`),
    handed to the hierarchy's copies: :meth:`Hierarchy.to` and the hand-over
    between the processes of one run (a data-loading worker's batch) call
    :obj:`export` on the original and :obj:`adopt` on the copy. A plain
    pickle (:func:`torch.save`) carries the tree only."""
    #: ``export(hierarchy)``: what to hand over (:obj:`None`: nothing)
    export: Callable[['Hierarchy'], Any]
    #: ``adopt(copy, exported)``, called with what :obj:`export` returned
    adopt: Callable[['Hierarchy', Any], None]


_ATTACHMENTS: List[Attachment] = []


def register_attachment(attachment: Attachment) -> None:
    r"""Registers :obj:`attachment` (see :class:`Attachment`); once per
    owner, at import."""
    _ATTACHMENTS.append(attachment)


def _exported(hierarchy: 'Hierarchy') -> List[Any]:
    return [attachment.export(hierarchy) for attachment in _ATTACHMENTS]


def _adopt(hierarchy: 'Hierarchy', exported: List[Any]) -> None:
    for attachment, state in zip(_ATTACHMENTS, exported):
        if state is not None:
            attachment.adopt(hierarchy, state)


class Hierarchy:
    r"""A forest over :obj:`num_leaves` leaves and :obj:`num_clusters` cluster
    nodes, stored as one parent pointer per node.

    Node ids ``0 .. num_leaves - 1`` are the leaves (the rows of the leaf
    features :obj:`x`); ids ``num_leaves .. num_nodes - 1`` are cluster nodes.
    :obj:`parent[v]` is the parent of node :obj:`v`, or :obj:`-1` for a root.
    Leaves may sit at different depths and a cluster may have any number of
    children (one included). Several roots make a forest; attention never
    crosses trees.

    Build it with :meth:`from_parent`, which validates the input, or with the
    builders in :mod:`hsa_geo.hierarchy`. Everything derived from the parent
    pointers (depths, leaf counts, the sweep plan used by
    :func:`hsa_geo.functional.hsa`) is computed once and cached. The tree
    cannot change under its caches: :attr:`parent`, :attr:`num_leaves`,
    :attr:`depth` and :attr:`num_leaves_below` cannot be reassigned, and
    an in-place edit of :attr:`parent` is caught at the next use
    (:meth:`check_unchanged`). Pickled or saved, a hierarchy holds its tree
    only; the caches are rebuilt on demand (a loader's worker processes hand
    them over with the tree).

    Example::

        >>> import torch
        >>> from hsa_geo import Hierarchy
        >>> # leaves 0,1 under cluster 4, leaves 2,3 under cluster 5, root 6
        >>> h = Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), num_leaves=4)
        >>> h
        Hierarchy(num_leaves=4, num_clusters=3, num_trees=1, max_depth=2)
        >>> h.num_leaves_below.tolist()
        [1, 1, 1, 1, 2, 2, 4]
    """

    #: The tree facts every cache derives from: set once, in the constructor.
    _TREE = ('parent', 'num_leaves', 'depth', 'num_leaves_below')
    #: What is derived from them: left out when the hierarchy is pickled.
    _DERIVED = ('_plans', '_family_tables', '_cache')

    def __init__(self, parent: Tensor, num_leaves: int, depth: Tensor,
                 num_leaves_below: Tensor, batch: Optional[Tensor] = None,
                 ordered: bool = False):
        self.parent = parent
        self.num_leaves = int(num_leaves)
        self.depth = depth
        self.num_leaves_below = num_leaves_below
        self.batch = batch
        #: whether the order of siblings (by their first leaf) means
        #: something, e.g. sentence order or quadrant order; positional
        #: terms (:mod:`hsa_geo.nn.positional`) require it
        self.ordered = bool(ordered)
        self._plans: Dict[torch.device, SweepPlan] = {}
        self._family_tables: Optional[FamilyTables] = None
        self._cache = TreeCache()
        # everything cached derives from the parent pointers: remember their
        # version, so that an in-place edit is caught rather than ignored
        self._parent_version = parent._version
        _BY_PARENT[parent] = weakref.ref(self)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_parent(cls, parent: Tensor, num_leaves: int,
                    batch: Optional[Tensor] = None, ordered: bool = False) -> 'Hierarchy':
        r"""Validates parent pointers and returns the hierarchy.

        Args:
            parent (torch.Tensor): Integer tensor of length
                :obj:`num_leaves + num_clusters`; :obj:`parent[v] == -1`
                marks a root.
            num_leaves (int): Number of leaves :math:`N`; nodes
                :obj:`0..N-1` are leaves and must have no children.
            batch (torch.Tensor, optional): Graph id of every node. When
                given, every graph must have exactly one root and no parent
                edge may cross graphs. (default: :obj:`None`)
            ordered (bool, optional): Whether the leaf order is meaningful
                (a sequence, a raster), so that siblings ordered by their
                first leaf carry a position (:attr:`sibling_index`) that
                positional terms may use. (default: :obj:`False`)

        Raises:
            ValueError: naming the offending node or graph, for a non-integer
                dtype, a wrong length, :math:`N = 0`, a parent index out of
                range, a leaf with children, a cluster with no leaf below it,
                a cycle, a parent edge across graphs, or a graph with more
                than one root.
        """
        parent, num_leaves = _parent_as_long(parent, num_leaves)
        analysis = analyse_tree(parent, num_leaves)  # compiled, when available
        if analysis is None:  # or the pointers are invalid: name the problem
            _check_parent_pointers(parent, num_leaves)
            depth = _depth_or_raise_on_cycle(parent)
            num_leaves_below = _count_leaves_below(parent, num_leaves, depth)
        else:
            depth, num_leaves_below = analysis.depth, analysis.num_leaves_below
        if batch is not None:
            batch = _check_batch(batch, parent)
        hierarchy = cls(parent, num_leaves, depth, num_leaves_below, batch, ordered)
        if analysis is not None:
            hierarchy._adopt(analysis)
        return hierarchy

    def _adopt(self, analysis: TreeAnalysis) -> None:
        r"""Caches what the compiled tree analysis derived beyond depths
        and leaf counts: first and last leaves, and the family tables."""
        device = self.parent.device
        self._cache.first_leaf = analysis.first_leaf.to(device)
        self._cache.last_leaf = analysis.last_leaf.to(device)
        self._family_tables = analysis.tables

    @classmethod
    def flat(cls, num_leaves: int) -> 'Hierarchy':
        r"""One root with :obj:`num_leaves` leaf children: HSA over it is
        exactly softmax attention."""
        num_leaves = _leaf_count(num_leaves)
        parent = torch.full((num_leaves + 1, ), num_leaves, dtype=torch.long)
        parent[-1] = -1
        return cls.from_parent(parent, num_leaves, ordered=True)

    @classmethod
    def batch_hierarchies(cls, hierarchies: Sequence['Hierarchy']) -> 'Hierarchy':
        r"""Joins hierarchies into one forest (one tree per input graph).
        Every input must be a single tree (a forest raises a
        :class:`ValueError` naming it).

        Leaves keep their order graph after graph (as PyG concatenates
        :obj:`x`), and all clusters follow all leaves. The result records the
        graph id of every node in :obj:`batch`; it is :attr:`ordered` when
        every input is.
        """
        if len(hierarchies) == 0:
            raise ValueError("batch_hierarchies() needs at least one hierarchy")
        for index, h in enumerate(hierarchies):
            if not isinstance(h, Hierarchy):
                raise TypeError(f"batch_hierarchies() takes Hierarchy objects, but input {index} "
                                f"is a {type(h).__name__}")
        device = hierarchies[0].parent.device
        num_leaves = torch.tensor([h.num_leaves for h in hierarchies])
        num_nodes = torch.tensor([h.num_nodes for h in hierarchies])
        local_parent = torch.cat([h.parent.cpu().to(torch.long) for h in hierarchies])
        graph_of = torch.repeat_interleave(torch.arange(len(hierarchies)), num_nodes)
        roots = torch.bincount(graph_of[local_parent < 0], minlength=len(hierarchies))
        if bool((roots != 1).any()):
            # one graph id per input: a forest would become one graph with
            # several roots (and readouts would add its trees up)
            index = int((roots != 1).nonzero()[0])
            raise ValueError(f"batch_hierarchies() joins one tree per graph, but input "
                             f"{index} is a forest of {int(roots[index])} trees (roots "
                             f"{hierarchies[index].roots[:5].tolist()}); give it one root "
                             f"cluster, or pass its trees as separate inputs")
        # graph g's leaves follow the leaves of graphs < g, its clusters the
        # clusters of graphs < g after all leaves
        total_leaves = int(num_leaves.sum())
        num_clusters = num_nodes - num_leaves
        leaf_offset = (num_leaves.cumsum(0) - num_leaves)[graph_of]
        cluster_offset = (num_clusters.cumsum(0) - num_clusters + total_leaves)[graph_of]
        leaves_of = num_leaves[graph_of]

        def renumber(local: Tensor) -> Tensor:
            return torch.where(local < leaves_of, local + leaf_offset,
                               local - leaves_of + cluster_offset)

        local_id = torch.arange(graph_of.numel()) - (num_nodes.cumsum(0) - num_nodes)[graph_of]
        new_id = renumber(local_id)
        parent = torch.empty_like(local_parent)
        parent[new_id] = torch.where(local_parent < 0, local_parent,
                                     renumber(local_parent.clamp(min=0)))
        batch = torch.empty_like(graph_of)
        batch[new_id] = graph_of
        ordered = all(h.ordered for h in hierarchies)
        analysis = analyse_tree(parent, total_leaves)
        if analysis is not None:
            batched = cls(parent, total_leaves, analysis.depth, analysis.num_leaves_below, batch,
                          ordered)
            batched._adopt(analysis)
            return batched if device.type == 'cpu' else batched.to(device)
        # without the compiled analysis: the inputs' own depths, counts and
        # leaf ranges (a graph's leaves move by its leaf offset)
        depth, count = torch.empty_like(parent), torch.empty_like(parent)
        depth[new_id] = torch.cat([h.depth.cpu() for h in hierarchies])
        count[new_id] = torch.cat([h.num_leaves_below.cpu() for h in hierarchies])
        batched = cls(parent.to(device), total_leaves, depth.to(device), count.to(device),
                      batch.to(device), ordered)
        first_and_last = []
        for name in ('first_leaf', 'last_leaf'):
            merged = torch.empty_like(parent)
            merged[new_id] = (torch.cat([getattr(h, name).cpu() for h in hierarchies])
                              + leaf_offset)
            first_and_last.append(merged.to(device))
        batched._cache.first_leaf, batched._cache.last_leaf = first_and_last
        return batched

    def new_node_ids(self, leaf_offset: int, cluster_offset: int) -> Tensor:
        r"""The id of every node once leaves are shifted by
        :obj:`leaf_offset` and clusters start at :obj:`cluster_offset`."""
        ids = torch.arange(self.num_nodes, dtype=torch.long, device=self.parent.device)
        return torch.where(ids < self.num_leaves, ids + leaf_offset,
                           ids - self.num_leaves + cluster_offset)

    # ------------------------------------------------------------ properties
    @property
    def num_nodes(self) -> int:
        return self.parent.numel()

    @property
    def num_clusters(self) -> int:
        return self.num_nodes - self.num_leaves

    @property
    def roots(self) -> Tensor:
        return (self.parent < 0).nonzero().view(-1)

    @property
    def num_trees(self) -> int:
        return int((self.parent < 0).sum())

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    @property
    def num_children(self) -> Tensor:
        r"""Number of children of every node (0 for leaves)."""
        self.check_unchanged()
        if self._cache.num_children is None:
            has_parent = self.parent >= 0
            self._cache.num_children = torch.bincount(
                self.parent[has_parent], minlength=self.num_nodes)
        return self._cache.num_children

    @property
    def edge_index(self) -> Tensor:
        r"""Child-to-parent edges ``[2, num_nodes - num_trees]``."""
        child = (self.parent >= 0).nonzero().view(-1)
        return torch.stack([child, self.parent[child]])

    @property
    def leaf_batch(self) -> Optional[Tensor]:
        r"""Graph id of every leaf, or :obj:`None` without a graph id."""
        return None if self.batch is None else self.batch[:self.num_leaves]

    @property
    def first_leaf(self) -> Tensor:
        r"""Smallest leaf id below every node (the leaf itself for a leaf);
        siblings are ordered by it."""
        self.check_unchanged()
        if self._cache.first_leaf is None:
            first, last = _first_and_last_leaf(self.parent.cpu(), self.num_leaves,
                                               self.depth.cpu())
            self._cache.first_leaf = first.to(self.parent.device)
            self._cache.last_leaf = last.to(self.parent.device)
        return self._cache.first_leaf

    @property
    def last_leaf(self) -> Tensor:
        r"""Largest leaf id below every node."""
        self.first_leaf  # noqa: B018 (fills both)
        return self._cache.last_leaf

    @property
    def sibling_index(self) -> Tensor:
        r"""``[N + M]`` position of every node among its siblings, ordered
        by first leaf (0 at roots). Meaningful when :attr:`ordered`."""
        return self.plan().sibling_index

    def sibling_pairs(self) -> Tensor:
        r"""``[2, E]`` the ordered sibling pairs :math:`(B, C)`, diagonal
        :math:`B = C` included, :math:`E = \sum_A b_A^2`. Per-pair tensors
        such as :obj:`pair_bias` of :func:`hsa_geo.functional.hsa` have one
        row per column of this, in this order."""
        return self.plan().sibling_pairs()

    def leaf_ancestor_pairs(self) -> Tuple[Tensor, Tensor]:
        r"""All pairs (leaf, node on the leaf's path to its root, both
        included): two index tensors of length
        :math:`\sum_i (\mathrm{depth}(i) + 1)`, computed once and cached
        (readouts pool over them in every step)."""
        self.check_unchanged()
        if self._cache.leaf_ancestor_pairs is None:
            leaf = torch.arange(self.num_leaves, device=self.parent.device)
            node, leaves, nodes = leaf, [], []
            while node.numel() > 0:
                leaves.append(leaf)
                nodes.append(node)
                up = self.parent[node]
                keep = up >= 0
                leaf, node = leaf[keep], up[keep]
            self._cache.leaf_ancestor_pairs = (torch.cat(leaves), torch.cat(nodes))
        return self._cache.leaf_ancestor_pairs

    def subtree_means(self, values: Tensor) -> Tensor:
        r"""Mean of per-leaf rows ``[N, ...]`` over the leaves below every
        node, ``[N + M, ...]`` (differentiable)."""
        leaf, node = (index.to(values.device) for index in self.leaf_ancestor_pairs())
        total = values.new_zeros((self.num_nodes, ) + values.shape[1:])
        total.index_add_(0, node, values[leaf])
        count = self.num_leaves_below.to(values.device, values.dtype)
        return total / count.view(-1, *([1] * (values.dim() - 1)))

    @property
    def num_sibling_pairs(self) -> int:
        r""":math:`E = \sum_A b_A^2`, the rows of a per-pair tensor (from the
        children counts: no plan is built for it)."""
        self.check_unchanged()
        if self._cache.num_sibling_pairs is None:
            children = self.num_children
            self._cache.num_sibling_pairs = int((children * children).sum())
        return self._cache.num_sibling_pairs

    def check_contiguous(self) -> None:
        r"""Raises a :class:`ValueError` naming the first node whose leaves
        are not consecutive ids: causal HSA needs every subtree to be an
        interval of the sequence."""
        span = self.last_leaf - self.first_leaf + 1
        broken = (span != self.num_leaves_below).nonzero().view(-1)
        if broken.numel() > 0:
            node = int(broken[0])
            raise ValueError(
                f"Causal HSA needs every subtree to hold consecutive leaves, but node "
                f"{node} has {int(self.num_leaves_below[node])} leaves spread over ids "
                f"{int(self.first_leaf[node])}..{int(self.last_leaf[node])}; number the "
                f"leaves in sequence order (depth-first), as the sequence builders do")

    def __setattr__(self, name: str, value) -> None:
        if name in self._TREE and name in self.__dict__:
            raise AttributeError(
                f"Hierarchy.{name} cannot be reassigned: the depths, leaf counts and cached "
                f"sweep plans derive from the tree it was built with. Build a new one: "
                f"Hierarchy.from_parent(parent, num_leaves)")
        super().__setattr__(name, value)

    def __getstate__(self):
        # the tree only: plans and caches hold engine types (some not
        # allow-listed for torch.load's weights_only) and are rebuilt on demand
        return {name: value for name, value in self.__dict__.items()
                if name not in self._DERIVED}

    def __setstate__(self, state):
        # a copy (pickled to a loader worker and back, torch.save) starts its
        # own version count
        state = {name: value for name, value in state.items()
                 if name != '_layouts'}  # an earlier version kept the engines' layouts here
        self.__dict__.update(state)
        for name, empty in (('_plans', dict), ('_family_tables', lambda: None)):
            self.__dict__.setdefault(name, empty())
        if not isinstance(self.__dict__.get('_cache'), TreeCache):  # none, or an earlier
            self.__dict__['_cache'] = TreeCache()  # version's dict keyed by strings
        self.__dict__['_parent_version'] = self.parent._version
        _BY_PARENT[self.parent] = weakref.ref(self)

    @staticmethod
    def of_parent(parent: Tensor) -> Optional['Hierarchy']:
        r"""The live hierarchy whose :attr:`parent` is the tensor
        :obj:`parent` (that very object, not an equal copy), or :obj:`None`.
        A graph compiled by :func:`torch.compile` holds a hierarchy's parent
        pointers only (see :mod:`hsa_geo.functional.compiled`); this finds
        the hierarchy, with everything cached for it."""
        found = _BY_PARENT.get(parent)
        return None if found is None else found()

    def check_unchanged(self) -> None:
        r"""Raises a :class:`ValueError` if :attr:`parent` was modified in
        place after the hierarchy was built: its depths, counts and cached
        plans would silently describe the old tree."""
        if torch.compiler.is_compiling():  # a graph reads tensors, not this Python state
            return
        if self.parent._version != self._parent_version:
            raise ValueError("hierarchy.parent was modified in place after the Hierarchy was "
                             "built; its depths, leaf counts and cached sweep plans describe the "
                             "old tree. Build a new one: Hierarchy.from_parent(parent, num_leaves)")

    def plan(self, device: Optional[torch.device] = None) -> SweepPlan:
        r"""The sweep plan (families grouped by depth and size) on
        :obj:`device`, computed once per device and cached."""
        self.check_unchanged()
        device = torch.device(device) if device is not None else self.parent.device
        if device not in self._plans:
            # CPU blocks are cut to stay cache-sized; a GPU wants few, large
            # launches, so its plan is built with a much larger block size.
            pairs_per_block = PAIRS_PER_BLOCK if device.type == 'cpu' else PAIRS_PER_BLOCK << 6
            plan = build_sweep_plan(self.parent.cpu(), self.num_leaves, self.depth.cpu(),
                                    self.num_leaves_below.cpu(), self.first_leaf.cpu(),
                                    pairs_per_block)
            self._plans[device] = plan.to(device)
        return self._plans[device]

    def family_tables(self) -> FamilyTables:
        r"""The families as flat CPU tables
        (:class:`~hsa_geo.hierarchy.plan.FamilyTables`), what the CPU
        kernel of the fused sweeps reads; built once and cached."""
        self.check_unchanged()
        if self._family_tables is None:
            self._family_tables = build_family_tables(self.parent.cpu(), self.depth.cpu(),
                                                      self.first_leaf.cpu())
        return self._family_tables

    def to(self, device) -> 'Hierarchy':
        r"""A copy on :obj:`device` (sharing the cached plans)."""
        moved = Hierarchy(self.parent.to(device), self.num_leaves, self.depth.to(device),
                          self.num_leaves_below.to(device),
                          None if self.batch is None else self.batch.to(device), self.ordered)
        moved._plans = dict(self._plans)
        moved._family_tables = self._family_tables
        if self._cache.first_leaf is not None:
            moved._cache.first_leaf = self._cache.first_leaf.to(device)
            moved._cache.last_leaf = self._cache.last_leaf.to(device)
        _adopt(moved, _exported(self))
        return moved

    def summary(self) -> Dict[str, float]:
        r"""Shape statistics that decide HSA's cost: depth, branching and the
        number of sibling pairs :math:`\sum_A b_A^2` the sweeps visit.

        Keys: :obj:`num_leaves`, :obj:`num_clusters`, :obj:`num_trees`;
        depth: :obj:`max_depth` (of any node), :obj:`mean_leaf_depth`;
        branching: :obj:`max_children`, :obj:`mean_children` (over
        clusters), :obj:`single_child_clusters`; cost:
        :obj:`sibling_pairs` :math:`= \sum_A b_A^2` (also as
        :obj:`hsa_cost`), against :obj:`dense_cost` :math:`= \sum_t n_t^2`,
        the leaf pairs softmax attention over each tree would score.

        Example::

            >>> import torch
            >>> from hsa_geo import Hierarchy
            >>> h = Hierarchy.from_parent(torch.tensor([4, 4, 5, 5, 6, 6, -1]), num_leaves=4)
            >>> s = h.summary()
            >>> s['max_depth'], s['mean_leaf_depth'], s['max_children'], s['hsa_cost'], s['dense_cost']
            (2, 2.0, 2, 12, 16)
        """
        children = self.num_children[self.num_leaves:]
        children = children[children > 0].to(torch.float64)
        leaf_depth = self.depth[:self.num_leaves].to(torch.float64)
        tree_size = self.num_leaves_below[self.roots].to(torch.float64)
        sibling_pairs = int((children ** 2).sum())
        return {
            'num_leaves': self.num_leaves,
            'num_clusters': self.num_clusters,
            'num_trees': self.num_trees,
            'max_depth': self.max_depth,
            'mean_leaf_depth': float(leaf_depth.mean()),
            'max_children': int(children.max()) if children.numel() else 0,
            'mean_children': float(children.mean()) if children.numel() else 0.0,
            'sibling_pairs': sibling_pairs,
            'single_child_clusters': int((children == 1).sum()),
            'hsa_cost': sibling_pairs,
            'dense_cost': int((tree_size ** 2).sum()),
        }

    def to_networkx(self):
        r"""The hierarchy as a :class:`networkx.DiGraph` with an edge from
        every cluster to each of its children (an arborescence per tree).

        Node :obj:`v` carries :obj:`kind` (:obj:`"leaf"` or
        :obj:`"cluster"`), :obj:`depth`, :obj:`num_leaves` (leaves below it)
        and, for a batched hierarchy, :obj:`graph` (its graph id). The parent
        pointers come back as
        ``next(iter(T.predecessors(v)), -1)``.

        Example::

            >>> import torch
            >>> from hsa_geo import Hierarchy
            >>> h = Hierarchy.from_parent(torch.tensor([3, 3, 4, 4, -1]), num_leaves=3)
            >>> T = h.to_networkx()
            >>> sorted(T.edges), T.nodes[3]
            ([(3, 0), (3, 1), (4, 2), (4, 3)], {'kind': 'cluster', 'depth': 1, 'num_leaves': 2})
        """
        import networkx as nx

        graph = nx.DiGraph()
        depth = self.depth.tolist()
        below = self.num_leaves_below.tolist()
        batch = None if self.batch is None else self.batch.tolist()
        for node in range(self.num_nodes):
            attrs = {'kind': 'leaf' if node < self.num_leaves else 'cluster',
                     'depth': depth[node], 'num_leaves': below[node]}
            if batch is not None:
                attrs['graph'] = batch[node]
            graph.add_node(node, **attrs)
        child, parent = self.edge_index.tolist()
        graph.add_edges_from(zip(parent, child))
        return graph

    def __repr__(self) -> str:
        ordered = ', ordered=True' if self.ordered else ''
        return (f'{self.__class__.__name__}(num_leaves={self.num_leaves}, '
                f'num_clusters={self.num_clusters}, num_trees={self.num_trees}, '
                f'max_depth={self.max_depth}{ordered})')


# ---------------------------------------------------------------- validation
def _leaf_count(num_leaves) -> int:
    r"""A positive integer number of leaves: an ``int``, a NumPy integer or a
    one-element integer tensor (what the builders hand around)."""
    if isinstance(num_leaves, Tensor):
        if num_leaves.numel() != 1 or num_leaves.is_floating_point() or \
                num_leaves.dtype == torch.bool:
            raise ValueError(f"'num_leaves' must be an integer (got {num_leaves!r})")
        num_leaves = int(num_leaves)
    elif isinstance(num_leaves, bool) or not isinstance(num_leaves, numbers.Integral):
        raise ValueError(f"'num_leaves' must be an integer (got {num_leaves!r})")
    num_leaves = int(num_leaves)
    if num_leaves <= 0:
        raise ValueError(f"A hierarchy needs at least one leaf (got num_leaves={num_leaves})")
    return num_leaves


def _parent_as_long(parent, num_leaves) -> Tuple[Tensor, int]:
    r"""The parent pointers as ``int64`` and the number of leaves as an
    ``int``, after the checks that need no pass over the pointers: type,
    dtype, shape and length."""
    if not isinstance(parent, Tensor):
        raise ValueError(f"'parent' must be a torch.Tensor (got {type(parent).__name__})")
    if parent.dtype == torch.bool or parent.is_floating_point() or parent.is_complex():
        raise ValueError(f"'parent' must hold integer node ids (got dtype {parent.dtype})")
    if parent.dim() != 1:
        raise ValueError(f"'parent' must be one-dimensional (got shape {tuple(parent.shape)})")
    if parent.is_meta:
        raise ValueError("'parent' is on the meta device, which holds no values, but a "
                         "hierarchy is built from the parent pointers' values: pass them on "
                         "the CPU (or another device); q, k and v may be meta tensors")
    num_leaves = _leaf_count(num_leaves)
    num_nodes = parent.numel()
    if num_nodes < num_leaves:
        raise ValueError(
            f"'parent' has length {num_nodes}, but must have one entry per node, "
            f"i.e. num_leaves ({num_leaves}) + number of clusters")
    return parent.to(torch.long), num_leaves


def _check_parent_pointers(parent: Tensor, num_leaves: int) -> None:
    r"""Raises a :class:`ValueError` naming the node for a parent out of
    range, a node that is its own parent, a leaf with children or a cluster
    without children."""
    num_nodes = parent.numel()
    bad = ((parent < -1) | (parent >= num_nodes)).nonzero().view(-1)
    if bad.numel() > 0:
        node = int(bad[0])
        raise ValueError(f"Node {node} has parent {int(parent[node])}, out of range "
                         f"[-1, {num_nodes - 1}]")
    self_loop = (parent == torch.arange(num_nodes, device=parent.device)).nonzero().view(-1)
    if self_loop.numel() > 0:
        raise ValueError(f"Node {int(self_loop[0])} is its own parent (a cycle)")
    leaf_parent = ((parent >= 0) & (parent < num_leaves)).nonzero().view(-1)
    if leaf_parent.numel() > 0:
        node = int(leaf_parent[0])
        raise ValueError(f"Node {node} has parent {int(parent[node])}, which is a leaf "
                         f"(ids below num_leaves={num_leaves}); leaves cannot have children")
    has_parent = parent >= 0
    num_children = torch.bincount(parent[has_parent], minlength=num_nodes)
    empty = (num_children[num_leaves:] == 0).nonzero().view(-1)
    if empty.numel() > 0:
        node = int(empty[0]) + num_leaves
        raise ValueError(f"Cluster node {node} has no children, so no leaf below it")


def _depth_or_raise_on_cycle(parent: Tensor) -> Tensor:
    # Pointer jumping: after k rounds every node points 2^k steps up (or at
    # its root), so O(log n) vectorised rounds give all depths. A node that
    # never reaches a root lies on or below a cycle.
    num_nodes = parent.numel()
    is_root = parent < 0
    jump = torch.where(is_root, torch.arange(num_nodes), parent)
    depth = (~is_root).to(torch.long)
    for _ in range(num_nodes.bit_length() + 1):
        if bool(is_root[jump].all()):
            break
        depth = depth + depth[jump]
        jump = jump[jump]
    stuck = (~is_root[jump]).nonzero().view(-1)
    if stuck.numel() > 0:
        node = int(stuck[0])
        parent_list = parent.tolist()
        for _ in range(num_nodes):  # walk into the cycle to name a node on it
            node = parent_list[node]
        cycle, current = [node], parent_list[node]
        while current != node:
            cycle.append(current)
            current = parent_list[current]
        raise ValueError(f"The parent pointers contain a cycle through nodes "
                         f"{sorted(cycle)[:10]}; node {node} never reaches a root")
    return depth


def _count_leaves_below(parent: Tensor, num_leaves: int, depth: Tensor) -> Tensor:
    count = torch.zeros(parent.numel(), dtype=torch.long)
    count[:num_leaves] = 1
    return reduce_to_ancestors(parent, depth, count, 'sum')


def _first_and_last_leaf(parent: Tensor, num_leaves: int, depth: Tensor):
    r"""Smallest and largest leaf id below every node."""
    ids = torch.arange(parent.numel())
    # one pass for both: the largest id is the smallest negated id
    both = torch.stack([torch.where(ids < num_leaves, ids, parent.numel()),
                        torch.where(ids < num_leaves, -ids, 1)], dim=1)
    both = reduce_to_ancestors(parent, depth, both, 'amin')
    return both[:, 0].contiguous(), (-both[:, 1]).contiguous()


def reduce_to_ancestors(parent: Tensor, depth: Tensor, values: Tensor, reduce: str) -> Tensor:
    r"""Folds :obj:`values` of every node into all its ancestors
    (:obj:`reduce` is ``'sum'``, ``'amin'`` or ``'amax'``), one vectorised
    step per depth level, deepest first."""
    values = values.clone()
    order = torch.argsort(depth, descending=True, stable=True)
    boundaries = torch.unique_consecutive(depth[order], return_counts=True)[1].tolist()
    start = 0
    for size in boundaries:
        nodes = order[start:start + size]
        start += size
        nodes = nodes[parent[nodes] >= 0]
        targets = parent[nodes]
        if values.dim() > 1:
            targets = targets.view(-1, *([1] * (values.dim() - 1))).expand_as(values[nodes])
        values.scatter_reduce_(0, targets, values[nodes], reduce=reduce)
    return values


def _check_batch(batch, parent: Tensor) -> Tensor:
    if not isinstance(batch, Tensor) or batch.is_floating_point() or batch.dtype == torch.bool:
        raise ValueError("'batch' must be an integer tensor with one graph id per node")
    batch = batch.to(torch.long).view(-1)
    if batch.numel() != parent.numel():
        raise ValueError(f"'batch' has {batch.numel()} entries but the hierarchy has "
                         f"{parent.numel()} nodes")
    if batch.numel() and int(batch.min()) < 0:
        raise ValueError(f"'batch' has a negative graph id at node {int((batch < 0).nonzero()[0])}")
    child = (parent >= 0).nonzero().view(-1)
    across = child[batch[child] != batch[parent[child]]]
    if across.numel() > 0:
        node = int(across[0])
        raise ValueError(f"Node {node} (graph {int(batch[node])}) has parent "
                         f"{int(parent[node])} in another graph ({int(batch[parent[node]])})")
    roots_per_graph = torch.bincount(batch[parent < 0], minlength=int(batch.max()) + 1)
    many = (roots_per_graph > 1).nonzero().view(-1)
    if many.numel() > 0:
        graph = int(many[0])
        roots = ((parent < 0) & (batch == graph)).nonzero().view(-1)[:5].tolist()
        raise ValueError(f"Graph {graph} has {int(roots_per_graph[graph])} roots "
                         f"(e.g. nodes {roots}); give it one root cluster")
    return batch


def _rebuild_with_derived(state, attached=()) -> Hierarchy:
    hierarchy = Hierarchy.__new__(Hierarchy)
    hierarchy.__setstate__(state)
    _adopt(hierarchy, list(attached))
    return hierarchy


def _reduce_with_derived(hierarchy: Hierarchy):
    # Between the processes of one run (a loader's worker handing a batch
    # over, see hsa_geo.loader), the plans travel with the tree: building
    # them in the worker is the point. torch.save and plain pickles use
    # __getstate__ (the tree only).
    return _rebuild_with_derived, (dict(hierarchy.__dict__), _exported(hierarchy))


ForkingPickler.register(Hierarchy, _reduce_with_derived)

# A Hierarchy saved with torch.save loads under torch.load's weights_only
# default (torch >= 2.6) only if its class is allow-listed; files saved by
# earlier versions also carry its plans, whose classes hold tensors, numbers
# and containers only.
torch.serialization.add_safe_globals([
    Hierarchy, SweepPlan, FamilyBlock, FamilyTables])
