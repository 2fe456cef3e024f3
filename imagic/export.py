"""Export a trained edit for tools without imagic: plain diffusers, ComfyUI, the A1111 and Forge web UIs.

`export_edit(state, out)` writes into `out`:
- a LoRA edit: `pytorch_lora_weights.safetensors` in diffusers' format (`pipe.load_lora_weights(out)`), the
  LoRA's scale alpha/rank folded into lora_B so that any reader computes imagic's layers, whatever alpha it
  assumes (diffusers takes alpha = rank from a file without alphas or metadata); for Stable Diffusion 1.x/2.x
  and SDXL also `lora_kohya.safetensors` in kohya's naming, which ComfyUI and the web UIs read;
- a full fine-tune: the denoiser as a diffusers model folder (`unet/`, or `transformer/` for SD3 and FLUX);
- `e_tgt.safetensors`, `e_opt.safetensors` and `embedding_eta{eta}.safetensors`, stage 3's embedding at eta,
  each under the keyword names the pipeline takes (`pipe(**load_file(...))`);
- `README.md`: what the files are and the recipe in plain diffusers.

Everything comes from the state: its header holds the denoiser's config, so no model is loaded.
"""

import json
import os
import warnings
from pathlib import Path
from typing import Callable

import diffusers
import torch
from safetensors.torch import save_file

from . import __version__, denoisers
from .errors import ExportError, StateMismatchError
from .families import FAMILIES, family_named
from .loading import model_defaults
from .outputs import write_atomic
from .settings import TrainSettings, check_real
from .stages import interpolate
from .staging import claimed
from .state import EditState

# The families an edit exports from, with their denoiser's diffusers class (a full fine-tune's folder). DeepFloyd
# IF is left out: its two pixel-space stages go to two pipelines, for which no file layout is settled.
DENOISER_CLASSES = {
    "stable-diffusion": "UNet2DConditionModel",
    "stable-diffusion-xl": "UNet2DConditionModel",
    "stable-diffusion-3": "SD3Transformer2DModel",
    "flux": "FluxTransformer2DModel",
}
DENOISER_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
KOHYA_FAMILIES = ("stable-diffusion", "stable-diffusion-xl")  # kohya's LoRA naming is defined for these UNets
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default name: load_lora_weights(folder) finds it
KOHYA_FILE = "lora_kohya.safetensors"
RECIPE_FILE = "README.md"

# A ResNet block's layers in the original (ldm) UNet, by their diffusers names.
_LDM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}


