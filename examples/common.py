r"""Shared plumbing of the example scripts: loading OGB folders offline,
hierarchies per molecule, seeds, checkpoints that refuse a foreign
configuration, per-epoch JSON, and torchrun/DDP setup.

Experiments live in the scripts; this file holds no model code."""
from __future__ import annotations

import json
import os
import os.path as osp
import random
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

HERE = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(HERE)

MOLHIV_FILES = ('edge.csv.gz', 'node-feat.csv.gz', 'edge-feat.csv.gz', 'num-node-list.csv.gz',
                'num-edge-list.csv.gz', 'graph-label.csv.gz')
ARXIV_FILES = ('edge.csv.gz', 'node-feat.csv.gz', 'node-label.csv.gz', 'node_year.csv.gz',
               'num-node-list.csv.gz', 'num-edge-list.csv.gz')


class ExampleError(RuntimeError):
    r"""A user-facing error: the scripts print its message and exit with 2."""


def run_main(main) -> None:
    r"""Runs :obj:`main()` turning :class:`ExampleError` into a clear message."""
    try:
        code = main()
    except ExampleError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


# ------------------------------------------------------------------ OGB
def allow_ogb_torch_load() -> None:
    r"""OGB calls bare :func:`torch.load`, which refuses PyG data objects
    under torch >= 2.6 (weights_only): allow exactly those classes."""
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import GlobalStorage
    torch.serialization.add_safe_globals([DataEdgeAttr, DataTensorAttr, GlobalStorage])


def _check_folder(root: str, name: str, files: Sequence[str], split: str) -> str:
    folder = osp.join(root, name.replace('-', '_'))
    hint = (f"build the offline copy with `python datasets/build_offline_ogb.py --out {root}` "
            f"or point --root at a real OGB download")
    if not osp.isdir(folder):
        raise ExampleError(f"dataset folder {folder} not found; {hint}")
    if not osp.isfile(osp.join(folder, 'RELEASE_v1.txt')):
        raise ExampleError(f"{folder}/RELEASE_v1.txt is missing (the OGB loader would ask "
                           f"on stdin to re-download); {hint}")
    processed = osp.isfile(osp.join(folder, 'processed', 'geometric_data_processed.pt'))
    missing = [f for f in files if not osp.isfile(osp.join(folder, 'raw', f))]
    if missing and not processed:
        raise ExampleError(f"{folder}/raw is missing {missing}; {hint}")
    missing = [f'{s}.csv.gz' for s in ('train', 'valid', 'test')
               if not osp.isfile(osp.join(folder, 'split', split, f'{s}.csv.gz'))]
    if missing and not osp.isfile(osp.join(folder, 'split', split, 'split_dict.pt')):
        raise ExampleError(f"{folder}/split/{split} is missing {missing}; {hint}")
    return folder


def load_graph_dataset(root: str, name: str = 'ogbg-molhiv'):
    r"""The real :class:`PygGraphPropPredDataset`, its split and
    :class:`Evaluator`, after checking files and labels."""
    _check_folder(root, name, MOLHIV_FILES, 'scaffold')
    allow_ogb_torch_load()
    from ogb.graphproppred import Evaluator, PygGraphPropPredDataset
    try:
        dataset = PygGraphPropPredDataset(name, root=root)
    except (OSError, ValueError, EOFError) as e:
        raise ExampleError(f"could not read {name} under {root}: {e}") from e
    y = dataset._data.y
    if dataset.task_type == 'binary classification':
        labelled = y[~torch.isnan(y.float())] if y.is_floating_point() else y
        bad = labelled[(labelled != 0) & (labelled != 1)]
        if bad.numel():
            raise ExampleError(f"{name}: binary labels must be 0 or 1 (found {bad[:5].tolist()}); "
                               f"check raw/graph-label.csv.gz")
    split = dataset.get_idx_split()
    _check_split(split, len(dataset), name)
    return dataset, split, Evaluator(name)


