"""scripts/matched_ind.py: OOD success against ind success along training, from evaluate_ood's JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

import evaluate_ood
from common import EpisodeOutcomes

sys.path.insert(0, str(REPO / "scripts"))
import matched_ind  # noqa: E402


def outcomes(successes: int, n: int = 4) -> list[EpisodeOutcomes]:
    hits = np.arange(n) < successes
    return [EpisodeOutcomes(np.arange(n), hits, hits, np.zeros(n), 1.0)]


def test_each_method_is_a_line_through_its_snapshots_in_training_order(tmp_path: Path) -> None:
    # ind / unseen_table / reposition successes out of 4 per snapshot, labelled METHOD@STEP.
    made = {"SFT@400": (4, 1, 0), "SFT@200": (2, 1, 1), "PPO@3": (3, 3, 2), "base": (1, 1, 1)}
    results = {label: {split: outcomes(k) for split, k in zip(("ind", "unseen_table", "reposition"), ks,
                                                                 strict=True)}
               for label, ks in made.items()}
    summary = evaluate_ood.summarise(results)
    lines = matched_ind.series(summary)
    assert [p[0] for p in lines["SFT"]] == [200, 400], "sorted by step, not by label order"
    assert [p[1] for p in lines["SFT"]] == [50.0, 100.0]
    assert lines["SFT"][1][2] == {"vision": 25.0, "execution": 0.0}
    assert lines["base"] == [(None, 25.0, {"vision": 25.0, "execution": 25.0})]

    document = {"summary": summary, "args": {"env": "twin", "seeds": [0], "episodes": 4, "temperature": 0.6}}
    (tmp_path / "results.json").write_text(json.dumps(document))
    done = subprocess.run([sys.executable, "scripts/matched_ind.py", str(tmp_path / "results.json"),
                           "--out", str(tmp_path / "m.png")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m.png").stat().st_size > 10_000
    assert "SFT    400  ind 100.0  vision  25.0  execution   0.0" in done.stdout

    # --also: the final checkpoints of another evaluation join their methods' lines at the given steps.
    final = {"summary": evaluate_ood.summarise({"SFT": results["SFT@200"], "PPO": results["PPO@3"]}),
             "args": {"env": "twin", "seeds": [0, 1], "episodes": 8, "temperature": 0.6}}
    (tmp_path / "final.json").write_text(json.dumps(final))
    joined = subprocess.run([sys.executable, "scripts/matched_ind.py", str(tmp_path / "results.json"), "--also",
                             str(tmp_path / "final.json"), "--steps", "SFT=600", "--out", str(tmp_path / "j.png")],
                            cwd=REPO, capture_output=True, text=True)
    assert joined.returncode == 0, joined.stderr
    assert "SFT    600  ind  50.0" in joined.stdout and "PPO      3" in joined.stdout
    assert joined.stdout.count("PPO") == 1, "only the checkpoints named in --steps join"
    wrong = subprocess.run([sys.executable, "scripts/matched_ind.py", str(tmp_path / "results.json"), "--also",
                            str(tmp_path / "final.json"), "--steps", "DPO=5"], cwd=REPO, capture_output=True, text=True)
    assert wrong.returncode == 1 and "error: --steps DPO=5: expected LABEL=N" in wrong.stderr

    with pytest.raises(ValueError, match="METHOD@N"):
        matched_ind.series({"SFT@last": summary["base"]})
    missing = subprocess.run([sys.executable, "scripts/matched_ind.py", str(tmp_path / "none.json")], cwd=REPO,
                             capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.strip().startswith("error: no ")
