"""The Forge adapter: Attend-and-Excite inside SD WebUI Forge and Forge Neo (lllyasviel's Forge 2 and its Neo fork,
whose UNet is `backend.nn.unet.IntegratedUNet2DConditionModel`).

Forge keeps A1111's extension surface, so the script and `lib_ae.webui` serve it unchanged; `lib_ae.webui.host.FORGE`
(told at import) makes `lib_ae.webui.sampling_pass.unet_host` hand the pass this package's `UnetHost`. Nothing here
imports Forge: what it needs it reads from the objects it is handed (the model, the sampler's denoiser), so the
package imports, type-checks and is tested without a Forge checkout (tests/test_forge_host.py).

    model.py   `ForgeUnet`: where Forge's UNet is, its conditional pass (`KModel.apply_model`), the pass inside
               `lib_ae.comfy_unet.differentiable_unet`; Forge's text engine; refused models and samplers
"""
