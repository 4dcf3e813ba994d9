"""Hub ids (`pec.hub`): `--model.path ORG/NAME` and `--paths.* ORG/NAME[/FILE][:REVISION]` resolved offline from
a Hugging Face cache that the test builds (tiny models, in huggingface_hub's layout: `_hub_cache`), through
`python -m pec.train`'s and `python -m pec.evaluate`'s main(argv); the commits a run records, which its resume
and evaluation load after main has moved; a revision the cache holds and one it does not; the offline-miss
line; a local folder that never touches hub code. Every test runs with sockets refused: nothing downloads."""
import ast
import contextlib
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from _hub_cache import cache_repo, commit_of  # noqa: E402
from _tiny_diffusers import tiny_clip_folder, tiny_dino_folder, tiny_sd3_folder  # noqa: E402

import pec  # noqa: E402
from pec.checks import check_run  # noqa: E402
from pec.config import PathsConfig, parse_config  # noqa: E402
from pec.evaluate import main as evaluate_main  # noqa: E402
from pec.hub import resolve_model_path, resolve_path  # noqa: E402
from pec.models import MODELS  # noqa: E402
from pec.models.embedded import EMBEDDED_DIR  # noqa: E402
from pec.perceptual import build_space, check_spaces  # noqa: E402
from pec.rewards.aesthetic import AestheticHead  # noqa: E402
from pec.train import main as train_main  # noqa: E402

MAIN, V1, DINO, CLIP, HEADS, DIGITS = (commit_of(n) for n in range(1, 7))
REPOS = ("org/tiny-sd3", "org/tiny-dino", "org/tiny-clip", "org/heads")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """HF_HOME with org/tiny-sd3 at main (MAIN) and at the tag v1 (V1); org/tiny-dino, org/tiny-clip (a CLIP of
    16-d embeddings), org/heads (a LAION aesthetic head for them, aesthetic.pth) and org/digits (the shipped
    embedded model) at main; and the local folders they were made from."""
    tmp = tmp_path_factory.mktemp("hub")
    sd3, dino, clip = tiny_sd3_folder(tmp, t5=False), tiny_dino_folder(tmp), tiny_clip_folder(tmp, "clip")
    (tmp / "heads").mkdir()
    torch.manual_seed(0)
    torch.save(AestheticHead(16).state_dict(), tmp / "heads" / "aesthetic.pth")
    cache = tmp / "hf" / "hub"
    cache_repo(cache, "org/tiny-sd3", sd3, MAIN)
    cache_repo(cache, "org/tiny-sd3", sd3, V1, refs=("v1",))
    cache_repo(cache, "org/tiny-dino", dino, DINO)
    cache_repo(cache, "org/tiny-clip", clip, CLIP)
    cache_repo(cache, "org/heads", tmp / "heads", HEADS)
    cache_repo(cache, "org/digits", EMBEDDED_DIR, DIGITS)
    return {"home": tmp / "hf", "cache": cache, "sd3": sd3, "dino": dino}


