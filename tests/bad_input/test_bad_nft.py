"""Bad input to `--algorithm nft` through `python -m pec.train`'s main: every option DiffusionNFT has no use
for, and every regulariser that needs what it lacks (log-probs, a ratio, a policy entropy), is refused
before any model loads with exit status 2 and one line that names it."""
import pytest

from pec.train import main

REFUSED = [
    (["--sampling.guidance_scale", "4.5"], "--sampling.guidance_scale must be 1 with --algorithm nft"),
    (["--model.guidance_scale_2", "3"], "--model.guidance_scale_2 must be 1 or empty with --algorithm nft"),
    (["--train.clip_range_high", "0.01"], "--train.clip_range_high (Clip-Higher) clips a PPO ratio"),
    (["--train.kl_beta", "0.04"], "use --nft.ref_coef"),
    (["--sampling.sde_window", "0", "2"], "--sampling.sde_window has no meaning with --algorithm nft"),
    (["--method", "entropy_bonus"], "--method entropy_bonus cannot run with --algorithm nft"),
    (["--method", "entropy_sample"], "--method entropy_sample cannot run with --algorithm nft"),
    (["--method", "pcgs"], "--method pcgs cannot run with --algorithm nft"),
    (["--method", "pcgs", "--pcgs.generation_density", "policy"], "--pcgs.generation_density latent_group"),
    (["--method", "clip_cov"], "--method clip_cov cannot run with --algorithm nft"),
    (["--method", "clip_cov", "--cov.variant", "perceptual"], "nft has no PPO ratio with its clip"),
    (["--method", "kl_cov"], "--method kl_cov cannot run with --algorithm nft"),
    (["--nft.decay", "3"], "nft.decay must be in [0, 2]"),
    (["--nft.solver", "rk4"], "nft.solver must be one of ['dpm2', 'euler']"),
    (["--nft.beta", "0"], "nft.beta must be > 0"),
    (["--nft.ref_coef=-1e-4"], "nft.ref_coef must be >= 0"),
    (["--nft.loss_scale", "0"], "nft.loss_scale must be > 0"),
]


@pytest.mark.parametrize("argv, words", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_refused_before_any_work_with_one_line(argv, words, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["--algorithm", "nft", "--run-dir", str(run), *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    assert line.startswith("pec.train: ") and words in line, line
    assert not run.exists()
