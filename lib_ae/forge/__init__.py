"""The Forge adapter's building blocks: Attend-and-Excite inside SD WebUI Forge / Forge Neo (lllyasviel's Forge 2 and
its Neo fork, whose UNet is `backend.nn.unet.IntegratedUNet2DConditionModel`).

Nothing here imports Forge: what a module needs from the host it takes from the objects it is handed (a UNet's class
module, its blocks), so that the package imports, type-checks and is tested without a Forge checkout
(tests/support/forge_standin.py reproduces the traits of Forge's UNet that matter here).

    unet_pass.py   `differentiable_unet`: a forward and backward through Forge's UNet, which Forge builds for
                   inference only (inference-mode weights, in-place additions, attention kernels without backward)
"""
