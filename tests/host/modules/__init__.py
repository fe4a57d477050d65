"""A small stand-in for the AUTOMATIC1111 WebUI v1.10.1 `modules` package (commit 82a973c0), for the extension tests.

Only the behaviour the extension relies on is reproduced, each piece with a comment citing the A1111 file:line it
stands in for; everything else is absent, so a new dependency on the host shows up as an ImportError or
AttributeError in the tests instead of passing silently. The model side is real: a tiny CompVis ldm UNet
(tests/support/models.py) driven through k-diffusion's `CompVisDenoiser` and its real samplers.

Simplifications (deliberate): no GPU/autocast/half precision, no VAE (images are the final latents), no styles,
extra networks, textual inversion, emphasis or comma back-tracking in prompts, no hires fix, no img2img, and only
tensor (SD1/SD2) conditionings. `tests/host` is put on sys.path only by the fixture of tests/test_extension.py.
"""
