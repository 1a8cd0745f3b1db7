r"""ListOps: does attention derived for the data's own hierarchy pay where
the hierarchy carries the answer? (issue 21)

Seven models, one recurrent encoder (``examples/listops_models.py``) with
matched parameter counts, the same optimiser, batches and number of steps:
HSA over the parse tree parsed from the brackets (``hsa``, ``hsa_pos``),
flat softmax (``softmax``), flat softmax given the tree as positional
encodings (``softmax_tree``), a GNN along the parse tree (``tree_gnn``) and
GPS-style tree message passing + flat attention (``gps``) or + HSA
(``gps_hsa``).

Data are drawn offline with the LRA recipe (:mod:`hsa_geo.datasets.listops`).
Two settings (``--setting``):

- ``generalisation`` (default): train on expressions of 500-1,000 tokens,
  test on the same recipe (``test``), on 2,000-4,000 tokens (``test_long``)
  and on depth 12-15 at 500-1,000 tokens (``test_deep``);
- ``lra``: LRA's ListOps, 500-2,000 tokens, 96,000 / 2,000 / 2,000.

A short run (one seed, 300 steps of 32 expressions)::

    python examples/listops.py --models hsa,tree_gnn --seeds 0 --steps 300

Each run checkpoints under ``--checkpoint-dir`` at every evaluation and
resumes from there (a later call with a larger ``--steps`` continues it: the
learning rate is constant after warm-up); a finished run leaves
``run_<model>_<seed>.json`` there, so processes given disjoint ``--models``
or ``--seeds`` train side by side and ``--report-only`` gathers them into
``--out``: accuracy per split and model, curves, seconds per step, the
machine's load, and paired differences of ``hsa`` to every other model with
95 % bootstrap intervals over seeds and test expressions.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import os.path as osp
import sys
import time
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from common import (ExampleError, compare_runs, config_of, count_parameters,  # noqa: E402
                    grid_of, load_checkpoint, mean_std, report_header, run_experiment,
                    run_main, save_checkpoint, set_seed, write_json)
from listops_models import MODELS, ListOpsBatch, build_model, matched_width  # noqa: E402

from hsa_geo.datasets.listops import (GENERALISATION_RECIPES, LRA_SPLITS,  # noqa: E402
                                      OPERATOR_NAMES, ListOpsRecipe, ListOpsSplit,
                                      flat_lists, generate_splits)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SETTINGS = ('generalisation', 'lra')
CURRICULUM_BATCH_SIZE = 256
TEST_SPLITS = {'generalisation': ('test', 'test_long', 'test_deep'), 'lra': ('test', )}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--setting', choices=SETTINGS, default='generalisation')
    parser.add_argument('--models', default=','.join(MODELS))
    parser.add_argument('--seeds', default='0')
    parser.add_argument('--steps', type=int, default=300)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--warmup', type=int, default=50)
    parser.add_argument('--width', type=int, default=64)
    parser.add_argument('--heads', type=int, default=4)
    parser.add_argument('--train-size', type=int, default=LRA_SPLITS['train'])
    parser.add_argument('--valid-size', type=int, default=LRA_SPLITS['valid'])
    parser.add_argument('--test-size', type=int, default=LRA_SPLITS['test'])
    parser.add_argument('--generalisation-test-size', type=int, default=500,
                        help='expressions in test_long and test_deep')
    parser.add_argument('--curriculum-steps', type=int, default=0,
                        help='steps on flat lists [OP d1 ... dk ] (all four operators, drawn '
                             'fresh) before the training split; they count in --steps')
    parser.add_argument('--curriculum-batch-size', type=int, default=CURRICULUM_BATCH_SIZE,
                        help='flat lists per curriculum step (a training batch of 32 '
                             'expressions holds ~400 lists)')
    parser.add_argument('--mixed-flat-lists', type=int, default=0,
                        help='flat lists added to every batch of the training split after the '
                             'curriculum (0: none)')
    parser.add_argument('--lr-after-curriculum', type=float, default=None,
                        help='learning rate after the curriculum (default: --lr)')
    parser.add_argument('--valid-every', type=int, default=50)
    parser.add_argument('--valid-subset', type=int, default=200,
                        help='validation expressions scored at every evaluation')
    parser.add_argument('--eval-tokens', type=int, default=16_000,
                        help='most tokens in one evaluation batch')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--data-dir', default=osp.join(osp.expanduser('~'), '.cache', 'hsa_geo',
                                                       'listops'))
    parser.add_argument('--checkpoint-dir', default=None,
                        help='default: ~/.cache/hsa_geo/checkpoints/listops_<setting> (kept '
                             'outside the work tree, so a later session can resume)')
    parser.add_argument('--out', default=None,
                        help='default: benchmarks/results/listops_<setting>.json')
    parser.add_argument('--report-only', action='store_true',
                        help='gather the finished runs found under --checkpoint-dir; train nothing')
    parser.add_argument('--resamples', type=int, default=2000)
    parser.add_argument('--references', default='hsa,hsa_pos,gps_hsa,hsa_bottom_up,hsa_values',
                        help='models compared with every other one in the report (paired '
                             'differences and intervals)')
    args = parser.parse_args(argv)
    grid_of(args, MODELS, f'listops_{args.setting}')
    args.references = [name for name in args.references.split(',') if name]
    for name in args.references:
        if name not in MODELS:
            raise ExampleError(f"unknown model {name!r} in --references; choose from "
                               f"{list(MODELS)}")
    args.out = args.out or osp.join(ROOT, 'benchmarks', 'results', f'listops_{args.setting}.json')
    return args


# ---------------------------------------------------------------- data
def recipes_and_sizes(args):
    if args.setting == 'lra':
        recipe = ListOpsRecipe()
        sizes = {'train': args.train_size, 'valid': args.valid_size, 'test': args.test_size}
        return {name: recipe for name in sizes}, sizes
    sizes = {'train': args.train_size, 'valid': args.valid_size, 'test': args.test_size,
             'test_long': args.generalisation_test_size,
             'test_deep': args.generalisation_test_size}
    recipes = dict(GENERALISATION_RECIPES)
    recipes['test'] = recipes['train']
    return recipes, sizes


def load_data(args) -> Dict[str, ListOpsSplit]:
    r"""The splits, drawn once and cached under :obj:`args.data_dir` (keyed
    by recipes and sizes; drawing 96,000 expressions takes ~1-2 min)."""
    recipes, sizes = recipes_and_sizes(args)
    key = json.dumps({n: [sizes[n], vars(recipes[n])] for n in sizes}, sort_keys=True)
    path = osp.join(args.data_dir, hashlib.sha1(key.encode()).hexdigest()[:16] + '.npz')
    if osp.isfile(path):
        saved = np.load(path)
        return {n: ListOpsSplit(*(saved[f'{n}_{f}'] for f in ('tokens', 'ptr', 'label', 'depth')))
                for n in sizes}
    print(f'drawing ListOps splits {sizes} ...', flush=True)
    splits = generate_splits(sizes, recipes, seed=0)
    os.makedirs(args.data_dir, exist_ok=True)
    arrays = {f'{n}_{f}': getattr(s, f) for n, s in splits.items()
              for f in ('tokens', 'ptr', 'label', 'depth')}
    np.savez(path + '.tmp.npz', **arrays)
    os.replace(path + '.tmp.npz', path)
    return splits


def make_batch(split: ListOpsSplit, indices, *more) -> ListOpsBatch:
    r"""The expressions :obj:`indices` of :obj:`split` as one packed batch,
    followed by those of further ``(split, indices)`` pairs in :obj:`more`."""
    parts, labels = [], []
    for part_split, part_indices in ((split, indices), *more):
        part_indices = np.asarray(part_indices)
        parts += [part_split.example(int(i)) for i in part_indices]
        labels.append(part_split.label[part_indices])
    ptr = np.zeros(len(parts) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(p) for p in parts])
    return ListOpsBatch.collate(torch.from_numpy(np.concatenate(parts).astype(np.int64)),
                                torch.from_numpy(ptr), torch.from_numpy(np.concatenate(labels)))


def evaluation_batches(split: ListOpsSplit, count: int, max_tokens: int):
    r"""The first :obj:`count` expressions in batches of at most
    :obj:`max_tokens` padded tokens (flat attention pads to the longest)."""
    order = np.argsort(split.lengths[:count], kind='stable')
    start = 0
    while start < order.size:
        end = start + 1
        while end < order.size and (end - start + 1) * split.lengths[order[end]] <= max_tokens:
            end += 1
        yield order[start:end]
        start = end


@torch.no_grad()
def correctness(model, split: ListOpsSplit, count: int, max_tokens: int) -> np.ndarray:
    model.eval()
    count = min(count, len(split))
    correct = np.zeros(count, dtype=bool)
    for indices in evaluation_batches(split, count, max_tokens):
        data = make_batch(split, indices)
        correct[indices] = (model(data).argmax(1) == data.label).numpy()
    model.train()
    return correct


# ---------------------------------------------------------------- training
def learning_rate(step: int, args) -> float:
    if args.lr_after_curriculum is not None and step >= args.curriculum_steps:
        return args.lr_after_curriculum
    return args.lr * min(1.0, (step + 1) / max(args.warmup, 1))


def run_path(args, name: str, seed: int, kind: str) -> str:
    return osp.join(args.checkpoint_dir, f'{kind}_{name}_{seed}.' + ('json' if kind == 'run'
                                                                      else 'pt'))


def train_one(name: str, seed: int, data: Dict[str, ListOpsSplit], args) -> Dict:
    config = config_of(args, {'model': name, 'seed': seed})
    for key in ('models', 'steps', 'report_only', 'resamples', 'references', 'data_dir',
                'eval_tokens'):
        config.pop(key, None)
    if not args.curriculum_steps:  # runs from before the options resume
        config.pop('curriculum_steps')
        config.pop('curriculum_batch_size')
    for key in ('mixed_flat_lists', 'lr_after_curriculum'):
        if not config[key]:  # likewise
            config.pop(key)
    set_seed(seed)
    width = matched_width(name, width=args.width, heads=args.heads)
    model = build_model(name, width, args.heads)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    order = torch.Generator().manual_seed(seed)
    state = load_checkpoint(run_path(args, name, seed, 'checkpoint'), config)
    curve: List[Dict] = []
    step, seconds, permutation, cursor = 0, 0.0, None, 0
    flat = np.random.default_rng(seed)  # draws the curriculum's flat lists
    if state is not None:
        model.load_state_dict(state['model'])
        optimiser.load_state_dict(state['optimiser'])
        order.set_state(state['order'])
        step, seconds, curve = state['step'], state['seconds'], state['curve']
        permutation, cursor = state['permutation'], state['cursor']
        torch.set_rng_state(state['torch_rng'])
        if 'flat_lists_rng' in state:
            flat.bit_generator.state = state['flat_lists_rng']
        print(f'{name} seed {seed}: resumed at step {step}', flush=True)
    train = data['train']
    losses: List[float] = []
    while step < args.steps:
        if step < args.curriculum_steps:
            count = args.curriculum_batch_size
            batch = make_batch(flat_lists(count, flat), np.arange(count))
        else:
            if permutation is None or cursor + args.batch_size > len(train):
                permutation, cursor = torch.randperm(len(train), generator=order).numpy(), 0
            chosen = permutation[cursor:cursor + args.batch_size]
            cursor += args.batch_size
            if args.mixed_flat_lists:  # the curriculum goes on beside the expressions
                batch = make_batch(train, chosen, (flat_lists(args.mixed_flat_lists, flat),
                                                   np.arange(args.mixed_flat_lists)))
            else:
                batch = make_batch(train, chosen)
        for group in optimiser.param_groups:
            group['lr'] = learning_rate(step, args)
        start = time.perf_counter()
        loss = F.cross_entropy(model(batch), batch.label)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        seconds += time.perf_counter() - start
        losses.append(float(loss.detach()))
        step += 1
        if step % args.valid_every == 0 or step == args.steps:
            valid = correctness(model, data['valid'], args.valid_subset, args.eval_tokens)
            curve.append({'step': step, 'train_loss': float(np.mean(losses)),
                          'valid_accuracy': float(valid.mean()), 'train_seconds': seconds,
                          'load': os.getloadavg()[0]})
            losses = []
            print(f"{name} seed {seed} step {step}: loss {curve[-1]['train_loss']:.3f} "
                  f"valid {curve[-1]['valid_accuracy']:.3f} ({seconds / step:.2f} s/step)",
                  flush=True)
            save_checkpoint(run_path(args, name, seed, 'checkpoint'), {
                'config': config, 'model': model.state_dict(),
                'optimiser': optimiser.state_dict(), 'order': order.get_state(),
                'torch_rng': torch.get_rng_state(), 'flat_lists_rng': flat.bit_generator.state,
                'step': step, 'seconds': seconds,
                'curve': curve, 'permutation': permutation, 'cursor': cursor})
    run = {'model': name, 'seed': seed, 'width': width, 'parameters': count_parameters(model),
           'steps': step, 'curriculum_steps': args.curriculum_steps,
           'curriculum_batch_size': args.curriculum_batch_size,
           'mixed_flat_lists': args.mixed_flat_lists,
           'lr_after_curriculum': args.lr_after_curriculum,
           'batch_size': args.batch_size, 'train_seconds': seconds,
           'seconds_per_step': seconds / max(step, 1), 'curve': curve, 'test': {}}
    test_sizes = {'test': args.test_size, 'test_long': args.generalisation_test_size,
                  'test_deep': args.generalisation_test_size}
    for split in TEST_SPLITS[args.setting]:
        start = time.perf_counter()
        correct = correctness(model, data[split], test_sizes[split], args.eval_tokens)
        run['test'][split] = {'accuracy': float(correct.mean()), 'count': int(correct.size),
                              'correct': ''.join('1' if c else '0' for c in correct),
                              'seconds': time.perf_counter() - start}
        print(f"{name} seed {seed} {split}: {run['test'][split]['accuracy']:.4f}", flush=True)
    run['load_at_end'] = os.getloadavg()[0]
    write_json(run_path(args, name, seed, 'run'), run)
    return run


# ---------------------------------------------------------------- report
def correct_of(run: Dict, split: str) -> np.ndarray:
    r"""A run's 0/1 correctness per test expression of :obj:`split`."""
    return np.frombuffer(run['test'][split]['correct'].encode(), dtype=np.uint8) - ord('0')


