"""The benchmark's tuning-free peers (benchmarks/peers.py) on the built-in shapes model, at few steps."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from imagic.loading import BUILTIN_FOLDER as MODEL_FOLDER
from imagic.shapes.cases import edit_cases

from helpers import pixels, snapshot

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import peers  # noqa: E402
import quality  # noqa: E402

STEPS = 5  # DiffEdit's weakest strength, 0.2, denoises one of 5 steps (none of 4)
SAMPLER = {"guidance_scale": quality.GUIDANCE_SCALE, "num_inference_steps": STEPS}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the benchmark's workers run: small ops on a shared CPU do not wait on a second one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    pipe = StableDiffusionPipeline.from_pretrained(MODEL_FOLDER, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def case():
    case = edit_cases()[0]  # a pose edit: "... person lying" -> "... person standing"
    return case.render()["input"], case.scene.caption, case.target_text


def _unet_state(unet) -> dict:
    return {"processors": unet.attn_processors, "requires_grad": {n: p.requires_grad for n, p in unet.named_parameters()},
            "grads": {n: p.grad for n, p in unet.named_parameters()}, "weights": snapshot(unet)}


@pytest.fixture(scope="module", params=list(peers.PEERS))
def runs(request, pipe, case):
    """One peer, twice from the same seed, and the UNet's state before and after each run."""
    peer = peers.PEERS[request.param]
    states, edits = [_unet_state(pipe.unet)], []
    for _ in range(2):
        edits.append(peer.edit(pipe, *case, [7], **SAMPLER))
        states.append(_unet_state(pipe.unet))
    return peer, edits, states


def test_changed_words_finds_the_one_word_the_target_changes():
    assert peers.changed_words("a photo of a red person standing", "a photo of a red person sitting") == ("standing", "sitting")
    assert peers.changed_words("a red star", "a yellow star") == ("red", "yellow")


def test_changed_words_falls_back_to_whole_captions():
    for source, target in (("a red star", "a yellow circle"), ("a red star", "a photo of a red star"), ("a star", "a star")):
        assert peers.changed_words(source, target) == (source, target)


def test_peers_span_three_to_five_settings_weak_to_strong():
    for name, peer in peers.PEERS.items():
        assert peer.name == name and 3 <= len(peer.values) <= 5 and list(peer.values) == sorted(set(peer.values))


def test_each_peer_edits_at_every_value_at_the_image_size(runs):
    peer, edits, _ = runs
    assert set(edits[0]) == {(value, 7) for value in peer.values}
    assert all(image.size == (64, 64) and image.mode == "RGB" for image in edits[0].values())


def test_the_same_seed_gives_the_same_edit(runs):
    _, (first, second), _ = runs
    for key in first:
        assert np.array_equal(pixels(first[key]), pixels(second[key])), key


def test_loaded_unet_unchanged_after_each_peer(runs):
    _, _, states = runs
    before = states[0]
    for after in states[1:]:
        assert after["processors"].keys() == before["processors"].keys()
        assert all(after["processors"][k] is before["processors"][k] for k in before["processors"])
        assert after["requires_grad"] == before["requires_grad"]
        assert all(after["grads"][n] is before["grads"][n] for n in before["grads"])
        assert all(torch.equal(after["weights"][n], w) for n, w in before["weights"].items())


@pytest.mark.parametrize("name", ["pix2pix-zero", "ledits++"])
def test_pipelines_that_change_the_shared_unet_are_undone(pipe, case, name):
    """Pix2Pix-Zero and LEDITS++ install attention processors on the very UNet they are given (and Pix2Pix-Zero
    leaves gradients on it): unet_kept puts back what was there."""
    before = pipe.unet.attn_processors
    with peers.unet_kept(pipe.unet):
        peers.PEERS[name].run(pipe, *case, [0], (peers.PEERS[name].values[0],), guidance_scale=quality.GUIDANCE_SCALE,
                              num_inference_steps=2)
        during = pipe.unet.attn_processors
        assert any(during[k] is not before[k] for k in before)
    after = pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_diffedit_shares_one_inversion_across_strengths(pipe, case):
    """A weaker strength cut from the strongest's inversion gives the image its own inversion gives."""
    both = peers.PEERS["diffedit"].edit(pipe, *case, [3], values=(0.5, 1.0), **SAMPLER)
    alone = peers.PEERS["diffedit"].edit(pipe, *case, [3], values=(0.5,), **SAMPLER)
    assert np.array_equal(pixels(both[(0.5, 3)]), pixels(alone[(0.5, 3)]))


def test_diffedit_refuses_a_strength_that_takes_no_step(pipe, case):
    with pytest.raises(ValueError, match="no step"):
        peers.PEERS["diffedit"].edit(pipe, *case, [0], guidance_scale=quality.GUIDANCE_SCALE, num_inference_steps=4)


def test_sdedit_batches_seeds_as_it_would_run_them_one_by_one(pipe, case):
    together = peers.PEERS["sdedit"].edit(pipe, *case, [1, 2], values=(0.6,), **SAMPLER)
    alone = peers.PEERS["sdedit"].edit(pipe, *case, [2], values=(0.6,), **SAMPLER)
    assert np.abs(pixels(together[(0.6, 2)]) - pixels(alone[(0.6, 2)])).max() <= 2  # batched float sums may round apart
