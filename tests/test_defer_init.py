"""``defer_init``: the policy is built in ``configure_model``; under ZeRO-3 with a live ``HfDeepSpeedConfig``.

A real ZeRO-3 load needs GPUs and a process group, so the ZeRO-3 tests patch the loader
(``modules.common.load_policy_model``) to record what transformers would see while loading:
``is_deepspeed_zero3_enabled()`` and ``deepspeed_config()``.
"""
import gc
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from transformers.integrations import deepspeed_config, is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

import lightning_r1v2.modules.common as common
from lightning_r1v2.data.datamodule import R1V2DataModule
from lightning_r1v2.models.loading import load_policy, param_ndim, param_numel
from lightning_r1v2.modules import GRPOModule, MPOModule, SFTModule
from lightning_r1v2.rewards import RewardCallback, accuracy_reward, format_reward
from lightning_r1v2.rollout import HFGenerateEngine


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny policy saved as a HF folder: the same loading path as a real 38B checkpoint."""
    folder = tmp_path_factory.mktemp("tiny_hf")
    model, processor = load_policy("tiny", seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def no_ds_leak():
    """transformers' ZeRO-3 switch is process-global: never let it outlive a test."""
    yield
    unset_hf_deepspeed_config()
    gc.collect()
    assert not is_deepspeed_zero3_enabled()


@pytest.fixture
def count_loads(monkeypatch):
    """Wrap the module's loader; ``calls`` gets one entry per load."""
    calls = []
    orig = common.load_policy_model

    def loader(*args, **kwargs):
        calls.append(args[0])
        return orig(*args, **kwargs)

    monkeypatch.setattr(common, "load_policy_model", loader)
    return calls


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_folder_defers_by_default_tiny_does_not(tiny_folder):
    deferred = SFTModule(model=str(tiny_folder))
    assert deferred.defer_init and deferred.model is None and deferred.param_counts == {}
    assert deferred.processor is not None  # the DataModule needs it before configure_model
    assert not SFTModule().defer_init and SFTModule().model is not None  # the tiny default is unchanged
    eager = SFTModule(model=str(tiny_folder), defer_init=False)
    assert eager.model is not None
    deferred_tiny = SFTModule(defer_init=True)
    assert deferred_tiny.model is None
    deferred_tiny.configure_model()  # outside a Trainer: builds it
    assert deferred_tiny.model is not None and deferred_tiny.param_counts["trainable"] > 0


def test_deferred_module_fits_validates_and_reloads(tiny_folder, tiny_data, tmp_path, count_loads):
    torch.manual_seed(0)
    m = SFTModule(model=str(tiny_folder), lr=1e-3, warmup_ratio=0.0, eval_max_new_tokens=4)
    assert m.model is None and count_loads == []
    dm = R1V2DataModule(train_file=str(tiny_data / "train.jsonl"), val_file=str(tiny_data / "val.jsonl"),
                        kind="sft", batch_size=4, eval_batch_size=4, max_val_records=4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        val_check_interval=2, limit_val_batches=1)
    trainer.fit(m, dm)
    assert count_loads == [str(tiny_folder)]  # built once, by configure_model
    assert m.model is not None and m.param_counts["trainable"] > 0
    assert m.model.training  # from_pretrained returns eval mode: gradient checkpointing would be off
    metrics = trainer.logged_metrics
    assert torch.isfinite(metrics["train/loss"]) and "val/accuracy" in metrics and "val/format" in metrics
    start, _ = load_policy(str(tiny_folder))
    assert any(not torch.equal(p, dict(start.named_parameters())[n]) for n, p in m.model.named_parameters())
    # trainer.validate calls configure_model again: the trained weights stay
    trained = _params(m.model)
    trainer.validate(m, dm, verbose=False)
    assert count_loads == [str(tiny_folder)]
    assert all(torch.equal(p, trained[n]) for n, p in m.model.named_parameters())
    # load_from_checkpoint calls configure_model (the hparams say defer_init), then loads the weights
    path = tmp_path / "sft.ckpt"
    trainer.save_checkpoint(path)
    from lightning_r1v2.jobs.export import load_module

    loaded = load_module(str(path))
    assert loaded.defer_init and loaded.model is not None
    assert all(torch.equal(p, trained[n]) for n, p in loaded.model.named_parameters())


def test_configure_model_twice_does_not_rebuild(tiny_folder, count_loads):
    m = GRPOModule(model=str(tiny_folder), kl_coef=0.05, engine=HFGenerateEngine(max_new_tokens=4))
    assert m.model is None and m.ref_model is None
    m.configure_model()
    model, ref = m.model, m.ref_model
    assert count_loads == [str(tiny_folder)]  # the reference is a copy, not a second load (not partitioned)
    assert ref is not None and ref is not model and not any(p.requires_grad for p in ref.parameters())
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in ref.named_parameters())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # as a training step would
    m.configure_model()
    assert m.model is model and m.ref_model is ref and count_loads == [str(tiny_folder)]
    mpo = MPOModule(model=str(tiny_folder), reference="model")
    assert mpo.ref_model is None
    mpo.configure_model()
    mpo.configure_model()
    assert mpo.ref_model is not None and not mpo.ref_model.training
    assert MPOModule(model=str(tiny_folder), reference="precomputed").ref_model is None


