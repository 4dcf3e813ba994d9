"""Bad video input through `python -m pec.train` (its main(argv), in-process): a reward that scores videos only
(the rule reward `temporal_smoothness`, or a reward server whose health check says `"video": true`) with an
image model, and a video pooling that does not exist, are refused before any weight loads or any run folder is
made, with exit code 2 and one line naming the option. (A frame count the VAE cannot take and a folder of
another pipeline class: tests/bad_input/test_bad_wan.py.)"""
import pytest

from pec.rewards import build_reward
from pec.rewards.serve import start_server
from pec.train import main as train_main


def _refused(argv: list[str], run_dir, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        train_main([*argv, "--device", "cpu", "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("pec.train: ") and str(info.value) == line, err
    assert not run_dir.exists()
    return line


@pytest.mark.parametrize("spec", ["temporal_smoothness", "digit:1.0,temporal_smoothness:0.1"])
def test_a_video_reward_with_an_image_model_is_refused(tmp_path, capsys, spec):
    line = _refused(["--reward", spec], tmp_path / "run", capsys)  # the embedded model makes images
    assert ("--reward: 'temporal_smoothness' is a video reward, and --model.name makes images: train a video model "
            "(--model.name wan)") in line


def test_a_video_reward_server_with_an_image_model_is_refused(tmp_path, capsys):
    with start_server(build_reward("temporal_smoothness"), "temporal_smoothness") as server:
        line = _refused(["--reward", "http", "--paths.reward_url", server.url], tmp_path / "run", capsys)
    assert "--reward: the reward server at --paths.reward_url serves a video reward, and --model.name makes images" \
        in line


def test_an_unknown_video_pooling_is_refused(tmp_path, capsys):
    line = _refused(["--perceptual.video_pool", "max"], tmp_path / "run", capsys)
    assert "perceptual.video_pool must be one of ['mean', 'concat'], got 'max'" in line
