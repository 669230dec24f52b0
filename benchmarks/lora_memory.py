"""Peak memory and time of GRPO updates: LoRA adapters against full fine-tuning, side by side.

    python benchmarks/lora_memory.py [--steps 3] [--width 512] [--layers 8]

Each variant runs in its own process (peak resident memory, ``ru_maxrss``, is per process): a
tiny-architecture policy scaled by ``--width`` / ``--layers`` (random init), GRPO updates on fixed
rollouts (``--rows`` sequences of ``--tokens`` tokens), AdamW. Printed: parameters trained, optimizer state elements,
peak RSS and median update time per variant, and LoRA / full ratios. On a GPU (``--device cuda``)
peak memory is ``torch.cuda.max_memory_allocated``. A measurement, not a test.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from lightning_r1v2.models.tiny import TinyVLMConfig, build_processor, build_tiny_model
    from lightning_r1v2.models.lora import add_lora
    from lightning_r1v2.models.loading import set_trainable

    torch.set_num_threads(1)
    cfg = TinyVLMConfig(text_hidden=args.width, text_layers=args.layers, text_intermediate=3 * args.width,
                        text_heads=8, text_kv_heads=4)
    proc = build_processor(cfg)
    model = build_tiny_model(cfg, proc.tokenizer).to(args.device)
    if args.variant == "lora":
        add_lora(model, {"r": 8, "alpha": 16, "parts": ["llm", "connector"]})
        counts = set_trainable(model, [], allow_none=True)
    else:
        counts = set_trainable(model, ["connector", "llm"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    n, T = args.rows, args.tokens
    ids = torch.randint(10, 200, (n, T), generator=g).to(args.device)  # text-only rows: the update's cost
    times = []
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        loss = -logp.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    state = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"trained": counts["trainable"], "optimizer_state": state, "peak_mb": peak,
            "update_s": statistics.median(times)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=8, help="sequences per update")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--variant", choices=["lora", "full"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    out = {}
    for variant in ("full", "lora"):
        cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps), "--width", str(args.width),
               "--layers", str(args.layers), "--device", args.device, "--rows", str(args.rows),
               "--tokens", str(args.tokens)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"{'variant':<8} {'trained params':>15} {'optimizer state':>16} {'peak MB':>9} {'update s':>9}")
    for v, r in out.items():
        print(f"{v:<8} {r['trained']:>15,} {r['optimizer_state']:>16,} {r['peak_mb']:>9.0f} {r['update_s']:>9.3f}")
    f, lo = out["full"], out["lora"]
    print(f"lora/full: trained {lo['trained'] / f['trained']:.3f}, optimizer state "
          f"{lo['optimizer_state'] / f['optimizer_state']:.3f}, peak memory {lo['peak_mb'] / f['peak_mb']:.2f}, "
          f"update time {lo['update_s'] / f['update_s']:.2f}")


if __name__ == "__main__":
    main()
