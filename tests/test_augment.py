"""Batched augmentation: dihedral transforms shared by a pair, MixUp, fused normalization."""

from __future__ import annotations

import torch

from data.augment import MEAN, STD, jitter_params, mixup, random_dihedral, to_float


def _dihedral_images(image: torch.Tensor) -> list[torch.Tensor]:
    rotations = [torch.rot90(image, k, (1, 2)) for k in range(4)]
    return rotations + [r.flip(2) for r in rotations]


def test_dihedral_gives_one_of_eight_images_and_the_same_for_both_streams():
    # Prepare: two streams holding the same square images
    base = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).view(2, 3, 5, 5).repeat(20, 1, 1, 1)
    generator = torch.Generator().manual_seed(0)

    # Execute
    context, detail = random_dihedral(base, base.clone(), generator)

    # Assert
    assert torch.equal(context, detail)
    for i in range(base.shape[0]):
        assert any(torch.equal(context[i], option) for option in _dihedral_images(base[i]))
    assert len({tuple(context[i].flatten().tolist()) for i in range(0, 40, 2)}) > 4  # not always the identity


def test_mixup_shares_lambda_and_permutation_across_streams():
    # Prepare: detail = 2 * context, so a shared mix keeps the ratio exactly
    generator = torch.Generator().manual_seed(3)
    context = torch.randn(8, 3, 4, 4)
    labels = torch.arange(8) % 3

    # Execute
    mixed_c, mixed_d, y_a, y_b, lam = mixup(context, 2 * context, labels, 0.2, generator)

    # Assert
    assert 0 <= lam <= 1
    # the same ops on twice the values: scaling by 2 commutes with float rounding, so this holds exactly
    torch.testing.assert_close(mixed_d, 2 * mixed_c)
    assert torch.equal(y_a, labels) and sorted(y_b.tolist()) == sorted(labels.tolist())


def test_mixup_alpha_zero_is_identity_and_draws_are_reproducible():
    x = torch.randn(4, 3, 2, 2)
    y = torch.tensor([0, 1, 2, 0])
    assert mixup(x, x, y, 0.0, torch.Generator())[4] == 1.0
    first = mixup(x, x, y, 0.2, torch.Generator().manual_seed(7))
    second = mixup(x, x, y, 0.2, torch.Generator().manual_seed(7))
    assert first[4] == second[4] and torch.equal(first[0], second[0])


def test_fused_normalization_with_jitter_matches_the_formula():
    # Prepare
    batch = torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8)
    gain, offset = jitter_params(4, torch.Generator().manual_seed(1), torch.device("cpu"))
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255

    # Execute
    plain, jittered = to_float(batch), to_float(batch, gain, offset)

    # Assert: one multiply-add with rounded 1/std and -mean/std (fused on some CPUs) against a subtract and a divide:
    # about ten roundings of 2^-24 on terms below 5 (the jitter adds three): < 4e-6, under the default atol 1e-5
    torch.testing.assert_close(plain, (batch.float() - mean) / std)
    torch.testing.assert_close(jittered, (batch.float() * gain - mean) / std + offset)
    assert not torch.equal(plain, jittered)
