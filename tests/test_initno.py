"""InitNO and Self-Cross guidance on InitNO (lib_ae.initno, the `initno` and `initno+selfcross` objectives) equal the
official code: their losses on recorded maps, Otsu's threshold as OpenCV computes it, and the whole official pipeline
(the noise optimisation's rounds, Adam and KL steps and choice of round, then sampling with refinement and the running
average of the maps) on the same random UNets, in VP space and through k-diffusion's real `sample_euler`.

The official figures were recorded once by running xiefan-guo/initno at fa021c4 (pipeline_sd_initno.py) and
mengtang-lab/selfcross-guidance at 9e54e74 (pipeline_sc_initno.py) unmodified, float64, on the CPU, from /tmp (nothing
of either is committed), with opencv-python-headless 5.1.0 (4.10 gives the same figures) and diffusers 0.42.1:
* the loss methods as unbound functions on a stub whose `aggregate_attention` returns `cross_maps()` and `self_maps()`
  of tests/support/recorded_maps.py (flat maps, where A&E's loss is near 1, and `drawn=True` maps, where it is below
  0.5 and the conflict terms count), `attention_res=16`; the augmented loss called twice (maps at phase 0.9, then 0),
  so that the second call reads the first's running average; token sets [2, 5], [3, 7, 9], [4]; K = 1 (and 16 for
  Self-Cross); recorded under ATEN_CPU_CAPABILITY unset and `default` (5.4e-16 apart at most);
* `__call__` on tests/test_reference.py's tiny random UNets (SD1_SMALL and SD2_SMALL, seed 11, `make_inputs(batch=2)`),
  one image per run, DDIM 24 steps (the official refinement steps 10 and 20 are fixed), CFG 7.5, attn_res 4x4,
  max_iter_to_alter 21, scale factor 20, generator seeded 100 + image (the rounds' fresh noise), token indices
  [[2, 5], [3, 7, 9]], Self-Cross with K = 4; InitNO's loss methods given `attention_res=4` at the call (their
  default of 16 is not passed on by `__call__`).

Two properties of the official code these tests account for: InitNO's noise-optimisation loss multiplies by a float32
`torch.ones(1)`, so its values (not its gradients) are float32-rounded there (3.7e-8); and on these random UNets no
round meets its targets (A&E's loss stays near 1), so every run makes all five rounds and the longer 50-step run.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lib_ae import AttendAndExcite, AttentionCapture, ExciteConfig, TokenSelection
from lib_ae.in_sampler import seeded_noise
from lib_ae.initno import InitnoConfig, clean_masks, initno_losses, otsu_level
from lib_ae.loss import smooth, subject_maps
from lib_ae.objectives import Initno, InitnoSelfCross
from support.models import make_unet
from support.official_loops import ddim_sigma_euler, ddim_vp
from support.recorded_maps import cross_maps, self_maps
from test_reference import SD1_SMALL, SD2_SMALL, make_inputs
from support.threads import one_thread  # noqa: F401  (module-scoped, autouse)

SUBJECTS = {"two": [2, 5], "three": [3, 7, 9], "one": [4]}

# (maps, pipeline, function, subjects, K): the official function's returned values, then for the augmented one
# its first call's; the gradient of the first value w.r.t. the cross and self maps (norms, [3, 5, I[0]], [3, 5, 37]).
OFFICIAL_LOSSES = {
    ('flat', 'initno', 'compute', 'two', 1): ((1.0481468439102173, 0.9487807154655457, 0.0), None,
        (7.676703472994401, 0.0, 0.0, 0.0)),
    ('flat', 'initno', 'augmented', 'two', 1): ((0.9623726636291398, 0.9487807048056592, 0.09936609993072062,
        0.0011570265421423805), (0.9652306200006361, 0.9560721954049093, 0.0865653521218599, 0.000501889383540781),
        (4.210720227906501, 7.730600723578725, 0.003338463001926485, 0.0)),
    ('flat', 'initno', 'compute', 'three', 1): ((1.07526433467865, 0.9601454138755798, 0.0), None,
        (6.875211486981671, 0.0, 0.0, 0.0)),
    ('flat', 'initno', 'augmented', 'three', 1): ((1.0084734486354734, 0.9601454311907597, 0.11511886595112285,
        0.03387674349647388), (1.0526518934568019, 0.9610970810139354, 0.12157220676347372, 0.07939759176651912),
        (3.649336894057392, 5.443722442750295, -7.066907441721251e-06, 0.0)),
    ('flat', 'initno', 'compute', 'one', 1): ((0.9963181018829346, 0.9438295960426331, 0.0), None,
        (5.907762991809863, 0.0, 0.0, 0.0)),
    ('flat', 'initno', 'augmented', 'one', 1): ((0.950489389498503, 0.9438296019776156, 0.05248850891111868, 0.0),
        (0.9519203956219118, 0.9467973177850275, 0.05123077836884235, 0.0), (4.321828101999584, 0.0,
        -4.013783058573642e-05, 0.0)),
    ('flat', 'selfcross', 'compute', 'two', 1): ((1.0481468047363798, 0.9487807048056592, 0.0), None,
        (7.676703472994401, 0.0, 0.0, 0.0)),
    ('flat', 'selfcross', 'augmented', 'two', 1): ((0.9612156370869974, 0.9587173147987313, 0.0),
        (0.9647287306170953, 0.9647287306170953, 0.0), (4.210720227906501, 0.0, 0.003338463001926485, 0.0)),
    ('flat', 'selfcross', 'compute', 'two', 16): ((1.0595853943549096, 0.960219294424189, 0.0), None,
        (5.5885412004068415, 0.0, 0.0, 0.0)),
    ('flat', 'selfcross', 'augmented', 'two', 16): ((0.9726542267055271, 0.9701559044172611, 0.0),
        (0.9718528504934889, 0.9718528504934889, 0.0), (0.9567235746570759, 0.0, 0.003338463001926485, 0.0)),
    ('flat', 'selfcross', 'compute', 'three', 1): ((1.0752642971418824, 0.9601454311907597, 0.0), None,
        (6.875211486981671, 0.0, 0.0, 0.0)),
    ('flat', 'selfcross', 'augmented', 'three', 1): ((0.9745967051389995, 0.9716573177858719, 0.0),
        (0.9732543016902828, 0.9732543016902828, 0.0), (3.649336894057392, 0.0, -7.066907441721251e-06, 0.0)),
    ('flat', 'selfcross', 'compute', 'three', 16): ((1.081988282810799, 0.9668694168596761, 0.0), None,
        (5.772261694564662, 0.0, 6.39216525852473e-07, 0.0)),
    ('flat', 'selfcross', 'augmented', 'three', 16): ((0.981320690807916, 0.9783813034547884, 0.0),
        (0.9782437740498897, 0.9782437740498897, 0.0), (0.8771525398776853, 0.0, -6.427690915868778e-06, 0.0)),
    ('flat', 'selfcross', 'compute', 'one', 1): ((0.9963181108887342, 0.9438296019776156, 0.0), None,
        (5.907762991809863, 0.0, 0.0, 0.0)),
    ('flat', 'selfcross', 'augmented', 'one', 1): ((0.950489389498503, 0.9490784528687274, 0.0),
        (0.9519203956219118, 0.9519203956219118, 0.0), (4.321828101999584, 0.0, -4.013783058573642e-05, 0.0)),
    ('flat', 'selfcross', 'compute', 'one', 16): ((1.007335495822054, 0.9548469869109353, 0.0), None,
        (3.8819483948112854, 0.0, 0.0, 0.0)),
    ('flat', 'selfcross', 'augmented', 'one', 16): ((0.9615067744318228, 0.9600958378020471, 0.0),
        (0.9588247211672163, 0.9588247211672163, 0.0), (1.0595643551918104, 0.0, -4.013783058573642e-05, 0.0)),
    ('drawn', 'initno', 'compute', 'two', 1): ((0.3890809416770935, 0.29126039147377014, 0.09782055020332336), None,
        (0.30248645191913726, 7.101593030242484, 0.0, 0.0)),
    ('drawn', 'initno', 'augmented', 'two', 1): ((0.4039168431123136, 0.29126038297545664, 0.0,
        0.09782054669695522), (0.5312634366955372, 0.39198245004986976, 0.28913685967828395, 0.11036730067783905),
        (0.30316067369497335, 7.101593030242484, 3.1846373903492125e-09, 0.0)),
    ('drawn', 'initno', 'compute', 'three', 1): ((0.21185685694217682, 0.20796075463294983, 0.0038960976526141167),
        None, (0.39013177795795195, 5.84119671537832, 0.0, 0.0)),
    ('drawn', 'initno', 'augmented', 'three', 1): ((0.2424221243288788, 0.20796075260787794, 0.0,
        0.003896097584272996), (0.3168411238288954, 0.28639042060173814, 0.2765440852829406, 0.0027962946988632346),
        (0.38996341132770157, 5.84119671537832, -4.526611047255731e-11, 0.0)),
    ('drawn', 'initno', 'compute', 'one', 1): ((0.28055086731910706, 0.28055086731910706, 0.0), None,
        (0.6222245757291524, 0.0, 0.0, 0.0)),
    ('drawn', 'initno', 'augmented', 'one', 1): ((0.2909853511170017, 0.2805508537852911, 0.0, 0.0),
        (0.4665660267713867, 0.4665660267713867, 0.0, 0.0), (0.6194151311206223, 0.0, -9.887975136195413e-11, 0.0)),
    ('drawn', 'selfcross', 'compute', 'two', 1): ((1.0847323074058322, 0.29126038297545664, 0.7934719244303754),
        None, (3.9254312690837656, 0.8161291337596793, 0.0, 0.0)),
    ('drawn', 'selfcross', 'augmented', 'two', 1): ((1.0995598449700046, 1.084723931530103, 0.7934635485546463),
        (1.316128832858222, 1.316128832858222, 0.8952326968405236), (3.926270895733805, 0.8161377976281811,
        3.1846373903492125e-09, 0.0)),
    ('drawn', 'selfcross', 'compute', 'two', 16): ((0.5297653034938204, 0.5297653034938204, 0.0), None,
        (0.27937465422368063, 0.0, 0.0, 0.0)),
    ('drawn', 'selfcross', 'augmented', 'two', 16): ((0.5446012169337222, 0.5297653034938204, 0.0),
        (0.603392268124829, 0.603392268124829, 0.0), (0.2795752332881906, 0.0, 3.1846373903492125e-09, 0.0)),
    ('drawn', 'selfcross', 'compute', 'three', 1): ((0.5227177180092397, 0.20796075260787794, 0.31475696540136183),
        None, (2.4900951690682422, 1.1431172119846402, 0.0, 0.0)),
    ('drawn', 'selfcross', 'augmented', 'three', 1): ((0.5532820384019148, 0.5227167642651869, 0.314756011657309),
        (0.5779364717622537, 0.5779364717622537, 0.26389164263222153), (2.494871977178594, 1.1431115185303573,
        -4.526611047255731e-11, 0.0)),
    ('drawn', 'selfcross', 'compute', 'three', 16): ((0.7338076984707584, 0.41905073306939666, 0.31475696540136183),
        None, (2.89215515274699, 1.1431172119846402, 0.0, 0.0)),
    ('drawn', 'selfcross', 'augmented', 'three', 16): ((0.7643720188634335, 0.7338067447267056, 0.314756011657309),
        (0.7206603800222661, 0.7206603800222661, 0.26389164263222153), (2.8918684346209544, 1.1431115185303573,
        -4.526611047255731e-11, 0.0)),
    ('drawn', 'selfcross', 'compute', 'one', 1): ((0.2805508537852911, 0.2805508537852911, 0.0), None,
        (0.6222245757291524, 0.0, 0.0, 0.0)),
    ('drawn', 'selfcross', 'augmented', 'one', 1): ((0.2909853511170017, 0.2805508537852911, 0.0),
        (0.4665660267713867, 0.4665660267713867, 0.0), (0.6194151311206223, 0.0, -9.887975136195413e-11, 0.0)),
    ('drawn', 'selfcross', 'compute', 'one', 16): ((0.4266239267550569, 0.4266239267550569, 0.0), None,
        (0.45874900491923637, 0.0, 0.0, 0.0)),
    ('drawn', 'selfcross', 'augmented', 'one', 16): ((0.4370584240867675, 0.4266239267550569, 0.0),
        (0.5036113912175451, 0.5036113912175451, 0.0), (0.45554503103270355, 0.0, -9.887975136195413e-11, 0.0)),
}
# (maps, subjects, token): (cv2's Otsu level, ones in the Otsu mask, ones in the peak's region, peak (y, x))
OFFICIAL_OTSU = {
    ('flat', 'two', 2): (3, 113, 55, (10, 6)),
    ('flat', 'two', 5): (4, 81, 6, (1, 6)),
    ('flat', 'three', 3): (4, 63, 4, (9, 0)),
    ('flat', 'three', 7): (3, 127, 35, (1, 13)),
    ('flat', 'three', 9): (3, 117, 33, (3, 9)),
    ('flat', 'one', 4): (4, 91, 10, (1, 13)),
    ('drawn', 'two', 2): (42, 22, 22, (12, 8)),
    ('drawn', 'two', 5): (63, 17, 17, (15, 7)),
    ('drawn', 'three', 3): (63, 36, 36, (11, 4)),
    ('drawn', 'three', 7): (54, 40, 40, (4, 11)),
    ('drawn', 'three', 9): (54, 33, 33, (12, 10)),
    ('drawn', 'one', 4): (61, 41, 41, (7, 2)),
}
# (pipeline, config, image): (per round (met, score, evaluations), the 50-step run's evaluations, refinement
# calls at steps 10 and 20, the latent's norm after each step, final sum, final[0, 1, 2, 3])
OFFICIAL_TRAJECTORY = {
    ('initno', 'sd1-like-small', 0): (
        ((False, 1.9865036010742188, 10), (False, 1.9931267499923706, 10), (False, 1.9887559413909912, 10), (False,
            1.9880931377410889, 10), (False, 1.9841649532318115, 10)), 50, (21, 21),
        (39.61565579476698, 51.20710571668518, 64.52312002842717, 79.28916783754084, 95.47676308859806,
            113.03113342408491, 131.84942562213564, 151.77618684785597, 172.58310120164134, 194.01407605564708,
            215.78738736310717, 237.6079019854237, 259.1809455676738, 280.22104376123525, 300.46115171233737,
            319.66038287431655, 337.61536626182345, 354.162679730585, 369.18479673792626, 382.6131544849686,
            394.428580820209, 404.6994535536161, 413.8461310972252, 414.1070182272895),
        995.1155733652988, -8.173373416558496,
    ),
    ('initno', 'sd1-like-small', 1): (
        ((False, 1.985793113708496, 10), (False, 1.9662336111068726, 10), (False, 1.988670825958252, 10), (False,
            1.9709265232086182, 10), (False, 1.9612867832183838, 10)), 50, (21, 21),
        (42.08756935319324, 54.25852413065847, 68.3539259915858, 84.13314019341391, 101.53113276478294,
            120.44677544930319, 140.68679831955015, 162.06235771376544, 184.33646505631688, 207.23815491238943,
            230.49197964883695, 253.78540574812504, 276.8073697273347, 299.2585167397019, 320.84956240375647,
            341.3269347756326, 360.47423344300154, 378.1166747870976, 394.12974118681717, 408.44138188037647,
            421.03084126531235, 431.96553477085973, 441.68051700753693, 441.95549161487077),
        1524.5974321195436, -13.258423031373768,
    ),
    ('initno', 'sd2-like-small', 0): (
        ((False, 1.984917163848877, 10), (False, 1.9782390594482422, 10), (False, 1.9875574111938477, 10), (False,
            1.9402068853378296, 10), (False, 1.9846854209899902, 10)), 50, (21, 21),
        (40.34846241524994, 53.01090013849341, 67.72841926809562, 84.0358910402603, 101.91627928101117,
            121.3147020624233, 142.06749303558644, 164.02425713059267, 186.92117170597814, 210.50065190357256,
            234.18426936451883, 258.16103338144745, 281.87037622041703, 304.99748182524763, 327.2492877959447,
            348.3646767561728, 368.1231697541273, 386.3468930156416, 402.9075606759622, 417.73224756738125,
            430.74247527861496, 442.14862983325753, 452.44742375084223, 452.7549931087613),
        792.5342590474461, -22.645358834895955,
    ),
    ('initno', 'sd2-like-small', 1): (
        ((False, 1.9791409969329834, 10), (False, 1.9802660942077637, 10), (False, 1.9832264184951782, 10), (False,
            1.980947732925415, 10), (False, 1.9847280979156494, 10)), 50, (21, 21),
        (41.4319801522649, 54.84515346880559, 70.35287492141559, 87.50729027152411, 106.22914763752185,
            126.46825345543868, 148.1001108623309, 170.93716898487267, 194.7434166532423, 219.23274014804252,
            244.07184214561065, 268.9811501928844, 293.6053616109091, 317.620613168526, 340.7236812817216,
            362.64447580265187, 383.15056892113813, 402.0574705013617, 419.2334242385565, 434.6009304883065,
            448.13540943138685, 459.93420081273257, 470.5353193653414, 470.84697499852007),
        789.933712442396, -13.62343115705155,
    ),
    ('selfcross', 'sd1-like-small', 0): (
        ((False, 0.9885157603553113, 10), (False, 0.9925496217775552, 10), (False, 0.9901808982815422, 10), (False,
            0.9891125271637761, 10), (False, 0.9870998589100386, 10)), 50, (21, 21),
        (39.69799810494866, 51.053176596336364, 64.07712652135176, 78.74878871585534, 94.87169365615235,
            112.37639042296227, 131.12642906698613, 150.96828246171367, 171.68419179265044, 193.01562554251382,
            214.68798918666673, 236.41027748678832, 257.8881213567448, 278.83707291550303, 298.9911346726706,
            318.11013465658357, 335.99181363321287, 352.4735039525265, 367.438221205255, 380.8178716413888,
            392.5987211389563, 402.83966526178256, 411.97344124706626, 412.23538607244825),
        953.9911504058337, -8.065534352309008,
    ),
    ('selfcross', 'sd1-like-small', 1): (
        ((False, 0.9876665663012736, 10), (False, 0.9719570565076493, 10), (False, 0.9895358212855712, 10), (False,
            0.9804637608163197, 10), (False, 0.975247751221971, 10)), 50, (21, 21),
        (40.31640995045874, 52.38229748473901, 66.51125564769424, 82.40979447660631, 99.71216275585539,
            118.36710375695468, 138.25836065790276, 159.21405846850442, 181.03122967297304, 203.46207238163467,
            226.22514127058696, 249.0210989357647, 271.54338026801366, 293.4963871235281, 314.60389950088785,
            334.61544507986645, 353.3198354283924, 370.54684550658055, 386.17446621291083, 400.13141098403895,
            412.3995603543614, 423.03358331732187, 432.4189355531395, 432.6785003882266),
        1433.7154310814012, 16.09953640784796,
    ),
    ('selfcross', 'sd2-like-small', 0): (
        ((False, 0.9867849819691509, 10), (False, 0.9834588112692965, 10), (False, 0.9885137130910326, 10), (False,
            0.971739023168624, 10), (False, 0.9861146389102399, 10)), 50, (21, 21),
        (40.173321941139925, 52.620715172512035, 67.28100699056392, 83.62298322682993, 101.59709806268022,
            121.11088128804894, 141.9598752334416, 164.00394353235035, 186.97720005759254, 210.6237706311781,
            234.60730871450727, 258.669549128412, 282.4597539887021, 305.66831977327894, 327.99849191010395,
            349.1905786523291, 369.02130145403953, 387.31272028320404, 403.9375630755198, 418.82212337320345,
            431.9510261621604, 443.41020963469384, 453.77269549926496, 454.08372395388244),
        765.1846105156883, -26.49848822628131,
    ),
    ('selfcross', 'sd2-like-small', 1): (
        ((False, 0.9812741630927413, 10), (False, 0.9827078090491405, 10), (False, 0.9844633778440134, 10), (False,
            0.9860755202568717, 10), (False, 0.9866199810421742, 10)), 50, (21, 21),
        (41.45525532727402, 54.43513953946409, 69.69643369295218, 86.66908226575516, 105.26346946570254,
            125.34221735695483, 146.78670910861334, 169.4263096420594, 193.01971483967682, 217.29819170162907,
            241.95336614096203, 266.6614680217417, 291.08884188185056, 314.91553938092835, 337.83983284016995,
            359.5937925809383, 379.9459185021623, 398.7136969381786, 415.7660087732637, 431.0267336188807,
            444.4822818375916, 456.20837525666843, 466.7639680860144, 467.07626416333653),
        830.1339523301378, -12.05218994555877,
    ),
}


# --- the losses -------------------------------------------------------------------------------------------------------


def our_losses(maps: str, pipeline: str, function: str, subjects: list[int], k: int, phase: float = 0.0,
               previous: Any = None) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(lib_ae's terms, the cross leaf, the self leaf) on the recorded maps; `previous`: an earlier call's terms."""
    cross = cross_maps(phase=phase, drawn=maps == "drawn").requires_grad_(True)
    self_attention = self_maps(phase=phase).requires_grad_(True)
    selection = TokenSelection.official(77, [[i] for i in subjects])
    raw = subject_maps(cross[None], selection)
    rows = self_attention.reshape(256, 256)
    config = InitnoConfig(self_cross=pipeline == "selfcross", top_k=k)
    cache = None if previous is None else previous.cache
    has = None if previous is None else torch.tensor([True])
    terms = initno_losses(raw, smooth(raw), lambda w: w @ rows, config, cache, has, initial=function == "compute")
    return terms, cross, self_attention


