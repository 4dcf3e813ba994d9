"""Bad input for GARDO and DiverseGRPO (`--method gardo`, `--method diverse_grpo`) through `pec.train`'s entry
point: each refusal is one line naming the option, exit 2, before any model loads (no run folder)."""
import pytest

from pec.train import main


@pytest.mark.parametrize("argv, needle", [
    (["--method", "gardo", "--gardo.kl_coef", "0.04"], "--gardo.aux_rewards"),
    (["--method", "gardo", "--gardo.kl_coef", "0.04", "--gardo.aux_rewards", "contrast", "nosuch"],
     "--gardo.aux_rewards: unknown reward 'nosuch'"),
    (["--method", "gardo", "--gardo.scale", "group"], "gardo.scale"),
    (["--method", "gardo", "--gardo.gate_fraction", "1.5"], "gardo.gate_fraction"),
    (["--method", "diverse_grpo", "--diverse_grpo.clusters", "9"], "diverse_grpo.clusters"),
    (["--method", "diverse_grpo", "--diverse_grpo.sigma_scale", "0"], "diverse_grpo.sigma_scale"),
    (["--method", "diverse_grpo", "--algorithm", "nft"], "--diverse_grpo.reg_coef 0"),
    (["--method", "gardo", "--gardo.kl_coef", "0.04", "--gardo.aux_rewards", "contrast", "--algorithm", "nft"],
     "--gardo.kl_coef 0"),
])
def test_a_bad_setting_is_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main([*argv, "--run-dir", str(run), "--device", "cpu"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err and needle in err, err
    assert not run.exists()
