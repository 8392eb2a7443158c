"""--amp bf16: where it acts (CPUs with native bf16 matrix instructions, CUDA), what stays fp32, and how far
its losses and gradients are from fp32's. The bf16 code paths run on any CPU (emulated bf16 is only slower),
so these tests hold on a CI machine without AMX as well."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cli
from config import build_config
from dataset import LeaveOneOut
from objectives.losses import padded, padded_size, softmax_loss
from readers.logs import make_synthetic
from training import loop, run


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path,
                                                                        *a, **k))
    cli.cpu_bf16_instructions.cache_clear()
    try:
        assert cli.cpu_bf16_instructions() == ("avx512_bf16",)
    finally:
        cli.cpu_bf16_instructions.cache_clear()


@pytest.mark.parametrize("instructions, amp, device, expected", [
    (("amx_bf16",), "bf16", "cpu", torch.bfloat16),
    ((), "bf16", "cpu", None),  # emulated bf16 is slower than fp32: fp32, with a note
    (("amx_bf16",), "none", "cpu", None),
    ((), "bf16", "cuda", torch.bfloat16),  # CUDA's meaning is unchanged, whatever the CPU
])
def test_amp_dtype(monkeypatch, instructions, amp, device, expected):
    monkeypatch.setattr(cli, "cpu_bf16_instructions", lambda: instructions)
    assert cli.amp_dtype(torch.device(device), amp) == expected


def test_padded_sizes_are_eight_an_octave():
    assert [padded_size(n) for n in (1, 7, 8, 9, 16, 17, 300, 320, 321, 4590, 6400)] == \
        [1, 7, 8, 9, 16, 18, 320, 320, 352, 4608, 6656]
    for n in range(1, 5000):
        assert n <= padded_size(n) <= n * 1.125
    assert {padded_size(n) for n in range(2049, 4097)} == set(range(2304, 4097, 256))  # 8 sizes an octave
    x = torch.ones(3, 2)
    assert padded(x, 3) is x
    out = padded(x, 5, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out[:3].eq(1).all() and out[3:].eq(0).all()


@pytest.mark.parametrize("rows, pool_rows, chunk_elems", [(300, 500, 30_000), (37, 1001, 1 << 20), (5, 3, 1)])
def test_bf16_pool_matmuls_match_fp32(rows, pool_rows, chunk_elems):
    """Cosine / 0.05 logits (|logit| <= 20, the default recipe's), pool sizes that need padding, hits and
    weights: the bf16 path's loss within 0.01 of fp32's (a bf16 operand carries 8 bits: a logit of 20 moves by up
    to ~0.08, and the mean over rows averages the errors out), its gradients within 3% of the largest."""
    torch.manual_seed(0)
    q = (F.normalize(torch.randn(rows, 64), dim=-1) * 20).requires_grad_()
    pool = F.normalize(torch.randn(pool_rows, 64), dim=-1).requires_grad_()
    pos = torch.randn(rows).mul(5).requires_grad_()
    pool_ids, pos_ids = torch.randint(1, 50, (pool_rows,)), torch.randint(1, 50, (rows,))
    bias, weights = torch.randn(pool_rows), torch.rand(rows)
    results = []
    for dtype in (None, torch.bfloat16):
        loss = softmax_loss(q, pos, pool, pool_ids, pos_ids, bias, chunk_elems=chunk_elems, weights=weights,
                            matmul_dtype=dtype)
        results.append((loss, *torch.autograd.grad(loss, (q, pool, pos))))
    (loss32, *grads32), (loss16, *grads16) = results
    assert loss16.dtype == torch.float32 and loss16.isfinite()
    torch.testing.assert_close(loss16, loss32, rtol=0, atol=0.01)
    for g16, g32 in zip(grads16, grads32, strict=True):
        assert g16.dtype == torch.float32 and g16.shape == g32.shape
        assert (g16 - g32).abs().max() <= 0.03 * g32.abs().max()


def default_recipe_step(monkeypatch, amp, instructions=("amx_bf16",)):
    """The default recipe's loss at d 32 on a synthetic log: (step module, its first batch)."""
    monkeypatch.setattr(cli, "cpu_bf16_instructions", lambda: instructions)
    config = build_config(["--config", "configs/default.toml", "--data", "synthetic", "--device", "cpu",
                           "--hidden_units", "32", "--maxlen", "12", "--dropout_rate", "0", "--amp", amp,
                           "--cache_dir", ""])
    data = make_synthetic(num_users=120, num_items=90, num_topics=4, seed=3)
    split = LeaveOneOut(data)
    config, side = run.complete_config(config, data)
    torch.manual_seed(0)
    model, loss, sampler, _ = run.build(config, side, split, torch.device("cpu"))
    step = loop.make_step(model, loss, sampler, config, torch.device("cpu"))
    return step, next(iter(loop.training_batches(split, config, sampler).epoch(np.random.default_rng(0))))


def test_a_bf16_step_runs_the_encoder_in_bf16_and_the_loss_in_fp32(monkeypatch):
    step32, batch = default_recipe_step(monkeypatch, "none")
    step16, _ = default_recipe_step(monkeypatch, "bf16")
    seen = []
    step16.model.blocks[0].attn.qkv.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
    loss32, loss16 = step32(batch).loss, step16(batch).loss
    assert seen == [torch.bfloat16] and loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 0.01 * abs(loss32.item())
    loss16.backward()
    grads = [p.grad for p in step16.model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and g.isfinite().all() for g in grads)


def test_no_native_bf16_trains_in_fp32_and_says_so_in_one_line(monkeypatch, capsys, tmp_path):
    from main import main
    monkeypatch.setattr(cli, "cpu_bf16_instructions", lambda: ())
    flags = ["--data", "synthetic", "--device", "cpu", "--maxlen", "10", "--hidden_units", "16", "--num_blocks",
             "1", "--num_epochs", "1", "--cache_dir", "", "--use_infonce"]
    weights = []
    for amp in ("none", "bf16"):
        main(flags + ["--amp", amp, "--run_dir", str(tmp_path / amp)])
        weights.append(torch.load(tmp_path / amp / "ckpt" / "last.pt", weights_only=True)["model"])
    notes = [line for line in capsys.readouterr().out.splitlines() if "--amp" in line]
    assert notes == ["note: --amp bf16: this CPU has no native bf16 matrix instructions (amx_bf16 / avx512_bf16 in "
                     "/proc/cpuinfo), where bf16 is slower than fp32; training in fp32"]
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=0, atol=0)
