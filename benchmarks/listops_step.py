r"""Wall-clock of one ListOps training step (forward, backward, optimiser)
for every model of ``examples/listops.py`` on the same batch of expressions
of about :obj:`--tokens` tokens each, timed interleaved (model after model,
round after round) so that the machine's load falls on all alike; the
medians and their ratios to flat softmax go to
``benchmarks/results/listops_step.json`` with the load average.

    python -m benchmarks.listops_step --tokens 2000 --batch-size 8
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'examples'))

from common import write_json  # noqa: E402
from listops_models import MODELS, ListOpsBatch, build_model, matched_width  # noqa: E402

from hsa_geo.datasets.listops import ListOpsRecipe, generate_listops  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--tokens', type=int, default=2000)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--models', default=','.join(MODELS))
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--out', default=osp.join(ROOT, 'benchmarks', 'results',
                                                  'listops_step.json'))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = args.models.split(',')
    # expressions of LRA's recipe whose lengths lie within 10 % of --tokens
    recipe = ListOpsRecipe(min_length=int(0.9 * args.tokens), max_length=int(1.1 * args.tokens))
    split = generate_listops(args.batch_size, seed=0, recipe=recipe)
    data = ListOpsBatch.collate(torch.from_numpy(split.tokens.astype('int64')),
                                torch.from_numpy(split.ptr), torch.from_numpy(split.label))
    built = {}
    for name in models:
        torch.manual_seed(0)
        model = build_model(name, matched_width(name))
        built[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))

    def step(name):
        model, optimiser = built[name]
        start = time.perf_counter()
        loss = F.cross_entropy(model(data), data.label)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        return time.perf_counter() - start

    for name in models:  # warm-up (kernel build, allocator)
        step(name)
    times = {name: [] for name in models}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name in models:
            times[name].append(step(name))
    medians = {name: statistics.median(t) for name, t in times.items()}
    reference = medians.get('softmax')
    result = {'tokens_per_expression': split.lengths.tolist(), 'batch_size': args.batch_size,
              'iterations': data.iterations, 'rounds': args.rounds, 'threads': args.threads,
              'seconds': times, 'median_seconds': medians,
              'ratio_to_softmax': ({n: m / reference for n, m in medians.items()}
                                   if reference else None),
              'load_average': {'before': load_before, 'after': os.getloadavg()[0]},
              'cpu_count': os.cpu_count(), 'torch': torch.__version__}
    write_json(args.out, result)
    for name in models:
        ratio = f'{medians[name] / reference:.2f}x softmax' if reference else ''
        print(f'{name:13s} {medians[name]:7.3f} s/step  {ratio}')
    print(f"load average {result['load_average']}")


if __name__ == '__main__':
    main()
