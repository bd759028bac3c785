"""`train.precision` through the loop's own code: the Worker's model setup (load dtype, FSDP2 policy,
autocast), its optimiser step (loss scaling, overflow skips), on CPU and without Ray.

A `Worker` is built without its Ray constructor (`bare_worker`): rank 0 of a one-process gloo group
for FSDP2, the prepared tiny split as its micro-batches. Everything after that (`_setup_model`,
`_setup_optimizer`, `train_step`) is the code a Ray Train worker runs.
"""

from __future__ import annotations

import socket
import time

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from distillery.config import ConfigError, load_config
from distillery.train.checkpoint import MetricsLog, TrainState
from distillery.train.collate import collate
from distillery.train.finetune import FINETUNE
from distillery.train.loop import Worker
from distillery.train.parallel import unwrap

STEPS = 20
BATCH = 8


@pytest.fixture(scope="module")
def gloo_group():
    """A one-process gloo group: what FSDP2 needs to wrap, as in a one-worker CPU run."""
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def batches(prepared_tiny, tiny_student):
    """STEPS micro-batches of the prepared train split, collated as `micro_batches` does."""
    from distillery.models.load import load_tokenizer

    rows = pq.read_table(prepared_tiny / "train" / "part-0.parquet", columns=["row_id", "input_ids", "labels"]).to_pylist()
    pad = load_tokenizer(tiny_student).pad_token_id
    out = []
    for i in range(STEPS):
        chunk = rows[i * BATCH:(i + 1) * BATCH]
        out.append(collate({k: [r[k] for r in chunk] for k in ("row_id", "input_ids", "labels")}, pad, 128))
    return out


def bare_worker(tmp_path, model_path, batches, *overrides: str) -> Worker:
    cfg = load_config(overrides=[f"output_dir={tmp_path}", f"model.path={model_path}", "train.scheduler=constant",
                                 "train.max_grad_norm=null", f"train.batch_size={BATCH}", *overrides])
    tmp_path.mkdir(parents=True, exist_ok=True)
    w = Worker.__new__(Worker)
    w.cfg, w.method, w.total_steps, w.gate = cfg, FINETUNE, STEPS, None
    w.rank, w.world, w.device = 0, 1, torch.device("cpu")
    w._setup_model()
    w._setup_optimizer()
    w.state, w.log = TrainState(), MetricsLog(cfg, 0, 0)
    w.stream = iter(batches)
    w.t_last, w.tokens_since = time.perf_counter(), 0.0
    return w


def weights(w: Worker) -> dict[str, torch.Tensor]:
    """Full (unsharded) parameters, as stored (their own dtype)."""
    out = {}
    for name, p in unwrap(w.model).named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().clone()
    return out


def train(tmp_path, model_path, batches, *overrides: str):
    torch.manual_seed(0)
    w = bare_worker(tmp_path, model_path, batches, *overrides)
    before = weights(w)
    compute: list[torch.dtype] = []
    probe = next(m for m in unwrap(w.model).modules() if isinstance(m, torch.nn.Linear))
    probe.register_forward_hook(lambda m, i, o: compute.append(o.dtype))
    losses = [w.train_step()["loss"] for _ in range(STEPS)]
    return w, losses, before, weights(w), compute[0]


@pytest.mark.parametrize("strategy", ["fsdp", "none"])
def test_bf16_mixed_precision_trains_like_fp32_on_fp32_weights(tmp_path, gloo_group, tiny_student, batches, strategy):
    """bf16 mixed precision (FSDP2 policy, or autocast without a wrapper) computes in bf16 from fp32
    weights, which the optimiser updates in fp32, and its losses follow fp32's over 20 steps."""
    common = [f"train.strategy={strategy}", "train.lr=3e-3"]
    _, ref, _, _, ref_compute = train(tmp_path / "fp32", tiny_student, batches, *common, "train.precision=fp32")
    w, mixed, _, after, compute = train(tmp_path / "bf16", tiny_student, batches, *common, "train.precision=bf16")
    assert ref_compute == torch.float32 and compute == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in after.values())  # fp32 master weights
    assert all(s["exp_avg"].dtype == torch.float32 for s in w.optimizer.state.values())
    gap = max(abs(a - b) for a, b in zip(ref, mixed))
    print(f"\n{strategy}: loss fp32 {ref[0]:.4f} -> {ref[-1]:.4f}, bf16 {mixed[0]:.4f} -> {mixed[-1]:.4f}, largest gap {gap:.4f}")
    assert ref[-1] < ref[0] - 0.5 and mixed[-1] < mixed[0] - 0.5, (ref, mixed)  # both learn
    assert gap < 0.05, (gap, ref, mixed)


