"""``cli.py convert``: a Skywork R1V / R1V2 / R1V3 release folder to an InternVL ``-hf`` folder.

Skywork releases its checkpoints in InternVL's original, remote-code layout: ``config.json`` with
``model_type: skywork_chat`` (``SkyworkChatModel``), an InternViT ``vision_config``, a Qwen2
``llm_config``, weights ``vision_model.*`` / ``mlp1.*`` / ``language_model.*``, the LLM's tokenizer
with InternVL's image tokens, and no processor (its own code tiles each image into at most
``max_dynamic_patch`` 448 px tiles plus a thumbnail). transformers' ``InternVLForConditionalGeneration``
is the same network under other names, so the conversion is a renaming (``N``: a ViT layer):

- ``vision_model.embeddings.class_embedding`` -> ``vision_tower.embeddings.cls_token``;
  ``patch_embedding.*`` -> ``patch_embeddings.projection.*``; ``position_embedding`` -> ``position_embeddings``
- ``vision_model.encoder.layers.N.attn.qkv.*`` -> ``vision_tower.encoder.layer.N.attention.{q,k,v}_proj.*``
  (split in three along the output dimension, q first: InternViT reshapes it as ``[3, heads, head_dim]``)
- ``...attn.proj`` -> ``...attention.projection_layer``; ``...attn.{q,k}_norm`` -> ``...attention.{q,k}_norm``;
  ``ls1`` / ``ls2`` -> ``lambda_1`` / ``lambda_2``; ``norm1`` / ``norm2`` -> ``layernorm_before`` /
  ``layernorm_after``; ``mlp.fc1`` / ``fc2`` unchanged
- ``mlp1.0`` / ``mlp1.1`` / ``mlp1.3`` -> ``multi_modal_projector.layer_norm`` / ``linear_1`` / ``linear_2``
- ``language_model.model.*`` and ``language_model.lm_head.*`` unchanged

The output names are those ``save_pretrained`` writes for an ``-hf`` model (the hub layout).
(``mlp1`` is ``Sequential(LayerNorm, Linear, GELU, Linear)``: index 2 holds no weights.) Shards are
converted one at a time, so memory holds one shard, not the model. Every name and shape is checked
against an ``InternVLForConditionalGeneration`` built on the meta device from the converted config
before anything is written.

Refused rather than converted silently wrong: pixel shuffle ``ps_version`` other than ``v2``
(transformers implements v2), ``select_layer`` other than -1, a ``force_image_size`` different from
the vision tower's ``image_size``, an LLM that is not Qwen2-family.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

log = logging.getLogger("lightning_r1v2.convert")

SKYWORK_MODEL_TYPE = "skywork_chat"
# InternVL's image tokens, as the tokenizer attributes InternVLProcessor reads.
IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
# InternVL / Skywork normalise tiles with the ImageNet statistics.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# llm_config keys that must not travel: remote-code and attention-backend choices of the release.
_DROP_LLM_KEYS = ("auto_map", "_name_or_path", "attn_implementation", "_attn_implementation", "use_flash_attn",
                  "torch_dtype", "dtype")
_VISION_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                "patch_size")

_VIT = r"^vision_model\.encoder\.layers\.(\d+)\."
_TOWER = r"vision_tower.encoder.layer.\1."
_RULES = [
    (r"^vision_model\.embeddings\.class_embedding$", "vision_tower.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.patch_embedding\.(weight|bias)$", r"vision_tower.embeddings.patch_embeddings.projection.\1"),
    (r"^vision_model\.embeddings\.position_embedding$", "vision_tower.embeddings.position_embeddings"),
    (_VIT + r"attn\.proj\.(weight|bias)$", _TOWER + r"attention.projection_layer.\2"),
    (_VIT + r"attn\.(q_norm|k_norm)\.weight$", _TOWER + r"attention.\2.weight"),
    (_VIT + r"ls1$", _TOWER + "lambda_1"),
    (_VIT + r"ls2$", _TOWER + "lambda_2"),
    (_VIT + r"norm1\.(weight|bias)$", _TOWER + r"layernorm_before.\2"),
    (_VIT + r"norm2\.(weight|bias)$", _TOWER + r"layernorm_after.\2"),
    (_VIT + r"mlp\.(fc1|fc2)\.(weight|bias)$", _TOWER + r"mlp.\2.\3"),
    (r"^mlp1\.0\.(weight|bias)$", r"multi_modal_projector.layer_norm.\1"),
    (r"^mlp1\.1\.(weight|bias)$", r"multi_modal_projector.linear_1.\1"),
    (r"^mlp1\.3\.(weight|bias)$", r"multi_modal_projector.linear_2.\1"),
    (r"^language_model\.(model\..+|lm_head\.weight)$", r"language_model.\1"),
]
_QKV = _VIT + r"attn\.qkv\.(weight|bias)$"
# The file names above (save_pretrained's) -> the runtime names of InternVLForConditionalGeneration.
_RUNTIME_PREFIXES = [
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]


def target_names(name: str) -> list[str] | None:
    """The InternVL ``-hf`` names of a Skywork weight (three for a fused qkv), None if unknown."""
    m = re.match(_QKV, name)
    if m:
        layer, kind = m.groups()
        return [f"vision_tower.encoder.layer.{layer}.attention.{p}_proj.{kind}" for p in "qkv"]
    for pattern, repl in _RULES:
        if re.match(pattern, name):
            return [re.sub(pattern, repl, name)]
    return None


def convert_tensor(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One Skywork weight as ``{-hf name: tensor}``; a fused qkv ``[3*C, ...]`` becomes q, k, v ``[C, ...]``."""
    names = target_names(name)
    if names is None:
        raise KeyError(f"{name}: not a weight of the Skywork R1V layout")
    if len(names) == 1:
        return {names[0]: tensor}
    if tensor.shape[0] % 3:
        raise ValueError(f"{name}: fused qkv of {tuple(tensor.shape)} does not split in three")
    return {n: t.contiguous() for n, t in zip(names, tensor.chunk(3, dim=0))}