def official_order(terms: Any, pipeline: str, function: str) -> tuple[float, ...]:
    """lib_ae's terms as the official function returns them."""
    if function == "compute":
        values = (terms.initial, terms.cross, terms.conflict)
    elif pipeline == "initno":
        values = (terms.joint, terms.cross, terms.clean, terms.conflict)
    else:
        values = (terms.joint, terms.update, terms.conflict)
    return tuple(float(v.detach()) for v in values)


@pytest.mark.recorded
@pytest.mark.parametrize("case", sorted(OFFICIAL_LOSSES), ids=lambda c: "-".join(map(str, c)))
def test_losses_equal_the_official_code(case: tuple[str, str, str, str, int]) -> None:
    maps, pipeline, function, name, k = case
    want_values, want_first, want_grads = OFFICIAL_LOSSES[case]
    subjects = SUBJECTS[name]
    first = None
    if function == "augmented":
        first, _, _ = our_losses(maps, pipeline, function, subjects, k, phase=0.9)
        assert official_order(first, pipeline, function) == pytest.approx(want_first, rel=1e-12, abs=1e-15)
    terms, cross, self_attention = our_losses(maps, pipeline, function, subjects, k, previous=first)
    # InitNO's noise-optimisation values are float32 in the official code (module docstring): 3.7e-8 measured.
    rel = 1e-7 if (pipeline, function) == ("initno", "compute") else 1e-12
    assert official_order(terms, pipeline, function) == pytest.approx(want_values, rel=rel, abs=1e-15)
    differentiated = terms.initial if function == "compute" else terms.joint
    grad_cross, grad_self = torch.autograd.grad(differentiated.sum(), [cross, self_attention], allow_unused=True,
                                                materialize_grads=True)
    got = (float(grad_cross.norm()), float(grad_self.norm()), float(grad_cross[3, 5, subjects[0]]),
           float(grad_self[3, 5, 37]))
    assert got == pytest.approx(want_grads, rel=1e-11, abs=1e-15)  # measured: 5.4e-16


