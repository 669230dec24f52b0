"""A colocated vLLM rollout engine: one ``vllm.LLM`` per training rank, weights pushed in place.

Details (how each call maps onto vLLM, departures from TRL, what could not be run here):
docs/components.md, "The vLLM engine".
"""
from __future__ import annotations

import inspect
import logging
import os

import torch

from ..data.collate import load_images, prompt_text
from ..utils.distributed import deepspeed_zero3_config
from .base import RolloutEngine, as_policy, rollouts_from_samples
from ..models.inputs import policy_io
from .hf_engine import completion_mask_from_eos
from .types import Rollouts

log = logging.getLogger("lightning_r1v2.rollout")

INSTALL_HINT = "pip install 'lightning-r1v2[vllm]'"


def import_vllm():
    """``vllm``, or an ImportError that names the extra to install."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            f"VLLMEngine needs vLLM (GPU only), which is not installed: {INSTALL_HINT}. "
            "The default engine, lightning_r1v2.rollout.HFGenerateEngine, needs nothing extra."
        ) from e
    return vllm


class VLLMEngine(RolloutEngine):
    """Samples completions with a colocated vLLM engine (GPU only).

    A ``RolloutEngine`` like ``HFGenerateEngine``: the same sampling keys in YAML, with the
    same validation, and the same ``generate(policy, batch, G) -> Rollouts``.

    Args:
        max_new_tokens: Longest completion (R1V1: 8K; R1V3: 4K -> 8K).
        temperature: Sampling temperature (R1V1: 1.0).
        top_p: Nucleus sampling mass (1.0: off; keep it off for exact old log-probs).
        top_k: Top-k sampling (0: off).
        model_path: The folder vLLM loads (HF layout); None = the module's ``model`` folder.
        gpu_memory_utilization: Share of each GPU's memory vLLM may take (weights + KV cache).
        tensor_parallel_size: GPUs per vLLM instance; consecutive ranks form one instance.
        enable_sleep_mode: Release vLLM's GPU memory while the policy trains (sleep level 1).
        max_model_len: Prompt + completion tokens per sequence (None: the model's own limit).
        dtype: Weights' dtype inside vLLM.
        sync_weights_every: Push the policy's weights every N optimizer steps (1: on-policy).
        max_images_per_prompt: vLLM's ``limit_mm_per_prompt`` for images.
        weight_name_map: Prefix renames applied to parameter names before ``load_weights``
            (first matching prefix wins), e.g. ``{"model.language_model.": "language_model.model."}``.
        seed: Base sampling seed; each tensor-parallel block adds its index.
        llm_kwargs: Extra keyword arguments for ``vllm.LLM`` (e.g. ``max_num_seqs``).
    """

    def __init__(
        self,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        model_path: str | None = None,
        gpu_memory_utilization: float = 0.3,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = True,
        max_model_len: int | None = None,
        dtype: str = "bfloat16",
        sync_weights_every: int = 1,
        max_images_per_prompt: int = 1,
        weight_name_map: dict[str, str] | None = None,
        seed: int = 0,
        llm_kwargs: dict | None = None,
    ):
        super().__init__(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if tensor_parallel_size < 1 or sync_weights_every < 1:
            raise ValueError("tensor_parallel_size and sync_weights_every must be >= 1")
        self.model_path = model_path
        self.gpu_memory_utilization = gpu_memory_utilization
        self.tensor_parallel_size = tensor_parallel_size
        self.enable_sleep_mode = enable_sleep_mode
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.sync_weights_every = sync_weights_every
        self.max_images_per_prompt = max_images_per_prompt
        self.weight_name_map = dict(weight_name_map or {})
        self.seed = seed
        self.llm_kwargs = dict(llm_kwargs or {})
        self.llm = None
        self._tp_group = None
        self._synced_step: int | None = None  # the policy's optimizer step at the last push
        self._weights_version = 0  # pushes so far: names cached image features
        self._calls = 0  # generate calls so far: part of each request's seed
        self._sleeping = False

    # ------------------------------------------------------------- building
    def _build(self, policy):
        vllm = import_vllm()
        policy = as_policy(policy)
        path = self.model_path or policy.source
        if not path or path == "tiny" or not os.path.isdir(path):
            raise ValueError(
                f"VLLMEngine loads a checkpoint folder, got {path!r}: set engine.init_args.model_path, or the "
                "module's model, to a local HF-layout folder (cli.py export writes one from a .ckpt)"
            )
        trainer = policy.trainer
        world = getattr(trainer, "world_size", 1) if trainer is not None else 1
        rank = getattr(trainer, "global_rank", 0) if trainer is not None else 0
        tp = self.tensor_parallel_size
        if world % tp:
            raise ValueError(f"world size {world} is not a multiple of tensor_parallel_size {tp}")
        # The engine core runs in this process: weights are handed over as tensors (vLLM V1).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs = dict(
            model=path,
            tokenizer=path,
            dtype=self.dtype,
            gpu_memory_utilization=self.gpu_memory_utilization,
            tensor_parallel_size=tp,
            enable_sleep_mode=self.enable_sleep_mode,
            max_model_len=self.max_model_len,
            limit_mm_per_prompt={"image": self.max_images_per_prompt, "video": 0},
            logprobs_mode="processed_logprobs",
            seed=self.seed + rank // tp,  # identical within a tensor-parallel block
        )
        if world > 1:
            # vLLM joins the launcher's process group (torchrun / srun through Lightning).
            os.environ.setdefault("RANK", str(rank))
            os.environ.setdefault("LOCAL_RANK", str(getattr(trainer, "local_rank", 0)))
            os.environ.setdefault("WORLD_SIZE", str(world))
            kwargs["distributed_executor_backend"] = "external_launcher"
            if tp > 1:
                self._tp_group = _tp_subgroup(world, tp)
        kwargs.update(self.llm_kwargs)
        log.info("building vLLM engine on %s (tp=%d, world=%d)", path, tp, world)
        with _kept_global_rngs():  # vLLM seeds the process's global RNGs when it builds its engine
            self.llm = vllm.LLM(**kwargs)
        return self.llm

    def request_seed(self, step: int, call: int) -> int:
        """The sampling seed of a request: the same on every rank of a tensor-parallel block (whose
        ranks sample on their own and must draw the same numbers, else they diverge or hang), new
        for every step and call. vLLM reseeds only when the engine is built; the trainer's
        per-rank RNG (restored per rank on resume) never reaches it."""
        return (self.seed * 1_000_003 + step * 1_009 + call) % (2**31 - 1)

    def sampling_params(self, group_size: int, processor, seed: int | None = None):
        """The ``vllm.SamplingParams`` of one request: ``n = group_size`` samples of a prompt."""
        vllm = import_vllm()
        io = policy_io(processor)
        tokenizer = processor.tokenizer
        blocked = io.blocked_ids
        return vllm.SamplingParams(
            n=group_size,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k if self.top_k > 0 else -1,  # vLLM: -1 (or 0 in recent versions) = off
            max_tokens=self.max_new_tokens,
            logprobs=0,  # the sampled token's log-prob only
            stop_token_ids=list(io.stop_ids),
            bad_words=tokenizer.convert_ids_to_tokens(blocked) if blocked else None,
            seed=seed,
        )

    # ------------------------------------------------------------- sleeping
    def _wake(self, tag: str):
        """Wake vLLM's ``tag`` part (``weights`` or ``kv_cache``); all of it where tags are unsupported."""
        if not self._sleeping or not hasattr(self.llm, "wake_up"):
            return
        if "tags" in inspect.signature(self.llm.wake_up).parameters:
            self.llm.wake_up(tags=[tag])  # weights first: no KV cache on the GPU while gathering
            self._sleeping = tag != "kv_cache"
        else:
            self.llm.wake_up()
            self._sleeping = False

    def _sleep(self):
        if self.enable_sleep_mode and hasattr(self.llm, "sleep"):
            self.llm.sleep(level=1)  # weights to CPU, KV cache dropped
            self._sleeping = True
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # -------------------------------------------------------- weight pushing
    def _sync_due(self, policy) -> bool:
        step = as_policy(policy).step
        return self._synced_step is None or step - self._synced_step >= self.sync_weights_every

    @torch.no_grad()
    def push_weights(self, policy, trainable_only: bool | None = None) -> int:
        """Copy the policy's parameters into vLLM; returns how many tensors were pushed.

        The first push sends every parameter; later ones only those that train
        (``requires_grad``): frozen parts cannot have changed, and sleep level 1 keeps vLLM's copy
        of them in CPU memory. With ``trainable: [connector]`` (R1V2) a push is a few MB, not 76 GB.

        Under ZeRO-3 each submodule's own parameters are gathered together and released before
        the next, so at most one submodule is whole on a GPU at a time (every rank runs the same
        sequence of gathers: they are collectives).
        """
        from ..models.lora import has_lora

        policy = as_policy(policy)
        if trainable_only is None:
            trainable_only = self._synced_step is not None
        zero3 = deepspeed_zero3_config(policy.trainer) is not None
        if zero3:
            import deepspeed
        model = policy.model
        if has_lora(model):
            if zero3:
                raise NotImplementedError("VLLMEngine: pushing a LoRA policy under ZeRO-3 is not supported")
            pushed = self._push_merged_lora(model, trainable_only)
            self._after_push(policy)
            return pushed
        seen: set[int] = set()
        pushed = 0
        for prefix, sub in model.named_modules():
            own = [(n, p) for n, p in sub.named_parameters(recurse=False) if id(p) not in seen]
            seen.update(id(p) for _, p in own)
            if trainable_only:
                own = [(n, p) for n, p in own if p.requires_grad]
            if not own:
                continue
            names = [f"{prefix}.{n}" if prefix else n for n, _ in own]
            params = [p for _, p in own]
            if zero3:
                with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                    self._load_weights([(self._vllm_name(n), p.data) for n, p in zip(names, params)])
            else:
                self._load_weights([(self._vllm_name(n), p.data) for n, p in zip(names, params)])
            pushed += len(params)
        self._after_push(policy)
        return pushed

    def _push_merged_lora(self, model, trainable_only: bool) -> int:
        """A LoRA policy's weights as vLLM knows them: each adapted layer's ``weight`` is
        ``W + (alpha / r) B A`` (peft's ``get_delta_weight``) under the base layer's name; the adapters
        themselves are never sent. After the first push only adapted layers and trained parameters go."""
        from peft.tuners.lora import LoraLayer

        out: list[tuple[str, torch.Tensor]] = []
        inside: set[str] = set()
        seen: set[int] = set()  # tied parameters (embeddings / head) go once, as on the plain path
        for name, mod in model.named_modules():
            if any(name.startswith(p + ".") for p in inside):
                continue
            if isinstance(mod, LoraLayer):
                inside.add(name)
                base = mod.get_base_layer()
                merged = base.weight.data.clone()
                for adapter in mod.active_adapters:
                    merged += mod.get_delta_weight(adapter).to(merged.dtype)
                out.append((f"{name}.weight", merged))
                if getattr(base, "bias", None) is not None and (not trainable_only or base.bias.requires_grad):
                    out.append((f"{name}.bias", base.bias.data))
                continue
            for n, p in mod.named_parameters(recurse=False):
                if id(p) not in seen and (not trainable_only or p.requires_grad):
                    out.append((f"{name}.{n}" if name else n, p.data))
                seen.add(id(p))
        self._load_weights([(self._vllm_name(n), t) for n, t in out])
        return len(out)

    def _after_push(self, policy) -> None:
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        # vLLM also caches vision tower + connector outputs per image across requests, and the prefix
        # reset leaves them: an image seen before would reuse features of the old weights (R1V2 trains
        # exactly the connector). vLLM >= 0.12 clears them on request; every request also names its
        # images per weight version (``multi_modal_uuids``), so no cached feature outlives a push.
        engine = getattr(self.llm, "llm_engine", None)
        if hasattr(engine, "reset_encoder_cache"):
            engine.reset_encoder_cache()
        self._synced_step = policy.step
        self._weights_version += 1

    def _vllm_name(self, name: str) -> str:
        for old, new in self.weight_name_map.items():
            if name.startswith(old):
                return new + name[len(old):]
        return name

    def _load_weights(self, weights: list[tuple[str, torch.Tensor]]):
        executor = getattr(getattr(self.llm, "llm_engine", None), "model_executor", None)
        if executor is None or not hasattr(executor, "driver_worker"):
            # a multiprocess engine core cannot take CUDA tensors (collective_rpc pickles its arguments)
            raise RuntimeError(
                "VLLMEngine pushes weights into an in-process vLLM engine core, but this one runs in another "
                "process; set VLLM_ENABLE_V1_MULTIPROCESSING=0 before vLLM is imported (VLLMEngine sets it when "
                "it builds the engine: was vllm.LLM built elsewhere?)"
            )
        executor.driver_worker.model_runner.model.load_weights(weights=weights)

    # ------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, policy, batch: dict, group_size: int) -> Rollouts:
        """``G`` samples for each prompt of ``batch`` (a ``PromptCollator`` batch)."""
        G = group_size
        policy = as_policy(policy)
        if self.llm is None:
            self._build(policy)
        self._wake("weights")
        if self._sync_due(policy):
            n = self.push_weights(policy)
            log.debug("pushed %d tensors to vLLM at step %d", n, self._synced_step)
        self._wake("kv_cache")

        records = batch["records"]
        own = len(records)
        all_records, offset = self._gather_tp(records)
        prompts = [_mm_prompt(policy.processor, r, self._weights_version) for r in all_records]
        seed = self.request_seed(policy.step, self._calls)
        self._calls += 1
        outs = self.llm.generate(prompts, self.sampling_params(G, policy.processor, seed=seed), use_tqdm=False)
        outs = outs[offset: offset + own]
        self._sleep()
        return self._rollouts(outs, batch, G, policy.processor).to(policy.device)

    def _gather_tp(self, records: list[dict]) -> tuple[list[dict], int]:
        """Every record of this tensor-parallel block, and where this rank's start."""
        if self._tp_group is None:
            return records, 0
        import torch.distributed as dist

        parts: list = [None] * dist.get_world_size(self._tp_group)
        dist.all_gather_object(parts, records, group=self._tp_group)
        me = dist.get_rank(self._tp_group)
        return [r for p in parts for r in p], sum(len(p) for p in parts[:me])

    def _rollouts(self, outs, batch: dict, G: int, processor) -> Rollouts:
        io = policy_io(processor)
        pad = io.pad_id
        prompt_rows, comp_rows, lp_rows, truncated = [], [], [], []
        for i, out in enumerate(outs):
            ids = list(out.prompt_token_ids) if getattr(out, "prompt_token_ids", None) is not None else None
            ref = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
            if ids is None:
                ids = ref
            elif ids != ref:
                raise ValueError(
                    f"vLLM's prompt ({len(ids)} tokens) differs from the processor's ({len(ref)} tokens) for record "
                    f"{batch['records'][i].get('id')!r}: the training forward would not see what was sampled. "
                    "Make vLLM's image processing match the processor's (tiles, image size) or use HFGenerateEngine."
                )
            if len(out.outputs) != G:
                raise ValueError(f"vLLM returned {len(out.outputs)} samples for a prompt, expected {G}")
            for o in out.outputs:
                prompt_rows.append(ids)
                toks = list(o.token_ids)
                comp_rows.append(toks)
                lp_rows.append(_sampled_logprobs(o, toks))
                reason = getattr(o, "finish_reason", None)
                truncated.append(reason == "length" if reason is not None else not set(io.stop_ids) & set(toks))
        # built on the CPU from vLLM's lists; ``generate`` moves the whole batch with ``Rollouts.to``
        P = max(len(r) for r in prompt_rows)
        C = max(1, max(len(r) for r in comp_rows))
        prompt_ids = torch.tensor([[pad] * (P - len(r)) + r for r in prompt_rows], dtype=torch.long)  # on CPU: moved by generate; [N, P]
        prompt_mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in prompt_rows], dtype=torch.long)  # on CPU: moved by generate
        completion_ids = torch.tensor([r + [pad] * (C - len(r)) for r in comp_rows], dtype=torch.long)  # on CPU: moved by generate; [N, C]
        old_logprobs = torch.tensor([r + [0.0] * (C - len(r)) for r in lp_rows], dtype=torch.float32)  # on CPU: moved by generate; [N, C]
        completion_mask, _ = completion_mask_from_eos(completion_ids, io.stop_ids)
        lengths = torch.tensor([len(r) for r in comp_rows])  # on CPU: moved by generate; [N]
        completion_mask = completion_mask * (torch.arange(C)[None, :] < lengths[:, None]).long()  # on CPU: moved by generate; [N, C]
        truncated = torch.tensor(truncated, dtype=torch.bool)  # on CPU: moved by generate
        return rollouts_from_samples(batch, G, prompt_ids, prompt_mask, completion_ids, completion_mask, truncated,
                                     old_logprobs, io)