def load_node_dataset(root: str, name: str = 'ogbn-arxiv'):
    r"""The real :class:`PygNodePropPredDataset`, its split and evaluator."""
    _check_folder(root, name, ARXIV_FILES, 'time')
    allow_ogb_torch_load()
    from ogb.nodeproppred import Evaluator, PygNodePropPredDataset
    try:
        dataset = PygNodePropPredDataset(name, root=root)
    except (OSError, ValueError, EOFError) as e:
        raise ExampleError(f"could not read {name} under {root}: {e}") from e
    y = dataset._data.y.view(-1)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= dataset.num_classes):
        raise ExampleError(f"{name}: node labels must lie in [0, {dataset.num_classes - 1}] "
                           f"(found [{int(y.min())}, {int(y.max())}])")
    split = dataset.get_idx_split()
    _check_split(split, dataset._data.num_nodes, name)
    return dataset, split, Evaluator(name)


def _check_split(split: Dict[str, torch.Tensor], size: int, name: str) -> None:
    for key in ('train', 'valid', 'test'):
        idx = torch.as_tensor(split[key])
        if idx.numel() == 0:
            raise ExampleError(f"{name}: the {key} split is empty")
        if int(idx.min()) < 0 or int(idx.max()) >= size:
            raise ExampleError(f"{name}: {key} split indices out of range [0, {size - 1}]")


# ------------------------------------------------------------ hierarchies
def graph_hierarchy(num_nodes: int, edge_index: torch.Tensor, method: str = 'louvain',
                    max_children: int = 8, seed: int = 0):
    r"""A hierarchy over the nodes ``0..num_nodes-1`` of a graph given by
    :obj:`edge_index`, as :class:`~hsa_geo.transforms.AddHierarchy` builds it."""
    from torch_geometric.data import Data

    from hsa_geo.transforms import AddHierarchy
    transform = AddHierarchy(method, max_children=max_children, seed=seed)
    return transform.hierarchy(Data(edge_index=edge_index, num_nodes=num_nodes))


def attach_hierarchies(dataset: Iterable, method: str = 'louvain', max_children: int = 8,
                       seed: int = 0, progress: bool = True, desc: str = 'hierarchies') -> List:
    r"""Every graph as a :class:`~hsa_geo.data.NestedSignal` carrying a
    hierarchy over its nodes (community detection on its own edges): the
    :class:`~hsa_geo.transforms.AddHierarchy` transform, applied once per
    graph as a ``pre_transform`` would be (the baselines read the same
    dataset without it)."""
    from hsa_geo.transforms import AddHierarchy
    transform = AddHierarchy(method, max_children=max_children, seed=seed)
    return [transform(data) for data in progress_bar(dataset, progress, desc=desc, leave=False)]


# ------------------------------------------------------------ training
def progress_bar(iterable, enabled: bool = True, **kwargs):
    r"""A tqdm bar that is drawn on a terminal only: with its output
    redirected to a log, tqdm stays quiet (``disable=None``) instead of
    writing one line per redraw."""
    from tqdm.auto import tqdm
    return tqdm(iterable, disable=None if enabled else True, **kwargs)


def set_seed(seed: int) -> None:
    r"""Seeds Python, NumPy and torch (:func:`torch_geometric.seed_everything`)."""
    from torch_geometric import seed_everything
    seed_everything(seed)


def rng_state() -> Dict[str, Any]:
    return {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(),
            'python': random.getstate()}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])


# Options that never change a run's numbers: a checkpoint may be resumed
# under different values of these.
RESUME_FREE = {'resume', 'checkpoint_dir', 'out', 'epochs', 'no_progress', 'threads',
               'seeds', 'root', 'max_steps', 'cpu'}