def root_operators(split: ListOpsSplit, count: int) -> np.ndarray:
    r"""The operator of every expression's outer list (its first token)."""
    return split.tokens[split.ptr[:min(count, len(split))]]


def accuracy_by_operator(runs: List[Dict], split: str, operator: np.ndarray) -> Dict:
    r"""Test accuracy of :obj:`runs` on the expressions of :obj:`split`
    whose outer list applies each operator (an error in any argument
    spoils ``SM`` at the root, while ``MIN`` and ``MAX`` survive errors
    in the arguments they do not select)."""
    return {name: mean_std(correct_of(run, split)[operator == token].mean() for run in runs)
            for token, name in OPERATOR_NAMES.items()}


def curriculum_steps_taken(run: Dict) -> int:
    r"""The steps of a run spent on its curriculum."""
    return min(run['steps'], run.get('curriculum_steps', 0))


def flat_lists_seen(run: Dict) -> int:
    r"""Flat lists a run trained on (its curriculum, and those mixed into
    the batches after it)."""
    curriculum = curriculum_steps_taken(run)
    return (curriculum * run.get('curriculum_batch_size', CURRICULUM_BATCH_SIZE)
            + (run['steps'] - curriculum) * run.get('mixed_flat_lists', 0))


def expressions_seen(run: Dict) -> int:
    r"""Training expressions a run saw (its steps after the curriculum)."""
    return (run['steps'] - curriculum_steps_taken(run)) * run['batch_size']


