"""SynGen's binding loss and schedule (lib_ae/binding.py) against the official code's own figures.

The official figures below were produced once, on the METHODS helper's machine (torch 2.13.0+cpu, float64), by
running the unmodified `compute_loss.py` and `SynGenDiffusionPipeline._attribution_loss` / `_calculate_losses` /
`_get_attention_maps_list` of RoyiRa/Linguistic-Binding-in-Diffusion-Models at 50b8eab (pipeline imports of
spaCy/diffusers/transformers stubbed out, since only these methods run; a stand-in tokenizer returning the word pieces
listed per case). Inputs: the maps of `_maps()` below (a closed formula, no RNG) and the official subtrees
(`_extract_attribution_indices` output format: word-piece indices, a nested list for a multi-piece word, noun last).
For each case: the loss, and the gradient of the loss with respect to the (16, 16, 77) maps, summarised by its L2
norm, its L1 norm and one entry. CI cannot reach that code; these literals stand for it.
"""

from __future__ import annotations

import math

import pytest
import torch

from lib_ae.binding import (
    BindingGroup,
    BindingIndex,
    BindingSelection,
    binding_loss,
    spatial_distributions,
    symmetric_kl,
)
from lib_ae.config import OFFICIAL_BINDING_STEP_SIZE as OFFICIAL_STEP_SIZE
from lib_ae.config import BindingConfig, binding_plan
from lib_ae.tokens import BindingLocation, locate_bindings
from support.models import float64_ddim_scheduler
from support.thirdparty import ClipTokenizer, clip_tokenizer

from lib_ae.tokens import CHUNK_LENGTH


def _maps(h: int = 16, w: int = 16, tokens: int = 77) -> torch.Tensor:
    """logits[y, x, k] = 3 sin(0.7 y (k mod 5 + 1) + 1.3 x (k mod 3 + 1) + 0.5 k), softmax over the tokens, float64.

    The sine is Python's (`math.sin`, one libm call per element), not `torch.sin`: torch's threaded float64 sine of
    these 19,712 elements returned other values in 1 of 50 fresh processes when the CPU was loaded (under
    ATEN_CPU_CAPABILITY=avx2; the loss then moved by 5.8e-9), a figure that depended on the machine's load. libm's
    sine differs from torch's usual result by 1 ulp in 40 elements, which moves the figures below by 3.6e-15 at most.
    """
    y = torch.arange(h, dtype=torch.float64)[:, None, None]
    x = torch.arange(w, dtype=torch.float64)[None, :, None]
    k = torch.arange(tokens, dtype=torch.float64)[None, None, :]
    angles = 0.7 * y * (k % 5 + 1) + 1.3 * x * (k % 3 + 1) + 0.5 * k  # products and sums: correctly rounded anywhere
    sines = torch.tensor([math.sin(a) for a in angles.flatten().tolist()], dtype=torch.float64)
    return torch.softmax(3 * sines.reshape(angles.shape), dim=-1)


# name: (word pieces after the start token, official subtrees, official loss, grad L2, grad L1, grad[0, 0, 2])
OFFICIAL = {
    "red_car_blue_bench": (
        "a red car and a blue bench".split(), [[2, 3], [6, 7]],
        -0.12209710313392597, 258.28316078299235, 4886.5725942389145, -0.5385209289197597,
    ),
    "multi_piece_nouns": (
        ["a", "pink", "sun", "flower", "and", "a", "yellow", "flam", "ingo"], [[2, [3, 4]], [7, [8, 9]]],
        -0.2855423191119244, 300.24764531702095, 5701.206502821373, -0.5851450532380392,
    ),
    "several_modifiers": (
        ["a", "big", "red", "check", "ered", "car", "on", "a", "wooden", "table"], [[2, 3, [4, 5], 6], [9, 10]],
        0.5580394749027322, 479.3262153101869, 10797.331593647774, -0.1874463670718654,
    ),
    "noun_only_group": (
        ["a", "cat", "and", "a", "red", "ball"], [[2], [5, 6]],
        -2.1315066440150274, 267.3057644084161, 4559.12482698876, 0.22588000071293865,
    ),
    "no_outside_words": (
        ["red", "car"], [[1, 2]],
        2.4431971377858615, 241.5972397574844, 2102.5109386526374, -0.10177014327272774,
    ),
}


