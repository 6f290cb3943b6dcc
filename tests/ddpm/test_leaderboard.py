"""The leaderboard (python -m sfd_jax.demo --methods=...): method parsing, and a --fast run end to end."""
import json
import os

import numpy as np
import pytest

from sfd_jax.cli_utils import UsageError
from sfd_jax.ddpm.leaderboard import METHODS, parse_methods
from tests.conftest import run_cli


def test_methods_are_parsed_in_order_without_duplicates():
    assert parse_methods("esd, sfd,esd,retrain") == ["esd", "sfd", "retrain"]
    with pytest.raises(UsageError, match="unknown method 'amnesia'; choose from sfd, retrain, sa, salun, esd"):
        parse_methods("sfd,amnesia")
    with pytest.raises(UsageError, match="empty"):
        parse_methods(" , ")


@pytest.mark.slow
def test_fast_leaderboard_writes_every_output_and_reuses_its_stages(tmp_path):
    wd = tmp_path / "lb"
    args = ["--fast", f"--methods={','.join(METHODS)}", "--forget=3", f"--workdir={wd}", "--noprogress"]
    proc = run_cli("sfd_jax.demo", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    board = json.load(open(wd / "leaderboard.json"))
    assert board["forget_class"] == 3 and board["fast"]
    rows = {r["method"]: r for r in board["rows"]}
    assert list(rows) == ["teacher", *METHODS]
    assert rows["sfd"]["nfe_per_image"] == 1 and rows["esd"]["nfe_per_image"] == 2 * board["sampler"]["steps"]
    assert rows["sfd"]["data_used"].startswith("none") and rows["salun"]["data_used"] == "real remain + real forget"
    for r in rows.values():
        assert 0 <= r["forgotten_class_accuracy"] <= 1 and np.isfinite(r["fid_penultimate_remaining"])
    for name in ["teacher", *METHODS]:
        with np.load(wd / f"samples_{name}.npz") as z:
            assert z["images"].dtype == np.uint8 and z["images"].shape == (1000, 8, 8, 1)
            assert (np.bincount(z["labels"]) == 100).all()
    md = open(wd / "leaderboard.md").read()
    assert "| salun |" in md and "forgotten digit recognised" in md
    runs = {"sa_fim_forget3", "sa_forget3", "salun_mask_forget3", "esd_forget3", "retrain_forget3"}
    assert runs <= set(os.listdir(wd))
    again = run_cli("sfd_jax.demo", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("sa_fim_forget3", "salun_forget3", "esd_forget3", "retrain_forget3", "samples_esd"):
        assert f"{stage}: reusing" in again.stdout, stage
