"""Throughput of mc2sim's matmul kernels against a numpy float32 GEMM of the same FLOPs.

Each case times a kernel and its baseline in the same process, alternating rep by rep
(ABAB...) after one warm-up call of each, so drift of a noisy machine hits both alike. Every
timed call is preceded by a short idle pause (``--pause``, 0.2 s): numpy's OpenBLAS threads
and torch's OpenMP threads spin for a while after a call, and without the pause each library
runs against the other's spinning threads (on 2 cores this halves torch's GEMM rate). The
table gives GFLOP/s from the median times (FLOPs = 2 * rows * k * n of the kernel's matmul)
and their ratio, checked against the case's target:

* grouped_matmul (bfloat16, float16) and weight_quant_batchmatmul (bfloat16 x, int8 weight,
  per-channel scale): >= 0.70 of numpy float32 GEMM;
* quant_matmul (int8 -> float16 / bfloat16, exact int32 accumulation): >= 0.50;
* incre_flash_attention decode with page attention (B=4, N=32, N_kv=8, D=128, S=8192,
  block 128) within 2x of float32 ``scaled_dot_product_attention`` on the dense inputs
  (ratio >= 0.50; its GFLOP/s count 4 * B * N * S * D).

    python scripts/bench_kernels.py --reps 7

``--device cuda`` times every kernel on the GPU against torch's plain op of the same FLOPs on
the same GPU (the kernels compute where their inputs live): one ``torch.matmul`` in the
inputs' dtype for grouped_matmul and weight_quant_batchmatmul, ``torch._int_mm`` for
quant_matmul, ``scaled_dot_product_attention`` on the dense float16 inputs for
incre_flash_attention. A rep runs ``--iters`` calls between two synchronizations; the GPU
targets: grouped_matmul bfloat16 >= 0.70, incre_flash_attention within 2x (>= 0.50); the
other GPU rows are reported without a target.

    python scripts/bench_kernels.py --device cuda --reps 7

More cases plug in by appending a ``Case`` to ``CASES``: a name and a function from the
parsed arguments to a list of ``Row``.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mc2sim.kernels.grouped_matmul import grouped_matmul
from mc2sim.kernels.ifa import incre_flash_attention
from mc2sim.kernels.quant_matmul import quant_matmul
from mc2sim.kernels.weight_quant import weight_quant_batchmatmul

GEMM_TARGET = 0.70
"""Float kernels (grouped_matmul, weight_quant_batchmatmul) vs numpy float32 GEMM."""
QUANT_TARGET = 0.50
"""quant_matmul (exact integer accumulation) vs numpy float32 GEMM."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Row:
    """One line of the table: a kernel against its baseline."""

    case: str
    """Kernel and variant, e.g. ``grouped_matmul bf16``."""
    shape: str
    """The problem size in words."""
    seconds: float
    """Median time of the kernel."""
    baseline_seconds: float
    """Median time of the baseline."""
    flops: float
    """Floating-point operations of one call (2 * m * k * n)."""
    target: float | None
    """Lowest acceptable ``baseline_seconds / seconds``; None: reported, not checked."""

    @property
    def ratio(self) -> float:
        """Kernel throughput over baseline throughput."""
        return self.baseline_seconds / self.seconds

    @property
    def passed(self) -> bool:
        """Whether the ratio reaches the target (always, without one)."""
        return self.target is None or self.ratio >= self.target


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    """A named benchmark case."""

    name: str
    """Name used by ``--cases``."""
    run: Callable[[argparse.Namespace], list[Row]]
    """Time the case and return its rows."""


def time_pair(
    kernel: Callable[[], object],
    baseline: Callable[[], object],
    reps: int,
    pause: float = 0.2,
) -> tuple[float, float]:
    """Median seconds of ``kernel`` and ``baseline``, interleaved rep by rep after a warm-up.

    Args:
        kernel: the call under test.
        baseline: the reference call.
        reps: timed repetitions of each (>= 1).
        pause: idle seconds before each timed call, so the other library's worker threads
            stop spinning first.

    Returns:
        ``(kernel_median, baseline_median)`` in seconds.

    """
    kernel()
    baseline()
    k_times: list[float] = []
    b_times: list[float] = []
    for _ in range(reps):
        for fn, times in ((baseline, b_times), (kernel, k_times)):
            time.sleep(pause)
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(k_times), statistics.median(b_times)