def _groups(subtrees: list[list[int | list[int]]]) -> list[BindingGroup]:
    groups = []
    for subtree in subtrees:
        words = [tuple(w) if isinstance(w, list) else (w,) for w in subtree]
        groups.append(BindingGroup(words[-1], tuple(words[:-1])))
    return groups


@pytest.mark.recorded
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_loss_and_gradient_equal_the_official_figures(name: str) -> None:
    pieces, subtrees, loss_ref, l2_ref, l1_ref, entry_ref = OFFICIAL[name]
    attention = _maps().requires_grad_(True)
    loss = binding_loss(attention, BindingSelection.official(len(pieces), _groups(subtrees)))
    (grad,) = torch.autograd.grad(loss, attention)
    assert loss.dtype == torch.float64
    loss = loss.detach()
    # Equal up to the order of float64 summation (the official code sums Python lists): measured 4.4e-16 at most.
    assert float(loss) == pytest.approx(loss_ref, rel=1e-12, abs=1e-14)
    assert float(grad.norm()) == pytest.approx(l2_ref, rel=1e-12)
    assert float(grad.abs().sum()) == pytest.approx(l1_ref, rel=1e-12)
    assert float(grad[0, 0, 2]) == pytest.approx(entry_ref, rel=1e-10, abs=1e-13)


def test_the_figures_can_fail() -> None:
    # The same maps with the modifier moved to another word give another loss: the comparison above is not vacuous.
    pieces, _, loss_ref, *_ = OFFICIAL["red_car_blue_bench"]
    wrong = BindingSelection.official(len(pieces), [BindingGroup(3, (6,)), BindingGroup(7, (2,))])
    assert float(binding_loss(_maps(), wrong)) != pytest.approx(loss_ref, rel=1e-6)


def test_symmetric_kl_is_categoricals() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(5, 256, dtype=torch.float64, generator=generator) * 100
    b = torch.rand(5, 256, dtype=torch.float64, generator=generator) * 100
    dp, dq = torch.distributions.Categorical(probs=a), torch.distributions.Categorical(probs=b)
    expected = (torch.distributions.kl_divergence(dp, dq) + torch.distributions.kl_divergence(dq, dp)) / 2
    # Categorical normalises its probs once, as spatial_distributions does: the result is bit for bit the same.
    p, q = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    torch.testing.assert_close(symmetric_kl(p, q), expected, rtol=0, atol=0)


def test_zero_probabilities_follow_categorical() -> None:
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    # KL(p||q) is finite (p's zero term counts 0), KL(q||p) is +inf (q > 0 where p = 0): so is their mean.
    assert math.isinf(float(symmetric_kl(p, q)))
    assert float(symmetric_kl(p, p)) == 0.0


