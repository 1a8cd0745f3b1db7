r"""Wall-clock of HSA against softmax attention on real documents: the
question reviewers asked of the paper's FLOP savings.

Run from the repository root::

    python -m benchmarks.text_step [--batches 8] [--repeats 5] \
        [--out benchmarks/results/text_step.json]

Set-up: the IMDB from-scratch experiment's model and data
(``examples/imdb_hsa.py``): batches of 32 training reviews of the shipped
split, at most 256 word pieces each, packed without padding; each review
one document → sentence → word → word-piece tree (families of at most 32).
Models of width 64, 2 layers, 4 heads, in float32 on one thread. Timed, in
interleaved rounds over the same batches
(:func:`~benchmarks.timing.time_interleaved`):

* ``attention`` -- the attention alone on ready-made q, k, v ``[T, 4, 16]``
  of a batch, forward and forward+backward: :func:`hsa_geo.functional.hsa`
  over the forest against :func:`~hsa_geo.text.packed_softmax_attention`
  (SDPA on the documents padded to the batch's longest);
* ``step`` -- one training step of the whole classifier (forward, loss,
  backward; no optimiser update) for ``softmax`` and every HSA variant of
  :data:`hsa_geo.text.HSA_VARIANTS`.

Ratios to softmax are medians of per-round ratios. The attention FLOPs per
review of both (:mod:`hsa_geo.flops`) are reported beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from benchmarks.timing import machine_info, median, paired_ratio, time_interleaved
from hsa_geo.flops import hsa_flops, softmax_flops
from hsa_geo.functional import hsa
from hsa_geo.text import (HSA_VARIANTS, TextClassifier, TextCorpus, load_imdb, load_split,
                          load_wordpiece_tokenizer, packed_softmax_attention)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, DEPTH, HEADS, MAX_TOKENS, MAX_CHILDREN, BATCH = 64, 2, 4, 256, 32, 32


def load_batches(num_batches: int):
    r"""The first :obj:`num_batches` batches of 32 training reviews."""
    texts, labels = load_imdb()
    split = load_split(os.path.join(ROOT, 'datasets', 'imdb_split.json.gz'))
    ids = split['train'][:num_batches * BATCH].tolist()
    corpus = TextCorpus.from_texts([texts[i] for i in ids], torch.as_tensor(labels)[ids],
                                   load_wordpiece_tokenizer(), MAX_TOKENS, MAX_CHILDREN)
    batches = [corpus.batch(range(start, start + BATCH)) for start in range(0, len(ids), BATCH)]
    return corpus, batches


def attention_calls(batches, backward: bool) -> Dict[str, Callable[[], Any]]:
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for input_ids, _, batch, forest, _ in batches:
        q, k, v = (torch.randn(input_ids.numel(), HEADS, WIDTH // HEADS, generator=generator,
                               requires_grad=backward) for _ in range(3))
        inputs.append((q, k, v, batch, forest))

    def run(attention):
        def call():
            for q, k, v, batch, forest in inputs:
                out = attention(q, k, v, batch, forest)
                if backward:
                    out.sum().backward()
        return call if backward else torch.no_grad()(call)

    return {'softmax': run(lambda q, k, v, batch, forest: packed_softmax_attention(q, k, v, batch)),
            'hsa': run(lambda q, k, v, batch, forest: hsa(q, k, v, forest))}


def step_calls(batches) -> Dict[str, Callable[[], Any]]:
    calls = {}
    for name in ('softmax', ) + tuple(HSA_VARIANTS):
        torch.manual_seed(0)
        model = TextClassifier.from_variant(name, 30522, 2, width=WIDTH, depth=DEPTH,
                                            heads=HEADS, max_tokens=MAX_TOKENS,
                                            max_children=MAX_CHILDREN)

        def call(model=model):
            for input_ids, position, batch, forest, labels in batches:
                F.cross_entropy(model(input_ids, position, batch, forest), labels).backward()
        calls[name] = call
    return calls


def summarise(samples: Dict[str, Sequence[float]], num_batches: int) -> Dict[str, Any]:
    return {name: {'seconds_per_batch': median(values) / num_batches,
                   'ratio_to_softmax': paired_ratio(values, samples['softmax']),
                   'samples_s': list(values)}
            for name, values in samples.items()}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    corpus, batches = load_batches(args.batches)
    tokens = sum(d.num_tokens for d in corpus.documents) / len(corpus)
    flops = {'hsa': sum(hsa_flops(h, WIDTH // HEADS, heads=HEADS) for h in corpus.hierarchies),
             'softmax': sum(softmax_flops(d.num_tokens, WIDTH // HEADS, heads=HEADS)
                            for d in corpus.documents)}
    results: Dict[str, Any] = {
        'benchmark': 'text_step',
        'config': dict(vars(args), width=WIDTH, depth=DEPTH, heads=HEADS,
                       max_tokens=MAX_TOKENS, max_children=MAX_CHILDREN, batch_size=BATCH),
        'data': {'reviews': len(corpus), 'mean_tokens_per_review': tokens,
                 'attention_flops_per_review': {k: v / len(corpus) for k, v in flops.items()}},
        'machine': machine_info(),
    }
    for stage, calls in (('attention_forward', attention_calls(batches, backward=False)),
                         ('attention_forward_backward', attention_calls(batches, backward=True)),
                         ('training_step', step_calls(batches))):
        samples = time_interleaved(calls, repeats=args.repeats, warmup=1)
        results[stage] = summarise(samples, len(batches))
        print(format_stage(stage, results[stage]), flush=True)
    return results


def format_stage(stage: str, rows: Dict[str, Any]) -> str:
    lines = [f'{stage} (per batch of {BATCH} reviews, median; ratio = median per-round ratio '
             f'to softmax):']
    for name, row in rows.items():
        lines.append(f'  {name:16s} {row["seconds_per_batch"] * 1e3:8.1f} ms   '
                     f'{row["ratio_to_softmax"]:.2f}x softmax')
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batches', type=int, default=8, help='batches of 32 reviews')
    parser.add_argument('--repeats', type=int, default=5, help='timed rounds')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results',
                                                      'text_step.json'))
    args = parser.parse_args(argv)
    if args.batches < 1 or args.repeats < 1 or args.threads < 1:
        parser.error('--batches, --repeats and --threads must be at least 1')
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    results = run(args)
    results['data']['attention_flop_ratio_hsa_to_softmax'] = (
        results['data']['attention_flops_per_review']['hsa']
        / results['data']['attention_flops_per_review']['softmax'])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as handle:
        json.dump(results, handle, indent=1)
    print(f'Wrote {args.out}')
    return results


if __name__ == '__main__':
    main(sys.argv[1:])
