"""Bad input to the window algorithms and GRPO-Guard through `pec.train`'s main (`--algorithm mixgrpo`,
`flow_grpo_fast`): each refused before any work, exit status 2, one line naming the setting, no traceback.
(Resuming MixGRPO under settings that move its window: tests/test_mixgrpo_algorithm.py.)"""
import pytest

from pec.train import main


def _refusal(argv, capsys, tmp_path) -> str:
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["--run-dir", str(run_dir), "--device", "cpu", *argv])
    message = capsys.readouterr().err
    assert exit_info.value.code == 2, message  # input refused before any work
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1, message
    assert not run_dir.exists()
    return message


MIX = ["--algorithm", "mixgrpo"]
FAST = ["--algorithm", "flow_grpo_fast"]


@pytest.mark.parametrize("argv, words", [
    ([*MIX, "--sampling.sde_window", "0", "2"],
     "sampling.sde_window fixes Flow-GRPO's SDE steps, but --algorithm mixgrpo places its own window (--mixgrpo.*)"),
    ([*FAST, "--sampling.sde_window", "0", "2"], "--algorithm flow_grpo_fast places its own window"),
    # the MixGRPO scripts' timestep_fraction 0.6 fed to the one rule: windows from step 15 on would train nothing
    ([*MIX, "--sampling.num_steps", "25", "--train.timestep_fraction", "0.6"],
     "mixgrpo (strategy progressive, limit 23) lets the window start at step 22, but only steps before 15 can train"),
    ([*MIX, "--sampling.num_steps", "4", "--sampling.kind", "cps", "--mixgrpo.limit", "4", "--mixgrpo.window_size",
      "1"], "less the last step, whose noise std is 0 with kind cps"),
    ([*MIX, "--sampling.num_steps", "4", "--mixgrpo.window_size", "5"],
     "mixgrpo.window_size must be an integer in [1, 4], got 5"),
    ([*MIX, "--sampling.num_steps", "2"], "mixgrpo.limit (default num_steps - 2) must be an integer in [1, 2], got 0"),
    ([*MIX, "--mixgrpo.strategy", "sideways"], "mixgrpo.strategy"),
    ([*MIX, "--mixgrpo.strategy", "random", "--mixgrpo.window_size", "5", "--mixgrpo.limit", "4"],
     "mixgrpo.window_size 5 is larger than mixgrpo.limit 4"),
    ([*MIX, "--mixgrpo.tau_min", "5", "--mixgrpo.tau_max", "3"], "mixgrpo.tau_max must be an integer >= 5, got 3"),
    ([*FAST, "--sampling.num_steps", "4", "--flow_grpo_fast.window_range", "0", "8"],
     "flow_grpo_fast.window_range must be two integers r0 < r1 within [0, num_steps=4]"),
    ([*FAST, "--flow_grpo_fast.window_range", "0", "2"],
     "flow_grpo_fast.window_range [0, 2) holds no window of flow_grpo_fast.window_size 3"),
    ([*FAST, "--sampling.num_steps", "4", "--flow_grpo_fast.window_range", "0", "4", "--flow_grpo_fast.window_size",
      "1", "--sampling.kind", "cps"], "flow_grpo_fast.window_range [0, 4) with window_size 1 lets the window start "
                                     "at step 3, but only steps before 3 can train"),
])
def test_refused(argv, words, capsys, tmp_path):
    message = _refusal(argv, capsys, tmp_path)
    assert words in message, message