def config_of(args, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    config = {k: v for k, v in vars(args).items() if k not in RESUME_FREE}
    config.update(extra or {})
    return config


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    r"""Writes atomically, so an interrupted save never destroys the last
    good checkpoint."""
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, config: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    r"""The checkpoint at :obj:`path` (or :obj:`None`), after checking that
    it was written under :obj:`config` (any configuration when
    :obj:`config` is :obj:`None`: the checkpoint is read, not resumed)."""
    if not osp.isfile(path):
        return None
    try:
        state = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise ExampleError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                           f"move it away or pass another --checkpoint-dir") from e
    saved = state.get('config') if isinstance(state, dict) else None
    if saved is None:
        raise ExampleError(f"{path} is not a checkpoint of this script")
    if config is None:
        return state
    diff = {k: (saved.get(k, '<missing>'), config.get(k, '<missing>'))
            for k in sorted(set(saved) | set(config)) if saved.get(k) != config.get(k)}
    if diff:
        lines = ', '.join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ExampleError(f"checkpoint {path} was written by another configuration ({lines}); "
                           f"rerun with the same options, or use another --checkpoint-dir "
                           f"(the checkpoint was left untouched)")
    return state


def write_json(path: Optional[str], payload: Dict[str, Any]) -> None:
    if not path:
        return
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(payload, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    values = np.asarray(list(values), dtype=np.float64)
    return {'mean': float(values.mean()), 'std': float(values.std(ddof=1)) if values.size > 1 else 0.0,
            'n': int(values.size)}


def paired_bootstrap(first: np.ndarray, second: np.ndarray, resamples: int,
                     metric=None, seed: int = 0) -> Dict[str, Any]:
    r"""Metric of :obj:`first` minus metric of :obj:`second`, both
    ``[seeds, examples, ...]`` for the same seeds and test examples, with a
    95 % interval from resampling seeds and examples alike for both. The
    metric maps ``[k, ...]`` (seeds and examples flattened) to a number; by
    default the mean (e.g. of 0/1 correctness)."""
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if first.shape != second.shape or first.ndim < 2:
        raise ValueError(f"paired_bootstrap() takes two [seeds, examples, ...] arrays of one "
                         f"shape (got {first.shape} and {second.shape})")
    metric = metric or (lambda values: float(values.mean()))
    num_seeds, num_examples = first.shape[:2]
    rng = np.random.default_rng(seed)
    differences = np.empty(resamples)
    for r in range(resamples):
        pick = (rng.integers(num_seeds, size=num_seeds)[:, None],
                rng.integers(num_examples, size=num_examples)[None, :])
        differences[r] = (metric(first[pick].reshape(-1, *first.shape[2:]))
                          - metric(second[pick].reshape(-1, *second.shape[2:])))
    low, high = np.quantile(differences, [0.025, 0.975])
    return {'difference': (metric(first.reshape(-1, *first.shape[2:]))
                           - metric(second.reshape(-1, *second.shape[2:]))),
            'ci95': [float(low), float(high)]}


def compare_runs(runs: Sequence[Dict[str, Any]], first: str, second: str, values,
                 resamples: int, metric=None) -> Optional[Dict[str, Any]]:
    r""":func:`paired_bootstrap` of model :obj:`first` against :obj:`second`
    over the seeds both have runs for, :obj:`values` mapping a run to its
    per-example array; :obj:`None` when they share no seed."""
    seeds = sorted({r['seed'] for r in runs if r['model'] == first}
                   & {r['seed'] for r in runs if r['model'] == second})
    if first == second or not seeds:
        return None

    def stacked(name):
        return np.stack([values(next(r for r in runs if r['model'] == name and r['seed'] == s))
                         for s in seeds])
    return {'first': first, 'second': second, 'seeds': seeds,
            **paired_bootstrap(stacked(first), stacked(second), resamples, metric)}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_width(build, target: int, step: int, largest: int) -> int:
    r"""The width (a multiple of :obj:`step` up to :obj:`largest`) at which
    :obj:`build(width)` has the parameter count closest to :obj:`target`."""
    return min(range(step, largest + 1, step),
               key=lambda width: abs(count_parameters(build(width)) - target))


def gather_runs(checkpoint_dir: str, fresh: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    r"""The finished runs of an experiment: every ``run_*.json`` under
    :obj:`checkpoint_dir` (left there by this or other processes) and the
    :obj:`fresh` ones, one per (model, seed)."""
    found = {}
    if osp.isdir(checkpoint_dir):
        for name in sorted(os.listdir(checkpoint_dir)):
            if name.startswith('run_') and name.endswith('.json'):
                with open(osp.join(checkpoint_dir, name)) as handle:
                    run = json.load(handle)
                found[(run['model'], run['seed'])] = run
    for run in fresh:
        found[(run['model'], run['seed'])] = run
    if not found:
        raise ExampleError(f"no finished runs under {checkpoint_dir}")
    return list(found.values())


def grid_of(args, models: Sequence[str], checkpoint_name: str) -> None:
    r"""Turns an experiment's ``--models`` and ``--seeds`` into lists (every
    model name checked) and defaults ``--checkpoint-dir`` to
    ``~/.cache/hsa_geo/checkpoints/<checkpoint_name>``, outside the work
    tree, so that a later session can resume."""
    args.models = [m for m in args.models.split(',') if m]
    for name in args.models:
        if name not in models:
            raise ExampleError(f"unknown model {name!r}; choose from {list(models)}")
    args.seeds = [int(s) for s in args.seeds.split(',') if s]
    args.checkpoint_dir = args.checkpoint_dir or osp.join(
        osp.expanduser('~'), '.cache', 'hsa_geo', 'checkpoints', checkpoint_name)


def run_experiment(args, load_data, train_one, report) -> Dict[str, Any]:
    r"""Trains every model of :obj:`args.models` for every seed of
    :obj:`args.seeds` (unless :obj:`args.report_only`), then writes the
    report of all finished runs (these and those other processes left
    under :obj:`args.checkpoint_dir`) to :obj:`args.out` and returns it."""
    torch.set_num_threads(args.threads)
    runs = []
    if not args.report_only:
        data = load_data(args)
        for seed in args.seeds:
            for name in args.models:
                runs.append(train_one(name, seed, data, args))
    result = report(gather_runs(args.checkpoint_dir, runs), args)
    write_json(args.out, result)
    return result


def report_header(args) -> Dict[str, Any]:
    r"""What every experiment report records besides its results: the
    options (less where files go) and the machine."""
    private = ('report_only', 'checkpoint_dir', 'out', 'data_dir')
    return {'config': {k: v for k, v in vars(args).items() if k not in private},
            'machine': {'cpu_count': os.cpu_count(), 'threads': args.threads,
                        'torch': torch.__version__}}


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


# ---------------------------------------------------------------- DDP
def init_distributed() -> Dict[str, Any]:
    r"""Rank, world size and backend from torchrun's environment (a single
    process without it). gloo on CPU, nccl on GPU."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    if world > 1:
        import torch.distributed as dist
        backend = 'nccl' if torch.cuda.is_available() and os.environ.get('HSA_GEO_FORCE_GLOO') != '1' \
            else 'gloo'
        dist.init_process_group(backend)
        return {'world_size': world, 'rank': rank, 'backend': backend,
                'local_rank': int(os.environ.get('LOCAL_RANK', '0'))}
    return {'world_size': 1, 'rank': 0, 'backend': None, 'local_rank': 0}


def mean_over_ranks(total: float, count: float, device: torch.device) -> float:
    r"""``total / count`` summed over all ranks (this process alone when not
    distributed): a training loss logged by rank 0 then covers every rank's
    graphs, not its own share."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        total, count = float(sums[0]), float(sums[1])
    return total / max(count, 1)


def finish_distributed(info: Dict[str, Any]) -> None:
    if info['world_size'] > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
