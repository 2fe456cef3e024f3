"""The TEdBench-style runner: naming, resuming, input checks and CLIP scoring (a tiny random CLIP)."""

import json

import pytest
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from imagic.batch import EditPair, read_pairs
from imagic.cli import main
from imagic.clip_score import ClipScorer
from imagic.toy import tiny_tokenizer

from helpers import scene_image

FAST = ["--embedding-steps", "2", "--finetune-steps", "2", "--steps", "2", "--quiet", "--method", "lora",
        "--lora-rank", "2"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A random CLIP (meaningless numbers, real code path) saved as a transformers folder."""
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_output_names_follow_tedbench():
    assert EditPair("cat.jpeg", "A photo of a cat  sitting.").output_name == "cat.jpeg-A_photo_of_a_cat_sitting.png"
    assert EditPair("a.png", "red/blue").output_name == "a.png-red_blue.png"
    assert EditPair("apples.jpeg", "A basket of oranges").output_name == "apples.jpeg-A_basket_of_oranges.png"


def test_batch_edits_every_pair_scores_them_and_resumes(bench_folder, sd1_folder, clip_folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["batch", str(bench_folder), "--model", str(sd1_folder), "--out", str(out), "--clip", str(clip_folder), *FAST]
    assert main(args) == 0
    names = {"dog.png-a_photo_of_a_sitting_dog.png", "cat.jpeg-a_photo_of_a_red_cat.png"}
    assert names <= {p.name for p in out.iterdir()}
    scores = json.loads((out / "scores.json").read_text())
    assert scores["scored"] == 2 and {s["output"] for s in scores["per_output"]} == names
    assert all(0 <= s["clip_text_score"] <= 100 and -1 <= s["clip_fidelity"] <= 1 for s in scores["per_output"])
    assert "2 edited, 0 already" in capsys.readouterr().out

    first = (out / "dog.png-a_photo_of_a_sitting_dog.png").stat().st_mtime_ns
    (out / "cat.jpeg-a_photo_of_a_red_cat.png").unlink()  # as if stopped before the second edit
    assert main(args) == 0
    assert "1 edited, 1 already" in capsys.readouterr().out
    assert (out / "dog.png-a_photo_of_a_sitting_dog.png").stat().st_mtime_ns == first


def test_reference_outputs_are_laid_beside_and_scored(bench_folder, sd1_folder, clip_folder, tmp_path, capsys):
    reference = tmp_path / "paper"
    reference.mkdir()
    scene_image(64, 64, seed=9).save(reference / "dog.png-a_photo_of_a_sitting_dog.png")  # the cat has none
    out = tmp_path / "out"
    assert main(["batch", str(bench_folder), "--model", str(sd1_folder), "--out", str(out), "--clip", str(clip_folder),
                 "--reference", str(reference), *FAST]) == 0
    assert [p.name for p in (out / "compare").iterdir()] == ["dog.png-a_photo_of_a_sitting_dog.png"]
    side_by_side = Image.open(out / "compare" / "dog.png-a_photo_of_a_sitting_dog.png")
    ours = Image.open(out / "dog.png-a_photo_of_a_sitting_dog.png")
    assert side_by_side.width == 3 * ours.width and side_by_side.height > ours.height  # three cells, labels on top
    scores = json.loads((out / "scores.json").read_text())
    by_output = {s["output"]: s for s in scores["per_output"]}
    assert set(by_output["dog.png-a_photo_of_a_sitting_dog.png"]["reference"]) == {"clip_text_score", "clip_fidelity"}
    assert "reference" not in by_output["cat.jpeg-a_photo_of_a_red_cat.png"]
    assert scores["reference"]["pairs"] == 1
    assert "1 side-by-side(s)" in capsys.readouterr().out
    assert main(["batch", str(bench_folder), "--model", str(sd1_folder), "--out", str(tmp_path / "o2"),
                 "--reference", str(tmp_path / "nowhere"), *FAST]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_clip_fidelity_is_one_for_the_input_itself(clip_folder):
    scorer = ClipScorer(clip_folder)
    image = scene_image(32, 32)
    assert scorer.score(image, image, "a dog")["clip_fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert scorer.score(image, scene_image(32, 32, seed=5).rotate(90), "a dog")["clip_fidelity"] < 1.0


@pytest.mark.parametrize("entries, message", [
    ([{"img_name": "dog.png"}], "needs both"),
    ([{"img_name": "missing.png", "target_text": "x"}], "not in"),
    ({"img_name": "dog.png"}, "non-empty JSON list"),
])
def test_bad_edit_lists_are_refused_before_any_work(bench_folder, entries, message):
    (bench_folder / "input_list.json").write_text(json.dumps(entries))
    with pytest.raises(Exception, match=message):
        read_pairs(bench_folder)


def test_batch_errors_are_one_line(bench_folder, sd1_folder, tmp_path, capsys):
    assert main(["batch", str(tmp_path / "nowhere"), "--model", str(sd1_folder), *FAST]) == 1
    assert "cannot read the edit list" in capsys.readouterr().err
    assert main(["batch", str(bench_folder), "--model", str(sd1_folder), "--clip", str(tmp_path), *FAST]) == 1
    assert "cannot load a CLIP model" in capsys.readouterr().err
    assert main(["batch", str(bench_folder), "--model", str(sd1_folder), "--eta", "0.6", "0.7", *FAST]) == 1
    assert "one --eta" in capsys.readouterr().err
