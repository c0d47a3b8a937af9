"""Files written by a stranger never run code: a checkpoint, an exported folder or a Hub repository whose stored
config names a foreign target anywhere is refused by every reader before anything is built (the payload would copy
a file: it must not exist afterwards); classes of the user's own load only with ``trust``; a missing local path
never becomes a Hub download."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

import difflab
from configs import compose_config, make_cfg, sample_cfg
from difflab.errors import MissingFileError, UsageError
from difflab.registry import UntrustedTargetError

LEGACY = Path(__file__).parent / "legacy"
REQUEST = dict(n=2, label=[1, 2], steps=5, seed=0, progress=False)


@pytest.fixture
def payload(tmp_path):
    """(a config node that copies a file when built, the file it would write)."""
    marker = tmp_path / "payload-ran"
    return {"_target_": "shutil.copyfile", "src": str(LEGACY / "README.md"), "dst": str(marker)}, marker


def tampered(tmp_path: Path, edit, name: str = "pixel_class.ckpt") -> Path:
    checkpoint = torch.load(LEGACY / name, map_location="cpu", weights_only=True)
    edit(checkpoint)
    path = tmp_path / f"tampered_{name}"
    torch.save(checkpoint, path)
    return path


def set_key(node: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


@pytest.mark.parametrize("key", ["model.network", "model.sampler", "model.schedule", "model.conditioner.extra",
                                 "model.prediction.nested.deeper"])
def test_a_checkpoint_naming_a_foreign_target_is_refused_by_load(tmp_path, payload, key):
    node, marker = payload
    path = tampered(tmp_path, lambda c: set_key(c["difflab_config"], key, node))
    with pytest.raises(UntrustedTargetError, match=rf"{key.removeprefix('model.')}\._target_ names 'shutil.copyfile'"):
        difflab.load(path, device="cpu")
    assert not marker.exists()


def test_a_torch_load_node_with_a_pickle_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    pickled = pickle.dumps(Copy(LEGACY / "README.md", marker))
    node = {"_target_": "torch.load", "weights_only": False,
            "f": {"_target_": "io.BytesIO", "initial_bytes": pickled}}
    path = tampered(tmp_path, lambda c: set_key(c["difflab_config"], "model.schedule", node))
    with pytest.raises(UntrustedTargetError, match="torch.load"):
        difflab.load(path, device="cpu")
    assert not marker.exists()


class Copy:
    """Unpickling it copies a file (what a pickle payload does)."""

    def __init__(self, src, dst):
        self.src, self.dst = str(src), str(dst)

    def __reduce__(self):
        return shutil.copyfile, (self.src, self.dst)


def test_the_first_stage_stored_in_a_latent_checkpoint_is_checked(tmp_path, payload):
    node, marker = payload
    path = tampered(tmp_path, lambda c: set_key(c, "difflab_first_stage.autoencoder", node), "latent_class.ckpt")
    with pytest.raises(UntrustedTargetError, match=r"first_stage\.autoencoder\._target_"):
        difflab.load(path, device="cpu")
    assert not marker.exists()


def test_sample_py_refuses_a_foreign_sampler_in_the_run_config(tmp_path, payload):
    from difflab.cli.sample import sample

    node, marker = payload
    path = tampered(tmp_path, lambda c: set_key(c["difflab_config"], "sampler", node))
    with pytest.raises(UntrustedTargetError, match=r"sampler"):
        sample(sample_cfg(f"ckpt={path}", "n=1", f"out={tmp_path / 'out'}"))
    assert not marker.exists()
    path = tampered(tmp_path, lambda c: set_key(c["difflab_config"], "model.network", node))
    with pytest.raises(UntrustedTargetError):
        sample(sample_cfg(f"ckpt={path}", "n=1", f"out={tmp_path / 'out'}"))
    assert not marker.exists()


def test_evaluate_and_the_probes_refuse_a_foreign_data_node(tmp_path, payload):
    from difflab.cli.evaluate import evaluate
    from difflab.cli.probe import run_probe
    from difflab.probe import real_batch

    node, marker = payload
    path = tampered(tmp_path, lambda c: set_key(c["difflab_config"], "data.dataset", node))
    with pytest.raises(UntrustedTargetError, match=r"data\.dataset\._target_"):
        evaluate(compose_config("evaluate", f"ckpt={path}", "n=4", "progress=false"))
    with pytest.raises(UntrustedTargetError, match=r"data"):
        run_probe(compose_config("probe", f"ckpt={path}", "probe=t_response"))
    with pytest.raises(UntrustedTargetError, match=r"data"):
        real_batch(path)
    assert not marker.exists()


def test_export_finetune_base_and_first_stage_ckpt_refuse_foreign_targets(tmp_path, payload):
    from difflab.export import export
    from difflab.latent import load_first_stage

    node, marker = payload
    path = tampered(tmp_path, lambda c: set_key(c["difflab_config"], "model.network", node))
    with pytest.raises(UntrustedTargetError):
        export(path, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
    cfg = make_cfg(tmp_path / "run", "finetune=lora", f"finetune.base={path}")
    with pytest.raises(Exception, match="shutil.copyfile") as raised:
        instantiate(cfg.model, _convert_="all")
    assert any(isinstance(e, UntrustedTargetError) for e in _chain(raised.value))
    autoencoder = tmp_path / "autoencoder.ckpt"
    torch.save({"difflab_config": {"model": {"_target_": "difflab.lightning.AutoencoderModule",
                                             "autoencoder": node}},
                "state_dict": {"latent_scale": torch.tensor(1.0)}}, autoencoder)
    with pytest.raises(UntrustedTargetError, match=r"autoencoder\._target_"):
        load_first_stage(ckpt=str(autoencoder))
    assert not marker.exists()


def _chain(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__


def exported_copy(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "exported"
    shutil.copytree(LEGACY / "pixel_class_export", folder)
    info = json.loads((folder / "difflab.json").read_text())
    edit(info)
    (folder / "difflab.json").write_text(json.dumps(info))
    return folder


def test_an_exported_folder_and_a_hub_repository_naming_a_foreign_target_are_refused(tmp_path, payload):
    node, marker = payload
    folder = exported_copy(tmp_path, lambda info: set_key(info, "model.conditioner.class_embedding", node))
    with pytest.raises(UntrustedTargetError, match=r"conditioner\.class_embedding\._target_"):
        difflab.load(folder, device="cpu")
    with mock.patch("huggingface_hub.snapshot_download", return_value=str(folder)) as download, \
            pytest.raises(UntrustedTargetError):
        difflab.load("hf://someone/digits", device="cpu")  # the Hub, stood in for by the folder
    download.assert_called_once_with("someone/digits")
    assert not marker.exists()


def test_an_exported_folder_points_only_into_itself(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(LEGACY / "pixel_class_export" / "unet", elsewhere)
    folder = exported_copy(tmp_path, lambda info: info.update(components={"network": "../elsewhere"}))
    with pytest.raises(UsageError, match="points outside the exported folder"):
        difflab.load(folder, device="cpu")
    shutil.rmtree(folder)
    folder = exported_copy(tmp_path, lambda info: info.update(relative_paths=["data.root"]))
    with pytest.raises(UsageError, match="not a path difflab exports"):
        difflab.load(folder, device="cpu")


def test_a_class_of_the_users_own_loads_only_when_trusted(tmp_path):
    # the same UNet under a dotted name the registry does not list: a class of "the user's own"
    path = tampered(tmp_path, lambda c: set_key(c["difflab_config"], "model.network._target_", "difflab.nn.unet.UNet"))
    with pytest.raises(UntrustedTargetError, match=r"trust=\['difflab.nn.unet.'\]"):
        difflab.load(path, device="cpu")
    images = difflab.load(path, device="cpu", trust=["difflab.nn.unet."])(**REQUEST)
    torch.testing.assert_close(images, load_file(str(LEGACY / "samples.safetensors"))["pixel_class"], atol=1e-5,
                               rtol=0)


def test_a_missing_local_path_is_a_missing_file_and_never_a_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    hub = mock.Mock(side_effect=AssertionError("the Hub was called"))
    with mock.patch("huggingface_hub.snapshot_download", hub):
        for missing in ("runs/last.ckpt", "outputs/last.ckpt", "checkpoints/last.ckpt", "runs/model"):
            with pytest.raises(MissingFileError, match=missing):
                difflab.load(missing, device="cpu")
    hub.assert_not_called()


def test_a_classifier_checkpoint_naming_a_foreign_target_is_refused(tmp_path, payload):
    from difflab.loading import load_classifier_network
    from difflab.metrics.classifier import load_classifier

    node, marker = payload
    path = tampered(tmp_path, lambda c: c["difflab_config"]["model"].update(
        _target_="difflab.lightning.NoisyClassifierModule", network=node))
    for read in (load_classifier, load_classifier_network):  # evaluate.py classifier=, sample.py classifier_ckpt=
        with pytest.raises(UntrustedTargetError, match=r"model\.network\._target_"):
            read(path)
    assert not marker.exists()


def test_data_of_the_users_own_is_checked_only_where_it_is_built(tmp_path):
    path = tampered(tmp_path, lambda c: set_key(c["difflab_config"], "data.dataset._target_", "mypkg.MyDigits"))
    images = difflab.load(path, device="cpu")(**REQUEST)  # sampling never builds the data
    torch.testing.assert_close(images, load_file(str(LEGACY / "samples.safetensors"))["pixel_class"], atol=1e-5,
                               rtol=0)
    from difflab.probe import real_batch

    with pytest.raises(UntrustedTargetError, match="mypkg.MyDigits"):
        real_batch(path)


def test_a_config_asking_for_more_weights_than_the_file_holds_is_refused_before_allocation(tmp_path):
    def wider(checkpoint):
        network = checkpoint["difflab_config"]["model"]["network"]
        network["model_channels"] *= 8  # some 60 times the weights the file holds
    with pytest.raises(UsageError, match=r"model\.network asks for [\d,]+ weights but the file holds"):
        difflab.load(tampered(tmp_path, wider), device="cpu")


def test_weights_that_do_not_fit_their_config_are_one_line(tmp_path):
    def reshaped(checkpoint):  # as many values, another shape
        key = next(k for k, v in checkpoint["state_dict"].items() if k.startswith("ema.") and v.ndim == 4)
        checkpoint["state_dict"][key] = checkpoint["state_dict"][key].flatten()
    with pytest.raises(UsageError, match="weights do not fit the model its config describes") as raised:
        difflab.load(tampered(tmp_path, reshaped), device="cpu")
    assert "\n" not in str(raised.value)
