"""The loss against the reference's own functions (diffusers 0.42.1 StableDiffusionAttendAndExcitePipeline)."""

from __future__ import annotations

import math

import pytest
import torch

from lib_ae import TokenSelection, excite_loss, official_gaussian_kernel, smooth, subject_maps, subject_maxima
from lib_ae.loss import SelectionIndex, excite_losses, smoothed_subject_maps

reference = pytest.importorskip(
    "diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite"
)
Pipeline = reference.StableDiffusionAttendAndExcitePipeline


def random_maps(seed: int, h: int = 16, w: int = 16, tokens: int = 77, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(h, w, tokens, generator=g, dtype=dtype) * 3, dim=-1)


def test_kernel_is_the_official_sqrt2_sigma_kernel() -> None:
    kernel = official_gaussian_kernel(3, 0.5)
    assert torch.equal(kernel, reference.GaussianSmoothing(channels=1, kernel_size=3, sigma=0.5).weight[0, 0])
    assert kernel[1, 1].item() == pytest.approx(0.3319, abs=1e-4)
    assert kernel[0, 1].item() == pytest.approx(0.1221, abs=1e-4)
    assert kernel[0, 0].item() == pytest.approx(0.0449, abs=1e-4)
    # A true sigma=0.5 Gaussian (what torchvision would build) has a centre weight of 0.787^2: must differ.
    assert kernel[1, 1].item() != pytest.approx(0.787**2, abs=1e-2)


@pytest.mark.parametrize("indices", [[2, 5], [5], [1, 75], [3, 4, 9]])
@pytest.mark.parametrize("seed", [0, 1])
def test_maxima_equal_reference(indices: list[int], seed: int) -> None:
    maps = random_maps(seed)
    expected = Pipeline._compute_max_attention_per_index(maps.clone(), indices)
    ours = subject_maxima(smoothed_subject_maps(maps, TokenSelection.official(77, [[i] for i in indices])))
    assert torch.allclose(ours, torch.stack(expected), rtol=0, atol=1e-14)


def test_loss_and_gradient_equal_reference() -> None:
    maps = random_maps(3).requires_grad_(True)
    expected_loss = Pipeline._compute_loss(Pipeline._compute_max_attention_per_index(maps.clone(), [2, 5]))
    (expected_grad,) = torch.autograd.grad(expected_loss, [maps])
    loss = excite_loss(subject_maxima(smoothed_subject_maps(maps, TokenSelection.official(77, [[2], [5]]))))
    (grad,) = torch.autograd.grad(loss, [maps])
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-14)
    assert torch.allclose(grad, expected_grad, atol=1e-14)


def test_loss_is_zero_without_gradient_when_every_subject_is_attended() -> None:
    assert excite_loss(torch.tensor([1.0, 1.2])).item() == 0.0
    assert not excite_loss(torch.tensor([1.0, 1.0], requires_grad=True)).requires_grad
    value = excite_loss(torch.tensor([0.3, 0.9]))
    assert value.item() == pytest.approx(0.7)


def test_only_the_most_neglected_subject_gets_gradient() -> None:
    maxima = torch.tensor([0.4, 0.9, 0.2], requires_grad=True)
    (grad,) = torch.autograd.grad(excite_loss(maxima), [maxima])
    assert grad.tolist() == [0.0, 0.0, -1.0]


def test_normalize_eot_keeps_only_prompt_tokens() -> None:
    maps = random_maps(4)
    # "a cat and a dog": BOS, 5 words, EOT at column 6.
    selection = TokenSelection.official(77, [[2], [5]], end_of_text=6, normalize_eot=True)
    assert selection.text_columns == (1, 2, 3, 4, 5)
    text = torch.softmax(maps[..., 1:6] * 100, dim=-1)
    assert torch.allclose(subject_maps(maps, selection), torch.stack([text[..., 1], text[..., 4]]))
    with pytest.raises(ValueError):
        TokenSelection.official(77, [[2]], normalize_eot=True)


def test_multi_token_subject_sums_its_tokens_probability() -> None:
    maps = random_maps(5)
    selection = TokenSelection.official(77, [[2, 3], [6]])
    text = torch.softmax(maps[..., 1:76] * 100, dim=-1)
    expected = torch.stack([text[..., 1] + text[..., 2], text[..., 5]])
    assert torch.allclose(subject_maps(maps, selection), expected)
    one = TokenSelection.official(77, [[2]])
    assert torch.equal(subject_maps(maps, one)[0], text[..., 1])


def test_subject_outside_text_columns_is_rejected() -> None:
    with pytest.raises(ValueError):
        TokenSelection.official(77, [[0]])
    with pytest.raises(ValueError):
        TokenSelection.official(77, [[]])


def test_smoothing_is_reflect_padded_convolution() -> None:
    maps = random_maps(6)[..., :4].permute(2, 0, 1)
    expected = torch.stack(
        [reference.GaussianSmoothing().double()(torch.nn.functional.pad(m[None, None], (1, 1, 1, 1), mode="reflect"))[0, 0] for m in maps]
    )
    assert torch.allclose(smooth(maps), expected, atol=1e-15)
    assert math.isclose(smooth(torch.ones(1, 5, 5)).mean().item(), 1.0, rel_tol=1e-6)  # float32 kernel sums to 1


@pytest.mark.parametrize("subjects", [[[2], [5]], [[2, 3], [6], [9, 10, 11]]], ids=["single-token", "multi-token"])
def test_batched_terms_equal_per_image_terms_bit_for_bit(subjects: list[list[int]]) -> None:
    """The engine evaluates all images sharing a selection at once, with precomputed indices and no host read."""
    maps = torch.stack([random_maps(seed) for seed in (7, 8, 9)]).requires_grad_(True)
    selection = TokenSelection.official(77, subjects)
    index = SelectionIndex.build(selection, maps.device)
    batched = subject_maxima(smoothed_subject_maps(maps, selection, index=index))
    losses = excite_losses(batched)
    (batched_grad,) = torch.autograd.grad(losses.sum(), [maps])
    for b in range(3):
        image = maps[b].detach().requires_grad_(True)
        maxima = subject_maxima(smoothed_subject_maps(image, selection))
        assert torch.equal(batched[b], maxima)
        loss = excite_loss(maxima)
        assert torch.equal(losses[b], loss)
        (grad,) = torch.autograd.grad(loss, [image])
        assert torch.equal(batched_grad[b], grad)


def test_batched_loss_is_zero_for_an_excited_image_and_reads_nothing_on_the_host() -> None:
    maxima = torch.tensor([[1.0, 1.2], [0.3, 0.9], [0.4, 0.4]], requires_grad=True)
    losses = excite_losses(maxima)
    assert losses.tolist() == pytest.approx([0.0, 0.7, 0.6])
    (grad,) = torch.autograd.grad(losses.sum(), [maxima])
    assert grad.tolist() == [[0.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]]  # first of equal deficits, like Python's max()
