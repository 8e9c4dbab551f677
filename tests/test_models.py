"""Shape, gradient and behaviour tests of the 3D VAE networks on small CPU volumes."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from vae.config import ModelConfig
from vae.models import VAE, BroadcastDecoder3d, ConvDecoder3d, Encoder3d, VAEOutput, build_model
from vae.models.blocks import FiLM, make_norm

# (decoder, broadcast grid as a fraction of the size): the three decoder forms.
DECODERS = {
    "conv": ("conv", None),
    "broadcast_grid": ("broadcast", 4),  # grid = size / 4: 4 at 16^3, 8 at 32^3
    "broadcast_full": ("broadcast", None),
}
INJECTIONS = ["input", "film"]
NORMS = ["group", "batch", "instance", "none"]
# (size, depth, channels)
VOLUMES = [pytest.param(16, 2, 1, id="16^3"), pytest.param(32, 3, 4, id="32^3")]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def small_config(decoder: str, z_injection: str = "input", norm: str = "group", size: int = 16, **overrides) -> ModelConfig:
    kind, grid_divisor = DECODERS[decoder]
    fields = dict(
        z_dim=8,
        base_filters=4,
        max_filters=16,
        depth=2,
        norm=norm,
        norm_groups=8,
        decoder=kind,
        broadcast_grid=size // grid_divisor if grid_divisor else None,
        broadcast_layers=2,
        z_injection=z_injection,
    )
    return ModelConfig(**(fields | overrides))


def small_model(decoder: str, z_injection: str = "input", norm: str = "group", size: int = 16, channels: int = 2, **overrides) -> VAE:
    return build_model(small_config(decoder, z_injection, norm, size, **overrides), channels, size)


def volume(batch: int = 2, channels: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, size)


def block_width(block: torch.nn.Module) -> int:
    """Output channels of a block: those of its last convolution."""
    return [m for m in block.modules() if isinstance(m, torch.nn.Conv3d)][-1].out_channels


# ---------------------------------------------------------------------------
# Shapes and wiring


@pytest.mark.parametrize("size, depth, channels", VOLUMES)
@pytest.mark.parametrize("decoder, z_injection, norm", list(itertools.product(DECODERS, INJECTIONS, NORMS)))
def test_shapes_and_finite(decoder: str, z_injection: str, norm: str, size: int, depth: int, channels: int) -> None:
    model = small_model(decoder, z_injection, norm, size, channels, depth=depth)
    x = volume(2, channels, size)
    out = model(x)
    assert isinstance(out, VAEOutput)
    assert out.x_hat.shape == x.shape
    for t in (out.mu, out.logvar, out.z):
        assert t.shape == (2, 8)
    for t in out:
        assert t.dtype == torch.float32
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("decoder, z_injection", list(itertools.product(DECODERS, INJECTIONS)))
def test_film_layers_in_every_decoder_block_only_when_asked(decoder: str, z_injection: str) -> None:
    model = small_model(decoder, z_injection)
    films = [m for m in model.modules() if isinstance(m, FiLM)]
    if z_injection == "input":
        assert films == []
    else:
        blocks = list(model.decoder.blocks)
        assert len(films) == len(blocks) > 0
        for block in blocks:
            assert sum(isinstance(m, FiLM) for m in block.modules()) == 1
        assert not any(isinstance(m, FiLM) for m in model.encoder.modules())


@pytest.mark.parametrize("decoder, z_injection", list(itertools.product(DECODERS, INJECTIONS)))
def test_z_reaches_the_output(decoder: str, z_injection: str) -> None:
    model = small_model(decoder, z_injection).eval()
    z = torch.randn(2, 8)
    with torch.no_grad():
        x_a, x_b = model.decode(z), model.decode(z + 1.0)
    # Per sample: a decoder drawing a z-free template would give zero.
    assert ((x_a - x_b).abs().flatten(1).amax(dim=1) > 1e-4).all()


def test_broadcast_widths() -> None:
    # grid 8 at 32^3: two upsamplings, base * 2**2 wide at the grid, base wide at the output.
    dec = BroadcastDecoder3d(3, 32, 8, base_filters=4, max_filters=64, grid=8, layers=3)
    assert [block_width(block) for block in dec.blocks] == [16, 16, 16, 8, 4]
    assert dec.out.kernel_size == (1, 1, 1) and dec.out.out_channels == 3
    full = BroadcastDecoder3d(3, 16, 8, base_filters=4, max_filters=64, grid=None, layers=2)
    assert [block_width(block) for block in full.blocks] == [4, 4]
    assert full.blocks[0].conv.in_channels == 8 + 3


# ---------------------------------------------------------------------------
# Spatial broadcast coordinates


@pytest.mark.parametrize("size, grid", [(16, 4), (20, 5), (32, 8), (16, None)])
def test_broadcast_coordinates_are_linspace_in_ij_order(size: int, grid: int | None) -> None:
    dec = BroadcastDecoder3d(2, size, 8, base_filters=4, grid=grid)
    g = size if grid is None else grid
    coords = dec.coords.double().numpy()
    assert coords.shape == (1, 3, g, g, g)
    # Independent construction: channel a is the voxel's index along axis a mapped to [-1, 1].
    expected = np.indices((g, g, g), dtype=np.float64) * (2.0 / (g - 1)) - 1.0
    np.testing.assert_allclose(coords[0], expected, atol=1e-6)
    np.testing.assert_allclose(coords[0, :, 0, 0, 0], [-1, -1, -1], atol=1e-7)
    np.testing.assert_allclose(coords[0, :, -1, 0, 0], [1, -1, -1], atol=1e-7)
    np.testing.assert_allclose(coords[0, :, 0, -1, 0], [-1, 1, -1], atol=1e-7)
    np.testing.assert_allclose(coords[0, :, 0, 0, -1], [-1, -1, 1], atol=1e-7)
    np.testing.assert_allclose(coords[0, :, -1, -1, -1], [1, 1, 1], atol=1e-7)
    if g % 2:
        np.testing.assert_allclose(coords[0, :, g // 2, g // 2, g // 2], [0, 0, 0], atol=1e-7)
    assert "coords" not in dec.state_dict()


def test_broadcast_input_is_tiled_z_then_coordinates() -> None:
    dec = BroadcastDecoder3d(2, 16, 8, base_filters=4, grid=4)
    seen = []
    dec.blocks[0].register_forward_hook(lambda module, args, output: seen.append(args[0]))
    z = torch.randn(3, 8)
    dec(z)
    h = seen[0]
    assert h.shape == (3, 8 + 3, 4, 4, 4)
    torch.testing.assert_close(h[:, :8], z[:, :, None, None, None].expand(-1, -1, 4, 4, 4))
    torch.testing.assert_close(h[:, 8:], dec.coords.expand(3, -1, -1, -1, -1))


# ---------------------------------------------------------------------------
# Gradients


def kl_sum(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mu.square() + logvar.exp() - logvar - 1).sum(dim=1).mean()


@pytest.mark.parametrize("decoder, z_injection", list(itertools.product(DECODERS, INJECTIONS)))
def test_every_parameter_gets_a_finite_nonzero_gradient(decoder: str, z_injection: str) -> None:
    model = small_model(decoder, z_injection)
    x = volume()
    out = model(x)
    ((out.x_hat - x).square().mean() + kl_sum(out.mu, out.logvar)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name

    if z_injection == "film":
        # FiLM layers start at zero (the identity) and one step moves them off it.
        films = [m for m in model.modules() if isinstance(m, FiLM)]
        assert all(f.linear.weight.abs().sum() == 0 for f in films)
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        assert all(f.linear.weight.abs().sum() > 0 for f in films)


def test_film_starts_as_identity_and_applies_scale_and_shift() -> None:
    film = FiLM(z_dim=5, channels=3)
    h, z = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 5)
    torch.testing.assert_close(film(h, z), h)
    with torch.no_grad():
        film.linear.bias.copy_(torch.tensor([1.0, 0.0, -0.5, 2.0, 0.0, 3.0]))  # dgamma, then dbeta
    gamma = torch.tensor([2.0, 1.0, 0.5])[None, :, None, None, None]
    beta = torch.tensor([2.0, 0.0, 3.0])[None, :, None, None, None]
    torch.testing.assert_close(film(h, z), gamma * h + beta)


@pytest.mark.parametrize("decoder, norm", [("conv", "group"), ("conv", "batch"), ("broadcast_grid", "group"), ("broadcast_full", "instance")])
def test_gradient_checkpointing_gives_the_same_gradients(decoder: str, norm: str) -> None:
    plain = small_model(decoder, "film", norm)
    ckpt = small_model(decoder, "film", norm, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    # Nonzero FiLM weights, so the checkpointed blocks see z as well.
    with torch.no_grad():
        for p_plain, p_ckpt in zip(plain.parameters(), ckpt.parameters()):
            p_plain.add_(0.01 * torch.randn_like(p_plain))
            p_ckpt.copy_(p_plain)
    calls = {"plain": 0, "ckpt": 0}
    plain.decoder.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__("plain", calls["plain"] + 1))
    ckpt.decoder.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__("ckpt", calls["ckpt"] + 1))
    x = volume()
    for model in (plain, ckpt):
        torch.manual_seed(1)  # the same posterior sample in both
        out = model(x)
        ((out.x_hat - x).square().mean() + kl_sum(out.mu, out.logvar)).backward()
    assert calls == {"plain": 1, "ckpt": 2}  # checkpointing recomputed the block in backward
    for (name, p_plain), p_ckpt in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p_ckpt.grad, p_plain.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_is_off_in_eval() -> None:
    model = small_model("conv", gradient_checkpointing=True).eval()
    calls = []
    model.decoder.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    out = model(volume())
    out.x_hat.sum().backward()
    assert len(calls) == 1


# ---------------------------------------------------------------------------
# Posterior: logvar bounds, BN-VAE, sampling


@pytest.mark.parametrize("logvar_min, logvar_max", [(-6.0, None), (-1.0, 0.5)])
def test_logvar_bounds(logvar_min: float, logvar_max: float | None) -> None:
    enc = Encoder3d(2, 16, 6, base_filters=4, depth=2, posterior_logvar_min=logvar_min, posterior_logvar_max=logvar_max)
    raw = torch.tensor([-10.0, -3.0, -0.5, 0.0, 0.2, 10.0])
    with torch.no_grad():
        enc.logvar_head.weight.zero_()
        enc.logvar_head.bias.copy_(raw)
    _, logvar = enc(volume())
    upper = float("inf") if logvar_max is None else logvar_max
    expected = torch.tensor([min(max(v, logvar_min), upper) for v in raw.tolist()])
    torch.testing.assert_close(logvar, expected.expand(2, -1))

    with torch.no_grad():
        enc.logvar_head.weight.normal_(0.0, 100.0)  # spread far past both bounds
    _, logvar = enc(volume(8))
    assert logvar.min() >= logvar_min and logvar.max() <= upper
    assert (logvar == logvar_min).any()


def test_bn_vae_fixes_the_scale_of_mu() -> None:
    gamma = 0.5
    model = small_model("conv", mu_batchnorm_gamma=gamma)
    bn = model.encoder.mu_norm
    assert not bn.weight.requires_grad and bn.bias.requires_grad
    torch.testing.assert_close(bn.weight.detach(), torch.full((8,), gamma))
    with torch.no_grad():
        bn.bias.fill_(0.3)
    out = model(volume(8))
    mu = out.mu.detach().double()
    torch.testing.assert_close(mu.std(dim=0, unbiased=False), torch.full((8,), gamma, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(mu.mean(dim=0), torch.full((8,), 0.3, dtype=torch.float64), atol=1e-6, rtol=0)
    (out.x_hat.square().mean() + kl_sum(out.mu, out.logvar)).backward()
    assert bn.weight.grad is None and bn.bias.grad is not None
    assert small_model("conv").encoder.mu_norm is None


def test_forward_samples_while_decode_of_mu_is_deterministic() -> None:
    model = small_model("broadcast_grid", "film")
    x = volume()
    first, second = model(x), model(x)
    torch.testing.assert_close(first.mu, second.mu)
    assert not torch.allclose(first.z, second.z)
    assert not torch.allclose(first.x_hat, second.x_hat)
    torch.testing.assert_close(model.decode(first.mu), model.decode(second.mu), rtol=0, atol=0)


def test_reparameterize_has_the_posterior_moments() -> None:
    mu = torch.tensor([[1.5, -2.0, 0.0]]).expand(200_000, -1)
    logvar = torch.tensor([[0.0, 2 * math.log(0.3), 2 * math.log(2.0)]]).expand(200_000, -1)
    z = VAE.reparameterize(mu, logvar)
    torch.testing.assert_close(z.mean(dim=0), mu[0], atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(dim=0), torch.tensor([1.0, 0.3, 2.0]), atol=0, rtol=0.01)


# ---------------------------------------------------------------------------
# Mixed precision


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_runs_under_bf16_autocast(decoder: str) -> None:
    model = small_model(decoder, "film")
    x = volume()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = (out.x_hat.float() - x).square().mean() + kl_sum(out.mu, out.logvar)
    assert out.x_hat.shape == x.shape and torch.isfinite(out.x_hat).all()
    assert out.x_hat.dtype == torch.bfloat16
    assert out.mu.dtype == out.logvar.dtype == torch.float32  # posterior heads stay in full precision
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "size, overrides, match",
    [
        (18, dict(decoder="conv", depth=2), r"multiple of 2\*\*depth"),
        (16, dict(decoder="conv", depth=5), r"multiple of 2\*\*depth"),
        (16, dict(decoder="broadcast", broadcast_grid=6), "broadcast grid 6"),
        (16, dict(decoder="broadcast", broadcast_grid=32), "broadcast grid 32"),
        (24, dict(decoder="broadcast", broadcast_grid=4, depth=3), "broadcast grid 4"),
    ],
)
def test_build_model_rejects_bad_sizes(size: int, overrides: dict, match: str) -> None:
    config = small_config("conv", size=size).model_copy(update=overrides)
    with pytest.raises(ValueError, match=match):
        build_model(config, 2, size)


def test_build_model_accepts_a_grid_equal_to_the_size() -> None:
    model = build_model(small_config("broadcast_grid").model_copy(update=dict(broadcast_grid=16)), 2, 16)
    assert isinstance(model.decoder, BroadcastDecoder3d) and model(volume()).x_hat.shape == (2, 2, 16, 16, 16)
    assert isinstance(build_model(small_config("conv"), 2, 16).decoder, ConvDecoder3d)


def test_encoder_rejects_a_volume_of_the_wrong_shape() -> None:
    model = small_model("conv")
    with pytest.raises(ValueError, match=r"encoder expects input \[B, 2, 16, 16, 16\]"):
        model(volume(channels=3))


def test_unknown_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="norm must be"):
        make_norm("layer", 8)
    with pytest.raises(ValueError, match="z_injection must be"):
        ConvDecoder3d(2, 16, 8, base_filters=4, depth=2, z_injection="concat")
    with pytest.raises(ValueError, match="upsample mode must be"):
        ConvDecoder3d(2, 16, 8, base_filters=4, depth=2, upsample_mode="bicubic")


def test_trilinear_upsampling_keeps_the_shape() -> None:
    dec = ConvDecoder3d(3, 16, 8, base_filters=4, depth=2, upsample_mode="trilinear")
    assert dec.blocks[1].upsample.mode == "trilinear"
    assert dec(torch.randn(2, 8)).shape == (2, 3, 16, 16, 16)