@pytest.mark.recorded
@pytest.mark.parametrize("case", sorted(OFFICIAL_OTSU), ids=lambda c: "-".join(map(str, c)))
def test_otsu_threshold_and_region_equal_opencv(case: tuple[str, str, int]) -> None:
    maps, name, token = case
    level, ones, region_ones, peak = OFFICIAL_OTSU[case]
    text = torch.softmax(100 * cross_maps(drawn=maps == "drawn")[:, :, 1:-1], -1)
    smoothed = smooth(text[:, :, token - 1])
    levels = (smoothed.flatten() * 255).to(torch.int64).tolist()
    assert otsu_level(levels) == level
    top = int(smoothed.flatten().argmax())
    assert divmod(top, 16) == peak
    mask, region = clean_masks(smoothed[None], torch.tensor([top]))
    assert int(mask.sum()) == ones and int(region.sum()) == region_ones


def test_otsu_level_on_edge_cases() -> None:
    """One level only (no split: 0, as OpenCV), two levels (the lower), and OpenCV's first maximum on a tie."""
    assert otsu_level([7] * 10) == 0
    assert otsu_level([3] * 5 + [9] * 5) == 3
    assert otsu_level([0, 0, 10, 10, 20, 20]) in (0, 10)
    assert otsu_level([0, 1, 2, 3, 200, 201, 202, 203]) == 3