def export_edit(state: EditState, out: str | os.PathLike, *, eta: float | None = None, overwrite: bool = False,
                editor=None) -> list[Path]:
    """Write the edit's fine-tuned weights and embeddings into the folder `out` as files other tools load; returns
    the paths written. `eta`: the interpolated embedding's, by default the model's (the middle of its etas, as
    `imagic batch` samples). `editor` (an ImagicEditor), if given: the state is first checked to be of its model,
    as sampling checks it. Existing files are refused before any is written, unless `overwrite`; the folder is claimed
    as every command claims it, and the files appear together or not at all (a refused or dying export leaves it as
    it was)."""
    family = _family(state)
    if state.method == "none" or not state.weights:
        raise ExportError("this edit state holds no fine-tuned weights (fine-tuning did not run): train it with "
                          "fine-tuning to export it")
    if editor is not None:
        editor.check_state(state)
    level = family.level_class.name  # also the pipeline's component and diffusers' LoRA prefix
    if list(state.weights) != [level]:
        raise StateMismatchError(f"the edit state holds weights of {', '.join(state.weights)}; a {family.name} model "
                                 f"has one level, {level}: not an intact imagic edit state")
    weights = state.weights[level]
    settings = state.settings
    _check_weights(state, family, weights, settings)
    if not state.complete:
        warnings.warn(f"this edit's training did not finish ({_unfinished(state)}): exporting what finished",
                      stacklevel=2)
    eta = model_defaults(state.base_model["name"], family.defaults).eta if eta is None else check_real("eta", eta)

    writers: dict[str, Callable[[Path], None]] = {}
    if state.method == "lora":
        pairs = _lora_pairs(weights)
        scale = settings.lora_scale_alpha / settings.lora_rank
        writers[LORA_FILE] = _safetensors(diffusers_lora(pairs, level, scale))
        if family.name in KOHYA_FAMILIES:
            config = state.base_model["denoiser_config"]
            writers[KOHYA_FILE] = _safetensors(kohya_lora(pairs, family.name, config, settings.lora_scale_alpha),
                                               _kohya_metadata(family.name, config, settings))
    else:
        config = {"_class_name": DENOISER_CLASSES[family.name], "_diffusers_version": diffusers.__version__,
                  **state.base_model["denoiser_config"]}
        config_file, weights_file = DENOISER_FILES
        writers[f"{level}/{config_file}"] = _text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        writers[f"{level}/{weights_file}"] = _safetensors(weights)
    embeddings = {"e_tgt": state.e_tgt, "e_opt": state.e_opt, f"embedding_eta{eta:g}": interpolate(state.e_tgt, state.e_opt, eta)}
    for name, embedding in embeddings.items():
        writers[f"{name}.safetensors"] = _safetensors(embedding)
    writers[RECIPE_FILE] = _text(recipe(state, family, list(writers), Path(out), eta))

    with claimed(out) as run:  # written beside the folder's files and swapped in together, as every command writes
        run.check_free(writers, overwrite)  # all refused before any is written
        for name, write in writers.items():
            write_atomic(run.path(name), write, overwrite=True)
        # The folder's summary.json is no export's; an earlier export's files that this one does not write (a LoRA
        # file under a full fine-tune's folder, another eta's embedding) go, so the folder is one export's.
        earlier = _export_files(Path(out)) if overwrite else set()
        run.commit(writers, overwrite, replace_earlier=False, superseded=earlier)
    return [Path(out) / name for name in writers]


def _export_files(folder: Path) -> set[str]:
    """The files in `folder` that an export writes, by their names relative to it."""
    names = {LORA_FILE, KOHYA_FILE, RECIPE_FILE, "e_tgt.safetensors", "e_opt.safetensors"}
    levels = {family_named(family).level_class.name for family in DENOISER_CLASSES}  # a full fine-tune's folders
    names |= {f"{level}/{name}" for level in levels for name in DENOISER_FILES}
    names |= {path.name for path in folder.glob("embedding_eta*.safetensors")}
    return {name for name in names if (folder / name).is_file()}


def _family(state: EditState):
    """The state's family class, if its edits export."""
    name = state.base_model["family"]
    family = family_named(name)
    if family is None or name not in DENOISER_CLASSES:
        supported = ", ".join(DENOISER_CLASSES)
        raise ExportError(f"edits of {name} models do not export yet; export is defined for {supported}")
    return family


def _unfinished(state: EditState) -> str:
    return "; ".join(f"{stage}: {status}" for stage, status in state.stages.items() if status != "done") or "no stages"


def _check_weights(state: EditState, family, weights: dict[str, torch.Tensor], settings: TrainSettings) -> None:
    """The weights must be exactly those of the denoiser the state's config describes (built on the meta device:
    no memory), as sampling rebuilds it; the embeddings finite."""
    name = DENOISER_CLASSES[family.name]
    try:
        with torch.device("meta"):
            base = getattr(diffusers, name).from_config(state.base_model["denoiser_config"])
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise StateMismatchError(f"the edit state's denoiser config does not describe a {name}: {error}") from None
    with warnings.catch_warnings():  # torch's notice that loading into meta tensors copies nothing
        warnings.simplefilter("ignore", UserWarning)
        denoisers.edited_denoiser(base, state.method, weights, settings.lora_rank, settings.lora_scale_alpha,
                                  targets=family.level_class.lora_targets)
    for group in ("e_tgt", "e_opt"):
        if not all(torch.isfinite(t).all() for t in getattr(state, group).values()):
            raise StateMismatchError(f"the edit state's {group} holds NaN or infinite values: train it again")


