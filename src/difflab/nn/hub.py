"""The Hub options of difflab's own networks: ``UNet`` and ``DiT`` are ``huggingface_hub.PyTorchModelHubMixin``s,
so ``net.save_pretrained(DIR)`` / ``net.push_to_hub(REPO)`` write ``config.json`` (the constructor's arguments)
and ``model.safetensors``, and ``UNet.from_pretrained(DIR_OR_REPO)`` builds and loads them back."""

HUB = dict(library_name="difflab", tags=["difflab", "diffusion"], license="mit")
