"""KD loss memory and time: chunked `distill_loss` vs the naive full-vocabulary form vs TRL's GKD loss.

    PYTHONPATH=platform python benchmarks/kd_loss.py [--vocab 32768,131072] [--positions 2048,8192]
        [--chunk-sizes 256,1024] [--max-gib G] [--reps 2] [--threads 1]

The chunked form runs at distill.chunk_size's default (`losses.default_chunk_size`: 2^22 / V
positions, 128 at a 32k vocabulary and 32 at 128k, so a chunk's tensors stay 16 MiB, but no more
than 1/32 of the target positions down to 2^21 / V; fused, at least 256) unless `--chunk-sizes` lists others.

One forward and backward of the loss from (B, T, V) student logits (float32, requires grad) and
teacher logits, for every vocabulary size V and number of positions N = B·T (rows of 512):

  * forward_kl at T = 1: `distill_loss` (chunked, each `--chunk-sizes`) vs `naive_distill_loss`;
  * jsd with beta 0.5 at T = 1: the same two vs TRL's `GKDTrainer.generalized_jsd_loss`
    (what GKD trains with; given the shifted logits and labels it expects);
  * both kinds fused (`distill.fused_lm_head`): from student hidden states (H = 256) and an lm_head
    weight (V, H), both requiring grad, the naive form computing the full logits first. No N·V
    tensor exists in the fused form, so there is no floor: its peak is the chunk's temporaries
    plus the lm_head gradient (V·H·4 bytes), which the naive form has too.

alpha is 1 (pure KD); distillery still computes its CE term for logging, TRL has none.
The losses must agree in value: the table prints the largest absolute difference to the chunked
form, and a small case checks the gradients too.

Time: process CPU seconds of one forward+backward, the least of `--reps` runs,
with `--threads` intra-op threads (default 1: on a shared machine the CPU time of one thread is far
steadier than wall time; wall seconds are recorded too).
Peak memory: every variant runs in a fresh subprocess. After the timed runs, glibc is told to map
every block of 1 MiB or more on its own (mallopt M_MMAP_THRESHOLD), so a freed tensor leaves the
resident set at once and RSS follows live tensor bytes; freed heap is returned (malloc_trim), the
kernel's peak-RSS mark is reset (`echo 5 > /proc/self/clear_refs`), and after one more
forward+backward the peak is VmHWM minus the RSS before. It sees torch's allocations (tracemalloc
would see none): the temporaries, the autograd state and the gradient of the student logits
(N·V·4 bytes, which every variant must produce, the "floor" column). The inputs are not counted.
The naive and TRL peaks repeat to the MiB from run to run; the chunked peak can differ by a few
chunk tensors (e.g. 356-464 MiB for jsd at V=32768, N=2048 with 128-position chunks).

TRL's form holds up to 16 N·V float32 tensors at once, the two inputs included (measured; the
naive one 13); with a margin, where 17 of them exceed `--max-gib` (default: the memory available at
start less 3 GiB) the number of positions is halved until it fits, the output says so, and a
cell that scales onto another cell is measured once. Targets: chunked peak at least 4x
lower than naive and TRL, at no more than 1.2x their time.
Prints a table and writes benchmarks/results/kd_loss.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from report import write_result  # same directory

ROW = 512  # positions per row: N = B·ROW
HIDDEN = 256  # student hidden size of the fused (lm_head inside the loss) variants
FULL_VOCAB_TENSORS = 17  # N·V float32 tensors at the TRL peak: 14 measured + the 2 inputs + margin


# --------------------------------------------------------------------------- one variant (subprocess)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} missing from /proc/self/status")


def measure(variant: str, kind: str, vocab: int, positions: int, chunk: int, reps: int, threads: int) -> dict:
    """Peak extra RSS, CPU and wall seconds and the loss value of one variant (see the module docstring)."""
    import ctypes
    import gc
    import time

    import torch

    from distillery.distill.losses import distill_loss, naive_distill_loss

    torch.set_num_threads(threads)
    s, t, labels = inputs(vocab, positions)
    head = None
    if variant in ("naive_fused", "fused"):  # student hidden states + lm_head instead of logits
        s, head = hidden_inputs(vocab, positions)
    if variant == "trl":
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        def loss_fn():
            return GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], labels[:, 1:], beta=0.5, temperature=1.0)
    else:
        fn = naive_distill_loss if variant.startswith("naive") else distill_loss

        def loss_fn():
            return fn(s, t, labels, kind=kind, temperature=1.0, alpha=1.0, beta=0.5, chunk_size=chunk or None, lm_head_weight=head).loss

    def once() -> tuple[float, float, float]:
        s.grad = None
        if head is not None:
            head.grad = None
        gc.collect()
        c0, w0 = time.process_time(), time.perf_counter()
        loss = loss_fn()
        loss.backward()
        return time.process_time() - c0, time.perf_counter() - w0, float(loss.detach())

    runs = [once() for _ in range(reps)]
    # Memory last: from here glibc maps every block of 1 MiB or more on its own and unmaps it when
    # freed, so RSS follows the live tensor bytes (by default freed blocks below its dynamic threshold,
    # up to 32 MiB, stay resident). Timing runs before this, with the allocator as users have it.
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    s.grad = None  # the timed runs' gradients go before the baseline, so the peak includes the new ones
    if head is not None:
        head.grad = None
    gc.collect()
    libc.malloc_trim(0)
    before = _status_bytes("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    _, _, value = once()
    peak = _status_bytes("VmHWM:") - before
    return {"peak_mib": peak / 2**20, "cpu_s": min(r[0] for r in runs), "wall_s": min(r[1] for r in runs), "loss": value}


def inputs(vocab: int, positions: int, seed: int = 0):
    """Student logits (B, ROW, V) requiring grad, teacher logits, labels with a 32-token prompt per row."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = max(positions // ROW, 1)
    width = min(positions, ROW)
    s = (torch.randn(rows, width, vocab, generator=g) * 2).requires_grad_()
    t = torch.randn(rows, width, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (rows, width), generator=g)
    labels[:, : min(32, width // 4)] = -100
    return s, t, labels


def hidden_inputs(vocab: int, positions: int, seed: int = 2):
    """Student final hidden states (B, ROW, HIDDEN) and lm_head weight (V, HIDDEN), both requiring grad."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(max(positions // ROW, 1), min(positions, ROW), HIDDEN, generator=g).requires_grad_()
    w = (torch.randn(vocab, HIDDEN, generator=g) * 2 / HIDDEN**0.5).requires_grad_()
    return h, w


def run_variant(variant: str, kind: str, vocab: int, positions: int, chunk: int, reps: int, threads: int) -> dict:
    spec = json.dumps(dict(variant=variant, kind=kind, vocab=vocab, positions=positions, chunk=chunk, reps=reps, threads=threads))
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    out = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} {kind} V={vocab} N={positions} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- gradients agree (small, in process)


def gradient_check(vocab: int = 4096, positions: int = 1024, chunk: int = 256) -> dict[str, float]:
    """Largest absolute difference of the student-logit gradients: chunked vs naive (both kinds) and vs TRL (jsd)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    from distillery.distill.losses import distill_loss, naive_distill_loss

    s, t, labels = inputs(vocab, positions, seed=1)

    def grad(loss):
        s.grad = None
        loss.backward()
        return s.grad.clone()

    out = {}
    for kind in ("forward_kl", "jsd"):
        ref = grad(distill_loss(s, t, labels, kind=kind, temperature=1.0, alpha=1.0, chunk_size=chunk).loss)
        out[f"{kind}: chunked vs naive"] = float((ref - grad(naive_distill_loss(s, t, labels, kind=kind, temperature=1.0, alpha=1.0).loss)).abs().max())
        if kind == "jsd":
            trl = grad(GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], labels[:, 1:], beta=0.5, temperature=1.0))
            out["jsd: chunked vs TRL"] = float((ref - trl).abs().max())
    return out


