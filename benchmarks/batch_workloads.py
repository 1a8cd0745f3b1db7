r"""Real batches of small graphs and documents, as a training loop meets
them, for :mod:`benchmarks.batches` and the tests of the slot
layout: molecules from rdkit's shipped ChEMBL assay with Louvain
hierarchies, and IMDB reviews with document -> sentence -> word -> word-piece
hierarchies. Hierarchies are built once per graph (as a ``pre_transform``
would); :meth:`Workload.forest` joins them into a fresh forest, as every
new batch must."""
from __future__ import annotations

import os
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
from torch import Tensor

from hsa_geo.hierarchy.hierarchy import Hierarchy

#: name -> (kind, number of graphs, tokens per document)
WORKLOADS = {
    'molecules': ('molecules', 128, None),
    'documents 32x256': ('documents', 32, 256),
    'documents 8x1024': ('documents', 8, 1024),
    'documents 2x4096': ('documents', 2, 4096),
}


class Workload(NamedTuple):
    name: str
    batch: Tensor  #: ``[T]`` graph of every leaf
    forest: Callable[[], Hierarchy]  #: a new forest over the batch, as a training step builds it

    @property
    def num_leaves(self) -> int:
        return self.batch.numel()

    def describe(self) -> Dict[str, object]:
        summary = self.forest().summary()
        return {'num_leaves': self.num_leaves, 'num_graphs': int(self.batch.max()) + 1,
                'max_depth': summary['max_depth'], 'max_children': summary['max_children'],
                'mean_children': summary['mean_children'],
                'sibling_pairs': summary['sibling_pairs'], 'dense_pairs': summary['dense_cost']}


def chembl_molecules(count: int = 128, min_atoms: int = 15, max_atoms: int = 50) -> List:
    r"""The first :obj:`count` molecules of CHEMBL2321810 (rdkit's shipped
    data) with :obj:`min_atoms` to :obj:`max_atoms` atoms, as
    :class:`~hsa_geo.data.NestedSignal` with a Louvain hierarchy."""
    from rdkit import RDConfig
    from torch_geometric.utils import from_smiles

    from hsa_geo.transforms import AddHierarchy
    path = os.path.join(RDConfig.RDContribDir, 'FreeWilson', 'data', 'CHEMBL2321810.smi')
    transform = AddHierarchy('louvain')
    molecules = []
    with open(path) as handle:
        for line in handle:
            if not line.strip():
                continue
            data = from_smiles(line.split()[0])
            if min_atoms <= data.num_nodes <= max_atoms:
                molecules.append(transform(data))
            if len(molecules) == count:
                break
    return molecules


def imdb_documents(count: int, tokens: int) -> List:
    r""":obj:`count` documents of exactly :obj:`tokens` MiniLM word pieces:
    IMDB reviews in file order, concatenated until long enough and cut."""
    from hsa_geo.text import load_imdb, load_wordpiece_tokenizer, tokenize_documents
    texts, _ = load_imdb()
    tokenizer = load_wordpiece_tokenizer()
    documents, review = [], 0
    while len(documents) < count:
        parts = []
        while sum(len(part.split()) for part in parts) < tokens:
            parts.append(texts[review])
            review += 1
        document = tokenize_documents([' '.join(parts)], tokenizer, tokens)[0]
        if document.num_tokens == tokens:
            documents.append(document)
    return documents


def workload_source(name: str) -> Dict[str, object]:
    r"""What :func:`load_workload` builds a workload from: the collated
    molecule batch (``'batch'``), or the documents' hierarchies and the
    graph of every token (``'hierarchies'``, ``'graph'``). Needs rdkit, or
    the IMDB reviews and the MiniLM tokenizer."""
    kind, count, tokens = WORKLOADS[name]
    if kind == 'molecules':
        from torch_geometric.data import Batch
        return {'batch': Batch.from_data_list(chembl_molecules(count))}
    from hsa_geo.text import document_hierarchy
    documents = imdb_documents(count, tokens)
    return {'hierarchies': [document_hierarchy(d) for d in documents],
            'graph': torch.cat([torch.full((d.num_tokens, ), i)
                                for i, d in enumerate(documents)])}


def save_workloads(path: str, names=tuple(WORKLOADS)) -> None:
    r"""Saves the sources of the workloads :obj:`names` to :obj:`path`, for
    a machine without the offline data (a lent GPU, say):
    ``load_workload(name, path)`` reads them back."""
    torch.save({name: workload_source(name) for name in names}, path)


def load_workload(name: str, saved: Optional[str] = None) -> Workload:
    r"""The workload :obj:`name`, built from the offline data or, with
    :obj:`saved`, from a file written by :func:`save_workloads`."""
    if saved is not None:
        sources = torch.load(saved, weights_only=False)  # our own file
        if name not in sources:
            raise KeyError(f"{saved} holds no workload {name!r} (it has {sorted(sources)})")
        source = sources[name]
    else:
        source = workload_source(name)
    if 'batch' in source:
        from hsa_geo.data import build_hierarchy  # uncached: every step meets a new batch
        batch = source['batch']
        return Workload(name, batch.batch, lambda: build_hierarchy(batch))
    hierarchies = source['hierarchies']
    return Workload(name, source['graph'], lambda: Hierarchy.batch_hierarchies(hierarchies))