def test_pure_bf16_rounds_small_updates_away_and_mixed_keeps_them(tmp_path, gloo_group, tiny_student, batches):
    """At a small lr most AdamW updates are below bf16's resolution for the weight they change: pure
    bf16 (`bf16-pure`) rounds them away, and its weights drift from fp32's path; mixed bf16 updates
    fp32 master weights and follows fp32 closely."""
    lr = ["train.lr=1e-5"]
    _, _, b32, a32, _ = train(tmp_path / "fp32", tiny_student, batches, *lr, "train.precision=fp32")
    _, _, bmix, amix, _ = train(tmp_path / "mixed", tiny_student, batches, *lr, "train.precision=bf16")
    _, _, bpure, apure, _ = train(tmp_path / "pure", tiny_student, batches, *lr, "train.precision=bf16-pure")
    assert all(t.dtype == torch.bfloat16 for t in apure.values())
    assert all(t.dtype == torch.float32 for t in amix.values())

    def flat(after, before):
        return torch.cat([(after[k].float() - before[k].float()).flatten() for k in sorted(after)])

    d32, dmix, dpure = flat(a32, b32), flat(amix, bmix), flat(apure, bpure)
    mixed_err = float((dmix - d32).norm() / d32.norm())
    pure_err = float((dpure - d32).norm() / d32.norm())
    # Weights fp32 moves (embedding rows of tokens never seen do not move in any mode).
    moved = d32 != 0
    kept_mixed, kept_pure = float((dmix[moved] != 0).float().mean()), float((dpure[moved] != 0).float().mean())
    print(f"\nupdate's deviation from fp32's (relative): mixed {mixed_err:.3f}, pure {pure_err:.3f}; "
          f"of the weights fp32 moved, moved too: mixed {kept_mixed:.3f}, pure {kept_pure:.3f}")
    assert mixed_err < 0.2 and kept_mixed > 0.99
    assert pure_err > 0.5 and pure_err > 4 * mixed_err and kept_pure < 0.5


def test_fp16_scales_the_loss_and_skips_an_overflowed_step(tmp_path, tiny_student, batches):
    """fp16 (GPU-only in a run, but its GradScaler works on CPU): an overflow of the scaled gradients
    skips the step without counting it as a divergence and halves the scale; later steps train."""
    w = bare_worker(tmp_path, tiny_student, batches, "train.strategy=none", "train.precision=fp16", "train.lr=1e-3")
    w.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)  # overflows fp16 on the first backward
    before = weights(w)
    first = w.train_step()
    assert first["skipped"] == 1 and first["grad_scale"] == 2.0 ** 119 and w.state.nonfinite_in_row == 0
    assert all(torch.equal(before[k], v) for k, v in weights(w).items())
    w.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    records = [w.train_step() for _ in range(5)]
    assert not any(r.get("skipped") for r in records) and all(r["grad_scale"] == 2.0 ** 8 for r in records)
    after = weights(w)
    assert all(t.dtype == torch.float32 for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)


def test_fp16_on_cpu_and_precision_names_fail_before_ray(tmp_path):
    from distillery.train.run import validate_training

    with pytest.raises(ConfigError, match="train.precision: fp16 .* needs train.use_gpu"):
        validate_training(load_config(overrides=[f"output_dir={tmp_path}", "train.precision=fp16"]), FINETUNE)
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(overrides=["train.precision=bfloat16"])