# --- the official pipelines' trajectories -----------------------------------------------------------------------------

STEPS, CFG, ALTER = 24, 7.5, 21
TOKEN_INDICES = [[2, 5], [3, 7, 9]]




def objective(pipeline: str) -> Initno:
    config = ExciteConfig(scale_thresholds_with_steps=False, max_iter_to_alter=ALTER)
    if pipeline == "initno":
        return Initno(config)
    return InitnoSelfCross(config, InitnoConfig(self_cross=True, top_k=4))


def run(config: Any, pipeline: str, space: str) -> tuple[Any, list[list[float]] | None, torch.Tensor]:
    unet = make_unet(config, seed=11, dtype=torch.float64)
    z, cond, uncond = make_inputs(config, batch=2)
    selections = [TokenSelection.official(77, [[i] for i in indices]) for indices in TOKEN_INDICES]
    capture = AttentionCapture(unet)
    try:
        engine = AttendAndExcite(capture, objective(pipeline))
        fresh = seeded_noise((4, 16, 16), [100, 101])  # the official generator's draws, image by image
        if space == "vp":
            excitation, norms, final = ddim_vp(unet, engine, z, cond, uncond, STEPS, CFG, selections, [None] * 2, fresh)
            return excitation, norms, final
        excitation, final = ddim_sigma_euler(unet, engine, z, cond, uncond, STEPS, CFG, selections, [None] * 2, fresh)
        return excitation, None, final
    finally:
        capture.remove()