def runtime_name(file_name: str) -> str:
    """The name a ``-hf`` file weight has inside ``InternVLForConditionalGeneration`` (its state_dict)."""
    for old, new in _RUNTIME_PREFIXES:
        if file_name.startswith(old):
            return new + file_name[len(old):]
    return file_name


def internvl_config(sky: dict, where: str = "config.json") -> dict:
    """The ``InternVLConfig`` keyword arguments of a Skywork ``config.json`` (``sky``), but
    ``image_token_id`` (the tokenizer's ``<IMG_CONTEXT>``).

    ``image_seq_length`` is the tokens per tile after pixel shuffle:
    ``(image_size / patch_size)^2 * downsample_ratio^2`` (448 px, 14 px patches, 0.5: 256).
    ``where`` names the file in error messages.
    """
    vis, llm = sky.get("vision_config"), sky.get("llm_config")
    if not isinstance(vis, dict) or not isinstance(llm, dict):
        raise ValueError(f"{where}: no vision_config / llm_config sections (not a Skywork R1V config)")
    llm_type = llm.get("model_type")
    if llm_type not in ("qwen2",):
        raise ValueError(f"{where}: llm_config.model_type is {llm_type!r}; only Qwen2-family LLMs "
                         "(R1V, R1V2, R1V3) are converted")
    ps = sky.get("ps_version", "v1")
    if ps != "v2":
        raise ValueError(f"{where}: ps_version {ps!r}; transformers' InternVL implements pixel shuffle v2 only")
    if sky.get("select_layer", -1) != -1:
        raise ValueError(f"{where}: select_layer {sky['select_layer']}; only -1 (the last ViT layer) is converted")
    lacking = [f"vision_config.{k}" for k in _VISION_KEYS if k not in vis] + [
        f"llm_config.{k}" for k in ("vocab_size", "hidden_size", "num_hidden_layers") if k not in llm]
    if lacking:
        raise ValueError(f"{where}: lacks {lacking}")
    image_size, patch_size = vis["image_size"], vis["patch_size"]
    forced = sky.get("force_image_size")
    if forced not in (None, image_size):
        raise ValueError(f"{where}: force_image_size {forced} differs from vision_config.image_size {image_size}")
    ratio = float(sky.get("downsample_ratio", 0.5))
    text = {k: v for k, v in llm.items() if k not in _DROP_LLM_KEYS}  # the model's dtype is the top-level one
    tie = bool(llm.get("tie_word_embeddings", False))
    return dict(
        vision_config=dict(
            hidden_size=vis["hidden_size"],
            num_hidden_layers=vis["num_hidden_layers"],
            num_attention_heads=vis["num_attention_heads"],
            intermediate_size=vis["intermediate_size"],
            hidden_act=vis.get("hidden_act", "gelu"),
            layer_norm_eps=vis.get("layer_norm_eps", 1e-6),
            norm_type=vis.get("norm_type", "layer_norm"),
            attention_bias=bool(vis.get("qkv_bias", False)),
            use_qk_norm=bool(vis.get("qk_normalization", False)),
            image_size=image_size,
            patch_size=patch_size,
            num_channels=vis.get("num_channels", 3),
            attention_dropout=vis.get("attention_dropout", 0.0),
            hidden_dropout_prob=vis.get("dropout", 0.0),
            use_mean_pooling=True,  # InternViT has no final norm: the -hf tower's last layernorm is then Identity
        ),
        text_config=text,
        downsample_ratio=ratio,
        projector_hidden_act="gelu",  # mlp1[2] is nn.GELU()
        image_seq_length=int((image_size // patch_size) ** 2 * ratio**2),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drop the CLS token, as Skywork's extract_feature does
        tie_word_embeddings=tie,
        dtype=sky.get("torch_dtype", llm.get("torch_dtype")),
    )


def image_processor_kwargs(sky: dict) -> dict:
    """``GotOcr2ImageProcessor`` settings reproducing Skywork's tiling: ``min..max_dynamic_patch``
    tiles of ``image_size`` px at the closest aspect ratio, a thumbnail when there are several,
    bicubic resize, ImageNet normalisation."""
    size = sky.get("force_image_size") or sky["vision_config"]["image_size"]
    if not sky.get("use_thumbnail", True):
        log.warning("use_thumbnail is false, but InternVL's image processor always adds a thumbnail to several tiles")
    return dict(
        size={"height": size, "width": size},
        crop_to_patches=bool(sky.get("dynamic_image_size", True)),
        min_patches=int(sky.get("min_dynamic_patch", 1)),
        max_patches=int(sky.get("max_dynamic_patch", 12)),
        resample=3,  # PIL bicubic
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )


def chat_template(llm_template: str | None) -> str:
    """A chat template for image + text messages around the LLM's own template.

    Content lists are flattened to strings first: each image item becomes ``<IMG_CONTEXT>\\n`` (the
    processor expands it into the tile tokens), text items are appended, so an image comes before
    its question as in Skywork's ``"<image>\\n" + question``. The LLM's template then renders the
    turns (R1V2's QwQ template opens the answer with ``<think>``). Without one: ChatML.
    """
    flatten = (
        "{%- set ns = namespace(msgs=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if m['content'] is string -%}{%- set text = m['content'] -%}"
        "{%- else -%}{%- set text = namespace(s='') -%}"
        "{%- for item in m['content'] -%}"
        "{%- if item['type'] == 'image' -%}{%- set text.s = text.s + '<IMG_CONTEXT>\\n' -%}"
        "{%- elif item['type'] == 'text' -%}{%- set text.s = text.s + item['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- set text = text.s -%}{%- endif -%}"
        "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': text}] -%}"
        "{%- endfor -%}"
        "{%- set messages = ns.msgs -%}"
    )
    chatml = (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )
    return flatten + (llm_template or chatml)


def read_skywork_config(src: Path) -> dict:
    """``src/config.json``, checked to be a Skywork R1V (``skywork_chat``) config."""
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: no such file (not a Skywork R1V release folder)")
    try:
        sky = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}:{e.lineno}: not valid JSON ({e.msg})") from None
    if sky.get("model_type") != SKYWORK_MODEL_TYPE:
        raise ValueError(f"{cfg_file}:{_line_of(cfg_file, 'model_type')}: model_type is {sky.get('model_type')!r}, "
                         f"not {SKYWORK_MODEL_TYPE!r} (a Skywork R1V / R1V2 / R1V3 release folder)")
    return sky


def _line_of(path: Path, key: str) -> int:
    """The first line of a JSON file naming ``key`` (1 if none), for ``file:line`` messages."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if f'"{key}"' in line:
            return i
    return 1


def source_shards(src: Path) -> list[Path]:
    """The safetensors files of a folder: the index's shards in order, or ``model.safetensors``."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index}: lists shards that are not in the folder: {missing}")
        return [src / n for n in names]
    single = src / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{src}: no model.safetensors or model.safetensors.index.json "
                            "(the Skywork releases ship safetensors shards)")