def _lora_pairs(weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per adapted module: its (lora_A, lora_B) from peft's names `<module>.lora_A.imagic.weight`."""
    suffix = f".lora_A.{denoisers.LORA_ADAPTER}.weight"
    return {name.removesuffix(suffix): (down, weights[name.replace(".lora_A.", ".lora_B.")])
            for name, down in weights.items() if name.endswith(suffix)}


def diffusers_lora(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], prefix: str, scale: float
                   ) -> dict[str, torch.Tensor]:
    """diffusers' LoRA format: `<prefix>.<module>.lora_A.weight` / `lora_B.weight`, lora_B times `scale`
    (alpha / rank), so the file's alpha is its rank."""
    tensors = {}
    for module, (down, up) in pairs.items():
        tensors[f"{prefix}.{module}.lora_A.weight"] = down
        tensors[f"{prefix}.{module}.lora_B.weight"] = (up.float() * scale).to(up.dtype)
    return tensors


def kohya_lora(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], family: str, unet_config: dict, alpha: float
               ) -> dict[str, torch.Tensor]:
    """kohya's LoRA format: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight` and `.alpha` (the scale is
    alpha / rank, the rank lora_down's rows). Convolutions keep their kernels (lora_down kxk, lora_up 1x1)."""
    tensors = {}
    for module, (down, up) in pairs.items():
        name = kohya_name(module, family, unet_config["layers_per_block"])
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


def kohya_name(module: str, family: str, layers_per_block) -> str:
    """A UNet module's name in kohya's files, '.' written '_': SD 1.x/2.x's as diffusers names it, as kohya's
    trainer does (diffusers' loader reads no other for them); SDXL's as the original (ldm) UNet names it, as
    kohya's SDXL trainer does (diffusers' SDXL loader maps it back with the UNet's config)."""
    if family == "stable-diffusion-xl" and isinstance(layers_per_block, int):
        module = ldm_name(module, layers_per_block)
    return "lora_unet_" + module.replace(".", "_")


def ldm_name(module: str, layers_per_block: int) -> str:
    """A diffusers UNet's ResNet or transformer-block layer under the original UNet's name: down_blocks.1.attentions.0
    is input_blocks.4.1 when layers_per_block is 2 (input_blocks.0 is conv_in, each level one block per layer and
    one for its downsampler), mid_block's ResNets and attention middle_block.0, .2 and .1, up_blocks' layers
    output_blocks in order (each level one more layer than the down levels)."""
    parts = module.split(".")
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        outer = f"middle_block.{1 if kind == 'attentions' else 2 * index}"
    else:
        where, block, kind, index, rest = parts[0], int(parts[1]), parts[2], int(parts[3]), parts[4:]
        position = block * (layers_per_block + 1) + index
        outer = f"input_blocks.{position + 1}" if where == "down_blocks" else f"output_blocks.{position}"
        outer += ".1" if kind == "attentions" else ".0"
    if kind == "resnets":
        rest = [_LDM_RESNET[rest[0]], *rest[1:]]
    return ".".join([outer, *rest])


def _kohya_metadata(family: str, unet_config: dict, settings: TrainSettings) -> dict[str, str]:
    """What kohya's trainer records and the web UIs read to tell a LoRA's base model (SD 1, SD 2 or SDXL)."""
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(settings.lora_rank),
                "ss_network_alpha": f"{settings.lora_scale_alpha:g}"}
    if family == "stable-diffusion-xl":
        metadata["ss_base_model_version"] = "sdxl_base_v1-0"
    elif unet_config.get("cross_attention_dim") == 1024:  # SD 2.x's OpenCLIP text width
        metadata["ss_v2"] = "True"
    return metadata