def time_pair_cuda(
    kernel: Callable[[], object],
    baseline: Callable[[], object],
    reps: int,
    iters: int,
) -> tuple[float, float]:  # pragma: no cover - needs a GPU
    """Median seconds per call on the GPU, ``iters`` calls per rep between synchronizations.

    Args:
        kernel: the call under test.
        baseline: the reference call.
        reps: timed repetitions of each (>= 1), interleaved.
        iters: calls per repetition.

    Returns:
        ``(kernel_median, baseline_median)`` in seconds per call.

    """
    for fn in (kernel, baseline):
        for _ in range(2):
            fn()
    torch.cuda.synchronize()
    k_times: list[float] = []
    b_times: list[float] = []
    for _ in range(reps):
        for fn, times in ((baseline, b_times), (kernel, k_times)):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / iters)
    return statistics.median(k_times), statistics.median(b_times)


def timed(
    args: argparse.Namespace, kernel: Callable[[], object], baseline: Callable[[], object]
) -> tuple[float, float]:
    """Time a kernel and its baseline on the selected device."""
    if args.device == "cuda":  # pragma: no cover - needs a GPU
        return time_pair_cuda(kernel, baseline, args.reps, args.iters)
    return time_pair(kernel, baseline, args.reps, args.pause)


def torch_gemm(
    m: int, k: int, n: int, dtype: torch.dtype, device: str, seed: int = 0
) -> Callable[[], object]:
    """Return a call of torch's plain ``(m, k) @ (k, n)`` in ``dtype`` on ``device``.

    Args:
        m: rows.
        k: reduction length.
        n: columns.
        dtype: the operands' dtype (int8: ``torch._int_mm``, int32 result).
        device: where the operands live.
        seed: random seed.

    Returns:
        A zero-argument callable.

    """
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        a8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen).to(device)
        b8 = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=gen).to(device)
        return lambda: torch._int_mm(a8, b8)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    return lambda: torch.matmul(a, b)


def gemm_baseline(
    args: argparse.Namespace, m: int, k: int, n: int, dtype: torch.dtype
) -> Callable[[], object]:
    """The baseline GEMM: numpy float32 on the CPU, torch's plain op in ``dtype`` on the GPU."""
    if args.device == "cuda":
        return torch_gemm(m, k, n, dtype, args.device)
    return numpy_gemm(m, k, n)


def numpy_gemm(m: int, k: int, n: int, seed: int = 0) -> Callable[[], object]:
    """Return a call of a float32 ``(m, k) @ (k, n)`` numpy GEMM on fixed random inputs.

    Args:
        m: rows.
        k: reduction length.
        n: columns.
        seed: random seed.

    Returns:
        A zero-argument callable.

    """
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    return lambda: a @ b


def case_grouped_matmul(args: argparse.Namespace) -> list[Row]:
    """grouped_matmul with 8 experts and uneven counts, bfloat16 and float16."""
    experts, rows, h, n = 8, args.gmm_rows, args.k, args.n // 2
    rng = np.random.default_rng(1)
    counts = rng.multinomial(rows, rng.dirichlet(np.full(experts, 4.0))).tolist()
    shape = f"A={rows} H={h} N={n} e={experts} counts={counts}"
    out = []
    gen = torch.Generator().manual_seed(2)
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        x = torch.randn(rows, h, generator=gen).to(device=args.device, dtype=dtype)
        w = (torch.randn(experts, h, n, generator=gen) * 0.02).to(device=args.device, dtype=dtype)
        baseline = gemm_baseline(args, rows, h, n, dtype)
        t_k, t_b = timed(args, _bind_gmm(x, w, counts), baseline)
        on_gpu = args.device == "cuda"
        out.append(
            Row(
                case=f"grouped_matmul {label}",
                shape=shape,
                seconds=t_k,
                baseline_seconds=t_b,
                flops=2.0 * rows * h * n,
                target=GEMM_TARGET if not on_gpu or dtype == torch.bfloat16 else None,
            )
        )
    return out


def _bind_gmm(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> Callable[[], object]:
    return lambda: grouped_matmul(x, w, counts)


def case_weight_quant(args: argparse.Namespace) -> list[Row]:
    """weight_quant_batchmatmul: bfloat16 x, int8 weight, per-channel scale and offset."""
    m, k, n = args.m, args.k, args.n
    gen = torch.Generator().manual_seed(3)
    dev = args.device
    x = torch.randn(m, k, generator=gen).to(device=dev, dtype=torch.bfloat16)
    w = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=gen).to(dev)
    scale = (torch.rand(n, generator=gen) * 0.01).to(device=dev, dtype=torch.bfloat16)
    offset = torch.randn(n, generator=gen).to(device=dev, dtype=torch.bfloat16)
    t_k, t_b = timed(
        args,
        lambda: weight_quant_batchmatmul(x, w, scale, offset),
        gemm_baseline(args, m, k, n, torch.bfloat16),
    )
    return [
        Row(
            case="weight_quant_batchmatmul bf16/int8",
            shape=f"m={m} k={k} n={n} per-channel",
            seconds=t_k,
            baseline_seconds=t_b,
            flops=2.0 * m * k * n,
            target=GEMM_TARGET if dev == "cpu" else None,
        )
    ]


