"""Schedule-value validation of sde_step_logprob / guided_sde_step (issue 7, item 4).

Python-float schedules are checked always (no device work); tensor schedules only on request
(check_schedule=True or PEC_DEBUG=1), since reading them costs a host synchronisation.
"""
from __future__ import annotations

import pytest
import torch

from pec_kernels.sde import guided_sde_step, sde_step_logprob


def _inputs():
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(3, 2, 4, generator=g) for k in ("x", "v", "noise")}


def _step(sigma, sigma_next, **kw):
    t = _inputs()
    return sde_step_logprob(t["x"], t["v"], sigma, sigma_next, noise=t["noise"], backend="torch", **kw)


def _guided(sigma, sigma_next, **kw):
    t = _inputs()
    return guided_sde_step(t["x"], t["v"], t["v"], 4.5, sigma, sigma_next, noise=t["noise"], backend="torch", **kw)


@pytest.mark.parametrize("op", [_step, _guided], ids=["sde_step_logprob", "guided_sde_step"])
@pytest.mark.parametrize("sigma, sigma_next, kw, name", [
    (0.5, 0.4, dict(eta=-0.1), "eta"),
    (0.5, 0.4, dict(eta=float("nan")), "eta"),
    (0.0, 0.0, dict(kind="flow"), "sigma"),            # σ = 0 divides by zero in the flow step
    (1.2, 0.5, dict(kind="flow"), "sigma"),
    (-0.1, 0.0, dict(kind="dance"), "sigma"),
    (1.5, 0.5, dict(kind="cps"), "sigma"),
    (float("nan"), 0.5, dict(), "sigma"),
    (0.5, 0.5, dict(), "sigma_next"),                  # σ' = σ: not a step down the schedule
    (0.5, 0.6, dict(), "sigma_next"),
    (0.5, -0.1, dict(), "sigma_next"),
    (0.0, 0.0, dict(kind="dance"), "sigma_next"),      # σ = 0 is allowed for dance, but then no σ' < σ exists
    (torch.full((3,), 0.5), 1.0, dict(), "sigma_next"),  # float σ' checked against σ ≤ 1 when σ is a tensor
    (torch.full((3,), 0.5), -0.2, dict(), "sigma_next"),
])
def test_float_schedule_errors_name_the_argument(op, sigma, sigma_next, kw, name):
    with pytest.raises(ValueError) as info:
        op(sigma, sigma_next, **kw)
    assert str(info.value).startswith(f"{name} must be"), str(info.value)


@pytest.mark.parametrize("sigma, sigma_next, kind", [
    (1.0, 0.9, "flow"), (0.05, 0.0, "flow"), (0.5, 0.0, "dance"), (1.0, 0.0, "cps"), (0.3, 0.2, "cps"),
])
def test_valid_float_schedules_pass(sigma, sigma_next, kind):
    out = _step(sigma, sigma_next, kind=kind, eta=0.0 if kind == "cps" else 0.7)
    assert torch.isfinite(out.log_prob).all()


BAD_TENSORS = [
    (torch.tensor([0.5, 0.0, 0.3]), torch.tensor([0.4, 0.0, 0.2]), "sigma"),
    (torch.tensor([0.5, 1.5, 0.3]), torch.tensor([0.4, 0.5, 0.2]), "sigma"),
    (torch.tensor([0.5, 0.6, 0.3]), torch.tensor([0.4, 0.6, 0.2]), "sigma_next"),
    (torch.tensor(0.5), torch.tensor([0.4, 0.2, -0.1]), "sigma_next"),
    (0.5, torch.tensor([0.4, 0.7, 0.1]), "sigma_next"),
]


@pytest.mark.parametrize("sigma, sigma_next, name", BAD_TENSORS)
def test_tensor_schedules_are_checked_only_on_request(monkeypatch, sigma, sigma_next, name):
    monkeypatch.delenv("PEC_DEBUG", raising=False)
    _step(sigma, sigma_next)  # default: never read on the host, so never rejected
    with pytest.raises(ValueError) as info:
        _step(sigma, sigma_next, check_schedule=True)
    assert str(info.value).startswith(f"{name} must be"), str(info.value)
    monkeypatch.setenv("PEC_DEBUG", "1")
    with pytest.raises(ValueError, match=f"^{name} must be"):
        _guided(sigma, sigma_next)
    _step(sigma, sigma_next, check_schedule=False)  # an explicit False wins over PEC_DEBUG


def test_valid_tensor_schedule_passes_the_debug_check():
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.1]), torch.tensor([0.9, 0.3, 0.0])
    out = _step(sigma, sigma_next, check_schedule=True, sigma_max=0.95)
    assert torch.isfinite(out.log_prob).all()


def _guided_scales(guidance_scale, guidance_weight, **kw):
    t = _inputs()
    return guided_sde_step(t["x"], t["v"], t["v"], guidance_scale, 0.5, 0.4, guidance=t["v"],
                           guidance_weight=guidance_weight, noise=t["noise"], backend="torch", **kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["guidance_scale", "guidance_weight"])
def test_non_finite_guidance_floats_name_the_argument(monkeypatch, name, bad):
    """A NaN or infinite guidance float makes every sample NaN; it is refused like sigma and eta, always."""
    monkeypatch.delenv("PEC_DEBUG", raising=False)
    scales = {"guidance_scale": 4.5, "guidance_weight": 0.05, name: bad}
    with pytest.raises(ValueError, match=f"^{name} must be a finite number, got {bad!r}$"):
        _guided_scales(**scales)


@pytest.mark.parametrize("name", ["guidance_scale", "guidance_weight"])
def test_guidance_tensors_are_checked_only_on_request(monkeypatch, name):
    monkeypatch.delenv("PEC_DEBUG", raising=False)
    scales = {"guidance_scale": torch.full((3,), 4.5), "guidance_weight": torch.full((3,), 0.05)}
    out = _guided_scales(**scales, check_schedule=True)  # finite tensors pass the debug check
    assert torch.isfinite(out.log_prob).all()
    scales[name] = torch.tensor([0.1, float("inf"), 0.2])
    _guided_scales(**scales)  # default: never read on the host, so never rejected
    with pytest.raises(ValueError, match=f"^{name} must be finite; check_schedule found values in"):
        _guided_scales(**scales, check_schedule=True)
    monkeypatch.setenv("PEC_DEBUG", "1")
    with pytest.raises(ValueError, match=f"^{name} must be finite"):
        _guided_scales(**scales)
