"""pec.experiments.algorithm_comparison: its runs and the table it makes of their evaluations."""
import json

from pec.evaluate import PRETRAINED
from pec.experiments.algorithm_comparison import COLUMNS, plan, rows, summarise


def test_every_algorithm_trains_alone_and_with_pec_and_each_seed_is_evaluated_after_its_runs(tmp_path):
    assert rows() == {"nft": ["--algorithm", "nft", "--method", "none"],
                      "nft_pec": ["--algorithm", "nft", "--method", "pec"],
                      "mixgrpo": ["--algorithm", "mixgrpo", "--method", "none"],
                      "mixgrpo_pec": ["--algorithm", "mixgrpo", "--method", "pec"]}
    jobs = plan(tmp_path, [0, 1], 300, ["--device", "cpu"])
    keys = [job.key for job in jobs]
    assert keys == [f"train seed {s} {r}" for s in (0, 1) for r in rows()][:4] + ["evaluate seed 0"] + \
        [f"train seed 1 {r}" for r in rows()] + ["evaluate seed 1"]
    train = jobs[0].cmd
    assert train[train.index("--train.steps") + 1] == "300" and train[-1] == "cpu" and jobs[0].run_dir is not None
    evaluate = jobs[4].cmd
    assert evaluate[evaluate.index("pec.evaluate") + 1] == PRETRAINED and jobs[4].after == "train seed 0 mixgrpo_pec"


def test_the_table_is_the_mean_and_sd_over_seeds(tmp_path):
    names = [PRETRAINED, *rows()]
    for seed, shift in ((0, 0.0), (1, 1.0)):
        folder = tmp_path / f"eval-seed{seed}"
        folder.mkdir()
        metrics = {f"row{i}": {c: i + shift for c in COLUMNS} for i in range(len(names))}
        (folder / "metrics.json").write_text(json.dumps(metrics))
    table, numbers = summarise(tmp_path, [0, 1])
    assert numbers["nft"]["gold"] == {"mean": 1.5, "sd": 0.7071067811865476}
    assert "| mixgrpo_pec | 4.500 ± 0.707 |" in table
