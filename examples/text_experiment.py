r"""Plumbing shared by the text experiments in ``examples/``: their common
command-line options and how they write a JSON report."""
from __future__ import annotations

import argparse
import json
import os
import platform
from typing import Any, Dict, List, Sequence

import torch

from hsa_geo.hierarchy import DEFAULT_MAX_CHILDREN

#: The repository root (``examples/`` and ``datasets/`` live under it).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_shared_arguments(parser: argparse.ArgumentParser, result_name: str,
                         batch_size: int) -> None:
    r"""Options every text experiment has: data size, hierarchy width,
    threads, the IMDB split, where results and plots go."""
    parser.add_argument('--max-tokens', type=int, default=256)
    parser.add_argument('--max-children', type=int, default=DEFAULT_MAX_CHILDREN,
                        help='widest family of the hierarchy (0 = no bound)')
    parser.add_argument('--batch-size', type=int, default=batch_size)
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads (1 is fastest on a shared machine)')
    parser.add_argument('--split', default=os.path.join(ROOT, 'datasets', 'imdb_split.json.gz'))
    parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results',
                                                      f'{result_name}.json'))
    parser.add_argument('--no-progress', action='store_true')
    parser.add_argument('--plot', default=None,
                        help='also save the results plot (PNG) to this path')
    parser.add_argument('--replot', action='store_true',
                        help='only redraw --plot from the JSON already at --out')


def subset(ids: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    r"""The same sorted random subset of :obj:`size` ids for every model and
    seed (drawn with a fixed seed); all ids when :obj:`size` is 0 or larger."""
    if size <= 0 or size >= ids.numel():
        return ids
    generator = torch.Generator().manual_seed(seed)
    return ids[torch.randperm(ids.numel(), generator=generator)[:size]].sort().values


def hierarchy_shape(shapes: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    r"""Mean sibling pairs and widest family over documents' summaries."""
    return {'mean_sibling_pairs': sum(s['sibling_pairs'] for s in shapes) / len(shapes),
            'mean_max_children': sum(s['max_children'] for s in shapes) / len(shapes)}


def percentile_interval(samples: torch.Tensor) -> List[float]:
    r"""The 95 % percentile interval ``[low, high]`` of bootstrap
    :obj:`samples` (e.g. the means of resampled test sets)."""
    bounds = torch.tensor([0.025, 0.975], dtype=samples.dtype)
    return torch.quantile(samples, bounds).tolist()


def environment(threads: int) -> Dict[str, Any]:
    return {'torch': torch.__version__, 'threads': threads, 'cpu_count': os.cpu_count(),
            'machine': platform.machine()}


def write_report(report: Dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as handle:
        json.dump(report, handle, indent=2)
