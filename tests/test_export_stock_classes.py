"""``cli.py export`` writes a folder stock transformers loads as the same classes as the source.

Where torchvision is missing (here) our loader uses an image-only stand-in (``TinyVLProcessor`` for the
built-in tiny model, the stock class without its video part for a folder) for
``InternVLProcessor``; the exported folder must still declare ``InternVLProcessor`` and keep the
source's video processor config. Stock ``AutoProcessor`` cannot be run here (the InternVL video
processor imports torchvision), so these tests check the class names the files declare against
transformers' own auto mappings, and load the folder with ``AutoModelForImageTextToText``,
``AutoTokenizer`` and our loader.
"""
import json

import lightning as L
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoTokenizer, InternVLForConditionalGeneration
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

from lightning_r1v2.jobs.export import export
from lightning_r1v2.models.loading import load_policy
from lightning_r1v2.modules import SFTModule

# What a stock InternVL -hf folder saved before transformers v5 carries as its own file.
VIDEO_CONFIG = {
    "video_processor_type": "InternVLVideoProcessor", "processor_class": "InternVLProcessor",
    "size": {"height": 32, "width": 32}, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "initial_shift": True, "resample": 3,
}


def _stock_source(folder):
    """The tiny policy saved as a stock InternVL -hf folder (InternVLProcessor, a video processor config)."""
    model, processor = load_policy("tiny", seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for name in ("processor_config.json", "tokenizer_config.json"):
        data = json.loads((folder / name).read_text())
        data["processor_class"] = "InternVLProcessor"
        (folder / name).write_text(json.dumps(data))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_CONFIG))
    return folder


def _checkpoint(module, path):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def _declared(folder) -> dict:
    proc = json.loads((folder / "processor_config.json").read_text())
    return {
        "processor": proc["processor_class"],
        "tokenizer_processor": json.loads((folder / "tokenizer_config.json").read_text())["processor_class"],
        "image": proc["image_processor"]["image_processor_type"],
        "model": json.loads((folder / "config.json").read_text())["architectures"],
    }


def test_export_of_a_stock_folder_policy_keeps_its_classes_and_video_config(tmp_path):
    source = _stock_source(tmp_path / "source")
    module = SFTModule(model=str(source), defer_init=False)
    # torchvision is missing here: the stock class without its video part (models/families.image_only)
    assert type(module.processor).__name__ == "InternVLProcessor" and getattr(type(module.processor), "image_only", False)
    with torch.no_grad():  # a change the export must carry
        module.model.lm_head.weight.mul_(1.5)
    out = tmp_path / "exported"
    export(str(_checkpoint(module, tmp_path / "sft.ckpt")), str(out))

    assert _declared(out) == {"processor": "InternVLProcessor", "tokenizer_processor": "InternVLProcessor",
                              "image": "GotOcr2ImageProcessor", "model": ["InternVLForConditionalGeneration"]}
    assert PROCESSOR_MAPPING_NAMES[json.loads((out / "config.json").read_text())["model_type"]] == "InternVLProcessor"
    assert json.loads((out / "video_preprocessor_config.json").read_text()) == VIDEO_CONFIG  # kept as it was
    assert "local_files_only" not in json.loads((out / "tokenizer_config.json").read_text())

    src_model = AutoModelForImageTextToText.from_pretrained(str(source))
    model = AutoModelForImageTextToText.from_pretrained(str(out))
    assert type(model) is type(src_model) is InternVLForConditionalGeneration
    torch.testing.assert_close(model.lm_head.weight, src_model.lm_head.weight * 1.5, atol=0, rtol=0)
    assert type(AutoTokenizer.from_pretrained(str(out))) is type(AutoTokenizer.from_pretrained(str(source)))

    _, src_proc = load_policy(str(source))
    _, proc = load_policy(str(out))
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    text = "<|im_start|>user\n<IMG_CONTEXT>\nHow many?<|im_end|>\n<|im_start|>assistant\n"
    a, b = proc(images=[image], text=[text], return_tensors="pt"), src_proc(images=[image], text=[text], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_export_of_the_tiny_default_declares_a_stock_video_processor(tmp_path):
    """No source folder: the video processor config is derived from the image processor's."""
    out = tmp_path / "exported"
    export(str(_checkpoint(SFTModule(), tmp_path / "sft.ckpt")), str(out))
    assert _declared(out)["processor"] == "InternVLProcessor"
    proc = json.loads((out / "processor_config.json").read_text())
    video, image = proc["video_processor"], proc["image_processor"]
    assert video["video_processor_type"] == "InternVLVideoProcessor"
    assert video["size"] == image["size"] == {"height": 32, "width": 32}
    assert video["image_mean"] == image["image_mean"] and video["image_std"] == image["image_std"]
    _, processor = load_policy(str(out))  # our loader reads the folder back
    assert processor.image_seq_length == 4

