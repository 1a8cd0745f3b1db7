r"""Small, generic helpers for benchmarks: wall-clock timing of several
calls side by side, peak memory, one-measurement-per-process isolation and
a description of the machine.

Nothing here knows about HSA; :mod:`benchmarks.scaling` and the
other benchmarks build on it.

* :func:`time_interleaved` times several calls in rounds (every call once
  per round, warm-up first), so a burst of load from other processes hits
  all of them alike and per-round ratios (:func:`paired_ratio`) stay
  meaningful on a shared machine.
* :class:`PeakMemory` measures the peak of a region: resident set size on
  CPU (``VmHWM`` of ``/proc/self/status`` after resetting it through
  ``/proc/self/clear_refs``), :func:`torch.cuda.max_memory_allocated` on
  CUDA.
* :func:`run_isolated` runs a function in a fresh process forked from a
  fork server that has only imported modules, so each measurement's peak
  RSS is its own and start-up does not pay for ``import torch`` again.
"""
from __future__ import annotations

import datetime
import math
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

MiB = 1 << 20
GiB = 1 << 30


# -------------------------------------------------------------------- timing
def synchronize(device: Optional[torch.device] = None) -> None:
    r"""Waits for queued device work (a no-op on CPU)."""
    device = torch.device('cpu') if device is None else torch.device(device)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_interleaved(calls: Mapping[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1,
                     device: Optional[torch.device] = None, budget_s: Optional[float] = None,
                     min_sample_s: float = 1e-3, max_inner: int = 1000) -> Dict[str, List[float]]:
    r"""Seconds per call of every entry of :obj:`calls`, measured in rounds.

    Each round runs every call once, in order, so all calls see the same
    machine load. :obj:`warmup` untimed rounds come first; they also decide
    how many times a fast call runs inside one sample (enough for the sample
    to last :obj:`min_sample_s`, at most :obj:`max_inner`), whose mean is
    the sample. A call whose timed samples add up to :obj:`budget_s` leaves
    the later rounds, so slow calls get fewer (but at least one) samples;
    the samples of two calls are then comparable round by round up to the
    shorter list.

    Returns:
        ``{name: [seconds per call, one per round]}``.

    Example::

        >>> samples = time_interleaved({'sum': lambda: sum(range(100))}, repeats=3)
        >>> len(samples['sum']), samples['sum'][0] > 0
        (3, True)
    """
    if repeats < 1:
        raise ValueError(f"'repeats' must be at least 1 (got {repeats})")
    inner = {name: 1 for name in calls}
    for _ in range(warmup):
        for name, call in calls.items():
            seconds = _timed(call, 1, device)
            if seconds < min_sample_s:
                needed = math.ceil(min_sample_s / max(seconds, 1e-9))
                inner[name] = max(inner[name], min(max_inner, needed))
    samples: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            if budget_s is not None and samples[name] and sum(samples[name]) >= budget_s:
                continue
            samples[name].append(_timed(call, inner[name], device) / inner[name])
    return samples


def _timed(call: Callable[[], Any], inner: int, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(inner):
        call()
    synchronize(device)
    return time.perf_counter() - start


def median(values: Sequence[float]) -> Optional[float]:
    r"""The median of :obj:`values` (:obj:`None` when empty)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else 0.5 * (values[middle - 1] + values[middle])


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Optional[float]:
    r"""Median over rounds of ``numerator[r] / denominator[r]`` (samples
    from :func:`time_interleaved`, paired up to the shorter list).

    Example::

        >>> paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0])
        2.0
    """
    pairs = [a / b for a, b in zip(numerator, denominator) if a is not None and b]
    return median(pairs)


def loglog_slope(sizes: Sequence[float], values: Sequence[float]) -> Optional[float]:
    r"""Least-squares slope of :math:`\log` value against :math:`\log`
    size (the exponent :math:`p` of value :math:`\propto` size:math:`^p`);
    :obj:`None` with fewer than two points.

    Example::

        >>> round(loglog_slope([1, 2, 4, 8], [3, 6, 12, 24]), 6)
        1.0
    """
    points = [(math.log(s), math.log(v)) for s, v in zip(sizes, values)
              if v is not None and v > 0 and s > 0]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


# -------------------------------------------------------------------- memory
def current_rss_bytes() -> int:
    r"""Resident set size of this process now (``VmRSS``)."""
    value = _proc_status_bytes('VmRSS')
    return value if value is not None else ru_maxrss_bytes()


def peak_rss_bytes() -> int:
    r"""Peak resident set size of this process (``VmHWM``: since start or
    since the last :func:`reset_peak_rss`)."""
    value = _proc_status_bytes('VmHWM')
    return value if value is not None else ru_maxrss_bytes()


def ru_maxrss_bytes() -> int:
    r""":func:`resource.getrusage` peak RSS in bytes. On Linux it never
    resets, and a child started by fork/exec may inherit its parent's."""
    scale = 1 if sys.platform == 'darwin' else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    r"""Resets ``VmHWM`` to the current RSS (Linux >= 4.0); returns whether
    that worked."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _proc_status_bytes(field: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


class PeakMemory:
    r"""Context manager: peak memory of the enclosed region.

    On CPU: ``baseline_bytes`` is the RSS on entry, ``peak_bytes`` the
    highest RSS inside the region (absolute, so it includes the baseline),
    ``delta_bytes`` their difference and ``process_peak_bytes`` the highest
    RSS the process ever had (imports and set-up included). Without a
    resettable ``VmHWM`` the peak is the process's lifetime peak and
    ``peak_reset`` is :obj:`False`. On CUDA the same fields count
    :func:`torch.cuda.memory_allocated` bytes.

    Example::

        >>> with PeakMemory() as memory:
        ...     x = torch.ones(1 << 20)
        >>> memory.peak_bytes >= memory.baseline_bytes
        True
    """

    def __init__(self, device: Optional[torch.device] = None):
        self.device = torch.device('cpu') if device is None else torch.device(device)
        self.kind = 'cuda_allocated' if self.device.type == 'cuda' else 'rss'
        self.baseline_bytes = self.peak_bytes = self.process_peak_bytes = 0
        self.peak_reset = True

    def __enter__(self) -> 'PeakMemory':
        if self.kind == 'cuda_allocated':
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self._setup_peak = peak_rss_bytes()
            self.peak_reset = reset_peak_rss()
            self.baseline_bytes = current_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == 'cuda_allocated':
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.process_peak_bytes = self.peak_bytes
        else:
            self.peak_bytes = peak_rss_bytes()
            self.process_peak_bytes = max(self._setup_peak, self.peak_bytes)

    @property
    def delta_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes

    def as_dict(self) -> Dict[str, Any]:
        return {'kind': self.kind, 'baseline_bytes': self.baseline_bytes,
                'peak_bytes': self.peak_bytes, 'delta_bytes': self.delta_bytes,
                'process_peak_bytes': self.process_peak_bytes, 'peak_reset': self.peak_reset}


# ----------------------------------------------------------------- isolation
class IsolatedError(RuntimeError):
    r"""The isolated process raised, died (e.g. killed for memory) or timed
    out; the message says which."""


_CONTEXTS: Dict[str, Any] = {}


def run_isolated(fn: Callable, *args, preload: Sequence[str] = ('torch', ),
                 start_method: str = 'forkserver', timeout: Optional[float] = None, **kwargs):
    r"""Returns ``fn(*args, **kwargs)`` computed in a fresh process.

    With :obj:`start_method` ``'forkserver'`` the process is forked from a
    server that has imported :obj:`preload` and done nothing else, so it
    starts fast, holds no memory from earlier measurements and has its own
    peak RSS; :obj:`preload` counts only on the first call (the server lives
    as long as this process). Use ``'spawn'`` for CUDA work: a module that
    initialises CUDA on import would leave the fork server unable to fork
    CUDA-capable children. :obj:`fn` and its arguments must be picklable (a
    module-level function), and so must its result.

    Raises:
        IsolatedError: with the child's traceback, its exit signal, or the
            timeout.
    """
    context = _CONTEXTS.get(start_method)
    if context is None:
        context = _CONTEXTS[start_method] = multiprocessing.get_context(start_method)
        if start_method == 'forkserver':
            context.set_forkserver_preload(list(preload))
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_isolated_main, args=(send, fn, args, kwargs),
                                  daemon=True)
    process.start()
    send.close()
    try:
        if not receive.poll(timeout):
            process.kill()
            process.join()
            raise IsolatedError(f'{_name(fn)} timed out after {timeout} s')
        status, payload = receive.recv()
    except EOFError:
        process.join()
        code = process.exitcode
        why = (f'killed by signal {-code}' + (' (out of memory?)' if code == -9 else '')
               if code is not None and code < 0 else f'exited with code {code}')
        raise IsolatedError(f'{_name(fn)} {why} before returning a result') from None
    finally:
        receive.close()
    process.join()
    if status == 'error':
        raise IsolatedError(f'{_name(fn)} raised in the isolated process:\n{payload}')
    return payload


def _isolated_main(send, fn, args, kwargs) -> None:
    try:
        message = ('ok', fn(*args, **kwargs))
    except BaseException:  # report everything, KeyboardInterrupt included
        message = ('error', traceback.format_exc())
    send.send(message)
    send.close()


def _name(fn) -> str:
    return getattr(fn, '__qualname__', repr(fn))


# ------------------------------------------------------------------- machine
def machine_info(device: Optional[torch.device] = None) -> Dict[str, Any]:
    r"""What a timing depends on: versions, threads, cores, memory, load,
    device, date, command line and the git commit of the working tree."""
    device = torch.device('cpu') if device is None else torch.device(device)
    info: Dict[str, Any] = {
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        # orig_argv keeps '-m package.module' where argv[0] is the file path.
        'command': ' '.join([os.path.basename(sys.executable)]
                            + list(getattr(sys, 'orig_argv', sys.argv))[1:]),
        'python': platform.python_version(),
        'platform': platform.platform(),
        'processor': platform.processor() or platform.machine(),
        'torch': torch.__version__,
        'torch_threads': torch.get_num_threads(),
        'torch_interop_threads': torch.get_num_interop_threads(),
        'cpu_count': os.cpu_count(),
        'cpu_affinity': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
        'memory_total_bytes': _meminfo_bytes('MemTotal'),
        'load_average': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None,
        'device': str(device),
    }
    for module in ('torch_geometric', 'torch_scatter'):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    if device.type == 'cuda':
        info['cuda_device'] = torch.cuda.get_device_name(device)
        info['cuda_version'] = torch.version.cuda
    info.update(_git_state())
    return info


def _meminfo_bytes(field: str) -> Optional[int]:
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _git_state() -> Dict[str, Any]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=here, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                               cwd=here, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {'git_commit': None, 'git_dirty': None}
    return {'git_commit': commit, 'git_dirty': bool(dirty.strip()) if commit else None}
