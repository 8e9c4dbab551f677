"""The product's reason to exist: the audited loss collapses, a likelihood in the right units does not.

Volumes whose only varying content is a blob's position. With the per-voxel mean MSE and
beta = 1 (a Gaussian decoder with sigma^2 = D/2 = 2048 here) no latent is worth its KL and
every unit dies; with a Gaussian likelihood summed over voxels at sigma^2 = 0.1 the
position is kept in z.
"""
import pytest

from vae.demo import small_experiment, train_and_diagnose

EPOCHS, N_TRAIN, N_VAL = 8, 128, 64


@pytest.fixture(scope="module")
def audited():
    return train_and_diagnose(small_experiment("mse_mean", beta=1.0, epochs=EPOCHS), N_TRAIN, N_VAL)


@pytest.fixture(scope="module")
def gaussian():
    return train_and_diagnose(small_experiment("gaussian", sigma2=0.1, epochs=EPOCHS), N_TRAIN, N_VAL)


def test_mean_mse_with_summed_kl_collapses(audited):
    assert audited["au"] == 0
    assert audited["kl_raw"] < 0.1
    # The decoder ignores z: decoding 0 reconstructs as well as decoding mu.
    assert audited["z_sensitivity"] < 0.01
    assert audited["recon_mu"] == pytest.approx(audited["recon_zero"], rel=0.01)


def test_gaussian_likelihood_keeps_information(gaussian):
    assert gaussian["au"] >= 2
    assert gaussian["kl_raw"] > 5.0
    assert gaussian["mi"] > 1.0
    # z carries the blob: the mean reconstruction is far better than the z = 0 template.
    assert gaussian["recon_mu"] < 0.6 * gaussian["recon_zero"]
