r"""Can one family step of the bottom-up ListOps models learn an operator?

Every ListOps model here is at chance on expressions whose outer list is
``SM`` (sum modulo 10). This probe separates what a single composition can
learn from what training through a deep tree delivers: each bottom-up model
(``examples/listops_models.py``, at the width of the comparison) is trained
on *flat* lists only -- ``[OP d1 ... dk ]`` with 2-10 random digits, one
operator -- and tested on 1,000 fresh ones, so its one family step is
supervised directly. The accuracy curves go to
``benchmarks/results/listops_family_probe.json``::

    python examples/listops_family_probe.py --operator SM --steps 10000 --test-every 1000
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from common import count_parameters, run_main, set_seed, write_json  # noqa: E402
from listops import make_batch  # noqa: E402
from listops_models import BOTTOM_UP_MODELS, ListOpsBatch, build_model, matched_width  # noqa: E402

from hsa_geo.datasets.listops import OPERATOR_NAMES, flat_lists  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
OPERATOR_TOKENS = {name: token for token, name in OPERATOR_NAMES.items()}


def flat_batch(operator: int, count: int, generator: np.random.Generator) -> ListOpsBatch:
    r""":obj:`count` lists ``[OP d1 ... dk ]`` of 2-10 uniform digits."""
    return make_batch(flat_lists(count, generator, operators=[operator]), np.arange(count))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--operator', default='SM', choices=sorted(OPERATOR_TOKENS))
    parser.add_argument('--models', default=','.join(BOTTOM_UP_MODELS))
    parser.add_argument('--steps', type=int, default=3000)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--width', type=int, default=64,
                        help="width of the reference 'hsa' model the widths are matched to")
    parser.add_argument('--heads', type=int, default=4)
    parser.add_argument('--test-every', type=int, default=500)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default=osp.join(ROOT, 'benchmarks', 'results',
                                                  'listops_family_probe.json'))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    operator = OPERATOR_TOKENS[args.operator]
    test = flat_batch(operator, 1000, np.random.default_rng(10_000 + args.seed))
    runs = {}
    for name in args.models.split(','):
        set_seed(args.seed)
        generator = np.random.default_rng(args.seed)
        model = build_model(name, matched_width(name, width=args.width, heads=args.heads),
                            args.heads)
        optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        curve, start = [], time.perf_counter()
        for step in range(1, args.steps + 1):
            batch = flat_batch(operator, args.batch_size, generator)
            loss = F.cross_entropy(model(batch), batch.label)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if step % args.test_every == 0 or step == args.steps:
                with torch.no_grad():
                    accuracy = float((model(test).argmax(1) == test.label).float().mean())
                curve.append({'step': step, 'train_loss': float(loss.detach()),
                              'test_accuracy': accuracy})
                print(f'{name} step {step}: test {accuracy:.3f}', flush=True)
        runs[name] = {'parameters': count_parameters(model), 'curve': curve,
                      'final_test_accuracy': curve[-1]['test_accuracy'],
                      'seconds': time.perf_counter() - start}
    write_json(args.out, {'operator': args.operator, 'config': vars(args) | {'out': None},
                          'runs': runs, 'load_average': os.getloadavg()[0],
                          'torch': torch.__version__})


if __name__ == '__main__':
    run_main(main)