def case_quant_matmul(args: argparse.Namespace) -> list[Row]:
    """quant_matmul on full-range int8 inputs, float16 and bfloat16 output."""
    m, k, n = args.m, args.k, args.n
    gen = torch.Generator().manual_seed(4)
    dev = args.device
    x1 = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen).to(dev)
    x2 = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=gen).to(dev)
    scale = (torch.rand(n, generator=gen) * 1e-4).to(dev)
    pertoken = torch.rand(m, generator=gen).to(dev)
    baseline = gemm_baseline(args, m, k, n, torch.int8)
    variants: list[tuple[str, Callable[[], object]]] = [
        ("int8->fp16", lambda: quant_matmul(x1, x2, scale, output_dtype=torch.float16)),
        (
            "int8->bf16 pertoken",
            lambda: quant_matmul(
                x1, x2, scale, pertoken_scale=pertoken, output_dtype=torch.bfloat16
            ),
        ),
    ]
    out = []
    for label, kernel in variants:
        t_k, t_b = timed(args, kernel, baseline)
        out.append(
            Row(
                case=f"quant_matmul {label}",
                shape=f"m={m} k={k} n={n}",
                seconds=t_k,
                baseline_seconds=t_b,
                flops=2.0 * m * k * n,
                target=QUANT_TARGET if dev == "cpu" else None,
            )
        )
    return out


IFA_TARGET = 0.50
"""incre_flash_attention may take at most twice SDPA's time: SDPA throughput / IFA >= 0.5."""


def _paged(dense: torch.Tensor, block: int, perm: torch.Tensor, heads_first: bool) -> torch.Tensor:
    """Scatter a dense ``(B, N_kv, S, D)`` cache into shuffled page blocks."""
    batch, heads, seq, dim = dense.shape
    blocks = seq // block
    pages = dense.reshape(batch, heads, blocks, block, dim)
    if heads_first:  # (blocknum, N_kv, blockSize, D)
        pages = pages.permute(0, 2, 1, 3, 4).reshape(batch * blocks, heads, block, dim)
    else:  # (blocknum, blockSize, H)
        pages = pages.permute(0, 2, 3, 1, 4).reshape(batch * blocks, block, heads * dim)
    cache = torch.empty_like(pages)
    cache[perm] = pages
    return cache


