"""The command line: every shipped YAML parses with the real CLI; overrides and jobs work."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402


def test_help_lists_every_command(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    for name in [*cli.LIGHTNING_COMMANDS, *cli.JOBS]:
        assert f"  {name} " in out


def test_there_are_configs():
    assert {p.stem for p in (ROOT / "configs" / "tiny").glob("*.yaml")} >= {"sft", "grpo"}


# overlays are laid over a stage's config: `--config BASE --config OVERLAY`
OVERLAYS = {"grpo_zero3_cpu": "grpo", "grpo_dapo": "grpo", "grpo_gspo": "grpo", "grpo_dr_grpo": "grpo",
            "grpo_high_entropy": "grpo", "grpo_tis": "grpo"}


def _config_args(path):
    base = OVERLAYS.get(path.stem)
    return ["--config", str(path.with_name(f"{base}.yaml"))] * bool(base) + ["--config", str(path)]


def _job_of(path):
    """Job configs are named after their job (build_pairs.yaml -> build-pairs)."""
    name = path.stem.replace("_", "-")
    return name if name in cli.JOBS else None


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_every_config_parses_with_the_real_cli(path, capsys):
    job = _job_of(path)
    with pytest.raises(SystemExit) as e:
        cli.main([job or "fit", *_config_args(path), "--print_config"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    if job is None:
        assert "class_path: lightning_r1v2.modules." in out
    else:
        assert "ckpt_path:" in out


@pytest.mark.parametrize("path", [p for p in CONFIGS if "tiny" in p.parts and not _job_of(p)], ids=lambda p: p.stem)
def test_tiny_configs_instantiate_with_overrides(path, tmp_path, tiny_data):
    from lightning.pytorch.cli import LightningCLI

    from lightning_r1v2.data.datamodule import R1V2DataModule
    from lightning_r1v2.modules.common import PolicyModule

    c = LightningCLI(
        PolicyModule, R1V2DataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=[
            *_config_args(path),
            "--model.lr", "3e-4",
            "--model.init_args.init_ckpt", "null",
            "--trainer.max_steps", "20",
            "--trainer.default_root_dir", str(tmp_path),
            "--data.train_file", str(tiny_data / "train.jsonl"),
        ],
    )
    assert c.model.hparams.lr == 3e-4
    assert c.trainer.max_steps == 20
    assert c.datamodule.hparams.train_file == str(tiny_data / "train.jsonl")


def test_make_data_job_runs_from_the_command_line(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "make-data", "--out", str(tmp_path / "d"), "--train", "3", "--val", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert len((tmp_path / "d" / "train.jsonl").read_text().splitlines()) == 3
    bad = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "make-data", "--difficulty", "impossible", "--out", str(tmp_path / "e")],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode != 0 and "difficulty must be one of" in bad.stderr
