"""The paper-table experiment's claim checks, on synthetic numbers (the full experiment takes ~20 min)."""
import json

from pec.experiments.paper_table import ROWS, check_claims


def _write_grpo_metrics(out, rewards, entropy=-32.4):
    (out / "grpo").mkdir(parents=True)
    with open(out / "grpo" / "metrics.jsonl", "w") as fh:
        for step, r in enumerate(rewards, 1):
            fh.write(json.dumps({"step": step, "reward_mean": r, "policy_entropy": entropy}) + "\n")


def _results(div_grpo, div_pec, reward_pec):
    results = {"pretrained": {"dist/simclr": 7.0, "digit": 0.90}, "grpo": {"dist/simclr": div_grpo, "digit": 0.99}}
    for name in ROWS:
        if name.startswith(("pec", "pcgs")):
            results[name] = {"dist/simclr": div_pec, "digit": reward_pec}
    return results


def test_claims_pass_when_the_paper_phenomena_hold(tmp_path):
    _write_grpo_metrics(tmp_path, [0.90] * 5 + [0.99] * 5)
    overall = {n: 0.6 for n in ROWS} | {"grpo": 0.4, "pretrained": 0.5}
    text = check_claims(tmp_path, _results(div_grpo=5.0, div_pec=6.8, reward_pec=0.98), overall)
    assert text.count("**PASS**") == 3 and "FAIL" not in text


def test_claims_fail_honestly(tmp_path):
    _write_grpo_metrics(tmp_path, [0.99] * 5 + [0.90] * 5)
    overall = {n: 0.3 for n in ROWS} | {"grpo": 0.4, "pretrained": 0.5}
    text = check_claims(tmp_path, _results(div_grpo=5.0, div_pec=5.1, reward_pec=0.98), overall)
    assert text.count("**FAIL**") == 3 and "does not rise" in text


def test_claims_over_seeds_use_means_and_show_the_spread(tmp_path):
    dirs = [tmp_path / "seed0", tmp_path / "seed1"]
    for d in dirs:
        _write_grpo_metrics(d, [0.90] * 5 + [0.99] * 5)
    overall = [{n: 0.6 for n in ROWS} | {"grpo": 0.4, "pretrained": 0.5},
               {n: 0.3 for n in ROWS} | {"grpo": 0.45, "pretrained": 0.5}]  # PEC mean 0.45 > GRPO 0.425
    results = [_results(div_grpo=5.0, div_pec=6.8, reward_pec=0.98),
               _results(div_grpo=6.0, div_pec=6.9, reward_pec=0.98)]
    text = check_claims(dirs, results, overall)
    assert "(2/2 seeds)" in text and text.count("**PASS**") == 3
    assert "GRPO 0.425 ± 0.035 (0.400 / 0.450)" in text and "above GRPO in 1/2 seeds" in text