def test_distributions_are_spatial_and_scale_free() -> None:
    attention = _maps()
    dist = spatial_distributions(attention, [2, 3])
    assert dist.shape == (2, 256)
    torch.testing.assert_close(dist.sum(-1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(dist[0], attention[..., 2].reshape(-1) / attention[..., 2].sum())


def test_only_word_columns_are_other_words() -> None:
    # Start token, end token and padding never enter the loss: changing their maps changes nothing.
    selection = BindingSelection.official(7, [BindingGroup(3, (2,)), BindingGroup(7, (6,))])
    attention = _maps()
    changed = attention.clone()
    changed[..., 0] *= 3
    changed[..., 8:] = changed[..., 8:].flip(0)
    assert float(binding_loss(changed, selection)) == float(binding_loss(attention, selection))
    changed[..., 4] = changed[..., 4].flip(1)  # "and" is another word of the prompt: it does count
    assert float(binding_loss(changed, selection)) != float(binding_loss(attention, selection))


def test_several_chunks_use_the_given_word_columns() -> None:
    # A1111 two-chunk row: words at 1..3 and 78..80; the second chunk's BOS (77) is not a word.
    attention = _maps(tokens=154)
    selection = BindingSelection((BindingGroup(79, (78,)),), (1, 2, 3, 78, 79, 80))
    loss = binding_loss(attention, selection)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="not word columns"):
        BindingSelection((BindingGroup(77, (78,)),), (1, 2, 3, 78, 79, 80))


def test_no_groups_is_zero_and_bad_groups_are_refused() -> None:
    assert float(binding_loss(_maps(), BindingSelection.official(5, []))) == 0.0
    with pytest.raises(ValueError):
        BindingGroup(())
    with pytest.raises(ValueError):
        BindingGroup((2,), ((),))
    with pytest.raises(TypeError):
        BindingGroup(True)  # type: ignore[arg-type]


def test_half_precision_maps_are_computed_in_float32() -> None:
    pieces, subtrees, loss_ref, *_ = OFFICIAL["several_modifiers"]
    selection = BindingSelection.official(len(pieces), _groups(subtrees))
    loss = binding_loss(_maps().half(), selection)
    assert loss.dtype == torch.float32
    assert float(loss) == float(binding_loss(_maps().half().float(), selection))
    assert float(loss) == pytest.approx(loss_ref, rel=1e-2)


def test_float32_is_close_to_float64() -> None:
    pieces, subtrees, loss_ref, *_ = OFFICIAL["several_modifiers"]
    loss = binding_loss(_maps().float(), BindingSelection.official(len(pieces), _groups(subtrees)))
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(loss_ref, rel=1e-4)


# --- the schedule ---------------------------------------------------------------------------------------------------

# The official schedule at 50 steps (syngen_diffusion_pipeline.py L278-289, L354-396, L60-68): at loop index i < 25
# one cond-only forward, one gradient, z <- z - 20.0 * grad (VP space, unscaled latent); no refinement; the step size
# never decays. Steps 25..49: no gradient pass at all.
OFFICIAL_50_STEP_SIZES = (
    20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0,
    20.0, 20.0, 20.0, 20.0, 20.0, 20.0,
    0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
    0.0, 0.0, 0.0,
)
# With the pipeline's default scheduler (PNDM of CompVis/stable-diffusion-v1-4, skip_prk_steps) 50 steps are 51 loop
# iterations; the 25 updated ones are at these timesteps (961 twice).
OFFICIAL_PNDM_UPDATED_TIMESTEPS = (
    981, 961, 961, 941, 921, 901, 881, 861, 841, 821, 801, 781, 761, 741, 721, 701, 681, 661, 641, 621, 601, 581,
    561, 541, 521,
)


def test_official_schedule_at_50_steps() -> None:
    plan = binding_plan(50)
    assert plan.step_sizes == OFFICIAL_50_STEP_SIZES
    assert plan.alter_steps == 25  # the official num_intervention_steps, one update per step
    assert OFFICIAL_STEP_SIZE == 20.0
    assert plan.step_size(50) == 0.0


def test_official_pndm_loop_of_51_iterations() -> None:
    plan = binding_plan(51, BindingConfig(intervention_steps=25))
    assert [i for i in range(51) if plan.step_sizes[i] > 0] == list(range(len(OFFICIAL_PNDM_UPDATED_TIMESTEPS)))
    assert set(plan.step_sizes[:25]) == {20.0} and set(plan.step_sizes[25:]) == {0.0}


def test_schedule_for_other_step_counts() -> None:
    assert binding_plan(20).alter_steps == 10
    assert binding_plan(1).alter_steps == 1  # round half up, as lib_ae.config does for A&E
    assert binding_plan(30, BindingConfig(intervention_steps=25)).alter_steps == 25  # verbatim, as officially
    assert binding_plan(10, BindingConfig(intervention_steps=25)).alter_steps == 10
    assert binding_plan(50, BindingConfig(step_size=5.0)).step_sizes[:2] == (5.0, 5.0)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            binding_plan(bad)  # type: ignore[arg-type]
    for kwargs in ({"step_size": float("nan")}, {"weight": -1.0}, {"intervention_fraction": 2.0},
                   {"intervention_steps": -3}):
        with pytest.raises(ValueError):
            BindingConfig(**kwargs)  # type: ignore[arg-type]


# --- words -> columns in A1111's chunks ------------------------------------------------------------------------------

BOS, EOS = 49406, 49407


def _chunks(tok: ClipTokenizer, *segments: str) -> list[list[int]]:
    """One 77-token chunk per segment (as A1111 lays out a short prompt, or BREAK-separated ones), SD1 padding."""
    chunks = []
    for segment in segments:
        ids = tok.encode(segment)
        chunks.append([BOS] + ids + [EOS] * (CHUNK_LENGTH - 1 - len(ids)))
    return chunks


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return clip_tokenizer()


def _locate(tok: ClipTokenizer, pairs: list[tuple[str, str]], *segments: str) -> BindingLocation:
    return locate_bindings(_chunks(tok, *segments), pairs, tok.encode, bos_id=BOS, eos_id=EOS, pad_id=EOS)


def test_locate_pairs_in_one_chunk(tok: ClipTokenizer) -> None:
    # "a big red car and a blue bench": a=1 big=2 red=3 car=4 and=5 a=6 blue=7 bench=8
    location = _locate(tok, [("big", "car"), ("red", "car"), ("blue", "bench")], "a big red car and a blue bench")
    assert location.selection == BindingSelection(
        (BindingGroup(4, (2, 3)), BindingGroup(8, (7,))), (1, 2, 3, 4, 5, 6, 7, 8)
    )
    assert location.messages == ()
    assert [b[:2] for b in location.bound] == [("big", "car"), ("red", "car"), ("blue", "bench")]


def test_repeated_words_bind_their_own_occurrence(tok: ClipTokenizer) -> None:
    same_modifier = _locate(tok, [("red", "car"), ("red", "bench")], "a red car and a red bench")
    assert same_modifier.selection is not None
    assert same_modifier.selection.groups == (BindingGroup(3, (2,)), BindingGroup(7, (6,)))
    same_noun = _locate(tok, [("red", "car"), ("blue", "car")], "a red car and a blue car")
    assert same_noun.selection is not None
    assert same_noun.selection.groups == (BindingGroup(3, (2,)), BindingGroup(7, (6,)))


def test_multi_token_words(tok: ClipTokenizer) -> None:
    assert len(tok.encode("hippopotamus")) == 3
    location = _locate(tok, [("pink", "hippopotamus")], "a pink hippopotamus")
    assert location.selection is not None
    assert location.selection.groups == (BindingGroup((3, 4, 5), (2,)),)


def test_hostile_pairs(tok: ClipTokenizer) -> None:
    missing = _locate(tok, [("green", "car"), ("red", "car")], "a red car")
    assert missing.messages == (
        "AE bind: modifier 'green' is not in the prompt; the pair ('green', 'car') is not bound",
    )
    assert missing.selection is not None and missing.selection.groups == (BindingGroup(3, (2,)),)
    nothing = _locate(tok, [], "a cat and a dog")
    assert nothing.selection is None
    assert nothing.messages == (
        "AE bind: the prompt has no modifier to bind (no adjective or other modifier before a noun)",
    )
    with pytest.raises(TypeError):
        _locate(tok, "red car", "a red car")  # type: ignore[arg-type]


def test_pair_straddling_a_chunk_boundary_is_bound(tok: ClipTokenizer) -> None:
    # "a red BREAK car": red in chunk 0 (column 2), car in chunk 1 (column 77 + 1); both chunks' words are the pool.
    location = _locate(tok, [("red", "car")], "a red", "car on a bench")
    assert location.selection == BindingSelection((BindingGroup(78, (2,)),), (1, 2, 78, 79, 80, 81))
    assert torch.isfinite(binding_loss(_maps(tokens=154), location.selection))


def test_word_split_between_chunks_is_reported(tok: ClipTokenizer) -> None:
    ids = tok.encode("hippopotamus")
    first = [BOS] + tok.encode("a pink") + ids[:1]
    second = [BOS] + ids[1:]
    chunks = [c + [EOS] * (CHUNK_LENGTH - len(c)) for c in (first, second)]
    location = locate_bindings(chunks, [("pink", "hippopotamus")], tok.encode, bos_id=BOS, eos_id=EOS, pad_id=EOS)
    assert location.selection is None
    assert "split between two chunks" in location.messages[0]


def test_embedding_names_are_words(tok: ClipTokenizer) -> None:
    # An embedding of 2 vectors at chunk offset 1 (after "a"): placeholders 0 at columns 2, 3.
    chunk = [BOS] + tok.encode("a") + [0, 0] + tok.encode("with a red hat")
    chunk += [EOS] * (CHUNK_LENGTH - len(chunk))
    pairs = [("red", "hat"), ("red", "my-cat")]
    embeddings = [[("my-cat", 1, 2)]]
    location = locate_bindings([chunk], pairs, tok.encode, bos_id=BOS, eos_id=EOS, pad_id=EOS, embeddings=embeddings)
    assert location.selection is not None
    # Groups in noun order; "red" follows the embedding, so it binds back to it (no noun occurrence after it).
    assert location.selection.groups == (BindingGroup((2, 3), (6,)), BindingGroup(7, (6,)))
    assert location.bound[1] == ("red", "my-cat", (6,), (2, 3))


def test_suggested_pairs_end_to_end(tok: ClipTokenizer) -> None:
    from lib_ae.suggest import modifier_pairs
    from lib_ae.webui.prompt_syntax import first_step_text

    prompt = "a photo of a (red:1.2) car and a blue bench"
    pairs = modifier_pairs(first_step_text(prompt), parser="rules")  # the A1111 syntax resolved as the adapter does
    assert pairs == [("red", "car"), ("blue", "bench")]
    # A1111 tokenizes the emphasis segments separately; for plain words the ids are the same as the whole text's.
    location = _locate(tok, pairs, "a photo of a red car and a blue bench")
    assert location.selection is not None
    assert location.selection.groups == (BindingGroup(6, (5,)), BindingGroup(10, (9,)))
    assert torch.isfinite(binding_loss(_maps(), location.selection))


# --- the official pipeline's trajectory on a random UNet (VP space) --------------------------------------------------
#
# The official `SynGenDiffusionPipeline.__call__` (unmodified; spaCy stubbed, the groups preset, a stand-in tokenizer
# for the 10 word pieces below, diffusers 0.42.1 with the A&E module aliased to its deprecated path and its
# `image_encoder` argument passed by name) was run once on tests/test_reference.py's tiny random UNets (SD1_SMALL and
# SD2_SMALL, seed 11, its `make_inputs` with seed 7), DDIM 8 steps, CFG 7.5, attn_res 4x4 (1/4 of the 16x16 latent),
# step size 20, 4 intervention steps. Float64 end to end, as tests/support/models.py explains: weights drawn in
# float64, `float64_ddim_scheduler`, the float64 timestep projection. With diffusers' float32 schedule and
# embedding these figures moved by up to 3.5e-5 between CPU capabilities; as recorded, the runs under
# ATEN_CPU_CAPABILITY=avx512, avx2 and default agree to 3e-13 (relative, losses; 1.3e-14 the latents' entries).
# Batch 1 per run: the official `_syngen_step` appends only the last image of a batch to its output (the append sits
# after the per-image loop), so a batch of 2 collapses to 1 image; each of the two inputs is therefore its own run.
# Recorded: the loss at each intervention step, the latent's norm after each step, the final latent's sum and entry
# [0, 1, 5, 9]. Below, the same steps are taken with lib_ae.binding's loss and plan (maps from diffusers' own A&E
# attention store, as the official pipeline reads them), and must land on the same numbers.

TRAJECTORY_STEPS, TRAJECTORY_CFG, TRAJECTORY_LATENT = 8, 7.5, 16
TRAJECTORY_PIECES = 10  # "a red car and a blue bench , big ball"
TRAJECTORY_GROUPS = (BindingGroup(3, (2,)), BindingGroup(7, (6,)), BindingGroup(10, (9,)))

OFFICIAL_TRAJECTORY = {
    "sd1-like-small/0": (
        (-0.036258543652618686, -0.10169172656513495, -0.10967763257510671, -0.10135800483467311),
        (66.50072057942049, 110.04641154056941, 159.88595990541683, 210.21851383415847,
         255.21141106191115, 290.5445212953405, 315.1978348824602, 315.4099310051367),
        824.1323061773036, -0.9952095376936143,
    ),
    "sd1-like-small/1": (
        (0.13202678915323207, -0.039921321639890234, -0.19446007882664756, -0.25928572318401555),
        (64.88300622671483, 108.60416980193777, 158.08625034597364, 208.0640535228678,
         252.7341737033701, 287.83339395359235, 312.3988693809206, 312.6140841488569),
        1084.6083120955516, 1.072564994107997,
    ),
    "sd2-like-small/0": (
        (0.0500046351163041, 0.00986302757716613, 0.00213283998016095, -0.01799404626275604),
        (68.68755744178027, 115.09646997615285, 168.4871084441021, 222.76965913295618,
         271.50560412324245, 310.0359175103561, 337.5442753053659, 337.81125756394505),
        415.4158348590899, -13.90396272245472,
    ),
    "sd2-like-small/1": (
        (-0.056080180798617305, -0.11681688959160409, -0.11185571968313507, -0.1048207411309264),
        (70.28697977291483, 117.46769618581108, 171.22244856831165, 225.71110705467672,
         274.5293442102033, 312.9967714972777, 340.1437879736686, 340.3923479068946),
        542.5726298278228, -10.726553527439442,
    ),
}


def _run_binding_vp(
    unet: torch.nn.Module, z: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, plan: object
) -> tuple[list[float], list[float], torch.Tensor]:
    """SynGen's loop (update before each step's CFG evaluation, DDIM) with lib_ae.binding's loss and plan."""
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite import (
        pipeline_stable_diffusion_attend_and_excite as attend_excite,
    )

    size = (TRAJECTORY_LATENT // 4, TRAJECTORY_LATENT // 4)
    store = attend_excite.AttentionStore(size)
    processors = {}
    for name in unet.attn_processors:
        place = "mid" if name.startswith("mid_block") else "up" if name.startswith("up_blocks") else "down"
        processors[name] = attend_excite.AttendExciteAttnProcessor(attnstore=store, place_in_unet=place)
    store.num_att_layers = len(processors)  # before set_attn_processor, which empties the dict it is given
    unet.set_attn_processor(processors)
    scheduler = float64_ddim_scheduler()
    scheduler.set_timesteps(TRAJECTORY_STEPS)
    selection = BindingSelection.official(TRAJECTORY_PIECES, TRAJECTORY_GROUPS)
    losses: list[float] = []
    norms: list[float] = []
    for i, t in enumerate(scheduler.timesteps):
        if i < plan.alter_steps:  # type: ignore[attr-defined]
            with torch.enable_grad():
                leaf = z.detach().clone().requires_grad_(True)
                unet(leaf, t, encoder_hidden_states=cond)
                loss = binding_loss(store.aggregate_attention(("up", "down", "mid")), selection)
                losses.append(float(loss.detach()))
                if float(loss.detach()) != 0:
                    (grad,) = torch.autograd.grad(loss, [leaf])
                    z = (leaf - plan.step_size(i) * grad).detach()  # type: ignore[attr-defined]
        with torch.no_grad():
            eps_u, eps_c = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            z = scheduler.step(eps_u + TRAJECTORY_CFG * (eps_c - eps_u), t, z).prev_sample
        norms.append(float(z.norm()))
    return losses, norms, z


@pytest.fixture(scope="module")
def tiny_unets() -> dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]]:
    import dataclasses

    pytest.importorskip("diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite")
    from support.models import SD1_LIKE, SD2_LIKE, make_unet, to_diffusers_unet

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread on a busy 2-core machine only costs
    try:
        unets = {}
        for base in (SD1_LIKE, SD2_LIKE):
            config = dataclasses.replace(
                base, name=f"{base.name}-small", num_res_blocks=1, channel_mult=(1, 1, 2, 2)
            )
            unet = to_diffusers_unet(make_unet(config, seed=11, dtype=torch.float64), config)
            g = torch.Generator().manual_seed(7)
            z = torch.randn(2, 4, TRAJECTORY_LATENT, TRAJECTORY_LATENT, generator=g, dtype=torch.float64)
            cond = torch.randn(2, 77, config.context_dim, generator=g, dtype=torch.float64)
            uncond = torch.randn(2, 77, config.context_dim, generator=g, dtype=torch.float64)
            unets[config.name] = (unet, z, cond, uncond)
        yield unets
    finally:
        torch.set_num_threads(threads)


