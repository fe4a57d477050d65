"""The host adapter: Attend-and-Excite inside the AUTOMATIC1111 WebUI v1.10.1.

The only package of `lib_ae` that imports the WebUI (`modules.*`), and only through `host.py`. It is imported by the
script file `scripts/attend_and_excite.py` at load time, while A1111 has the extension directory on `sys.path`
(docs/host-notes.md §1); its submodules import each other by package-relative paths, which do not need that entry.

    host.py           every call into the WebUI (and its gradio), typed
    wire.py           the script args / API dict form and the infotext of the parameters
    prompt_syntax.py  A1111's prompt syntax resolved to plain text for the subject suggestion
    report.py         the "AE error" / "AE trace" infotext entries and the console log
    run_state.py      the per-generation state kept on a processing object (the parameters, parsed once)
    subjects.py       A1111's text encoder, schedule and syntax for `lib_ae.targeting` (generation and token view)
    sampling_pass.py  one sampler run with A&E: install, the denoiser wrapper, the UNet runner, release
    graph_safety.py   what may stay on the UNet while the A&E pass is replayed as a CUDA graph
    controlnet.py     sd-webui-controlnet beside the graphs: its per-call state, its uncapturable calls swapped
    sgm_timestep.py   SDXL's timestep embedding computed on the device (graph-capturable, same numbers)
    visuals.py        heatmaps and the excitation trace of a batch
    controls.py       the accordion's controls, settings, infotext paste, X/Y/Z axes
    token_view.py     the live token view inside the accordion
"""