def _safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Callable[[Path], None]:
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    return lambda path: save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})


def _text(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text)


def _web_uis(model: str) -> str:
    return f"""
## ComfyUI, A1111, Forge

Put `{KOHYA_FILE}` in ComfyUI's `models/loras` or the web UI's `models/Lora`, load `{model}` and prompt with the
target text: that is close to eta 1 (e_tgt is the text's embedding). Other etas need the embeddings, which these
UIs do not take.
"""


def recipe(state: EditState, family, files: list[str], out: Path, eta: float) -> str:
    """The README of an export: the files, and how plain diffusers samples the edit (as imagic samples it from
    pure noise, the paper's start, with the model's default steps and guidance and an empty negative prompt)."""
    pipeline = next(name for name, cls in FAMILIES if cls is family)
    level, model = family.level_class.name, state.base_model["name"] or "path/to/base-model"
    defaults = model_defaults(state.base_model["name"], family.defaults)
    what = {
        LORA_FILE: "the LoRA in diffusers' format (its scale alpha/rank folded into lora_B)",
        KOHYA_FILE: "the same LoRA in kohya's naming, for ComfyUI and the A1111/Forge web UIs",
        f"{level}/config.json": f"the fine-tuned {level}: a diffusers model folder",
        "e_tgt.safetensors": "e_tgt, the target text's embedding (eta 1)",
        "e_opt.safetensors": "e_opt, the optimised embedding (eta 0: the photo)",
        f"embedding_eta{eta:g}.safetensors": f"{eta:g} * e_tgt + {1 - eta:g} * e_opt",
    }
    rows = "\n".join(f"| `{name.removesuffix('config.json')}` | {what[name]} |" for name in files if name in what)
    if state.method == "lora":
        load = (f"pipe = {pipeline}.from_pretrained({model!r})\n"
                f"pipe.load_lora_weights(folder, weight_name={LORA_FILE!r})")
    else:
        denoiser = DENOISER_CLASSES[family.name]
        load = (f"{level} = {denoiser}.from_pretrained(f\"{{folder}}/{level}\")\n"
                f"pipe = {pipeline}.from_pretrained({model!r}, {level}={level})")
    pooled = ", pooled_prompt_embeds" if "pooled_prompt_embeds" in state.e_tgt else ""
    imports = pipeline if state.method == "lora" else f"{DENOISER_CLASSES[family.name]}, {pipeline}"
    text = f"""# imagic edit: "{state.target_text}"

Trained on `{model}` ({family.name}) with {state.method} fine-tuning, {state.height}x{state.width}; exported by
imagic {__version__}. Stage 3 samples e = eta * e_tgt + (1 - eta) * e_opt with the fine-tuned model.

| file | what |
| --- | --- |
{rows}

## Plain diffusers

```python
import torch
from diffusers import {imports}
from safetensors.torch import load_file

folder = {str(out)!r}  # this folder
# On a GPU: from_pretrained(..., torch_dtype=torch.float16) (SD3, FLUX: torch.bfloat16), then pipe.to("cuda")
{load}
embedding = load_file(f"{{folder}}/embedding_eta{eta:g}.safetensors")  # prompt_embeds{pooled}
embedding = {{name: t.to(pipe.device, pipe.dtype) for name, t in embedding.items()}}
image = pipe(**embedding, height={state.height}, width={state.width}, num_inference_steps={defaults.num_inference_steps},
             guidance_scale={defaults.guidance_scale:g}, generator=torch.Generator().manual_seed(0)).images[0]
```

Other etas: mix `e_tgt.safetensors` and `e_opt.safetensors` tensor by tensor.
"""
    if KOHYA_FILE in files:
        text += _web_uis(model)
    if not state.complete:
        text += f"\nTraining did not finish ({_unfinished(state)}): these files hold what finished.\n"
    return text