def plan(shards: list[Path], expected: dict[str, tuple], tied: bool) -> dict[Path, list[str]]:
    """Check every source weight maps to an expected ``-hf`` weight of the right shape, and none is missing.

    Args:
        shards: the source safetensors files.
        expected: runtime name -> shape, from the meta-device model.
        tied: the LLM ties ``lm_head`` to the embeddings (then ``lm_head`` may be absent).
    Returns:
        Source shard -> its weight names (nothing is read but the headers).
    """
    from safetensors import safe_open

    found: dict[str, tuple] = {}
    names: dict[Path, list[str]] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            names[shard] = list(f.keys())
            unexpected = [k for k in names[shard] if target_names(k) is None]
            if unexpected:
                raise ValueError(f"{shard}: {len(unexpected)} weights not in the Skywork R1V layout, "
                                 f"e.g. {unexpected[:5]}")
            for k in names[shard]:
                shape = tuple(f.get_slice(k).get_shape())
                targets = target_names(k)
                if len(targets) == 3:
                    shape = (shape[0] // 3, *shape[1:])
                for t in targets:
                    found[runtime_name(t)] = (shape, shard, k)
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ValueError(f"{found[extra[0]][1]}: weights the converted config has no place for, e.g. "
                         f"{[found[e][2] for e in extra[:5]]} (vision/LLM config and weights disagree?)")
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(set(expected) - set(found) - optional)
    if missing:
        raise ValueError(f"{shards[0].parent}: the weights lack {len(missing)} tensors the config needs, e.g. "
                         f"{missing[:5]}")
    for name, (shape, shard, k) in found.items():
        if tuple(expected[name]) != shape:
            raise ValueError(f"{shard}: {k} has shape {shape}, the converted config expects {tuple(expected[name])}")
    return names


def expected_weights(config) -> dict[str, tuple]:
    """Runtime name -> shape of an ``InternVLForConditionalGeneration`` of ``config``, built on the meta device."""
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def internvl_tokenizer(src: Path, vocab_size: int):
    """The release's tokenizer with InternVL's image tokens declared (added where missing).

    The ids of the image tokens must be rows of the LLM's embedding (``vocab_size``).
    """
    from transformers import AutoTokenizer, Qwen2Config

    # The LLM's tokenizer: config.json (skywork_chat, auto_map to Skywork's code) is not read.
    tok = AutoTokenizer.from_pretrained(str(src), config=Qwen2Config(), local_files_only=True, trust_remote_code=False,
                                        extra_special_tokens=dict(IMAGE_TOKENS))
    ids = {t: tok.convert_tokens_to_ids(t) for t in IMAGE_TOKENS.values()}
    outside = {t: i for t, i in ids.items() if i is None or i >= vocab_size}
    if outside:
        raise ValueError(f"{src}: the tokenizer's image tokens {outside} have no row in the LLM's embedding "
                         f"(llm_config.vocab_size {vocab_size})")
    return tok


def write_weights(shards: list[Path], names: dict[Path, list[str]], out: Path) -> int:
    """Convert each source shard into one output shard (a progress line each); returns the tensor count."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    n = len(shards)
    weight_map, total_bytes, count = {}, 0, 0
    for i, shard in enumerate(shards, 1):
        dst = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(shard), framework="pt") as f:
            for k in names[shard]:
                tensors.update(convert_tensor(k, f.get_tensor(k)))
        save_file(tensors, str(out / dst), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, dst))
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        count += len(tensors)
        print(f"convert: shard {i}/{n} {shard.name}: {len(names[shard])} weights -> {len(tensors)} in {dst}", flush=True)
    if n > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return count


def convert(src: str, out: str) -> str:
    """Write a Skywork R1V / R1V2 / R1V3 release folder as an InternVL ``-hf`` folder.

    The result loads with ``AutoModelForImageTextToText`` / ``AutoProcessor`` (stock transformers,
    no remote code) and as ``--model.model <out>`` in every job. Its processor tiles images as
    Skywork's code does (up to ``max_dynamic_patch`` tiles plus a thumbnail).

    Args:
        src: The release folder (``config.json`` with ``model_type: skywork_chat``, safetensors,
            tokenizer files).
        out: The folder to write; must not exist or be empty.
    """
    from transformers import GenerationConfig, InternVLConfig
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from ..models.tiny import TinyVLProcessor
    from .export import save_processor

    src_dir, out_dir = Path(src), Path(out)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"{src}: no such folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; give a new folder")
    sky = read_skywork_config(src_dir)
    kwargs = internvl_config(sky, str(src_dir / "config.json"))
    tokenizer = internvl_tokenizer(src_dir, kwargs["text_config"]["vocab_size"])
    config = InternVLConfig(**kwargs, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["context_image_token"]))
    shards = source_shards(src_dir)
    names = plan(shards, expected_weights(config), config.tie_word_embeddings)

    out_dir.mkdir(parents=True, exist_ok=True)
    count = write_weights(shards, names, out_dir)
    config.architectures = ["InternVLForConditionalGeneration"]
    config.save_pretrained(out_dir)
    if (src_dir / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(str(src_dir), local_files_only=True)
    else:
        llm = sky["llm_config"]
        gen = GenerationConfig(bos_token_id=llm.get("bos_token_id"), eos_token_id=llm.get("eos_token_id"),
                               pad_token_id=tokenizer.pad_token_id)
    gen.save_pretrained(out_dir)
    processor = TinyVLProcessor(
        image_processor=GotOcr2ImageProcessorPil(**image_processor_kwargs(sky)),
        tokenizer=tokenizer,
        image_seq_length=config.image_seq_length,
        chat_template=chat_template(tokenizer.chat_template),
    )
    save_processor(processor, out_dir)
    print(f"convert: wrote {count} tensors of {src} as InternVLForConditionalGeneration to {out} "
          f"({config.image_seq_length} tokens per tile, up to {processor.image_processor.max_patches} tiles)")
    return out