def assert_official(pipeline: str, config: Any, excitation: Any, norms: list[list[float]] | None,
                    final: torch.Tensor, rel: float) -> None:
    for b in range(2):
        rounds, final_steps, refinement_calls, want_norms, want_sum, want_entry = OFFICIAL_TRAJECTORY[
            (pipeline, config.name, b)
        ]
        noise = excitation.noise_reports[b]
        assert [(r.succeeded, r.steps) for r in noise.rounds] == [(met, steps) for met, _, steps in rounds]
        # InitNO's scores are float32 in the official code (module docstring).
        assert [r.score for r in noise.rounds] == pytest.approx([s for _, s, _ in rounds], rel=1e-7)
        assert noise.final_steps == final_steps
        # The official step makes one call per refinement iteration and a final one.
        iterations = [r.refinement_iterations[b] for r in excitation.reports if r.step in (10, 20)]
        assert [n + 1 for n in iterations] == list(refinement_calls)
        if norms is not None:
            assert norms[b] == pytest.approx(want_norms, rel=rel), f"image {b} norms"
        assert float(final[b].sum()) == pytest.approx(want_sum, rel=rel), f"image {b} sum"
        assert float(final[b, 1, 2, 3]) == pytest.approx(want_entry, rel=rel), f"image {b} entry"


