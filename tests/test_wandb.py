"""Weights & Biases beside TensorBoard (`--logging.wandb`, issue 20), in W&B's offline mode (nothing reaches the
network; every W&B folder is under the test's tmp_path): a run writes its W&B files with the config (without
its secrets), every step's scalars as metrics.jsonl has them and the sample grids as images; a resumed run
continues the same W&B run id; a rank but 0 logs nothing. The W&B run log is read back with the record
format W&B writes (LevelDB-style blocks of `wandb.proto` records). Needs the wandb extra, which CI installs."""
import json
import struct
import sys

import pytest

from pec.config import LoggingConfig
from pec.logging_utils import WandbLog, read_metrics
from pec.train import main

wandb = pytest.importorskip("wandb", reason='the wandb extra: pip install -e ".[wandb]"')
from wandb.proto import wandb_internal_pb2 as wandb_pb  # noqa: E402

SECRET = "tok-5ecret-never-logged"
BLOCK = 32768  # W&B's run log: a 7-byte header, then 32 KiB blocks of records (crc32, length, kind, data)


def wandb_records(path):
    """The `Record`s of a W&B run log (run-ID.wandb)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a record header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first | middle, last
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(pending)
            yield record


def read_wandb_run(folder):
    """(run id, config {key: value}, {step: {key: value}}) of one offline W&B run folder."""
    (log,) = folder.glob("run-*.wandb")
    run_id, config, history = None, {}, {}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row.pop("_step"), {}).update(row)
    return run_id, config, history


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline, with every folder it writes under tmp_path / "wandb" (WANDB_DIR is set per run)."""
    root = tmp_path / "wandb"
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        (root / name).mkdir(parents=True)
        monkeypatch.setenv(name, str(root / name))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr("pec.trainer.plot_metrics", lambda *args, **kwargs: None)  # most of a tiny run's time
    return root


def test_a_run_logs_offline_and_its_resumption_continues_the_same_wandb_run(world, tmp_path, offline, monkeypatch):
    run = tmp_path / "run"
    argv = ["--device", "cpu", "--assets", str(world), "--model.path", str(world / "embedded"), "--method", "pec",
            "--sampling.prompts_per_step", "2", "--sampling.group_size", "3", "--sampling.num_steps", "2",
            "--train.micro_batch", "4", "--perceptual.k", "1", "--logging.tensorboard", "false",
            "--logging.grid_samples", "2", "--logging.progress", "false", "--train.steps", "2",
            "--train.stop_after", "1", "--logging.wandb", "pec-test", "--reward_http.token", SECRET,
            "--run-dir", str(run)]
    resume = ["--run-dir", str(run), "--resume", "--logging.progress", "false"]  # W&B's options from config.yaml
    folders = []
    for name, command in (("first", argv), ("resumed", resume)):
        # W&B names a run's folder by its start time to the second: each run gets its own WANDB_DIR.
        (offline / name).mkdir()
        monkeypatch.setenv("WANDB_DIR", str(offline / name))
        monkeypatch.setattr("sys.argv", ["pec.train", *command])  # W&B records the command line it sees
        main(command)
        wandb.teardown()  # W&B reads its environment once a process, at its first run
        (folder,) = (offline / name / "wandb").glob("offline-run-*")
        folders.append(folder)
    first, resumed = folders
    stored = json.loads((run / "wandb.json").read_text())
    rows = {row["step"]: row for row in read_metrics(run / "metrics.jsonl")}
    assert sorted(rows) == [1, 2]
    (id_1, config, history_1), (id_2, _, history_2) = read_wandb_run(first), read_wandb_run(resumed)
    assert id_1 == id_2 == stored["id"] and stored["step"] == 2  # the resumed run continues the same W&B run
    assert sorted(history_1) == [0, 1] and sorted(history_2) == [2]
    history = {**history_1, **history_2}
    for step, row in rows.items():  # the same scalars as metrics.jsonl (and so TensorBoard), at the same steps
        scalars = {k: v for k, v in row.items() if k != "step"}
        assert {k: history[step].get(k) for k in scalars} == scalars
    assert history[0]["samples_start/_type"] == history[2]["samples_end/_type"] == "image-file"
    assert (first / "files" / history[0]["samples_start/path"]).is_file()
    assert (resumed / "files" / history[2]["samples_end/path"]).is_file()
    assert config["method"] == "pec" and config["logging"]["wandb"] == "pec-test"
    assert config["reward_http"]["token"] is None  # a secret option never reaches W&B
    for path in [*offline.rglob("*"), *run.rglob("*")]:
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


def test_only_rank_0_logs(tmp_path, offline, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it would fail: a rank but 0 must not touch W&B
    log = WandbLog(tmp_path, LoggingConfig(wandb="pec-test"), {}, enabled=False)
    log.log({"reward_mean": 1.0}, step=1)
    log.close()
    assert log.run is None and not (tmp_path / "wandb.json").exists()
