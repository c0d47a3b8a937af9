"""finetune=lora: the base stays bit-identical, only adapters train, the adapter file is small, merged equals
unmerged, an adapter loads onto the base again, and fine-tuning starts from a base run's EMA weights."""

from __future__ import annotations

import pytest
import torch

from configs import make_cfg
from difflab.cli.train import run
from difflab.errors import UsageError
from difflab.loading import load_module
from difflab.nn import DiT, UNet
from network_contract import randomize

pytest.importorskip("peft")
from difflab.nn.lora import LoRA, default_targets, load_adapter, merge  # noqa: E402


def unet(**kwargs) -> UNet:
    return UNet(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                num_heads=2, norm_groups=8, num_classes=10, **kwargs)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    run(make_cfg(tmp, "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=4"))
    return tmp / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_run):
    tmp = tmp_path_factory.mktemp("lora")
    trainer = run(make_cfg(tmp, "finetune=lora", f"finetune.base={base_run}", "finetune.rank=2", "optim.lr=1e-2",
                           "trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=6"))
    return tmp, trainer.lightning_module


def test_the_base_stays_bit_identical_and_the_adapters_train(base_run, lora_run):
    _, module = lora_run
    base = load_module(base_run)
    base_weights = base.ema.state_dict()
    for name, tensor in module.network.state_dict().items():
        if "lora_" in name:
            continue
        torch.testing.assert_close(tensor, base_weights[name.replace(".base_layer", "")], atol=0, rtol=0, msg=name)
    adapters = {n: p for n, p in module.network.named_parameters() if "lora_B" in n}
    assert adapters and all(p.abs().sum() > 0 for p in adapters.values())  # B starts at zero: it trained
    trainable = {id(p) for p in module.trainable_parameters()}
    assert all(("lora_" in n) == (id(p) in trainable) for n, p in module.network.named_parameters())


def test_the_adapter_file_is_small_and_loads_onto_the_base(base_run, lora_run):
    tmp, module = lora_run
    adapter = tmp / "lora" / "adapter.safetensors"
    model_bytes = sum(p.numel() * p.element_size() for p in module.network.parameters())
    assert adapter.is_file() and adapter.stat().st_size < 0.05 * model_bytes
    network = load_module(base_run).ema
    load_adapter(network, adapter)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 990]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        torch.testing.assert_close(network(x, t, class_labels=y), module.ema(x, t, class_labels=y))


def test_the_lora_checkpoint_reloads_without_its_base(lora_run, tmp_path):
    tmp, module = lora_run
    reloaded = load_module(tmp / "checkpoints" / "last.ckpt")
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("make", [lambda: unet(), lambda: unet(context_dim=12), lambda: DiT(
    in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)])
@pytest.mark.parametrize("convs", [False, True])
def test_merged_and_unmerged_agree(make, convs):
    network = randomize(make())
    LoRA(rank=3, alpha=6, convs=convs).apply(network)
    with torch.no_grad():  # B is zero at injection: give the adapters something to merge
        for name, p in network.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    kwargs = {"context": torch.randn(2, 5, 12)} if getattr(network, "context_dim", None) else {}
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([20, 700]), torch.tensor([3, 10])
    with torch.no_grad():
        unmerged = network(x, t, class_labels=y, **kwargs)
        merged = merge(network)(x, t, class_labels=y, **kwargs)
    assert not any("lora_" in n for n, _ in network.named_parameters())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_default_targets_are_the_attention_projections():
    targets = default_targets(unet(context_dim=12))
    assert targets and all(t.rsplit(".", 1)[-1] in ("to_q", "to_kv", "to_out", "qkv", "proj") for t in targets)
    convs = set(default_targets(unet(), convs=True)) - set(default_targets(unet()))
    assert convs and all(t.endswith(("conv1", "conv2")) for t in convs)


def test_a_base_of_another_network_is_refused(base_run):
    with pytest.raises(UsageError, match="another network"):
        from difflab.nn.lora import load_base

        load_base(unet(context_dim=12), base_run)


def test_sample_py_puts_an_adapter_onto_its_base(base_run, lora_run, tmp_path):
    from configs import sample_cfg
    from difflab.cli.sample import sample
    from difflab.loading import load
    from difflab.nn.lora import save_adapter

    _, module = lora_run
    # a base and adapters whose effect shows (a few steps leave the zero-initialised output layers near zero)
    checkpoint = torch.load(base_run, weights_only=True)
    g = torch.Generator().manual_seed(0)
    for name, tensor in checkpoint["state_dict"].items():
        if name.startswith("ema."):
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.2)
    torch.save(checkpoint, tmp_path / "base.ckpt")
    base_run = tmp_path / "base.ckpt"
    ema = module.finetune.apply(load_module(base_run).ema)
    with torch.no_grad():
        for name, p in ema.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    adapter = save_adapter(ema, module.finetune, tmp_path / "adapter.safetensors")
    request = dict(n=2, label=3, seed=0, steps=3, progress=False)
    pipe = module.diffusion_model().with_network(ema).pipeline()
    expected = pipe(**request)
    got = load(base_run, device="cpu", lora=adapter)(**request)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (load(base_run, device="cpu")(**request) - expected).abs().max() > 1e-3  # 700x the tolerance
    args = ("n=2", "label=3", "steps=3", "seed=0", "progress=false")
    base = sample(sample_cfg(f"ckpt={base_run}", *args, f"out={tmp_path / 'base'}"))
    adapted = sample(sample_cfg(f"ckpt={base_run}", f"lora={adapter}", *args, f"out={tmp_path / 'adapted'}"))
    names = sorted(p.name for p in base.glob("*_seed*.png"))
    assert names and names == sorted(p.name for p in adapted.glob("*_seed*.png"))
    assert any((base / n).read_bytes() != (adapted / n).read_bytes() for n in names)
    with pytest.raises(UsageError, match="not a difflab LoRA adapter"):
        load(base_run, device="cpu", lora=base_run)
