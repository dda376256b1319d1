"""hierfed run --resume continues the saved run: its config.yaml, not the current flags' defaults;
any difference but the allowed ones is refused in one line naming the field (no MPI: `prepare`)."""

from __future__ import annotations

import pytest

from hierfed.commands.run import parse_run_args, prepare
from hierfed.config import dump_config, load_config
from hierfed.errors import HierfedError


@pytest.fixture
def saved_run(tmp_path):
    """A run directory as the cloud leaves it: config.yaml of a non-default run."""
    out = tmp_path / "exp1"
    out.mkdir()
    cfg = load_config(None, ["seed=7", "schedule.tau1=3", "schedule.rounds=4", "compression.cloud_down=fp16", f"out={out}"])
    (out / "config.yaml").write_text(dump_config(cfg))
    return out


def test_resume_continues_the_saved_settings_and_may_extend_rounds(saved_run):
    """README's `hierfed run --out runs/exp1 --rounds 10 --resume`: the saved seed, tau1 and codec,
    10 rounds (it used to rebuild the config from defaults: seed 0, tau1 5, identity codec)."""
    cfg, _, text = prepare(parse_run_args(["--out", str(saved_run), "--rounds", "10", "--resume", "--no-launch"]))
    assert (cfg.seed, cfg.schedule.tau1, cfg.compression.cloud_down, cfg.schedule.rounds) == (7, 3, "fp16", 10)
    assert "rounds: 10" in text


@pytest.mark.parametrize("extra, field", [
    (["--set", "compression.cloud_down=int8"], "compression.cloud_down"),  # would change the message count: a hang
    (["--seed", "8"], "seed"),
    (["flat"], "topology"),  # the positional topology
])
def test_resume_refuses_a_changed_setting_naming_it(saved_run, extra, field):
    with pytest.raises(HierfedError, match=rf"--resume: {field} is .* but the run in .* used") as e:
        prepare(parse_run_args(["--out", str(saved_run), "--resume", "--no-launch", *extra]))
    assert "\n" not in str(e.value)


def test_resume_with_the_original_config_file_again_is_fine_and_a_different_one_refused(saved_run, tmp_path):
    (tmp_path / "same.yaml").write_text((saved_run / "config.yaml").read_text())
    cfg, _, _ = prepare(parse_run_args(["--config", str(tmp_path / "same.yaml"), "--resume", "--no-launch", "--set", "runtime.progress=false"]))
    assert cfg.seed == 7 and cfg.runtime.progress is False
    (tmp_path / "other.yaml").write_text(dump_config(load_config(None, [f"out={saved_run}", "seed=7", "schedule.tau1=3", "schedule.rounds=4"])))
    with pytest.raises(HierfedError, match="compression.cloud_down is 'identity' but"):
        prepare(parse_run_args(["--config", str(tmp_path / "other.yaml"), "--resume", "--no-launch"]))


def test_resume_without_a_saved_run_says_so(tmp_path):
    with pytest.raises(HierfedError, match="holds no run to continue"):
        prepare(parse_run_args(["--out", str(tmp_path / "nothing"), "--resume", "--no-launch"]))


def test_resume_auto_starts_fresh_without_a_checkpoint_and_resumes_with_one(saved_run):
    """slurm/job.sh runs `--resume auto` so that a requeued job continues and a first one starts."""
    args = parse_run_args(["--out", str(saved_run), "--resume", "auto", "--no-launch", "--seed", "3"])
    cfg, _, _ = prepare(args)
    assert args.resume is None and cfg.seed == 3  # no checkpoint: a fresh run with these flags
    (saved_run / "checkpoints").mkdir()
    (saved_run / "checkpoints" / "latest").write_text("round-0002\n")
    args = parse_run_args(["--out", str(saved_run), "--resume", "auto", "--no-launch"])
    cfg, _, _ = prepare(args)
    assert args.resume == "yes" and cfg.seed == 7  # the saved run's settings
    with pytest.raises(HierfedError, match="--resume: seed is 3"):
        prepare(parse_run_args(["--out", str(saved_run), "--resume", "auto", "--no-launch", "--seed", "3"]))
