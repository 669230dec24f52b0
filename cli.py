"""lightning-r1v2 command line.

    python cli.py fit --config configs/tiny/sft.yaml          # Lightning commands: fit, validate, test, predict
    python cli.py make-data --out data/tiny --train 4000      # data jobs: plain functions, see JOBS
    python cli.py <command> --help
"""
from __future__ import annotations

import sys

JOBS = {
    "make-data": ("lightning_r1v2.data.synthetic", "make_data", "generate the synthetic visual reasoning task"),
    "evaluate": ("lightning_r1v2.jobs.evaluate", "evaluate", "held-out accuracy, format and hallucination rates of a checkpoint"),
    "plot": ("lightning_r1v2.jobs.plot", "plot", "PNG plots of a run's logs (reward, effective share, MPO terms)"),
    "export": ("lightning_r1v2.jobs.export", "export", "write a checkpoint as a Hugging Face folder"),
    "consolidate": ("lightning_r1v2.jobs.export", "consolidate", "merge a DeepSpeed checkpoint folder into one .ckpt"),
    "convert": ("lightning_r1v2.jobs.convert", "convert", "turn a Skywork R1V release folder into an InternVL -hf folder"),
    "build-pairs": ("lightning_r1v2.jobs.build_pairs", "build_pairs", "sample the policy into MPO preference pairs"),
    "prefilter": ("lightning_r1v2.jobs.prefilter", "prefilter", "drop prompts the policy always or never solves"),
    "study": ("lightning_r1v2.study", "study", "pipeline variants over seeds: one table of means and standard deviations"),
}
LIGHTNING_COMMANDS = {
    "fit": "train a stage (SFT, MPO or GRPO) from a YAML config",
    "validate": "evaluate a checkpoint on the held-out set (accuracy, format rate)",
    "test": "like validate, on the test loop",
    "predict": "run prediction",
}


def _overview() -> str:
    lines = ["usage: python cli.py COMMAND [--config FILE] [options]", "", "Lightning commands:"]
    lines += [f"  {k:<12} {v}" for k, v in LIGHTNING_COMMANDS.items()]
    lines += ["", "Data jobs:"]
    lines += [f"  {k:<12} {v[2]}" for k, v in JOBS.items()]
    lines += ["", "Run 'python cli.py COMMAND --help' for a command's options."]
    return "\n".join(lines)


def run_job(name: str, args: list[str]):
    import importlib

    from jsonargparse import CLI

    module, fn, _ = JOBS[name]
    func = getattr(importlib.import_module(module), fn)
    return CLI(func, args=args, as_positional=False, prog=f"cli.py {name}")


def run_lightning(args: list[str]):
    from lightning.pytorch.cli import LightningCLI

    from lightning_r1v2.data.datamodule import R1V2DataModule
    from lightning_r1v2.modules.common import PolicyModule

    return LightningCLI(
        PolicyModule,
        R1V2DataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview())
        return None
    if argv[0] in JOBS:
        return run_job(argv[0], argv[1:])
    return run_lightning(argv)


if __name__ == "__main__":
    main()
