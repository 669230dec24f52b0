"""Ctrl-C during training: save a checkpoint that resumes, then stop with a message.

First Ctrl-C (SIGINT) while training: the current step finishes (with its callbacks, its
ModelCheckpoint save and any validation due after it); before the next step begins a checkpoint
is written to ``<dirpath>/<filename>.ckpt`` and the process exits with status 130 (the shell's
"stopped by Ctrl-C"). That checkpoint resumes exactly, as if the run had never stopped
(``tests/test_interrupt.py`` compares weights, optimizer, buffer, RNG and loop counters)::

    python cli.py fit --config configs/tiny/grpo.yaml --ckpt_path runs/grpo/checkpoints/interrupted.ckpt

A Ctrl-C after that checkpoint is written (during the shutdown) is swallowed once, with a message,
so the exit stays clean (status 130). A second Ctrl-C before it, or one that arrives outside the
training loop, raises ``KeyboardInterrupt`` at once. Lightning then calls ``on_exception``; if training had started, the state of that moment
is saved to the same file, marked ``r1v2_interrupted_mid_step``, and Lightning exits with status 1.
Resuming from it redoes the interrupted step from its first prompt (no data is skipped), but the
step's random draws differ and an optimizer update it had already made is kept: it resumes, not
exactly. (In a multi-process run that save is skipped: the other ranks may not reach it.)

Why not only ``on_exception``: Lightning's handler of ``KeyboardInterrupt`` exits with status 1
whatever the callbacks do, and the interrupt lands mid-step (usually mid-generation).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

from lightning.pytorch import Callback

log = logging.getLogger("lightning_r1v2.callbacks")

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd program


class SaveOnInterrupt(Callback):
    """Save a resumable checkpoint on Ctrl-C and stop.

    Args:
        dirpath: Folder of the checkpoint (None: the ModelCheckpoint's ``dirpath``, else
            ``<default_root_dir>/checkpoints``).
        filename: File name without ``.ckpt``.
        save_mid_step: Also save when ``KeyboardInterrupt`` arrives mid-step (second Ctrl-C).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "interrupted", save_mid_step: bool = True):
        super().__init__()
        self.dirpath = dirpath
        self.filename = filename
        self.save_mid_step = save_mid_step
        self.requested = False
        self.saved_path: str | None = None
        self._previous_handler = None
        self._training = False
        self._mid_step = False
        self._at_batch_start = False
        self._stop_now = False

    # ------------------------------------------------------------------ signal
    def _on_sigint(self, signum, frame):
        if self.requested:  # second Ctrl-C: stop now
            self._restore_handler()
            self._stop_now = True
            raise KeyboardInterrupt
        self.requested = True
        # os.write, not print: a handler that prints while the main thread prints can fail (reentrant call)
        os.write(2, b"\nCtrl-C: finishing this step, then saving a checkpoint and stopping (Ctrl-C again to stop now).\n")

    def _on_sigint_after_save(self, signum, frame):
        # the checkpoint is written and the run is shutting down: a Ctrl-C now would only turn a clean
        # exit (status 130) into a traceback from Lightning's teardown; swallow one, then act as before
        os.write(2, b"\nCtrl-C: the checkpoint is saved, finishing the shutdown (Ctrl-C again to force).\n")
        self._restore_handler()

    def _install_handler(self, handler=None) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        if self._previous_handler is None:
            self._previous_handler = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, handler or self._on_sigint)

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
        self._previous_handler = None

    # ------------------------------------------------------------------- hooks
    def path(self, trainer) -> Path:
        folder = self.dirpath
        if folder is None and trainer.checkpoint_callback is not None:
            folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        if folder is None:
            folder = Path(trainer.default_root_dir) / "checkpoints"
        return Path(folder) / f"{self.filename}.ckpt"

    def on_train_start(self, trainer, pl_module) -> None:
        self.requested, self.saved_path, self._training, self._stop_now = False, None, True, False
        self._install_handler()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Here, not at the end of the interrupted step: every callback (ModelCheckpoint is always
        # last) and any scheduled validation have finished that step, and the next has not begun,
        # so the checkpoint is the one a ModelCheckpoint at that step would write.
        # Every rank must take the same decision at the same step (Ctrl-C may reach them apart).
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        path = self.path(trainer)
        self._at_batch_start = True
        try:
            trainer.save_checkpoint(path)
        finally:
            self._at_batch_start = False
        self.saved_path = str(path)
        self._install_handler(self._on_sigint_after_save)
        if trainer.is_global_zero:
            _say(f"Interrupted: saved step {trainer.global_step} to {path}\n"
                 f"Resume: run the same command with --ckpt_path {path}")
        raise SystemExit(EXIT_INTERRUPTED)  # Lightning tears down (on_exception, loggers), then exits

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self._mid_step:
            checkpoint["r1v2_interrupted_mid_step"] = True
        if self._at_batch_start:
            _uncount_fetched_batch(checkpoint)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if checkpoint.get("r1v2_interrupted_mid_step"):
            log.warning("resuming from a mid-step interrupt: the interrupted step is redone from its first prompt; "
                        "the run goes on correctly but not bit-for-bit as if never stopped")

    def on_exception(self, trainer, pl_module, exception) -> None:
        # A KeyboardInterrupt raised inside torch.save (e.g. ModelCheckpoint's) reaches Lightning as
        # the RuntimeError of the half-written zip file: still our second Ctrl-C.
        if not isinstance(exception, KeyboardInterrupt) and not self._stop_now:
            if not self.saved_path:  # after a step-boundary save (SystemExit 130) keep the after-save handler
                self._restore_handler()
            return
        if isinstance(exception, KeyboardInterrupt):
            self._previous_handler = None  # Lightning now ignores SIGINT while it shuts down: leave it so
        else:
            self._restore_handler()
        if not self._training or self.saved_path:
            return
        if not self.save_mid_step:
            return
        if trainer.world_size > 1:
            log.warning("KeyboardInterrupt in a %d-process run: no checkpoint saved (ranks may not all reach it)",
                        trainer.world_size)
            return
        path = self.path(trainer)
        self._mid_step = True
        try:
            trainer.save_checkpoint(path)
        finally:
            self._mid_step = False
        self.saved_path = str(path)
        _say(f"Interrupted mid-step: saved the state at step {trainer.global_step} to {path}; resuming from it "
             f"redoes the interrupted step (--ckpt_path {path}).")

    def on_train_end(self, trainer, pl_module) -> None:
        self._training = False
        self._restore_handler()
        if self.requested and not self.saved_path and trainer.is_global_zero:
            _say("Ctrl-C came during the last step: the run finished normally (its checkpoints are written as usual).")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_handler()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _uncount_fetched_batch(checkpoint: dict) -> None:
    """Make a checkpoint taken in ``on_train_batch_start`` read as one taken after the last step.

    By then Lightning has fetched the next batch and counted it ``ready``. Left so, the resumed
    loop counts one batch too many (the logging step and a ``val_check_interval`` schedule shift
    by one). With ``ready`` set back to ``started`` the progress is that of a save after a
    finished step (ready = started = processed = completed, as a ModelCheckpoint save in
    ``on_validation_end``), which Lightning resumes without skipping or repeating a batch; the
    data position is the DataModule's, counted from ``processed``. Tested against a run never
    stopped in ``tests/test_interrupt.py``.
    """
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    if progress is None:  # another loop layout: the resume still works, a counter may be off by one
        log.warning("unexpected loop state in the checkpoint; the resumed step counter may be off by one")
        return
    for part in ("total", "current"):
        progress[part]["ready"] = progress[part]["started"]
    progress["is_last_batch"] = False
