"""Every tensor a step creates lives on the module's device.

A CPU machine cannot run a CUDA step, so the class of bug (a tensor built from Python data on the
CPU, then meeting CUDA tensors: the first H100 step crashed twice this way) is caught in the
source: in the step path, every ``torch.<factory>(...)`` call names its ``device=``, or its line
says why it stays on the CPU (``# on CPU: <reason>``, e.g. the buffer's own bookkeeping, or
vLLM's lists that ``generate`` moves as one batch with ``Rollouts.to``). ``*_like`` factories
inherit their argument's device and are not checked.
"""
import ast
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STEP_PATH = ["modules", "rollout", "losses", "callbacks", "rewards"]
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint",
             "linspace", "eye", "multinomial"}


def _offenders(source: str, name: str) -> list[str]:
    lines = source.splitlines()
    out = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        f = node.func
        if not (f.attr in FACTORIES and isinstance(f.value, ast.Name) and f.value.id == "torch"):
            continue
        if f.attr == "multinomial" or any(k.arg == "device" for k in node.keywords):
            continue
        text = "\n".join(lines[node.lineno - 1: node.end_lineno])
        marker = text.partition("# on CPU:")[2].strip()
        if not marker:
            out.append(f"{name}:{node.lineno}: torch.{f.attr}(...) without device= (or a '# on CPU: reason')")
    return out


def test_step_path_tensors_name_their_device():
    bad = []
    for d in STEP_PATH:
        for p in sorted((ROOT / "lightning_r1v2" / d).glob("*.py")):
            bad += _offenders(p.read_text(), str(p.relative_to(ROOT)))
    assert not bad, "\n".join(bad)


def test_the_check_catches_a_cpu_tensor_and_accepts_a_reasoned_one():
    src = ("import torch\n"
           "a = torch.tensor([1.0])\n"
           "b = torch.zeros(3, device=x.device)\n"
           "c = torch.ones(2)  # on CPU: bookkeeping\n"
           "d = torch.zeros_like(b)\n"
           "e = torch.full(\n    (2,), 0.0)  # on CPU:\n")
    assert _offenders(src, "f.py") == ["f.py:2: torch.tensor(...) without device= (or a '# on CPU: reason')",
                                       "f.py:6: torch.full(...) without device= (or a '# on CPU: reason')"]


def test_rollouts_to_moves_every_tensor_media_and_token_inputs_included():
    from lightning_r1v2.rollout.types import Rollouts

    media = {"pixel_values": torch.zeros(5, 3, 4, 4), "image_grid_thw": torch.ones(1, 3, dtype=torch.long)}
    r = Rollouts(prompt_ids=torch.zeros(2, 3, dtype=torch.long), prompt_mask=torch.ones(2, 3, dtype=torch.long),
                 completion_ids=torch.zeros(2, 2, dtype=torch.long), completion_mask=torch.ones(2, 2, dtype=torch.long),
                 media=[media, media], completions=["a", "b"], records=[{}, {}], group_ids=torch.zeros(2, dtype=torch.long),
                 group_size=2, old_logprobs=torch.zeros(2, 2), rewards={"acc": torch.ones(2)}, reward=torch.ones(2),
                 advantages=torch.zeros(2), dropped=torch.zeros(2, dtype=torch.bool),
                 token_inputs={"mm_token_type_ids": torch.zeros(2, 3, dtype=torch.long)})
    m = r.to("meta")  # a device no tensor of the original is on
    seen = []
    for v in vars(m).values():
        if isinstance(v, torch.Tensor):
            seen.append(v)
        elif isinstance(v, dict):
            seen += list(v.values())
    seen += [t for d in m.media for t in d.values()]
    assert len(seen) == 9 + 1 + 1 + 2 * 2 and all(t.device.type == "meta" for t in seen)
    assert m.media[0] is m.media[1]  # rows that shared a media dict still share one
    assert r.prompt_ids.device.type == "cpu"  # the original is untouched
