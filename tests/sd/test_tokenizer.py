"""The real CLIP tokenizer, built offline from open-clip-torch's BPE merge list."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    from sfd_jax.sd.tokenizer import default_bpe_path, write_clip_tokenizer

    try:
        bpe = default_bpe_path()
    except FileNotFoundError:
        pytest.skip("open-clip-torch is not installed (pip install --no-deps open-clip-torch)")
    folder = write_clip_tokenizer(str(tmp_path_factory.mktemp("tokenizer")), bpe)
    return CLIPTokenizer.from_pretrained(folder)


def test_a_photo_of_a_cat_gives_the_familiar_ids_padded_with_eos(clip_tokenizer):
    from sfd_jax.sd.tokenizer import tokenize

    ids = tokenize(clip_tokenizer, ["a photo of a cat", ""])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()
    assert ids[1, :2].tolist() == [49406, 49407] and (ids[1, 2:] == 49407).all()
    assert len(clip_tokenizer) == 49408


def test_long_prompts_are_truncated_to_77_with_eos_last(clip_tokenizer):
    from sfd_jax.sd.tokenizer import tokenize

    ids = tokenize(clip_tokenizer, [" ".join(["cat"] * 100)])
    assert ids.shape == (1, 77) and ids[0, 0] == 49406 and ids[0, -1] == 49407


def test_tokenizer_cli_writes_a_loadable_folder(tmp_path, clip_tokenizer):
    from tests.conftest import run_cli

    proc = run_cli("sfd_jax.sd.tokenizer", "--out", str(tmp_path / "tok"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tok" / "vocab.json").exists() and (tmp_path / "tok" / "merges.txt").exists()
    assert (tmp_path / "tok" / "merges.txt").read_text().startswith("#version: 0.2\n")