def _mm_prompt(processor, record: dict, weights_version: int = 0) -> dict:
    """vLLM's multimodal prompt: chat-template text plus the record's PIL images, each named by the
    record, its index and the weights version (vLLM keys cached image features by this name)."""
    images = load_images(record)
    prompt = {"prompt": prompt_text(processor, record)}
    if images:
        rid = record.get("id", record.get("_source", "record"))
        prompt["multi_modal_data"] = {"image": images[0] if len(images) == 1 else images}
        uuids = [f"{rid}/{i}@w{weights_version}" for i in range(len(images))]
        prompt["multi_modal_uuids"] = {"image": uuids[0] if len(images) == 1 else uuids}
    return prompt


def _sampled_logprobs(output, token_ids: list[int]) -> list[float]:
    """Log-prob of each sampled token from ``CompletionOutput.logprobs`` (one mapping per position)."""
    lps = getattr(output, "logprobs", None)
    if lps is None:
        raise ValueError("vLLM returned no log-probs; SamplingParams(logprobs=0) must be set")
    out = []
    for t, entry in zip(token_ids, lps):
        v = entry[t]
        out.append(float(getattr(v, "logprob", v)))
    return out


class _kept_global_rngs:
    """Restore Python's, NumPy's and torch's (CPU and CUDA) global RNG states on exit."""

    def __enter__(self):
        import random

        import numpy as np

        self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                       torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        return self

    def __exit__(self, *exc):
        import random

        import numpy as np

        py, npy, cpu, cuda = self.states
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        return False


def _tp_subgroup(world: int, tp: int):
    """This rank's block of ``tp`` consecutive ranks (vLLM's tensor-parallel layout)."""
    import torch.distributed as dist

    group, _ = dist.new_subgroups_by_enumeration([list(range(i, i + tp)) for i in range(0, world, tp)])
    return group


__all__ = ["VLLMEngine", "import_vllm", "INSTALL_HINT"]
