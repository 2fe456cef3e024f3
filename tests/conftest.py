import json
import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from imagic.toy import build_tiny_pipeline  # noqa: E402

from helpers import scene_image  # noqa: E402


@pytest.fixture(scope="session")
def sd1_pipe(tmp_path_factory):
    """Tiny epsilon-prediction SD1-style pipeline (VAE factor 2, 32 px)."""
    return build_tiny_pipeline("sd1", tmp_path_factory.mktemp("tok1"))


@pytest.fixture(scope="session")
def sd2_pipe(tmp_path_factory):
    """Tiny v-prediction SD2-style pipeline (VAE factor 4, 32 px)."""
    return build_tiny_pipeline("sd2", tmp_path_factory.mktemp("tok2"))


def _saved(pipe, tmp_path_factory, name: str) -> Path:
    folder = tmp_path_factory.mktemp(name)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sd1_folder(sd1_pipe, tmp_path_factory) -> Path:
    """The tiny SD1 pipeline saved as a diffusers folder."""
    return _saved(sd1_pipe, tmp_path_factory, "sd1_model")


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A 40x32 photo of a scene, one per test module (test_cli.py draws its own at another size)."""
    path = tmp_path_factory.mktemp("in") / "photo.png"
    scene_image(40, 32).save(path)
    return path


@pytest.fixture
def bench_folder(tmp_path):
    """A TEdBench-style folder: two photos in originals/ and their input_list.json."""
    folder = tmp_path / "tedbench"
    (folder / "originals").mkdir(parents=True)
    scene_image(32, 32, seed=1).save(folder / "originals" / "dog.png")
    scene_image(32, 32, seed=2).save(folder / "originals" / "cat.jpeg")
    pairs = [{"img_name": "dog.png", "target_text": "a photo of a sitting dog"},
             {"img_name": "cat.jpeg", "target_text": "a photo of a red cat"}]
    (folder / "input_list.json").write_text(json.dumps(pairs))
    return folder


@pytest.fixture(scope="session")
def sdxl_pipe(tmp_path_factory):
    """Tiny SDXL pipeline: two text encoders, pooled embedding, size/crop conditioning (VAE factor 2, 32 px)."""
    return build_tiny_pipeline("sdxl", tmp_path_factory.mktemp("tokxl"))


@pytest.fixture(scope="session")
def sdxl_folder(sdxl_pipe, tmp_path_factory) -> Path:
    """The tiny SDXL pipeline saved as a diffusers folder."""
    return _saved(sdxl_pipe, tmp_path_factory, "sdxl_model")


@pytest.fixture(scope="session")
def if_pipe(tmp_path_factory):
    """Tiny DeepFloyd IF stage I: T5, a pixel UNet at 16 px with a learned variance."""
    return build_tiny_pipeline("if", tmp_path_factory.mktemp("tokif"))


@pytest.fixture(scope="session")
def if_ii_pipe(tmp_path_factory):
    """Tiny DeepFloyd IF stage II: super-resolution 16 -> 64 px, conditioned on the noised upscaled image."""
    return build_tiny_pipeline("if-ii", tmp_path_factory.mktemp("tokif2"))


@pytest.fixture(scope="session")
def if_folders(if_pipe, if_ii_pipe, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny IF stages I and II saved as diffusers folders."""
    return _saved(if_pipe, tmp_path_factory, "if_model"), _saved(if_ii_pipe, tmp_path_factory, "if_ii_model")


@pytest.fixture(scope="session")
def sd3_pipe(tmp_path_factory):
    """Tiny SD3: CLIP-L, CLIP-G and T5 encoders, an MMDiT trained by flow matching (VAE factor 2, 32 px)."""
    return build_tiny_pipeline("sd3", tmp_path_factory.mktemp("toksd3"))


@pytest.fixture(scope="session")
def flux_pipe(tmp_path_factory):
    """Tiny FLUX.1-dev: CLIP (pooled) and T5 (tokens), packed latents, guidance as an input (VAE factor 2)."""
    return build_tiny_pipeline("flux", tmp_path_factory.mktemp("tokflux"))


@pytest.fixture(scope="session")
def sd3_folder(sd3_pipe, tmp_path_factory) -> Path:
    return _saved(sd3_pipe, tmp_path_factory, "sd3_model")


@pytest.fixture(scope="session")
def flux_folder(flux_pipe, tmp_path_factory) -> Path:
    return _saved(flux_pipe, tmp_path_factory, "flux_model")



@pytest.fixture(scope="session")
def qwen_pipe(tmp_path_factory):
    """Tiny Qwen-Image: a Qwen2.5-VL text encoder with an attention mask, a video VAE, a packed MMDiT (32 px)."""
    return build_tiny_pipeline("qwen-image", tmp_path_factory.mktemp("tokqwen"))


@pytest.fixture(scope="session")
def qwen_folder(qwen_pipe, tmp_path_factory) -> Path:
    return _saved(qwen_pipe, tmp_path_factory, "qwen_model")
