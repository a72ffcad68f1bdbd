"""The chunked output-layer loss against plain full-logits cross-entropy, and the precision choice."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64])
def test_linear_cross_entropy_matches_full_logits_in_value_and_gradient(chunk_tokens: int) -> None:
    import torch.nn.functional as F

    from homeiq_trainer.training.loss import linear_cross_entropy

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 50, (23,), generator=generator)
    upstream = torch.randn(23, 16, generator=generator, dtype=torch.float64)

    expected = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected * 0.5 + (hidden * upstream).sum(), hidden)
    # Through an op after it and one before it, as inside the model.
    ours = linear_cross_entropy(hidden * 1.0, weight, labels, chunk_tokens=chunk_tokens)
    (ours_grad,) = torch.autograd.grad(ours * 0.5 + (hidden * upstream).sum(), hidden)
    assert float(ours) == pytest.approx(float(expected), rel=1e-12)
    assert torch.allclose(ours_grad, expected_grad, rtol=1e-10, atol=1e-12)

    with torch.no_grad():  # evaluation: no gradient computed or kept
        assert float(linear_cross_entropy(hidden, weight, labels, chunk_tokens)) == pytest.approx(float(expected))


def test_far_off_targets_keep_their_whole_loss() -> None:
    """An untrained model puts targets ~100 nats below the best token: the floor must not cap that loss."""
    import torch.nn.functional as F

    from homeiq_trainer.training.loss import LOG_PROB_FLOOR, linear_cross_entropy

    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(30, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(64, 16, generator=generator, dtype=torch.float64) * 40
    labels = (hidden.detach() @ weight.T).argmin(dim=-1)  # the least likely token of each row
    expected = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    assert float(expected) / 30 > -2 * LOG_PROB_FLOOR  # far below the floor, as in the benchmarks
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    ours = linear_cross_entropy(hidden, weight, labels, chunk_tokens=8)
    (ours_grad,) = torch.autograd.grad(ours, hidden)
    assert float(ours) == pytest.approx(float(expected), rel=1e-12)
    assert torch.allclose(ours_grad, expected_grad, rtol=1e-9, atol=1e-9)


def test_linear_cross_entropy_under_bf16_autocast_stays_close() -> None:
    from homeiq_trainer.training.loss import linear_cross_entropy

    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 32, generator=generator, requires_grad=True)
    weight = torch.randn(100, 32, generator=generator) * 0.1
    labels = torch.randint(0, 100, (40,), generator=generator)
    exact = float(linear_cross_entropy(hidden, weight, labels))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = linear_cross_entropy(hidden, weight, labels)
    mixed.backward()
    assert float(mixed) == pytest.approx(exact, rel=0.02)
    assert hidden.grad is not None and hidden.grad.dtype == torch.float32


def test_hidden_states_out_swaps_only_a_plain_frozen_head_and_restores_it() -> None:
    from homeiq_trainer.training.loss import hidden_states_out

    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(4, 9, bias=False)
    model.lm_head.weight.requires_grad_(False)
    head = model.lm_head
    with hidden_states_out(model) as swapped:
        assert swapped is head and isinstance(model.lm_head, torch.nn.Identity)
    assert model.lm_head is head
    head.weight.requires_grad_(True)  # a trained output layer must keep its own gradient path
    with hidden_states_out(model) as swapped:
        assert swapped is None and model.lm_head is head


def test_cpu_bf16_detection_reads_the_flags(tmp_path: Path) -> None:
    from homeiq_trainer.training.engine import cpu_has_bf16_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_bf16_flags(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_tile amx_bf16\n")
    assert cpu_has_bf16_flags(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert not cpu_has_bf16_flags(info)
    assert not cpu_has_bf16_flags(tmp_path / "missing")


def test_auto_precision_takes_bf16_only_where_it_measures_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    from homeiq_trainer.training import engine

    monkeypatch.setattr(engine, "memory_limit_bytes", lambda: 64 * 2**30)
    monkeypatch.setattr(engine, "cpu_has_bf16_flags", lambda: True)
    monkeypatch.setattr(engine, "bf16_matmul_speedup", lambda: engine.BF16_MIN_MATMUL_SPEEDUP * 0.99)
    assert engine.pick_precision("cpu", "auto") == "fp32"  # flags without the speed (seen on a VM)
    monkeypatch.setattr(engine, "bf16_matmul_speedup", lambda: engine.BF16_MIN_MATMUL_SPEEDUP)
    assert engine.pick_precision("cpu", "auto") == "bf16"
    assert engine.pick_precision("cpu", "fp32") == "fp32"  # an explicit choice is never second-guessed
    monkeypatch.setattr(engine, "cpu_has_bf16_flags", lambda: False)
    assert engine.pick_precision("cpu", "auto") == "fp32"
    assert engine.pick_precision("cpu", "bf16") == "bf16"


def test_auto_precision_keeps_fp32_where_memory_is_short(monkeypatch: pytest.MonkeyPatch) -> None:
    from homeiq_trainer.training import engine

    monkeypatch.setattr(engine, "cpu_has_bf16_flags", lambda: True)
    monkeypatch.setattr(engine, "bf16_matmul_speedup", lambda: 4.0)
    monkeypatch.setattr(engine, "memory_limit_bytes", lambda: engine.BF16_MIN_MEMORY_BYTES - 1)
    assert engine.pick_precision("cpu", "auto") == "fp32"
    assert engine.pick_precision("cpu", "bf16") == "bf16"  # asked for, it is what the user gets
    monkeypatch.setattr(engine, "memory_limit_bytes", lambda: engine.BF16_MIN_MEMORY_BYTES)
    assert engine.pick_precision("cpu", "auto") == "bf16"
    monkeypatch.setattr(engine, "memory_limit_bytes", lambda: None)  # unknown: the speed decides
    assert engine.pick_precision("cpu", "auto") == "bf16"


def test_memory_limit_is_the_lowest_of_the_machine_and_its_control_groups(tmp_path: Path) -> None:
    from homeiq_trainer.training.engine import memory_limit_bytes

    gib = 2**30
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal:       {32 * gib // 1024} kB\nMemFree:        1024 kB\n")
    # cgroup v2, an add-on's container below a parent group: no limit anywhere yet.
    (proc / "self" / "cgroup").write_text("0::/addons/homeiq\n")
    group = cgroups / "addons" / "homeiq"
    group.mkdir(parents=True)
    (group / "memory.max").write_text("max\n")
    assert memory_limit_bytes(proc, cgroups) == 32 * gib
    (group / "memory.max").write_text(f"{3 * gib}\n")
    assert memory_limit_bytes(proc, cgroups) == 3 * gib
    (group / "memory.max").write_text("max\n")
    (group.parent / "memory.max").write_text(f"{2 * gib}\n")  # a parent's limit binds its children
    assert memory_limit_bytes(proc, cgroups) == 2 * gib
    # cgroup v1 reports "no limit" as a huge number; the machine's 4 GiB is then the limit.
    (proc / "meminfo").write_text(f"MemTotal:       {4 * gib // 1024} kB\n")
    (proc / "self" / "cgroup").write_text("5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n")
    v1 = cgroups / "memory" / "docker" / "abc"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory_limit_bytes(proc, cgroups) == 4 * gib
    (v1 / "memory.limit_in_bytes").write_text(f"{gib}\n")
    assert memory_limit_bytes(proc, cgroups) == gib
    # A v1 container whose group path is the host's, absent under its own mount: the mount's limit.
    (proc / "self" / "cgroup").write_text("4:memory:/host/path/not/mounted\n")
    (cgroups / "memory" / "memory.limit_in_bytes").write_text(f"{3 * gib}\n")
    assert memory_limit_bytes(proc, cgroups) == 3 * gib
    # A v2 container with its own cgroup namespace sees itself as the root: the limit is at the mount.
    (proc / "self" / "cgroup").write_text("0::/\n")
    (cgroups / "memory.max").write_text(f"{gib // 2}\n")
    assert memory_limit_bytes(proc, cgroups) == gib // 2
    (proc / "self" / "cgroup").write_text("garbage\n0::\n::\n")  # odd lines are skipped, not fatal
    assert memory_limit_bytes(proc, cgroups) == gib // 2
    assert memory_limit_bytes(tmp_path / "nothing", tmp_path / "nothing") is None
    # This machine: some positive amount, at most what the kernel says it has.
    here = memory_limit_bytes()
    assert here is not None and 0 < here <= int(Path("/proc/meminfo").read_text().split()[1]) * 1024


def test_a_distributed_run_trains_in_bf16_only_where_every_worker_chose_it() -> None:
    from homeiq_trainer.training.engine import agreed_precision

    def with_other_worker(choice: str) -> Callable[[list[float]], list[float]]:
        # The sum over this worker and one other that chose `choice`.
        return lambda values: [values[0] + (choice == "bf16"), values[1] + 1.0]

    assert agreed_precision("bf16", with_other_worker("bf16")) == "bf16"
    assert agreed_precision("bf16", with_other_worker("fp32")) == "fp32"
    assert agreed_precision("fp32", with_other_worker("bf16")) == "fp32"
    assert agreed_precision("bf16", lambda values: values) == "bf16"  # alone


def test_bf16_probe_measures_a_real_ratio() -> None:
    from homeiq_trainer.training.engine import bf16_matmul_speedup

    speedup = bf16_matmul_speedup.__wrapped__()
    # A timing ratio, not a constant: both multiplies ran. Without bf16 instructions it can be tiny
    # (0.008 on a 2-core AVX2 EPYC); such a CPU never runs the probe outside this test.
    assert 0 < speedup < 50 and speedup != 1.0


def test_fused_tanh_gelu_computes_the_same_function_and_replaces_every_python_one(tmp_path: Path) -> None:
    from transformers.activations import NewGELUActivation

    from homeiq_trainer.demo import build_tiny_model
    from homeiq_trainer.training.engine import fuse_tanh_gelu, load_base_model

    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    python_gelu = NewGELUActivation()
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), python_gelu)
    assert fuse_tanh_gelu(model) == 1 and type(model[1]) is not NewGELUActivation
    assert torch.allclose(model[1](x), python_gelu(x), rtol=1e-12, atol=1e-12)
    directory = build_tiny_model(tmp_path / "model")
    from transformers import AutoModelForSeq2SeqLM

    raw = AutoModelForSeq2SeqLM.from_pretrained(directory)
    assert any(isinstance(m, NewGELUActivation) for m in raw.modules())  # T5's gated-gelu, as flan-t5's
    _, base = load_base_model(str(directory), "cpu", False)
    assert not any(isinstance(m, NewGELUActivation) for m in base.modules())


def test_peak_rss_is_the_training_process_own_not_its_parents() -> None:
    """A process started by a big parent reports its own peak (getrusage would report the parent's)."""
    import subprocess
    import sys

    ballast = bytearray(400 * 2**20)
    for i in range(0, len(ballast), 4096):  # touched, so resident
        ballast[i] = 1
    child = subprocess.run(
        [sys.executable, "-c", "from homeiq_trainer.training.engine import peak_rss_mb; print(peak_rss_mb())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert 1 < float(child.stdout) < 200, child.stdout
    del ballast


def test_bf16_probe_leaves_the_global_random_state_alone() -> None:
    from homeiq_trainer.training.engine import bf16_matmul_speedup

    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    bf16_matmul_speedup.__wrapped__()
    assert torch.equal(torch.rand(4), expected)  # a run seeded before the probe draws what it would without it
