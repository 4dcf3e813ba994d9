"""Bad Wan input through `python -m pec.train` (its main(argv), in-process): refused before any weight loads
or any run folder is made, with exit code 2 and one line naming the option."""
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from pec.train import main as train_main  # noqa: E402
from tests._tiny_diffusers import tiny_sd3_folder  # noqa: E402
from tests._tiny_wan import tiny_wan_folder  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wan_bad")
    return {"wan": tiny_wan_folder(tmp, "wan21"), "sd3": tiny_sd3_folder(tmp)}


@pytest.mark.parametrize("name,folder,extra,expected", [
    ("wan", "wan", ["--model.frames", "6"], "--model.frames must be 1 + a multiple of 4"),
    ("wan", "sd3", [], "--model.path must be a diffusers folder of a WanPipeline"),
    ("sd3", "wan", [], "holds a WanPipeline (model_index.json): choose the matching --model.name"),
    ("wan", "wan", ["--model.train_experts", "low"], "--model.train_experts low needs a two-expert model"),
])
def test_refused_before_any_work_in_one_line(folders, tmp_path, capsys, name, folder, extra, expected):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        train_main(["--model.name", name, "--model.path", str(folders[folder]), "--model.resolution", "32",
                    "--device", "cpu", "--run-dir", str(run_dir), *extra])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("pec.train: ") and expected in line and str(info.value) == line, err
    if name == "wan" and folder == "wan" and "--model.frames" in extra:
        assert "a frame count the VAE cannot take" in line
    assert not run_dir.exists()