def report(runs: List[Dict], args) -> Dict:
    splits = TEST_SPLITS[args.setting]
    data = load_data(args)
    summary = {}
    for name in MODELS:
        mine = [r for r in runs if r['model'] == name]
        if mine:
            summary[name] = {split: mean_std(r['test'][split]['accuracy'] for r in mine)
                             for split in splits}
            summary[name].update(parameters=mine[0]['parameters'], width=mine[0]['width'],
                                 seconds_per_step=mean_std(r['seconds_per_step'] for r in mine),
                                 steps=sorted({r['steps'] for r in mine}))
            summary[name]['test_by_operator'] = accuracy_by_operator(
                mine, 'test', root_operators(data['test'], mine[0]['test']['test']['count']))
    comparisons = []
    for reference in args.references:
        for other in MODELS:
            for split in splits:
                comparison = compare_runs(runs, reference, other,
                                          lambda run: correct_of(run, split), args.resamples)
                if comparison is not None:
                    comparisons.append({**comparison, 'split': split})
    return {'setting': args.setting, **report_header(args),
            'budget': {'steps': sorted({r['steps'] for r in runs}),
                       'curriculum_steps': sorted({r.get('curriculum_steps', 0) for r in runs}),
                       'curriculum_batch_size': sorted({  # runs before it was recorded: default
                           r.get('curriculum_batch_size', CURRICULUM_BATCH_SIZE) for r in runs
                           if r.get('curriculum_steps')}),
                       'batch_size': args.batch_size,
                       'examples_seen': sorted({expressions_seen(r) for r in runs}),
                       'flat_lists_seen': sorted({flat_lists_seen(r) for r in runs
                                                  if r.get('curriculum_steps')}),
                       'mixed_flat_lists': sorted({r.get('mixed_flat_lists', 0) for r in runs}),
                       'lr_after_curriculum': sorted({r['lr_after_curriculum'] for r in runs
                                                      if r.get('lr_after_curriculum')})},
            'summary': summary, 'comparisons': comparisons,
            'runs': runs}


def main(argv=None):
    result = run_experiment(parse_args(argv), load_data, train_one, report)
    for name, row in result['summary'].items():
        print(name, {k: round(v['mean'], 4) for k, v in row.items()
                     if isinstance(v, dict) and 'mean' in v})


if __name__ == '__main__':
    run_main(main)