def test_deferred_grpo_with_kl_fits(tiny_folder, tiny_data):
    torch.manual_seed(0)
    m = GRPOModule(model=str(tiny_folder), kl_coef=0.05, group_size=2, table_every_n_steps=0,
                   engine=HFGenerateEngine(max_new_tokens=4, temperature=1.3))
    dm = R1V2DataModule(train_file=str(tiny_data / "train.jsonl"), val_file=None, kind="prompts", batch_size=2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        callbacks=[RewardCallback(accuracy_reward, name="accuracy", weight=0.8),
                                   RewardCallback(format_reward, name="format", weight=0.2)])
    trainer.fit(m, dm)
    assert trainer.global_step == 1 and m.ref_model is not None
    # the reference is the folder's policy, untouched by the step; at the first step the policy
    # still equals it, so the k3 KL of every token is 0
    start, _ = load_policy(str(tiny_folder))
    assert all(torch.equal(p, dict(start.named_parameters())[n]) for n, p in m.ref_model.named_parameters())
    assert float(trainer.logged_metrics["kl"]) == pytest.approx(0.0, abs=1e-6)


class DeepSpeedStrategy:  # noqa: D101 - a stand-in: matched by class name, as Lightning's is
    def __init__(self, stage):
        self.config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 1}


def _strategy(kind: str, stage: int):
    if kind == "stand-in":
        return DeepSpeedStrategy(stage)
    from lightning.pytorch.strategies import DeepSpeedStrategy as Real  # constructs on a CPU; only setup needs CUDA

    return Real(stage=stage)


@pytest.mark.parametrize("kind", ["stand-in", "lightning"])
def test_zero3_loads_under_a_live_hf_deepspeed_config(tiny_folder, monkeypatch, no_ds_leak, kind):
    from transformers.integrations import HfDeepSpeedConfig

    seen = []
    built = []

    def loader(name, processor, **kw):
        # what from_pretrained would see: the ZeRO-3 switch and the config it passes to zero.Init
        seen.append((is_deepspeed_zero3_enabled(), (deepspeed_config() or {}).get("zero_optimization")))
        model = built.pop(0)
        for p in model.parameters():  # as zero.Init leaves them: partitioned, full shape kept aside
            p.ds_id, p.ds_shape, p.ds_numel = id(p), tuple(p.shape), p.numel()
        return model

    built += [load_policy("tiny", seed=0)[0], load_policy("tiny", seed=0)[0]]  # built before the switch is on
    monkeypatch.setattr(common, "load_policy_model", loader)
    m = GRPOModule(model=str(tiny_folder), kl_coef=0.05, engine=HFGenerateEngine(max_new_tokens=4))
    m._trainer = SimpleNamespace(strategy=_strategy(kind, 3))
    assert not is_deepspeed_zero3_enabled()
    m.configure_model()
    # policy, then the reference: loaded a second time (a deep copy of partitioned parameters is no model)
    assert [s[0] for s in seen] == [True, True] and seen[0][1]["stage"] == 3
    assert m.ref_model is not None and m.ref_model is not m.model and not m.ref_model.training
    gc.collect()
    assert isinstance(m._hf_ds_config, HfDeepSpeedConfig)
    assert is_deepspeed_zero3_enabled()  # still referenced after loading, by the module alone
    held = m._hf_ds_config
    m.configure_model()  # idempotent: no new load, the same config object
    assert len(seen) == 2 and m._hf_ds_config is held
    del held
    m.teardown("fit")
    gc.collect()
    assert not is_deepspeed_zero3_enabled()  # the module held the only reference


@pytest.mark.parametrize("strategy", [DeepSpeedStrategy(2), SimpleNamespace(config={"zero_optimization": {"stage": 3}})],
                         ids=["zero2", "not-deepspeed"])
def test_no_hf_deepspeed_config_outside_zero3(tiny_folder, monkeypatch, no_ds_leak, strategy):
    seen = []
    orig = common.load_policy_model
    monkeypatch.setattr(common, "load_policy_model",
                        lambda *a, **kw: seen.append(is_deepspeed_zero3_enabled()) or orig(*a, **kw))
    m = SFTModule(model=str(tiny_folder))
    m._trainer = SimpleNamespace(strategy=strategy)
    m.configure_model()
    assert seen == [False] and m._hf_ds_config is None and m.model is not None


def test_zero3_helpers_use_the_full_shape():
    p = torch.nn.Parameter(torch.empty(0))  # a partition's local slice outside a gather
    p.ds_shape, p.ds_numel = (4, 8), 32
    assert param_ndim(p) == 2 and param_numel(p) == 32  # weight decay and parameter counts see the real tensor
    q = torch.nn.Parameter(torch.zeros(3))
    assert param_ndim(q) == 1 and param_numel(q) == 3


def test_load_into_zero3_matches_load_state_dict(tmp_path):
    """The module-by-module copy used for ``init_ckpt`` under ZeRO-3 (a no-op gather on plain parameters)."""
    from lightning_r1v2.models.weights import load_into_zero3

    target, _ = load_policy("tiny", seed=0)
    source, _ = load_policy("tiny", seed=1)
    weights = source.state_dict()
    missing, unexpected = load_into_zero3(target, weights)
    assert missing == [] and unexpected == []
    assert all(torch.equal(p, dict(source.named_parameters())[n]) for n, p in target.named_parameters())
    bad = dict(weights)
    key = next(k for k, v in bad.items() if v.ndim == 2)
    bad[key] = bad[key][:1]
    with pytest.raises(ValueError, match="shape"):
        load_into_zero3(target, bad)
    extra = dict(weights, **{"not.a.weight": torch.zeros(1)})
    assert load_into_zero3(target, extra)[1] == ["not.a.weight"]
    less = {k: v for k, v in weights.items() if k != key}
    assert load_into_zero3(target, less)[0] == [key]


def test_offline_jobs_build_a_folder_policy_at_once(tiny_folder):
    from lightning_r1v2.jobs.sampling import load_policy_module

    assert load_policy_module(str(tiny_folder)).model is not None  # no Trainer calls configure_model there
