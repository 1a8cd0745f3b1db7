r"""How well does a trained bottom-up ListOps model evaluate the lists *inside*
an expression?

The bottom-up models (``BottomUpModel`` in ``examples/listops_models.py``)
read their answer out of the outer list's state; the same readout applied to
every inner list says which value the model holds for it. This script loads
finished checkpoints of ``examples/listops.py``, compares that readout with
every list's true value (:func:`hsa_geo.datasets.listops.evaluate_lists`,
computed from the brackets) on the test expressions, and reports the
accuracy by operator and by height (``0``: a list of digits only, ``h``: a
list whose deepest sub-list has height ``h - 1``), so an error can be traced
to the operator and the level where it starts::

    python examples/listops_inner_lists.py --models hsa_values,tree_values \
        --checkpoint-dir ~/.cache/hsa_geo/checkpoints/listops_curriculum_12k \
        --out benchmarks/results/listops_inner_lists.json

The readout of models trained on root labels alone (not the values models)
is never asked about inner lists, so their inner accuracy says what their
states hold, not what they were trained for.
"""
from __future__ import annotations

import argparse
import os.path as osp
import sys
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from common import ExampleError, load_checkpoint, run_main, write_json  # noqa: E402
import listops  # noqa: E402
from listops_models import BOTTOM_UP_MODELS, ListOpsBatch, build_model, matched_width  # noqa: E402

from hsa_geo.datasets.listops import OPERATOR_NAMES, ListOpsSplit, evaluate_lists  # noqa: E402


def inner_lists(split: ListOpsSplit, indices: np.ndarray):
    r"""Every list of the expressions :obj:`indices` in batch order: its
    opening token's position in the packed batch, operator and value."""
    openers, operators, values = [], [], []
    offset = 0
    for index in indices.tolist():
        tokens = split.example(index)
        opener, value = evaluate_lists(tokens)
        openers.append(opener + offset)
        operators.append(tokens[opener].astype(np.int64))
        values.append(value)
        offset += len(tokens)
    return tuple(np.concatenate(part) for part in (openers, operators, values))


@torch.no_grad()
def list_predictions(model, split: ListOpsSplit, indices: np.ndarray) -> Dict[str, np.ndarray]:
    r"""Every list of the expressions :obj:`indices`, in batch order: the
    position of its opening token in the packed batch (``opener``), its
    ``operator``, ``height``, true ``value``, and the digit :obj:`model`'s
    readout predicts for it (``predicted``)."""
    data: ListOpsBatch = listops.make_batch(split, indices)
    logits = model.list_logits(data)
    hierarchy = data.hierarchy
    lists = torch.arange(hierarchy.num_leaves, hierarchy.num_nodes)
    list_of_opener = torch.full((hierarchy.num_leaves, ), -1, dtype=torch.long)
    list_of_opener[hierarchy.first_leaf[lists]] = lists
    # a list's height: how far its deepest token lies below it, less one
    leaf, ancestor = hierarchy.leaf_ancestor_pairs()
    deepest = hierarchy.depth.new_zeros(hierarchy.num_nodes).scatter_reduce(
        0, ancestor, hierarchy.depth[leaf], 'amax')
    opener, operator, value = inner_lists(split, indices)
    node = list_of_opener[torch.from_numpy(opener)]
    predicted = logits[node].argmax(1).numpy()
    height = (deepest - hierarchy.depth - 1)[node].numpy()
    return {'opener': opener, 'operator': operator, 'height': height, 'value': value,
            'predicted': predicted}


def inner_accuracy(model, split: ListOpsSplit, count: int, max_tokens: int) -> Dict:
    r"""Accuracy of :obj:`model`'s readout at every list of the first
    :obj:`count` expressions, by operator and height (``lists`` and
    ``accuracy``), and over all lists of each operator."""
    model.eval()
    hits: Dict[str, Dict[int, List[int]]] = {name: {} for name in OPERATOR_NAMES.values()}
    for indices in listops.evaluation_batches(split, min(count, len(split)), max_tokens):
        lists = list_predictions(model, split, indices)
        right = lists['predicted'] == lists['value']
        for token, name in OPERATOR_NAMES.items():
            mine = lists['operator'] == token
            for level in np.unique(lists['height'][mine]).tolist():
                mask = mine & (lists['height'] == level)
                counts = hits[name].setdefault(level, [0, 0])
                counts[0] += int(mask.sum())
                counts[1] += int(right[mask].sum())
    report = {}
    for name, by_height in hits.items():
        total = sum(c[0] for c in by_height.values())
        report[name] = {'lists': total,
                        'accuracy': sum(c[1] for c in by_height.values()) / max(total, 1),
                        'by_height': {str(level): {'lists': c[0], 'accuracy': c[1] / c[0]}
                                      for level, c in sorted(by_height.items())}}
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default='hsa_values,tree_values')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--split', default='test')
    parser.add_argument('--count', type=int, default=500,
                        help='expressions of the split whose lists are scored')
    parser.add_argument('--out', default=None)
    known, rest = parser.parse_known_args(argv)
    args = listops.parse_args(rest)  # --setting, --checkpoint-dir, sizes: as in training
    torch.set_num_threads(args.threads)
    data = listops.load_data(args)
    result = {'checkpoint_dir': args.checkpoint_dir, 'setting': args.setting,
              'split': known.split, 'count': known.count, 'models': {}}
    for name in known.models.split(','):
        if name not in BOTTOM_UP_MODELS:
            raise ExampleError(f"{name!r} is not a bottom-up model: only those read out every "
                             f"list (choose from {sorted(BOTTOM_UP_MODELS)})")
        path = listops.run_path(args, name, known.seed, 'checkpoint')
        state = load_checkpoint(path, None)
        if state is None:
            raise ExampleError(f"no checkpoint of {name!r} seed {known.seed} at {path}")
        config = state['config']
        model = build_model(name, matched_width(name, width=config['width'],
                                                heads=config['heads']), config['heads'])
        model.load_state_dict(state['model'])
        result['models'][name] = {'step': state['step'], **inner_accuracy(
            model, data[known.split], known.count, args.eval_tokens)}
        print(name, {op: round(r['accuracy'], 3) for op, r in result['models'][name].items()
                     if isinstance(r, dict)}, flush=True)
    write_json(known.out, result)
    return result


if __name__ == '__main__':
    run_main(main)