@pytest.mark.recorded
@pytest.mark.parametrize("pipeline", ["initno", "selfcross"])
@pytest.mark.parametrize("config", [SD1_SMALL, SD2_SMALL], ids=lambda c: c.name)
def test_in_vp_space_equals_the_official_pipeline(pipeline: str, config: Any) -> None:
    excitation, norms, final = run(config, pipeline, "vp")
    assert_official(pipeline, config, excitation, norms, final, rel=1e-11)  # measured: 8.5e-14 at most


@pytest.mark.recorded
@pytest.mark.parametrize("pipeline", ["initno", "selfcross"])
def test_through_sigma_space_euler_equals_the_official_pipeline(pipeline: str) -> None:
    excitation, _, final = run(SD1_SMALL, pipeline, "sigma")
    assert_official(pipeline, SD1_SMALL, excitation, None, final, rel=1e-11)  # measured: 9.4e-14 at most


@pytest.mark.parametrize("flag", ["chains_carry", "refines_in_official_order"])
def test_the_running_average_and_the_official_refinement_are_what_the_trajectory_needs(
    flag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the running average carried through every evaluation (the maps' cache, then read only from the previous
    step), or with A&E's refinement loop (which skips the official re-evaluation at the step's latent and never
    differentiates the joint loss), the engine leaves the official trajectory: the figures above can fail."""
    monkeypatch.setattr(Initno, flag, False)
    excitation, norms, final = run(SD1_SMALL, "initno", "vp")
    with pytest.raises(AssertionError):
        assert_official("initno", SD1_SMALL, excitation, norms, final, rel=1e-6)


@pytest.mark.parametrize("pipeline", ["initno", "selfcross"])
def test_an_sdxl_like_unet_in_float32_runs_and_changes_the_image(pipeline: str) -> None:
    """sgm-style blocks (linear projections, two transformer blocks per level, maps at 1/4), float32 weights: the noise
    optimisation and the sampling updates run, every value finite, and the image differs from the plain one (an
    image without targets takes no part: the same loop, unchanged)."""
    from support.models import SDXL_LIKE

    unet = make_unet(SDXL_LIKE, seed=5)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 16, 16, generator=g)
    cond = torch.randn(1, 77, SDXL_LIKE.context_dim, generator=g)
    uncond = torch.randn(1, 77, SDXL_LIKE.context_dim, generator=g)
    small = InitnoConfig(self_cross=pipeline == "selfcross", top_k=1, rounds=2, round_steps=2, final_steps=2)
    kind = Initno if pipeline == "initno" else InitnoSelfCross
    runs = []
    for selection in (None, TokenSelection.official(77, [[2], [5]])):
        capture = AttentionCapture(unet)
        try:
            engine = AttendAndExcite(capture, kind(ExciteConfig(), small))
            runs.append(ddim_vp(unet, engine, z, cond, uncond, 6, CFG, [selection], [None],
                                seeded_noise((4, 16, 16), [9])))
        finally:
            capture.remove()
    (plain_excitation, _, plain), (excitation, _, final) = runs
    assert plain_excitation.noise_reports == [None]
    noise = excitation.noise_reports[0]
    assert noise is not None and noise.evaluations >= 1 and not noise.skipped
    assert torch.isfinite(final).all() and not torch.equal(final, plain)
    assert all(r.loss[0] is not None for r in excitation.reports if r.active)