# --------------------------------------------------------------------------- the grid


def fit(vocab: int, positions: int, max_gib: float) -> int:
    """Positions, halved until the naive / TRL peak (FULL_VOCAB_TENSORS · N · V · 4 bytes) fits in max_gib."""
    n = positions
    while n > ROW and FULL_VOCAB_TENSORS * n * vocab * 4 > max_gib * 2**30:
        n //= 2
    return n


def chunk_label(chunk: int | None, vocab: int, positions: int, fused: bool = False) -> str:
    """The chunk size a variant ran at: given, or the default for this vocabulary and the number
    of target positions `inputs` makes (each row's prompt has none)."""
    from distillery.distill.losses import default_chunk_size

    rows, width = max(positions // ROW, 1), min(positions, ROW)
    targets = rows * (width - min(32, width // 4))
    return str(chunk) if chunk else f"{default_chunk_size(vocab, targets, fused)}*"


def available_gib() -> float:
    """MemAvailable from /proc/meminfo, GiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("MemAvailable missing from /proc/meminfo")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", default="32768,131072", help="vocabulary sizes, comma-separated")
    ap.add_argument("--positions", default="2048,8192", help="positions B·T, comma-separated")
    ap.add_argument("--chunk-sizes", default=None, help="distill_loss chunk_size values, comma-separated (default: distill.chunk_size)")
    ap.add_argument("--max-gib", type=float, default=None, help="memory the naive / TRL forms may use (default: MemAvailable less 3 GiB)")
    ap.add_argument("--reps", type=int, default=2, help="timed runs per variant (the least counts)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(measure(**spec)))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    if args.max_gib is None:
        args.max_gib = round(available_gib() - 3, 1)
    chunks = [int(c) for c in args.chunk_sizes.split(",")] if args.chunk_sizes else [0]  # 0: the default per vocabulary
    cells, seen = [], {}
    for v in (int(x) for x in args.vocab.split(",")):
        for n in (int(x) for x in args.positions.split(",")):
            used = fit(v, n, args.max_gib)
            cells.append({"vocab": v, "positions": n, "positions_used": used, "same_as": seen.get((v, used))})
            seen.setdefault((v, used), f"V={v} N={n}")
    print(f"chunk sizes {[c or 'default' for c in chunks]} (default: 2^22 / V positions, at most N/32 down to 2^21 / V, fused at least 256); up to {args.max_gib:g} GiB; {args.threads} thread(s); "
          f"peak = extra RSS of one forward+backward (fresh process); time = least CPU seconds of {args.reps} runs; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    variants = [("forward_kl", "naive", 0)] + [("forward_kl", "chunked", c) for c in chunks]
    variants += [("jsd", "naive", 0), ("jsd", "trl", 0)] + [("jsd", "chunked", c) for c in chunks]
    for kind in ("forward_kl", "jsd"):  # distill.fused_lm_head: from hidden states, lm_head included on both sides
        variants += [(kind, "naive_fused", 0)] + [(kind, "fused", c) for c in chunks]
    for cell in cells:
        v, n = cell["vocab"], cell["positions_used"]
        if cell["positions_used"] != cell["positions"]:
            cell["note"] = (f"scaled from N={cell['positions']} to {n}: the naive/TRL forms need about "
                            f"{FULL_VOCAB_TENSORS * cell['positions'] * v * 4 / 2**30:.0f} GiB > --max-gib {args.max_gib:g}")
            print(f"V={v} N={cell['positions']}: {cell['note']}" + (f"; same cell as {cell['same_as']}" if cell["same_as"] else ""), flush=True)
        if cell["same_as"]:
            continue
        cell["results"] = {}
        for kind, variant, chunk in variants:
            name = f"{kind} {variant}" + (f" c={chunk_label(chunk, v, n, variant == 'fused')}" if variant in ("chunked", "fused") else "")
            cell["results"][name] = run_variant(variant, kind, v, n, chunk, args.reps, args.threads)
            r = cell["results"][name]
            print(f"  V={v} N={n} {name:<22} peak {r['peak_mib']:8.0f} MiB  cpu {r['cpu_s']:6.2f} s  loss {r['loss']:.6f}", flush=True)

    grads = gradient_check()
    print_tables(cells, chunks, grads)
    write_result("kd_loss", {"load_average_1min": os.getloadavg()[0], "chunk_sizes": chunks, "threads": args.threads,
                             "reps": args.reps, "max_gib": args.max_gib, "row_length": ROW,
                             "peak_method": "VmHWM - VmRSS around one forward+backward in a fresh subprocess, after "
                                            "mallopt(M_MMAP_THRESHOLD, 1 MiB), malloc_trim and clear_refs=5; inputs excluded",
                             "time_method": "least process CPU seconds of one forward+backward",
                             "cells": cells, "gradient_max_abs_diff": grads})
    return 0


def print_tables(cells: list[dict], chunks: list[int], grads: dict[str, float]) -> None:
    """Per cell and chunk size: chunked peak and time as ratios against naive and TRL, and value agreement."""
    print(f"\n{'V':>7} {'N':>6} {'chunk':>6} {'loss':<16} {'floor':>6} {'peak MiB':>9} {'vs naive':>14} {'vs TRL':>14} {'max |Δloss|':>12}")
    print(f"{'':>7} {'':>6} {'':>6} {'':<16} {'MiB':>6} {'chunked':>9} {'mem↓ / time':>14} {'mem↓ / time':>14}")
    for cell in cells:
        if "results" not in cell:
            continue
        res = cell["results"]
        cell["ratios"] = {}
        cell["gradient_mib"] = cell["vocab"] * cell["positions_used"] * 4 / 2**20
        for c in chunks:
            for kind in ("forward_kl", "jsd", "forward_kl fused", "jsd fused"):
                base, fused = kind.split()[0], kind.endswith("fused")
                label = chunk_label(c, cell["vocab"], cell["positions_used"], fused)
                ours = res[f"{base} fused c={label}"] if fused else res[f"{kind} chunked c={label}"]
                naive = res[f"{base} naive_fused"] if fused else res[f"{kind} naive"]
                trl = None if fused else res.get(f"{kind} trl")
                r = {"peak_reduction_vs_naive": naive["peak_mib"] / ours["peak_mib"], "time_vs_naive": ours["cpu_s"] / naive["cpu_s"],
                     "max_abs_loss_diff": max(abs(ours["loss"] - x["loss"]) for x in (naive, trl) if x)}
                if trl:
                    r.update(peak_reduction_vs_trl=trl["peak_mib"] / ours["peak_mib"], time_vs_trl=ours["cpu_s"] / trl["cpu_s"])
                cell["ratios"][f"{kind} c={label}"] = r
                vs_trl = f"{r['peak_reduction_vs_trl']:5.1f}x / {r['time_vs_trl']:4.2f}x" if trl else "-"
                floor = cell["gradient_mib"] if not fused else 0.0
                print(f"{cell['vocab']:>7} {cell['positions_used']:>6} {label:>6} {kind:<16} {floor:>6.0f} {ours['peak_mib']:>9.0f} "
                      f"{r['peak_reduction_vs_naive']:5.1f}x / {r['time_vs_naive']:4.2f}x {vs_trl:>14} {r['max_abs_loss_diff']:>12.2e}")
    print("\nfloor: the student-logit gradient every form from logits returns (N·V·4 bytes), part of every peak;")
    print(f"  fused (distill.fused_lm_head): from hidden states (H={HIDDEN}) + lm_head, which both sides include; no N·V floor")
    print("chunk: * the default for the vocabulary (distill.chunk_size unset)")
    print("mem↓: naive (or TRL) peak / chunked peak (target >= 4x); time: chunked CPU s / theirs (target <= 1.2x)")
    print("gradient max |Δ| (V=4096, N=1024): " + ", ".join(f"{k} {v:.1e}" for k, v in grads.items()))


if __name__ == "__main__":
    raise SystemExit(main())
