"""What every denoising network must do with its conditioning inputs (the UNet, the DiT, wrapped models):
checks shared by their test modules."""

from __future__ import annotations

import torch


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace the zero initialisation (which makes every output 0) by random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def check_padded_context_is_ignored(model, in_channels: int = 4, context_dim: int = 12, size: int = 8) -> None:
    """Masked context tokens change nothing (garbage there, or the real tokens alone), and the context matters."""
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, in_channels, size, size, generator=g), torch.randn(2, 6, context_dim, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    t = torch.tensor([5, 600])
    out = model(x, t, context=context, context_mask=mask)
    garbage = torch.where(mask[..., None], context, torch.randn(2, 6, context_dim, generator=g) * 100)
    torch.testing.assert_close(model(x, t, context=garbage, context_mask=mask), out)
    torch.testing.assert_close(model(x[:1], t[:1], context=context[:1, :3]), out[:1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(x, t, context=torch.randn(2, 6, context_dim, generator=g), context_mask=mask),
                              out)


def check_null_class(model, in_channels: int = 1, size: int = 16, num_classes: int = 10) -> None:
    """No label means the null class (index num_classes); every real class gives another output."""
    x = torch.randn(1, in_channels, size, size).expand(num_classes + 1, -1, -1, -1)
    t = torch.full((num_classes + 1,), 300)
    out = model(x, t, class_labels=torch.arange(num_classes + 1))
    torch.testing.assert_close(model(x[:1], t[:1]), out[num_classes:])
    for k in range(num_classes):
        assert not torch.allclose(out[k], out[num_classes])
    assert not torch.allclose(out[0], out[1])


def check_cond_vector_matters(model, in_channels: int = 1, size: int = 16, cond_dim: int = 5) -> None:
    x, t = torch.randn(2, in_channels, size, size), torch.tensor([1, 1])
    assert not torch.allclose(model(x, t, cond=torch.randn(2, cond_dim)), model(x, t))
