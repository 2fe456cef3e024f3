"""Tiny pipelines of every supported family built from configs: the real code paths at toy size.

Untrained (random weights): for tests, the plumbing demo and smoke benchmarks, never for
real edits. Each family's module holds its own tiny configs (its `tiny_pipelines`); here are the
tokenizers they share, built in memory, and `build_tiny_pipeline` to build one by kind.
`python -m imagic.toy FOLDER --kind KIND` writes one as a diffusers folder.
"""

import argparse
import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from transformers import CLIPTextConfig, CLIPTokenizer, T5Tokenizer

WORDS = ["a", "photo", "of", "dog", "cat", "sitting", "standing", "red", "blue", "person", "the"]


def write_tiny_tokenizer(folder: Path, words: list[str] = WORDS) -> Path:
    """A CLIP BPE tokenizer whose vocabulary is letters plus whole `words`: any lowercase word still tokenizes."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    merges = []
    for word in words:
        # Merge left to right so each listed word becomes one token.
        piece = word[0]
        for i, char in enumerate(word[1:], start=1):
            right = char + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{piece} {right}")
            piece += right
            tokens.append(piece)
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return folder


def tiny_tokenizer(folder: Path, words: list[str] = WORDS) -> CLIPTokenizer:
    write_tiny_tokenizer(folder, words)
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )


def sd_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """DDIM with Stable Diffusion 1.x/2.x's noise schedule."""
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def tiny_clip_config(vocab_size: int) -> CLIPTextConfig:
    """A two-layer CLIP text encoder 32 wide (with a 32-wide projection, for the pooled embeddings)."""
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, hidden_act="gelu", projection_dim=32)


def tiny_t5_tokenizer(words: list[str] = WORDS) -> T5Tokenizer:
    """A T5 (unigram) tokenizer whose vocabulary is whole `words` and single letters, built in memory."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + word, -1.0) for word in words] + [(c, -5.0) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=77)


def tiny_kinds() -> dict[str, object]:
    """Every family's tiny pipelines by kind ("sd1", "sdxl", "if", "if-ii", ...)."""
    from .families import FAMILIES  # here, not at the top: the families' modules import this one

    return {kind: build for _, family in FAMILIES for kind, build in family.tiny_pipelines.items()}


def build_tiny_pipeline(kind: str, tokenizer_folder: Path, seed: int = 0) -> DiffusionPipeline:
    """A tiny untrained pipeline of the family that names `kind` among its tiny pipelines, its weights drawn from
    `seed`; a CLIP tokenizer is written to `tokenizer_folder`."""
    kinds = tiny_kinds()
    if kind not in kinds:
        raise ValueError(f"no tiny pipeline {kind!r}: one of {', '.join(kinds)}")
    torch.manual_seed(seed)
    return kinds[kind](tokenizer_folder)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a tiny untrained pipeline folder of a supported family.")
    parser.add_argument("folder")
    parser.add_argument("--kind", choices=tuple(tiny_kinds()), default="sd1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tokenizer_folder:
        build_tiny_pipeline(args.kind, Path(tokenizer_folder)).save_pretrained(args.folder)
    print(f"wrote a tiny untrained {args.kind} pipeline to '{args.folder}'")


if __name__ == "__main__":
    main()
