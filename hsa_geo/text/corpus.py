r"""Tokenised documents with their hierarchies and labels, packed into
batches on demand (tokens of all documents concatenated, no padding)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from hsa_geo.hierarchy.hierarchy import Hierarchy
from hsa_geo.text.hierarchy import document_hierarchy
from hsa_geo.text.tokenize import TokenizedDocument, tokenize_documents


class TextCorpus:
    r"""Tokenised reviews, their document hierarchies and labels.

    :meth:`batch` returns what :class:`~hsa_geo.text.TextClassifier` takes:
    token ids ``[T]``, position in the document ``[T]``, document id ``[T]``,
    the forest of the documents' hierarchies, and the labels ``[B]``.
    """

    def __init__(self, documents: List[TokenizedDocument], hierarchies: List[Hierarchy],
                 labels: Tensor):
        self.documents, self.hierarchies, self.labels = documents, hierarchies, labels

    @classmethod
    def from_texts(cls, texts: Sequence[str], labels: Tensor, tokenizer, max_tokens: int,
                   max_children=None) -> 'TextCorpus':
        r"""Tokenises :obj:`texts` (at most :obj:`max_tokens` word pieces
        each) and builds their hierarchies (families of at most
        :obj:`max_children`, unbounded for :obj:`None`)."""
        documents = tokenize_documents(list(texts), tokenizer, max_tokens)
        hierarchies = [document_hierarchy(d, max_children=max_children) for d in documents]
        return cls(documents, hierarchies, labels)

    def __len__(self) -> int:
        return len(self.documents)

    def batch(self, indices: Sequence[int]) -> Tuple[Tensor, Tensor, Tensor, Hierarchy, Tensor]:
        documents = [self.documents[i] for i in indices]
        input_ids = torch.cat([d.input_ids for d in documents])
        position = torch.cat([torch.arange(d.num_tokens) for d in documents])
        batch = torch.cat([torch.full((d.num_tokens, ), row, dtype=torch.long)
                           for row, d in enumerate(documents)])
        forest = Hierarchy.batch_hierarchies([self.hierarchies[i] for i in indices])
        return input_ids, position, batch, forest, self.labels[list(indices)]