def case_ifa(args: argparse.Namespace) -> list[Row]:
    """incre_flash_attention decode (fp16 inputs) against float32 SDPA on the dense inputs.

    The contract case is page attention at B=4 (``--ifa-batch``), N=32, N_kv=8, D=128,
    S=8192, block 128, with both cache layouts; the dense BNSD row is for reference. Baseline:
    ``torch.nn.functional.scaled_dot_product_attention`` in float32 with ``enable_gqa``.
    """
    batch, heads, kv_heads, dim, seq, block = args.ifa_batch, 32, 8, 128, 8192, 128
    gen = torch.Generator().manual_seed(0)
    dev = args.device
    q = torch.randn(batch, heads, 1, dim, generator=gen)
    k = torch.randn(batch, kv_heads, seq, dim, generator=gen)
    v = torch.randn(batch, kv_heads, seq, dim, generator=gen)
    q16, k16, v16 = q.half().to(dev), k.half().to(dev), v.half().to(dev)
    if dev == "cuda":  # torch's SDPA in the inputs' dtype on the GPU
        q, k, v = q16, k16, v16
    scale = 1.0 / math.sqrt(dim)
    flops = 4.0 * batch * heads * seq * dim  # q k^T and p v
    shape = f"B={batch} N={heads} N_kv={kv_heads} D={dim} S={seq} block={block}"

    def sdpa() -> object:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    rows = []
    for mode in ("paged_bsh", "paged_bnsd", "dense_bnsd"):
        kwargs: dict[str, Any] = {
            "num_heads": heads,
            "num_key_value_heads": kv_heads,
            "scale_value": scale,
            "actual_seq_lengths": [seq] * batch,
        }
        if mode == "dense_bnsd":
            kwargs["input_layout"] = "BNSD"
            key, value, query = k16, v16, q16
        else:
            perm = torch.randperm(batch * (seq // block), generator=gen).to(dev)
            heads_first = mode == "paged_bnsd"
            key = _paged(k16, block, perm, heads_first)
            value = _paged(v16, block, perm, heads_first)
            kwargs.update(
                block_table=perm.view(batch, -1).to(torch.int32),
                block_size=block,
                input_layout="BNSD" if heads_first else "BSH",
            )
            query = q16 if heads_first else q16.reshape(batch, 1, heads * dim)

        ifa = functools.partial(incre_flash_attention, query, key, value, **kwargs)

        seconds, base = timed(args, ifa, sdpa)
        rows.append(
            Row(
                case=f"incre_flash_attention {mode}",
                shape=shape,
                seconds=seconds,
                baseline_seconds=base,
                flops=flops,
                target=IFA_TARGET,
            )
        )
    return rows


CASES: list[Case] = [
    Case(name="grouped_matmul", run=case_grouped_matmul),
    Case(name="weight_quant", run=case_weight_quant),
    Case(name="quant_matmul", run=case_quant_matmul),
    Case(name="ifa", run=case_ifa),
]
"""The cases ``main`` runs, in order; append a ``Case`` to add one (e.g. IFA)."""


def format_table(rows: Sequence[Row], reps: int, device: str = "cpu", iters: int = 1) -> str:
    """Render the rows as a fixed-width table.

    Args:
        rows: the measured rows.
        reps: repetitions per median, for the header.
        device: where the kernels ran, for the header.
        iters: calls per repetition (GPU), for the header.

    Returns:
        The table text, header first.

    """
    lines = [
        f"# bench_kernels: median of {reps} interleaved reps, {torch.get_num_threads()} threads,"
        " baseline = numpy float32 GEMM of the same FLOPs (float32 SDPA for incre_flash_attention)"
        if device == "cpu"
        else f"# bench_kernels on {device}: median of {reps} interleaved reps of {iters} calls,"
        " baseline = torch's plain op of the same FLOPs on the same GPU (torch.matmul in the"
        " inputs' dtype, torch._int_mm for int8, float16 SDPA for incre_flash_attention)",
        f"{'case':<36}{'ms':>9}{'GFLOP/s':>9}{'base ms':>9}{'base GF/s':>10}{'ratio':>7}"
        f"{'target':>7}  check  shape",
    ]
    digits = 1 if device == "cpu" else 3
    for r in rows:
        target = "-" if r.target is None else f"{r.target:.2f}"
        check = "-" if r.target is None else ("PASS" if r.passed else "FAIL")
        lines.append(
            f"{r.case:<36}{r.seconds * 1e3:>9.{digits}f}{r.flops / r.seconds / 1e9:>9.1f}"
            f"{r.baseline_seconds * 1e3:>9.{digits}f}{r.flops / r.baseline_seconds / 1e9:>10.1f}"
            f"{r.ratio:>7.2f}{target:>7}  {check:<5}  {r.shape}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected cases and print the table.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0, or 1 when ``--strict`` is given and a row misses its target.

    """
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=7, help="timed reps per kernel (>= 5)")
    parser.add_argument("--m", type=int, default=2048, help="rows (tokens)")
    parser.add_argument("--k", type=int, default=4096, help="reduction dim (hidden size)")
    parser.add_argument("--n", type=int, default=4096, help="output columns (GMM uses n/2)")
    parser.add_argument(
        "--gmm-rows", type=int, default=4096, help="GMM rows A over 8 experts (~A/8 each)"
    )
    parser.add_argument(
        "--cases",
        nargs="*",
        choices=[c.name for c in CASES],
        default=[c.name for c in CASES],
        help="cases to run (default: all)",
    )
    parser.add_argument(
        "--pause", type=float, default=0.2, help="idle seconds before each timed call"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if a row misses its target")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where the kernels run"
    )
    parser.add_argument(
        "--ifa-batch", type=int, default=4, help="incre_flash_attention batch B (decode tokens)"
    )
    parser.add_argument(
        "--iters", type=int, default=20, help="GPU: calls per timed rep, between synchronizations"
    )
    args = parser.parse_args(argv)
    if args.reps < 5:
        parser.error("--reps must be >= 5")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    rows: list[Row] = []
    for case in CASES:
        if case.name in args.cases:
            rows.extend(case.run(args))
    print(format_table(rows, args.reps, args.device, args.iters), flush=True)
    return 1 if args.strict and not all(r.passed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
