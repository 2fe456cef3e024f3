"""Model loading: diffusers folders, single-file checkpoints, pickle refusal, hub ids without a network."""

import json
import os
import shutil
import socket
import time

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from huggingface_hub import constants
from ldm_checkpoint import VAE_PREFIX, pipeline_to_ldm
from safetensors.torch import save_file

from imagic import loading
from imagic.errors import ModelLoadError
from imagic.loading import is_local_model, load_pipeline


class _RunsCode:
    """Unpickling this creates a folder: stands in for a checkpoint that carries code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def ldm_state(sd1_pipe):
    return pipeline_to_ldm(sd1_pipe)


@pytest.fixture
def online(monkeypatch):
    """HF_HUB_OFFLINE unset, as on a user's machine; the hub is still unreachable from here."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def assert_same_weights(module, reference, dtype=torch.float32):
    expected = reference.state_dict()
    actual = module.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor.to(dtype)), name


def load_error(model, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(model, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_diffusers_folder_loads_the_saved_weights(sd1_folder, sd1_pipe):
    pipe = load_pipeline(sd1_folder)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(pipe, name), getattr(sd1_pipe, name))


def test_torch_dtype_is_honoured(sd1_folder):
    pipe = load_pipeline(str(sd1_folder), torch_dtype=torch.float16)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float16}


def test_folder_without_model_index_is_refused(tmp_path):
    assert "not a diffusers pipeline folder" in load_error(tmp_path)


def test_folder_with_missing_component_weights_is_a_load_error(sd1_folder, tmp_path):
    broken = shutil.copytree(sd1_folder, tmp_path / "broken")
    for weights in (broken / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    assert "cannot load" in load_error(broken)


def test_unsupported_pipeline_class_is_a_load_error(sd1_folder, tmp_path):
    folder = shutil.copytree(sd1_folder, tmp_path / "other")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "NoSuchPipeline"}))
    assert "NoSuchPipeline" in load_error(folder)


@pytest.mark.parametrize("model", ["./nope", "/no/such/folder", "~/no-such-model", "nope.safetensors", "a/b/c", "nope"])
def test_missing_path_is_refused(model):
    assert load_error(model).startswith("no such model folder or file")


def test_hub_ids_and_paths_are_told_apart(tmp_path):
    assert not is_local_model("org/name")
    assert is_local_model(tmp_path / "org/name")
    assert is_local_model("./org/name")
    assert is_local_model("org/model.safetensors")


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    message = load_error("imagic-test/not-cached")
    assert time.monotonic() - start < 5
    assert "not in the local Hugging Face cache" in message and "no network" in message


def test_hub_id_without_offline_flag_probes_the_endpoint_and_fails_fast(online, monkeypatch):
    probed = []

    def unreachable(address, timeout):
        probed.append((address, timeout))
        raise OSError("unreachable")

    monkeypatch.setattr(loading.socket, "create_connection", unreachable)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    start = time.monotonic()
    assert "no network" in load_error("imagic-test/not-cached")
    assert time.monotonic() - start < 5
    assert probed == [(("hub.invalid", 443), 3.0)]


def test_real_probe_against_a_closed_port_fails_fast(online, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    assert "no network" in load_error("imagic-test/not-cached")
    assert time.monotonic() - start < 5


def test_real_probe_sees_an_open_port(online, monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as server:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert loading._hub_reachable()


def test_reachable_hub_downloads_what_the_cache_lacks(online, monkeypatch):
    calls = []

    def from_pretrained(repo_id, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        if kwargs.get("local_files_only"):
            raise OSError("not cached")
        return "downloaded"

    monkeypatch.setattr(loading, "_hub_reachable", lambda: True)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", from_pretrained)
    assert load_pipeline("imagic-test/not-cached") == "downloaded"
    assert calls == [True, False]


def test_single_file_with_a_hub_config_goes_online_when_reachable(online, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(loading, "_hub_reachable", lambda: True)
    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", lambda path, **kwargs: calls.append(kwargs))
    (tmp_path / "model.safetensors").write_bytes(b"")
    load_pipeline(tmp_path / "model.safetensors", config="org/sd15")
    assert calls == [dict(config="org/sd15", dtype=None, local_files_only=False)]


def test_loading_bugs_are_not_hidden(sd1_folder, monkeypatch):
    def bug(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", bug)
    with pytest.raises(TypeError):
        load_pipeline(sd1_folder)


def test_safetensors_checkpoint_loads_with_a_local_config(ldm_state, sd1_folder, sd1_pipe, tmp_path):
    save_file(ldm_state, tmp_path / "model.safetensors")
    pipe = load_pipeline(tmp_path / "model.safetensors", config=sd1_folder)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(pipe, name), getattr(sd1_pipe, name))


def test_ckpt_loads_with_allow_pickle(ldm_state, sd1_folder, sd1_pipe, tmp_path):
    torch.save({"state_dict": ldm_state}, tmp_path / "model.ckpt")
    pipe = load_pipeline(tmp_path / "model.ckpt", config=str(sd1_folder), allow_pickle=True, torch_dtype=torch.float16)
    assert_same_weights(pipe.unet, sd1_pipe.unet, torch.float16)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth", ".CKPT"])
def test_pickled_checkpoint_is_refused_without_opt_in(suffix, sd1_folder, tmp_path):
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {"x": _RunsCode(tmp_path / "ran")}}, path)
    assert "--allow-pickle" in load_error(path, config=sd1_folder)
    assert not (tmp_path / "ran").exists()


def test_pickled_checkpoint_cannot_run_code_even_with_opt_in(sd1_folder, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": _RunsCode(tmp_path / "ran")}}, path)
    assert "cannot load" in load_error(path, config=sd1_folder, allow_pickle=True)
    assert not (tmp_path / "ran").exists()
    torch.load(path, weights_only=False)  # the file really does run code when fully unpickled
    assert (tmp_path / "ran").exists()


def test_single_file_without_config_and_no_network_asks_for_config(ldm_state, online, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    save_file(ldm_state, tmp_path / "model.safetensors")
    start = time.monotonic()
    message = load_error(tmp_path / "model.safetensors")
    assert time.monotonic() - start < 5
    assert "--config" in message and "no network" in message


def test_config_must_be_a_pipeline_folder(ldm_state, tmp_path):
    save_file(ldm_state, tmp_path / "model.safetensors")
    (tmp_path / "empty").mkdir()
    assert "not a diffusers pipeline folder" in load_error(tmp_path / "model.safetensors", config=tmp_path / "empty")
    assert "no such config folder" in load_error(tmp_path / "model.safetensors", config=tmp_path / "missing")


def test_checkpoint_missing_a_component_is_a_load_error(ldm_state, sd1_folder, tmp_path):
    without_vae = {k: v for k, v in ldm_state.items() if not k.startswith(VAE_PREFIX)}
    save_file(without_vae, tmp_path / "model.safetensors")
    message = load_error(tmp_path / "model.safetensors", config=sd1_folder)
    assert "AutoencoderKL" in message and "missing in the checkpoint" in message
    assert "from_single_file" not in message


def test_corrupt_checkpoint_is_a_load_error(sd1_folder, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "cannot load" in load_error(tmp_path / "model.safetensors", config=sd1_folder)


def test_unknown_file_type_is_refused(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    assert "is not a model" in load_error(tmp_path / "model.onnx")