@pytest.mark.recorded
@pytest.mark.parametrize("case", sorted(OFFICIAL_TRAJECTORY))
def test_trajectory_equals_the_official_pipeline(case: str, tiny_unets: dict) -> None:
    name, image = case.split("/")
    unet, z, cond, uncond = tiny_unets[name]
    b = int(image)
    plan = binding_plan(TRAJECTORY_STEPS, BindingConfig(intervention_steps=4))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses, norms, final = _run_binding_vp(unet, z[b : b + 1], cond[b : b + 1], uncond[b : b + 1], plan)
    finally:
        torch.set_num_threads(threads)
    want_losses, want_norms, want_sum, want_entry = OFFICIAL_TRAJECTORY[case]
    # Measured against the official final latents: at most 2.3e-13 apart (entries up to 40), losses 2.2e-13 relative.
    assert losses == pytest.approx(want_losses, rel=1e-11, abs=1e-13)
    assert norms == pytest.approx(want_norms, rel=1e-12)
    assert float(final.sum()) == pytest.approx(want_sum, rel=1e-10)
    assert float(final[0, 1, 5, 9]) == pytest.approx(want_entry, rel=1e-10)


@pytest.mark.recorded
def test_trajectory_check_can_fail(tiny_unets: dict) -> None:
    # Without the updates (or with A&E's decaying step instead of the constant 20) the numbers move.
    unet, z, cond, uncond = tiny_unets["sd1-like-small"]
    official_sum = OFFICIAL_TRAJECTORY["sd1-like-small/0"][2]
    for config in (BindingConfig(intervention_steps=0), BindingConfig(intervention_steps=4, step_size=17.0)):
        _, _, final = _run_binding_vp(unet, z[:1], cond[:1], uncond[:1], binding_plan(TRAJECTORY_STEPS, config))
        assert float(final.sum()) != pytest.approx(official_sum, rel=1e-6)


def test_batched_loss_equals_per_image_and_index_is_reusable() -> None:
    pieces, subtrees, *_ = OFFICIAL["several_modifiers"]
    selection = BindingSelection.official(len(pieces), _groups(subtrees))
    index = BindingIndex.build(selection)
    first = _maps()
    second = torch.softmax(first.log() * 1.3, dim=-1)  # (a pixel permutation would not change any divergence)
    batch = torch.stack([first, second])
    losses = binding_loss(batch, selection, index)
    assert losses.shape == (2,)
    assert float(losses[0]) == float(binding_loss(first, selection, index))
    assert float(losses[1]) == float(binding_loss(second, selection))
    assert float(losses[0]) != float(losses[1])
    assert binding_loss(batch, BindingSelection.official(5, [])).shape == (2,)
