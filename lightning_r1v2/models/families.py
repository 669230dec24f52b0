"""One small adapter per VLM family, so that everything else is family-agnostic.

A ``Family`` says which parameters make up the vision tower, the connector and the LLM (by name
prefix, connector first: Qwen's connector ``visual.merger`` sits inside its vision tower), whether
the model computes its own position ids (Qwen's 3-D M-RoPE: never pass 1-D ones), and whether a
prompt's KV cache may be shared between the ``G`` samples of a group. Everything a batch must
carry to the model comes from the processor itself (see ``policy_io``), so the table stays small.

Adding a family: one ``Family`` row, plus one fixture in ``tests/tiny_families.py``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

_HF_PARTS = {  # the -hf layout of InternVL, LLaVA, Gemma3 (and most ``*ForConditionalGeneration``)
    "connector": ("model.multi_modal_projector.",),
    "vision": ("model.vision_tower.",),
    "llm": ("model.language_model.", "lm_head."),
}


@dataclass(frozen=True)
class Family:
    name: str
    processors: tuple[str, ...]  # processor class names of the family
    model_types: tuple[str, ...]  # config.model_type values
    parts: dict = field(default_factory=lambda: dict(_HF_PARTS))  # part -> parameter-name prefixes
    own_positions: bool = False  # the model derives (3-D) position ids from input ids and image grids
    share_prompt: bool = True  # a prompt's KV cache can be reused by the G samples (1-D positions, no
    #                            per-token inputs such as token_type_ids that change the prompt's attention)


_QWEN_PARTS = {"connector": ("model.visual.merger.",), "vision": ("model.visual.",),
               "llm": ("model.language_model.", "lm_head.")}

FAMILIES = (
    Family("internvl", ("InternVLProcessor", "TinyVLProcessor"), ("internvl",)),
    Family("llava", ("LlavaProcessor",), ("llava",)),
    Family("gemma3", ("Gemma3Processor",), ("gemma3",), share_prompt=False),
    Family("qwen2_vl", ("Qwen2VLProcessor", "Qwen2_5_VLProcessor"), ("qwen2_vl", "qwen2_5_vl"),
           parts=_QWEN_PARTS, own_positions=True, share_prompt=False),
    Family("qwen3_vl", ("Qwen3VLProcessor",), ("qwen3_vl",),
           parts={**_QWEN_PARTS, "connector": ("model.visual.merger.", "model.visual.deepstack_merger_list.")},
           own_positions=True, share_prompt=False),
)


def family_of_processor(processor) -> Family:
    name = type(processor).__name__
    for fam in FAMILIES:
        if name in fam.processors:
            return fam
    raise ValueError(f"no adapter for processor class {name}; supported families: "
                     + ", ".join(f"{f.name} ({'/'.join(f.processors)})" for f in FAMILIES))


def family_of_model_type(model_type: str) -> Family:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise ValueError(f"no adapter for model_type {model_type!r}; supported: "
                     + ", ".join(t for f in FAMILIES for t in f.model_types)
                     + " (a Skywork R1V folder: convert it first, `python cli.py convert`)")


def part_of(name: str, family: Family) -> str | None:
    """The part (``connector``, ``vision``, ``llm``) of parameter ``name``, connector prefixes first."""
    for part in ("connector", "vision", "llm"):
        if any(name.startswith(p) for p in family.parts[part]):
            return part
    return None


@functools.lru_cache(maxsize=None)
def image_only(cls):
    """``cls`` (a processor class with a video processor) without it, under the same class name.

    Stock Qwen-VL and InternVL processors always build a video processor, which imports
    torchvision; many machines have no torchvision build. The subclass takes only the image
    processor and tokenizer (transformers reads a processor's parts from its ``__init__``
    signature) and keeps ``cls.__name__``, so a folder it saves names the stock class.
    """

    import inspect

    # transformers reads a processor's parts and saved settings from ``__init__``'s signature and its
    # code object's argument names, so the wrapper is generated with the parent's own parameters
    params = [p for n, p in inspect.signature(cls.__init__).parameters.items() if n not in ("self", "video_processor")]
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    args = ", ".join(f"{p.name}=_d[{p.name!r}]" for p in named)
    calls = ", ".join(f"{p.name}={p.name}" for p in named)
    src = (f"def __init__(self, {args}, **kwargs):\n"
           f"    kwargs.pop('video_processor', None)\n"
           f"    _cls.__init__(self, video_processor=None, {calls}, **kwargs)\n")
    scope = {"_cls": cls, "_d": {p.name: (None if p.default is p.empty else p.default) for p in named}}
    exec(src, scope)
    __init__ = scope["__init__"]
    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__,
                                       "__qualname__": cls.__name__, "image_only": True})


def needs_image_only(cls) -> bool:
    """The processor class builds a video processor (torchvision) and torchvision is missing."""
    import importlib.util
    import inspect

    return ("video_processor" in inspect.signature(cls.__init__).parameters
            and importlib.util.find_spec("torchvision") is None)