@pytest.fixture
def offline(hub, monkeypatch, tmp_path, no_network):
    """HF_HOME at the test's cache, HF_HUB_OFFLINE=1, sockets refused, and a working folder without an org/."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(hub["home"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return hub


def _sd3(run_dir: Path, *extra: str) -> list[str]:
    return ["--model.name", "sd3", "--model.path", "org/tiny-sd3", "--model.t5", "false", "--model.resolution", "16",
            "--model.dtype", "float32", "--model.max_sequence_length", "8", "--device", "cpu", "--reward", "jpeg",
            "--sampling.prompts_per_step", "2", "--sampling.group_size", "3", "--sampling.num_steps", "2",
            "--train.steps", "1", "--train.micro_batch", "3", "--logging.progress", "false",
            "--logging.tensorboard", "false", "--logging.grid_samples", "2", "--run-dir", str(run_dir), *extra]


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        train_main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@contextlib.contextmanager
def main_moved(cache: Path, repos: tuple[str, ...]):
    """refs/main of each of `repos` names a commit the cache lacks, as after a push to the hub that a later
    `hf download` would bring; restored on exit (the cache is the module's)."""
    refs = [cache / ("models--" + repo.replace("/", "--")) / "refs" / "main" for repo in repos]
    saved = [ref.read_text() for ref in refs]
    try:
        for ref in refs:
            ref.write_text(commit_of(99))
        yield
    finally:
        for ref, text in zip(refs, saved):
            ref.write_text(text)


def test_train_resume_and_evaluate_load_the_commits_the_run_recorded(offline, tmp_path, capsys):
    """One PEC step of SD3 from org/tiny-sd3, the space dino from org/tiny-dino and the reward aesthetic from a
    hub file (org/heads/aesthetic.pth) and a hub folder (org/tiny-clip); config.yaml keeps each id and records
    the commit it resolved to. After main moves to a commit this cache lacks (so that main itself no longer
    resolves), the resume and pec.evaluate still load those snapshots."""
    run = tmp_path / "run"
    train_main(_sd3(run, "--method", "pec", "--reward", "jpeg:1,aesthetic:0.5", "--paths.aesthetic",
                    "org/heads/aesthetic.pth", "--paths.aesthetic_clip", "org/tiny-clip", "--paths.dino",
                    "org/tiny-dino", "--perceptual.spaces", "dino", "--perceptual.space", "dino"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["path"] == "org/tiny-sd3" and saved["model"]["revision"] == MAIN
    assert {k: saved["paths"][k] for k in ("dino", "aesthetic_clip", "aesthetic")} == {
        "dino": f"org/tiny-dino:{DINO}", "aesthetic_clip": f"org/tiny-clip:{CLIP}",
        "aesthetic": f"org/heads/aesthetic.pth:{HEADS}"}
    with main_moved(offline["cache"], REPOS):
        with pytest.raises(ValueError, match="holds org/tiny-sd3 at .* but not at 'main'"):
            resolve_model_path("org/tiny-sd3")
        train_main(["--resume", "--run-dir", str(run), "--train.steps", "2"])
        evaluate_main([str(run), "--out", str(tmp_path / "eval"), "--eval.max_prompts", "2",
                       "--eval.images_per_prompt", "2", "--eval.batch", "4", "--eval.num_steps", "2"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["perc_knn/dino"] == r["perc_knn/dino"] for r in rows)
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["run"]
    assert {"aesthetic", "dist/dino"} <= set(evaluated), evaluated
    capsys.readouterr()


def test_a_revision_the_cache_holds_and_one_it_does_not(offline, tmp_path, capsys):
    """A tag and a commit the cache holds resolve to their snapshot (and pin the run's revision); a revision
    it lacks is one line naming --model.revision, with the command that fetches it, before the run folder."""
    assert check_run(parse_config(_sd3(tmp_path / "r", "--model.revision", "v1"))).model.revision == V1
    assert check_run(parse_config(_sd3(tmp_path / "r", "--model.revision", MAIN))).model.revision == MAIN
    line = _refused(_sd3(tmp_path / "r", "--model.revision", "v9"), capsys)
    assert line.startswith("pec.train: --model.revision: ") and "'v9'" in line and "HF_HUB_OFFLINE" in line
    assert "`hf download org/tiny-sd3 --revision v9`" in line and "main, v1" in line
    assert not (tmp_path / "r").exists()


def test_an_id_missing_offline_is_one_line_that_says_how_to_fetch_it(offline, tmp_path, capsys):
    line = _refused(_sd3(tmp_path / "r") + ["--model.path", "org/absent"], capsys)
    assert line.startswith("pec.train: --model.path: org/absent is neither a local folder nor in the Hugging Face "
                           f"cache {offline['home'] / 'hub'}"), line
    assert "HF_HUB_OFFLINE is set" in line and "`hf download org/absent`" in line
    line = _refused(_sd3(tmp_path / "r", "--paths.dino", "org/absent-dino:v2", "--perceptual.spaces", "dino",
                         "--perceptual.space", "dino", "--method", "pec"), capsys)
    assert line.startswith("pec.train: --paths.dino: org/absent-dino is neither") and \
        "`hf download org/absent-dino --revision v2`" in line
    assert not (tmp_path / "r").exists()


def test_without_a_network_the_cache_serves_and_a_miss_says_why(offline, monkeypatch):
    """HF_HUB_OFFLINE unset on a machine without a network: what the cache holds resolves (and loads), at once;
    what it lacks says the hub cannot be reached."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    paths = PathsConfig(dino="org/tiny-dino:main")
    check_spaces(["dino"], paths)
    assert build_space("dino", paths=paths).dim == 16
    with pytest.raises(ValueError, match=r"^--paths.dino: org/nothing is neither .*the hub cannot be reached"):
        check_spaces(["dino"], PathsConfig(dino="org/nothing"))


def test_only_configs_tokenizers_and_safetensors_are_fetched(offline, monkeypatch):
    """What a pipeline id asks huggingface_hub for: model_index.json, then the files of the components it
    names, each limited to configs, tokenizer files and safetensors (no pickles, no root checkpoints). Where
    the hub answers (its answer stubbed here), the first fetch names the tag itself, so that huggingface_hub
    records it in the cache's refs/ for a later run offline, and the second the commit the first gave."""
    import huggingface_hub

    asked, real = [], huggingface_hub.snapshot_download

    def recording(repo_id, **kwargs):
        asked.append(dict(kwargs))
        return real(repo_id, **{**kwargs, "local_files_only": True})  # nothing downloads in a test

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    folder = resolve_path("org/tiny-sd3", "--model.path", "pipeline", revision="v1")
    assert folder.name == V1 and asked[0]["allow_patterns"] == ["model_index.json"]
    assert {p.split("/")[0] for p in asked[1]["allow_patterns"][1:]} == {
        "transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"}
    assert all(p.endswith((".json", ".safetensors", ".txt", ".model")) for p in asked[1]["allow_patterns"])
    assert all(a["local_files_only"] for a in asked)

    asked.clear()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda self, repo_id, revision=None: SimpleNamespace(sha=V1))
    assert resolve_path("org/tiny-sd3", "--model.path", "pipeline", revision="v1").name == V1
    assert [(a["revision"], a["local_files_only"]) for a in asked] == [("v1", False), (V1, False)]


def test_resolve_model_path_reads_hf_hub_cache_and_the_embedded_model_loads_from_an_id(offline, tmp_path,
                                                                                        monkeypatch):
    """`pec.hub.resolve_model_path`, which the loaders and other commands share: HF_HUB_CACHE wins over HF_HOME
    (as in huggingface_hub), a revision picks its snapshot, a local folder comes back as it is. The embedded
    model (a "model" folder: config.json + model.safetensors) from the hub id org/digits, through check_run
    (which pins its revision) and the model registry."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(offline["cache"], moved, symlinks=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(moved))
    assert resolve_model_path("org/tiny-sd3", "v1") == moved / "models--org--tiny-sd3" / "snapshots" / V1
    assert resolve_model_path(str(offline["sd3"])) == offline["sd3"]
    cfg = check_run(parse_config(["--model.path", "org/digits", "--device", "cpu"]))
    assert cfg.model.revision == DIGITS
    model = MODELS.build(cfg.model.name, cfg=cfg.model, device=torch.device("cpu"))
    assert model.weights_dir == moved / "models--org--digits" / "snapshots" / DIGITS


def test_a_local_folder_never_touches_hub_code(offline, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # importing it would fail
    cfg = check_run(parse_config(_sd3(tmp_path / "r", "--paths.dino", str(offline["dino"]), "--perceptual.spaces",
                                      "dino", "--perceptual.space", "dino", "--method", "pec", "--model.path",
                                      str(offline["sd3"]))))
    assert cfg.model.revision is None
    with pytest.raises(ValueError, match="--model.revision 'v1' applies to a hub id, and --model.path .* is a local"):
        check_run(parse_config(_sd3(tmp_path / "r", "--model.path", str(offline["sd3"]), "--model.revision", "v1")))


def test_every_loader_refuses_remote_code():
    """Each transformers / diffusers `from_pretrained` in pec passes `pec.hub.load_options` (local files,
    trust_remote_code=False, safetensors from the hub); only pec's own model classes are called otherwise."""
    root = Path(pec.__file__).parent
    for path in root.rglob("*.py"):
        source = path.read_text()
        assert "trust_remote_code=True" not in source, path
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                owner = ast.unparse(node.func.value)
                passes = any(k.arg is None and "load_options" in ast.unparse(k.value) for k in node.keywords)
                assert passes or owner.endswith("FlowModel"), f"{path}:{node.lineno}: {owner}.from_pretrained"
