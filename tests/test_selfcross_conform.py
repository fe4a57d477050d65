"""Self-Cross guidance on CONFORM (`conform+selfcross`, lib_ae.conform.self_cross_conform_terms and the
`ConformSelfCross` objective) equals the official code: its loss on recorded maps in each of its three branches, and
the official pipeline's trajectory on the same random UNets, in VP space and through k-diffusion's `sample_euler`.

The official figures were recorded once by running mengtang-lab/selfcross-guidance at 9e54e74
(pipelines/pipeline_sc_conform.py `SelfCrossConformPipeline`) unmodified, float64, on the CPU, from /tmp (nothing of it
committed), with pytorch-metric-learning 2.5.0 (CONFORM's pin), opencv-python-headless 5.1.0 and diffusers 0.42.1,
with the loss settings of the authors' run_selfcross+conform.py (`do_smoothing=False, softmax_normalize=False`, the
embeddings are the raw maps) and `model_choice="SD14"`:
* `_compute_contrastive_loss` on tests/support/recorded_maps.py's `cross_maps()` (flat and `drawn=True`) and
  `self_maps()`, previous maps `cross_maps(phase=0.9)` or none, t = 981 (the contrast branch) and 861 (the self-cross
  branch), temperatures 0.5 and 0.07, the token groups below; recorded under ATEN_CPU_CAPABILITY unset and `default`
  (5e-16 apart);
* `__call__` on tests/test_reference.py's tiny random UNets (SD1_SMALL and SD2_SMALL, seed 11, `make_inputs(batch=2)`),
  one image per run, DDIM 24 steps, CFG 7.5, attn_res 4x4, max_iter_to_alter 21, refinement at steps [1, 10, 20]
  (the run script's, fixed indices) with 20 iterations, scale factor 20, temperature 0.5, groups [[2, 3], [6, 7]] and
  [[3], [7, 9]]. On these random UNets every token's top-4 deficit stays above 0.5, so the trajectory runs the first
  branch throughout; the loss figures cover the other two.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lib_ae import AttendAndExcite, AttentionCapture, ExciteConfig, TokenSelection
from lib_ae.binding import BindingGroup, BindingSelection
from lib_ae.conform import ConformGroups, ConformIndex, conform_embeddings, ntxent_loss, self_cross_conform_terms
from lib_ae.objectives import ConformSelfCross
from support.models import make_unet
from support.official_loops import ddim_sigma_euler, ddim_vp
from support.recorded_maps import cross_maps, self_maps
from support.threads import one_thread  # noqa: F401  (module-scoped, autouse)
from test_reference import SD1_SMALL, SD2_SMALL, make_inputs

GROUPS = {"two_pairs": [[2, 3], [6, 7]], "single_tokens": [[2], [5]], "three_groups": [[2, 3, 4], [6], [8, 9]]}

# (maps, groups, t, previous maps, temperature): (loss, NT-Xent, top-4 deficit, its gradient w.r.t. the cross and
# self maps: norms, [3, 5, 6], [3, 5, 37])
OFFICIAL_LOSS = {
    ('flat', 'two_pairs', 981, False, 0.5): (0.8886551146964539, 1.039443127463775, 0.8886551146964539,
        5.175409921552472, 0.0, 0.0, 0.0),
    ('flat', 'two_pairs', 981, False, 0.07): (0.8886551146964539, 0.8097217070839513, 0.8886551146964539,
        5.175409921552472, 0.0, 0.0, 0.0),
    ('flat', 'two_pairs', 981, True, 0.5): (0.8886551146964539, 1.503342839389126, 0.8886551146964539,
        5.175409921552472, 0.0, 0.0, 0.0),
    ('flat', 'two_pairs', 981, True, 0.07): (0.8886551146964539, 1.2744115895739516, 0.8886551146964539,
        5.175409921552472, 0.0, 0.0, 0.0),
    ('flat', 'two_pairs', 861, False, 0.5): (0.8886551146964539, 1.039443127463775, 0.8886551146964539,
        5.175409921552472, 0.0, 0.0, 0.0),
    ('flat', 'two_pairs', 861, False, 0.07): (0.8886551146964539, 0.8097217070839513, 0.8886551146964539,
        5.175409921552472, 0.0, 0.0, 0.0),
    ('flat', 'two_pairs', 861, True, 0.5): (0.8886551146964539, 1.503342839389126, 0.8886551146964539,
        5.175409921552472, 0.0, 0.0, 0.0),
    ('flat', 'two_pairs', 861, True, 0.07): (0.8886551146964539, 1.2744115895739516, 0.8886551146964539,
        5.175409921552472, 0.0, 0.0, 0.0),
    ('flat', 'single_tokens', 981, False, 0.5): (0.8787839206322919, 0.0, 0.8787839206322919, 5.544285403267418,
        0.0, 0.0, 0.0),
    ('flat', 'single_tokens', 981, False, 0.07): (0.8787839206322919, 0.0, 0.8787839206322919, 5.544285403267418,
        0.0, 0.0, 0.0),
    ('flat', 'single_tokens', 981, True, 0.5): (0.8787839206322919, 0.8444498439717726, 0.8787839206322919,
        5.544285403267418, 0.0, 0.0, 0.0),
    ('flat', 'single_tokens', 981, True, 0.07): (0.8787839206322919, 0.10366038342190861, 0.8787839206322919,
        5.544285403267418, 0.0, 0.0, 0.0),
    ('flat', 'single_tokens', 861, False, 0.5): (0.8787839206322919, 0.0, 0.8787839206322919, 5.544285403267418,
        0.0, 0.0, 0.0),
    ('flat', 'single_tokens', 861, False, 0.07): (0.8787839206322919, 0.0, 0.8787839206322919, 5.544285403267418,
        0.0, 0.0, 0.0),
    ('flat', 'single_tokens', 861, True, 0.5): (0.8787839206322919, 0.8444498439717726, 0.8787839206322919,
        5.544285403267418, 0.0, 0.0, 0.0),
    ('flat', 'single_tokens', 861, True, 0.07): (0.8787839206322919, 0.10366038342190861, 0.8787839206322919,
        5.544285403267418, 0.0, 0.0, 0.0),
    ('flat', 'three_groups', 981, False, 0.5): (0.8861288353521678, 1.4227675461925735, 0.8861288353521678,
        5.244740023756252, 0.0, 0.0, 0.0),
    ('flat', 'three_groups', 981, False, 0.07): (0.8861288353521678, 1.3799342928165848, 0.8861288353521678,
        5.244740023756252, 0.0, 0.0, 0.0),
    ('flat', 'three_groups', 981, True, 0.5): (0.8861288353521678, 1.9698490060704918, 0.8861288353521678,
        5.244740023756252, 0.0, 0.0, 0.0),
    ('flat', 'three_groups', 981, True, 0.07): (0.8861288353521678, 2.0840003044915565, 0.8861288353521678,
        5.244740023756252, 0.0, 0.0, 0.0),
    ('flat', 'three_groups', 861, False, 0.5): (0.8861288353521678, 1.4227675461925735, 0.8861288353521678,
        5.244740023756252, 0.0, 0.0, 0.0),
    ('flat', 'three_groups', 861, False, 0.07): (0.8861288353521678, 1.3799342928165848, 0.8861288353521678,
        5.244740023756252, 0.0, 0.0, 0.0),
    ('flat', 'three_groups', 861, True, 0.5): (0.8861288353521678, 1.9698490060704918, 0.8861288353521678,
        5.244740023756252, 0.0, 0.0, 0.0),
    ('flat', 'three_groups', 861, True, 0.07): (0.8861288353521678, 2.0840003044915565, 0.8861288353521678,
        5.244740023756252, 0.0, 0.0, 0.0),
    ('drawn', 'two_pairs', 981, False, 0.5): (1.0635169220729521, 1.0635169220729521, 0.0, 0.8417368368045423, 0.0,
        0.004968492421783806, 0.0),
    ('drawn', 'two_pairs', 981, False, 0.07): (0.8625192375284887, 0.8625192375284887, 0.0, 5.302100025987998, 0.0,
        0.0315050822698254, 0.0),
    ('drawn', 'two_pairs', 981, True, 0.5): (1.42789895901302, 1.42789895901302, 0.0, 0.34192613557667506, 0.0,
        0.0021701125397799105, 0.0),
    ('drawn', 'two_pairs', 981, True, 0.07): (0.977762792736284, 0.977762792736284, 0.0, 1.9330944608240634, 0.0,
        0.010774142529030376, 0.0),
    ('drawn', 'two_pairs', 861, False, 0.5): (0.12457167740407749, 1.0635169220729521, 0.0, 0.6183496947204636,
        1.297405619942394, -1.8401095551694252e-06, 0.005683526998164589),
    ('drawn', 'two_pairs', 861, False, 0.07): (0.12457167740407749, 0.8625192375284887, 0.0, 0.6183496947204636,
        1.297405619942394, -1.8401095551694252e-06, 0.005683526998164589),
    ('drawn', 'two_pairs', 861, True, 0.5): (0.12457167740407749, 1.42789895901302, 0.0, 0.6183496947204636,
        1.297405619942394, -1.8401095551694252e-06, 0.005683526998164589),
    ('drawn', 'two_pairs', 861, True, 0.07): (0.12457167740407749, 0.977762792736284, 0.0, 0.6183496947204636,
        1.297405619942394, -1.8401095551694252e-06, 0.005683526998164589),
    ('drawn', 'single_tokens', 981, False, 0.5): (0.0, 0.0, 1.9055867994666187e-12, 0.0, 0.0, 0.0, 0.0),
    ('drawn', 'single_tokens', 981, False, 0.07): (0.0, 0.0, 1.9055867994666187e-12, 0.0, 0.0, 0.0, 0.0),
    ('drawn', 'single_tokens', 981, True, 0.5): (1.1075214679111274, 1.1075214679111274, 1.9055867994666187e-12,
        0.6777385211288275, 0.0, 0.0, 0.0),
    ('drawn', 'single_tokens', 981, True, 0.07): (1.3682018097105815, 1.3682018097105815, 1.9055867994666187e-12,
        6.079160833618275, 0.0, 0.0, 0.0),
    ('drawn', 'single_tokens', 861, False, 0.5): (0.28017235199887325, 0.0, 1.9055867994666187e-12,
        0.8527880829032299, 2.052087489283575, -5.705041037962042e-08, 0.0),
    ('drawn', 'single_tokens', 861, False, 0.07): (0.28017235199887325, 0.0, 1.9055867994666187e-12,
        0.8527880829032299, 2.052087489283575, -5.705041037962042e-08, 0.0),
    ('drawn', 'single_tokens', 861, True, 0.5): (0.28017235199887325, 1.1075214679111274, 1.9055867994666187e-12,
        0.8527880829032299, 2.052087489283575, -5.705041037962042e-08, 0.0),
    ('drawn', 'single_tokens', 861, True, 0.07): (0.28017235199887325, 1.3682018097105815, 1.9055867994666187e-12,
        0.8527880829032299, 2.052087489283575, -5.705041037962042e-08, 0.0),
    ('drawn', 'three_groups', 981, False, 0.5): (1.416749378702633, 1.416749378702633, 0.0, 0.6760021099823955, 0.0,
        0.0013017011778994276, 0.0),
    ('drawn', 'three_groups', 981, False, 0.07): (1.2758821247596672, 1.2758821247596672, 0.0, 4.626656541530976,
        0.0, 0.007682098794811069, 0.0),
    ('drawn', 'three_groups', 981, True, 0.5): (1.934178441625504, 1.934178441625504, 0.0, 0.2594979202150378, 0.0,
        0.010510020313150955, 0.0),
    ('drawn', 'three_groups', 981, True, 0.07): (2.5863146920028526, 2.5863146920028526, 0.0, 2.0437392391028086,
        0.0, 0.18489062839494413, 0.0),
    ('drawn', 'three_groups', 861, False, 0.5): (0.1527405988790066, 1.416749378702633, 0.0, 0.4418337510658103,
        0.9772521823930512, -1.1347315907140076e-06, 0.0010389086595895736),
    ('drawn', 'three_groups', 861, False, 0.07): (0.1527405988790066, 1.2758821247596672, 0.0, 0.4418337510658103,
        0.9772521823930512, -1.1347315907140076e-06, 0.0010389086595895736),
    ('drawn', 'three_groups', 861, True, 0.5): (0.1527405988790066, 1.934178441625504, 0.0, 0.4418337510658103,
        0.9772521823930512, -1.1347315907140076e-06, 0.0010389086595895736),
    ('drawn', 'three_groups', 861, True, 0.07): (0.1527405988790066, 2.5863146920028526, 0.0, 0.4418337510658103,
        0.9772521823930512, -1.1347315907140076e-06, 0.0010389086595895736),
}

# (config, image): (the loss at the start of each updated step, the latent's norm after each step, final sum,
# final[0, 1, 2, 3])
OFFICIAL_TRAJECTORY = {
    ('sd1-like-small', 0): (
        (0.9918108146615913, 0.9914590045674604, 0.9885500910200737, 0.989587911534059, 0.9891705883678613,
        0.9888101144689503, 0.9884332562780029, 0.9874014281859973, 0.9873367858750115, 0.9870146412742407,
        0.98725502757004, 0.9875115771655397, 0.9876367180551253, 0.9877465214781338, 0.9875757430745077,
        0.9879918668721668, 0.9879221188514209, 0.9881211740251671, 0.9881648843688868, 0.988139928303428,
        0.9880287694400556, 0.9882502642752017, 0.9880780098854473, 0.9882618816578547),
        (42.96074529342947, 55.364797170298196, 69.66640418820126, 85.6317306266876, 103.20391260256197,
        122.2650015754438, 142.67765831093496, 164.22296587057818, 186.68484150339503, 209.787784634563,
        233.23555606006119, 256.72423160606996, 279.9366344403606, 302.56600786765574, 324.32324361672676,
        344.95290189026304, 364.23392560891074, 381.9936389641417, 398.1047469987668, 412.4937200214702,
        425.13953329306196, 436.1018139770534, 445.7754757178151, 446.04296407100986),
        1151.4158340800493, -5.086785991929214,
    ),
    ('sd1-like-small', 1): (
        (0.9873844675898317, 0.9869710025526316, 0.9696933429129462, 0.9739646074343081, 0.9758979109699247,
        0.9790811083611979, 0.9775456720639188, 0.9806990313600855, 0.9829117547666844, 0.9848198847257119,
        0.9854004979203945, 0.9850868513268248, 0.9848525302850373, 0.9848639090924652, 0.9846941975707861,
        0.9848917367234026, 0.9847341362855885, 0.984919794758551, 0.9850304910741056, 0.9847714249976603,
        0.9851131305555387, 0.9848345936749161, 0.984938554637498, 0.9849885763841074),
        (40.2505365361404, 52.365023442089345, 66.50400972022595, 82.34031691884842, 99.68538222413432,
        118.42140016464839, 138.41382423618336, 159.4888933844072, 181.44559544279758, 204.02166193021444,
        226.94200329399024, 249.89770957134576, 272.58443701330265, 294.702681324937, 315.97431770846305,
        336.14532490479826, 355.0078320110736, 372.3861759423188, 388.15868264837417, 402.25326345765257,
        414.65484906593446, 425.42128413576006, 434.984793417545, 435.2550851835451),
        1506.851720187558, -19.871910206472435,
    ),
    ('sd2-like-small', 0): (
        (0.9844847112320745, 0.985162454660633, 0.9835184086499775, 0.984366837754581, 0.9845377869977506,
        0.9850418728800087, 0.9845803750944984, 0.9848959684755084, 0.9851216884896761, 0.986046174588585,
        0.9865274563240045, 0.9869973655105552, 0.9871150617968812, 0.9872205125423323, 0.987412982843779,
        0.9874629891428702, 0.9874987471244782, 0.9878288372743028, 0.9877975596412801, 0.9878661899437762,
        0.9879707281721839, 0.9879166726554881, 0.9878446535891177, 0.9879586781252386),
        (43.61609509016447, 56.873547186143895, 72.1445210790983, 89.30119754349974, 108.23404935005301,
        128.80741790809788, 150.8500117000364, 174.16167302520827, 198.48687559252997, 223.53458983738918,
        248.96958019172453, 274.4691642882216, 299.6818470058813, 324.2769324728185, 347.9445674263131,
        370.40571113596417, 391.4237552809803, 410.80998337218455, 428.4285000663045, 444.20117715253616,
        458.11484599312934, 470.2532968765422, 481.2188289389387, 481.54691229126763),
        658.9679285670118, 4.689764800760842,
    ),
    ('sd2-like-small', 1): (
        (0.9829402146195545, 0.9783941700408603, 0.9600484350399882, 0.9649975080320609, 0.9697590334740163,
        0.9741492768634715, 0.9770145917168302, 0.9788263864767965, 0.9796714794216136, 0.9784299650237586,
        0.9788352324937326, 0.9784388369285629, 0.9786230782383871, 0.9788708619593695, 0.9787681863367982,
        0.9789677774331634, 0.9785879389799645, 0.9788235582685124, 0.9783842674791506, 0.9787838346353769,
        0.977929147412149, 0.9779695059942494, 0.9778179198921828, 0.9777094559720386),
        (41.124882456655996, 54.67422053049176, 70.20900231406632, 87.39074955823996, 106.11427599574444,
        126.29065298969782, 147.8272297390825, 170.5545551275324, 194.24489120810983, 218.62199094602724,
        243.37466344305682, 268.1807565031558, 292.7066941917268, 316.62848277879493, 339.6424960440043,
        361.47831597353667, 381.90472802106353, 400.7381175769411, 417.84618997369785, 433.1524708535589,
        446.64281860893743, 458.38995238626023, 468.9363316975869, 469.2456644063108),
        844.4708573280521, -3.000076348513989,
    ),
}


def index_of(groups: list[list[int]]) -> ConformIndex:
    columns = tuple(c for group in groups for c in group)
    classes = tuple(g for g, group in enumerate(groups) for _ in group)
    return ConformIndex.build(TokenSelection.official(77, [[c] for c in columns]), ConformGroups(columns, classes), "cpu")


@pytest.mark.recorded
@pytest.mark.parametrize("case", sorted(OFFICIAL_LOSS), ids=lambda c: "-".join(map(str, c)))
def test_loss_equals_the_official_code(case: tuple[str, str, int, bool, float]) -> None:
    maps, name, t, previous, temperature = case
    want = OFFICIAL_LOSS[case]
    drawn = maps == "drawn"
    index = index_of(GROUPS[name])
    cross = cross_maps(drawn=drawn).requires_grad_(True)
    attention = self_maps().requires_grad_(True)
    rows = attention.reshape(256, 256)
    embeddings, classes = conform_embeddings(cross[None], index, smooth_maps=False, softmax_normalize=False), index.classes
    if previous:  # each token then its previous map, as the official code orders them
        before = conform_embeddings(cross_maps(phase=0.9, drawn=drawn)[None], index, smooth_maps=False,
                                    softmax_normalize=False)
        embeddings = torch.stack([embeddings, before], -2).flatten(-3, -2)
        classes = classes.repeat_interleave(2)
    contrast = ntxent_loss(embeddings, classes, None, temperature)
    deficit, self_cross = self_cross_conform_terms(cross[None], index, lambda w: w @ rows)
    # The official branches (SD14): the deficit while it is above 0.5, else the contrast above t = 881, else both.
    loss = deficit if float(deficit.detach()) > 0.5 else contrast if t > 881 else deficit + self_cross
    grad_cross, grad_self = torch.autograd.grad(loss.sum(), [cross, attention], allow_unused=True,
                                                materialize_grads=True)
    got = (float(loss.detach()), float(contrast.detach()), float(deficit.detach()), float(grad_cross.norm()),
           float(grad_self.norm()), float(grad_cross[3, 5, 6]), float(grad_self[3, 5, 37]))
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)  # measured: 6.4e-16


def test_the_objective_takes_the_official_branch_per_row() -> None:
    """Drawn maps at t = 861: the deficit is below 0.5, so the loss is deficit + self-cross; at t = 981 the contrast;
    on SD2 the contrast at 981 even where the deficit is above 0.5 (the authors' SD 2.1 rule)."""
    from lib_ae.evaluation import LossGroup
    from lib_ae.objectives import Extras

    selection = TokenSelection.official(77, [[3], [7]])
    binding = BindingSelection.official(10, [BindingGroup(3, (2,)), BindingGroup(7, (6,))])
    drawn = cross_maps(drawn=True)[None]
    rows = self_maps().reshape(256, 256)
    values = {}
    for sd2 in (False, True):
        objective = ConformSelfCross(ExciteConfig(), sd2=sd2)
        group = LossGroup(None, selection, None, binding, None, objective.index_for(selection, binding, "cpu"))
        for t in (981.0, 861.0):
            objective.start_step(objective.plan(50), 0, torch.device("cpu"), t)
            terms = objective.terms(group, drawn, (16, 16), False, None, Extras("update", lambda w: w @ rows))
            values[(sd2, t)] = float(terms.objective)
    index = ConformIndex.build(selection, ConformGroups.build(selection, binding), "cpu")
    deficit, self_cross = self_cross_conform_terms(drawn, index, lambda w: w @ rows)
    assert float(deficit) < 0.5
    assert values[(False, 861.0)] == pytest.approx(float(deficit + self_cross), rel=1e-14)
    assert values[(False, 981.0)] != values[(False, 861.0)] and values[(True, 981.0)] == values[(False, 981.0)]
    with pytest.raises(Exception, match="timestep"):
        ConformSelfCross(ExciteConfig()).start_step(objective.plan(50), 0, torch.device("cpu"), None)


# --- the official pipeline's trajectory -----------------------------------------------------------------------------

STEPS, CFG, ALTER = 24, 7.5, 21
TARGETS = [
    (TokenSelection.official(77, [[3], [7]]), BindingSelection.official(10, [BindingGroup(3, (2,)), BindingGroup(7, (6,))])),
    (TokenSelection.official(77, [[3], [9]]), BindingSelection.official(10, [BindingGroup(9, (7,))])),
]


def run(config: Any, space: str) -> tuple[Any, list[list[float]] | None, torch.Tensor]:
    unet = make_unet(config, seed=11, dtype=torch.float64)
    z, cond, uncond = make_inputs(config, batch=2)
    capture = AttentionCapture(unet)
    try:
        objective = ConformSelfCross(ExciteConfig(scale_thresholds_with_steps=False, max_iter_to_alter=ALTER))
        engine = AttendAndExcite(capture, objective)
        selections, bindings = (list(t) for t in zip(*TARGETS))
        if space == "vp":
            return ddim_vp(unet, engine, z, cond, uncond, STEPS, CFG, selections, bindings)
        excitation, final = ddim_sigma_euler(unet, engine, z, cond, uncond, STEPS, CFG, selections, bindings)
        return excitation, None, final
    finally:
        capture.remove()


def assert_official(config: Any, excitation: Any, norms: list[list[float]] | None, final: torch.Tensor,
                    rel: float) -> None:
    assert sorted(excitation.plan.refinement_thresholds) == [1, 10, 20]
    for b in range(2):
        starts, want_norms, want_sum, want_entry = OFFICIAL_TRAJECTORY[(config.name, b)]
        losses = [r.loss[b] for r in excitation.reports if r.active]
        assert losses == pytest.approx(starts[:ALTER], rel=rel), f"image {b} losses"
        iterations = [r.refinement_iterations[b] for r in excitation.reports if r.step in (1, 10, 20)]
        assert iterations == [20, 20, 20]
        if norms is not None:
            assert norms[b] == pytest.approx(want_norms, rel=rel), f"image {b} norms"
        assert float(final[b].sum()) == pytest.approx(want_sum, rel=rel), f"image {b} sum"
        assert float(final[b, 1, 2, 3]) == pytest.approx(want_entry, rel=rel), f"image {b} entry"


@pytest.mark.recorded
@pytest.mark.parametrize("config", [SD1_SMALL, SD2_SMALL], ids=lambda c: c.name)
def test_in_vp_space_equals_the_official_pipeline(config: Any) -> None:
    excitation, norms, final = run(config, "vp")
    assert_official(config, excitation, norms, final, rel=1e-11)  # measured: 2.2e-14 at most


@pytest.mark.recorded
def test_through_sigma_space_euler_equals_the_official_pipeline() -> None:
    excitation, _, final = run(SD1_SMALL, "sigma")
    assert_official(SD1_SMALL, excitation, None, final, rel=1e-11)  # measured: 7.2e-15 at most
