"""``RewardCallback``: one reward function as one callback, so a run's rewards are a list in YAML.

The GRPO module calls ``score(rollouts)`` on every ``RewardCallback`` of the trainer, in config
order (``lightning_r1v2/callbacks/hooks.py``), stores each column under the callback's ``name``
in ``rollouts.rewards`` and combines them with ``combine_rewards`` using each callback's
``weight`` and ``group``. Monitors may change ``weight`` between steps (it is checkpointed).

A reward function that crashes, hangs, or returns NaN/inf must not kill a long run, nor silently
teach the policy: each such row is a *fault*, logged once per distinct message, counted, then
either scored 0 or has its whole group dropped from the loss; past ``max_failure_share`` of a
batch the run stops with a clear error, because then the reward itself is broken. A reward that
calls ``sys.exit`` or raises ``KeyboardInterrupt`` itself stops the run with an error naming it.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import math
import threading
from typing import Any, Callable

import torch
from lightning.pytorch import Callback

from lightning_r1v2.rewards.faults import RewardFault

__all__ = ["RewardCallback", "RewardFault", "RewardAborted", "import_object"]

log = logging.getLogger("lightning_r1v2.rewards")

ON_ERROR = ("zero", "drop_group")


def import_object(path: str) -> Any:
    """``"pkg.module.attr"`` or ``"pkg.module:attr"`` -> the object."""
    if ":" in path:
        module, _, attr = path.partition(":")
    else:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise ValueError(f"not a dotted import path: {path!r}")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


_Fault = RewardFault


class RewardAborted(RuntimeError):
    """A reward function tried to end the process (``SystemExit``, its own ``KeyboardInterrupt``)."""


class _TimedOut(Exception):
    pass


_F32_MAX = float(torch.finfo(torch.float32).max)


class RewardCallback(Callback):
    """Scores rollouts with one reward function ``fn(completions, **columns, **kwargs)``.

    Contract of :meth:`score`: calls ``fn`` once on the whole batch with every record field as a
    per-row keyword column (``rollouts.columns()``) plus ``kwargs`` (which win over columns of
    the same name); if that call raises or returns the wrong length, calls it row by row to
    isolate the failing rows. ``None`` -> NaN (not applicable, not a fault). A raised exception,
    a value that is not finite in float32 (the loss dtype: ``1e39`` is a fault), a non-number
    (a string too), a :class:`RewardFault`, or a return value that is not a list, tuple or
    tensor (a dict, a string) is a fault: the row gets 0.0 and, with ``on_error="drop_group"``,
    every row of its group is marked in ``last_dropped`` (``[N]`` bool), which ``score_columns`` ORs
    into ``rollouts.dropped``. A call running past ``timeout_s``
    is a fault on every row of that call (the thread is abandoned; it cannot be killed). ``fn``
    gets deep copies of the record columns, so it cannot change the dataset. ``SystemExit`` or
    ``KeyboardInterrupt`` raised inside ``fn`` raise :class:`RewardAborted`. Returns a float32
    ``[N]`` tensor (the module stores it as ``rollouts.rewards[name]``).

    Args:
        fn: the reward function, or its dotted import path (``lightning_r1v2.rewards.format_reward``).
        name: the column name; default ``fn.__name__``.
        weight: weight in the combined reward (``weighted`` and ``gate`` modes).
        group: columns with the same group are OR-ed in ``gate`` mode (e.g. rule and model verifier).
        kwargs: extra keyword arguments for ``fn`` (e.g. ``{all_or_nothing: true}``).
        on_error: ``zero`` (faulty row scores 0) or ``drop_group`` (its group leaves the loss).
        max_failure_share: raise ``RuntimeError`` when a batch's fault share exceeds this.
        timeout_s: seconds one call of ``fn`` may take (run on a helper thread); None runs it
            inline, without a timeout.

    Attributes:
        calls_total: rows scored so far; ``faults_total``: faulty rows so far (both checkpointed).
        last_stats: ``rewards/<name>/mean``, ``/std`` (population std over applicable rows) and
            ``/faults`` of the last batch, for the module to log.
    """

    def __init__(
        self,
        fn: Callable | str,
        name: str | None = None,
        weight: float = 1.0,
        group: str | None = None,
        kwargs: dict | None = None,
        on_error: str = "zero",
        max_failure_share: float = 0.1,
        timeout_s: float | None = 600.0,
    ):
        super().__init__()
        self.fn_path = fn if isinstance(fn, str) else None
        self.fn = import_object(fn) if isinstance(fn, str) else fn
        if not callable(self.fn):
            raise TypeError(f"reward fn must be callable, got {type(self.fn).__name__}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if not 0.0 <= max_failure_share <= 1.0:
            raise ValueError(f"max_failure_share must be in [0, 1], got {max_failure_share}")
        self.name = name or getattr(self.fn, "__name__", None) or type(self.fn).__name__
        self.weight = float(weight)
        self.group = group
        self.kwargs = dict(kwargs or {})
        self.on_error = on_error
        self.max_failure_share = float(max_failure_share)
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self.calls_total = 0
        self.faults_total = 0
        self.last_stats: dict[str, float] = {}
        self._logged: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def __repr__(self) -> str:
        return f"RewardCallback(name={self.name!r}, weight={self.weight}, group={self.group!r}, on_error={self.on_error!r})"

    # -- scoring -------------------------------------------------------------------------------

    def score(self, rollouts) -> torch.Tensor:
        """One reward per row, float32 ``[N]``, NaN where ``fn`` returned None. See the class doc."""
        completions = list(rollouts.completions)
        n = len(completions)
        columns = rollouts.columns()
        self.last_dropped = None
        raw = self._call(completions, columns)
        values = [math.nan] * n
        faults: dict[int, str] = {}
        for i, v in enumerate(raw):
            if isinstance(v, _Fault):
                faults[i] = str(v)
                continue
            if v is None:
                continue
            if isinstance(v, (str, bytes)):
                faults[i] = f"returned a non-number {v!r:.80}"
                continue
            try:
                f = float(v)
            except (TypeError, ValueError, RuntimeError):
                faults[i] = f"returned a non-number {v!r:.80}"
                continue
            if not math.isfinite(f) or abs(f) > _F32_MAX:
                faults[i] = f"returned {f}, not finite in float32 (the loss dtype)"
                continue
            values[i] = f
        device = rollouts.group_ids.device
        column = torch.tensor(values, dtype=torch.float32, device=device)  # [N]
        if faults:
            bad = torch.tensor(sorted(faults), dtype=torch.long, device=device)
            column[bad] = 0.0
            if self.on_error == "drop_group":  # the module applies it (rewards.combine.score_columns)
                self.last_dropped = torch.isin(rollouts.group_ids, rollouts.group_ids[bad])  # [N]
            for i, msg in faults.items():
                self._log_once(msg, self._sample_id(rollouts, i))
        self.calls_total += n
        self.faults_total += len(faults)
        applicable = column[~column.isnan()]
        self.last_stats = {
            f"rewards/{self.name}/mean": applicable.mean().item() if applicable.numel() else math.nan,
            f"rewards/{self.name}/std": applicable.std(unbiased=False).item() if applicable.numel() else math.nan,
            f"rewards/{self.name}/faults": float(len(faults)),
        }
        share = len(faults) / max(n, 1)
        if share > self.max_failure_share:
            i, msg = next(iter(faults.items()))
            raise RuntimeError(
                f"reward {self.name!r} failed on {len(faults)}/{n} rows ({share:.0%}), more than "
                f"max_failure_share={self.max_failure_share:.0%}; e.g. sample id={self._sample_id(rollouts, i)}: {msg}"
            )
        return column

    def _call(self, completions: list[str], columns: dict[str, list]) -> list:
        n = len(completions)
        try:
            return self._as_list(self._invoke(completions, columns), n)
        except _TimedOut as e:
            return [RewardFault(str(e))] * n  # row by row would multiply the hang
        except RewardAborted:
            raise
        except Exception as e:  # noqa: BLE001 - isolate the failing rows below
            self._log_once(f"batch call failed ({type(e).__name__}: {e}); scoring row by row", None)
        out = []
        for i in range(n):
            row = {k: [v[i]] for k, v in columns.items()}
            try:
                out.append(self._as_list(self._invoke([completions[i]], row), 1)[0])
            except RewardAborted:
                raise
            except _TimedOut as e:
                out.append(RewardFault(str(e)))
            except Exception as e:  # noqa: BLE001
                out.append(RewardFault(f"{type(e).__name__}: {e}"))
        return out

    def _invoke(self, completions: list[str], columns: dict[str, list]):
        """``fn`` on deep copies of the columns, on a helper thread bounded by ``timeout_s``."""
        kwargs = {**copy.deepcopy(columns), **self.kwargs}
        if self.timeout_s is None:
            try:
                return self.fn(list(completions), **kwargs)
            except SystemExit as e:
                raise self._aborted(e) from e
        box: dict[str, Any] = {}
        # Thread-local state the caller's thread had: CUDA device, grad and inference modes.
        device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def target():
            try:
                if device is not None:
                    torch.cuda.set_device(device)
                # inference_mode(False) would turn grad on: enter it only when it was on
                with torch.inference_mode() if inference else contextlib.nullcontext(), torch.set_grad_enabled(grad):
                    box["value"] = self.fn(list(completions), **kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                box["error"] = e

        worker = threading.Thread(target=target, name=f"reward-{self.name}", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            raise _TimedOut(f"timed out after {self.timeout_s:g}s (timeout_s; the call was abandoned)")
        if "error" in box:
            e = box["error"]
            if isinstance(e, (SystemExit, KeyboardInterrupt)):
                raise self._aborted(e) from e
            raise e
        return box["value"]

    def _aborted(self, e: BaseException) -> RewardAborted:
        what = f"SystemExit({e.code!r}) (sys.exit)" if isinstance(e, SystemExit) else type(e).__name__
        return RewardAborted(
            f"reward {self.name!r} raised {what}; a reward function must return values, not end the "
            "process: the run stops here"
        )

    @staticmethod
    def _as_list(out, n: int) -> list:
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().reshape(-1).tolist()
        elif hasattr(out, "tolist") and hasattr(out, "shape"):  # numpy arrays
            out = out.tolist()
        if not isinstance(out, (list, tuple)):
            raise TypeError(f"returned a {type(out).__name__}, expected a list of {n} values")
        out = list(out)
        if len(out) != n:
            raise ValueError(f"returned {len(out)} values for {n} completions")
        return out

    @staticmethod
    def _sample_id(rollouts, i: int) -> str:
        rec = rollouts.records[i] if i < len(rollouts.records) else {}
        return str(rec.get("id", f"row {i}")) if isinstance(rec, dict) else f"row {i}"

    def _log_once(self, msg: str, sample_id: str | None) -> None:
        if msg in self._logged:
            return
        if len(self._logged) < 1000:
            self._logged.add(msg)
        where = f" on sample id={sample_id}" if sample_id is not None else ""
        log.error("reward %r%s: %s (further identical errors are not logged)", self.name, where, msg)

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"calls_total": self.calls_total, "faults_total": self.faults_total, "weight": self.weight}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.calls_total = int(state_dict.get("calls_total", 0))
        self.faults_total = int(state_dict.get("faults_total", 0))
        self.weight = float(state_dict.get("weight", self.weight))
