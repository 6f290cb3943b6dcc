"""The SD forget table (several concepts in one run): the CSV parser and its one-line errors, the one forget
prompt stream whose samples carry their own concept's override, the text-table rows the step receives, and one
tiny SD step with two concepts."""
from __future__ import annotations

import re

import numpy as np
import pytest

from sfd_jax.data.prompts import ForgetPrompts, ForgetPromptTable, read_forget_table
from tests.conftest import ROOT, load_config

PROMPTS = ROOT / "configs" / "prompts"


def _table(tmp_path, text: str, files: dict[str, str] | None = None):
    for name, lines in (files or {}).items():
        (tmp_path / name).write_text(lines)
    path = tmp_path / "table.csv"
    path.write_text(text)
    return str(path)


FILES = {"cats.txt": "a photo of a cat\na cat on a sofa\nCAT in the snow\n",
         "dogs.txt": "a photo of a dog\na dog running\n", "birds_over.txt": "a photo of a fish\nan aquarium\n"}


def test_reads_rows_with_paths_relative_to_the_csv(tmp_path):
    path = _table(tmp_path, "concept,override,forget_prompts,override_prompts\ncat,tiger,cats.txt,\n"
                            "dog,,dogs.txt,birds_over.txt\n\n", FILES)
    rows = read_forget_table(path)
    assert [(r.concept, r.override) for r in rows] == [("cat", "tiger"), ("dog", "")]
    assert rows[0].forget_prompts == str(tmp_path / "cats.txt") and rows[0].override_prompts is None
    assert rows[1].override_prompts == str(tmp_path / "birds_over.txt")
    # three columns are enough
    assert len(read_forget_table(_table(tmp_path, "concept,override,forget_prompts\ncat,tiger,cats.txt\n"))) == 1


@pytest.mark.parametrize("text, error, message", [
    (None, FileNotFoundError, "forget table file not found"),
    ("", ValueError, "is empty"),
    ("concept,replacement,forget_prompts\ncat,tiger,cats.txt\n", ValueError,
     "the header must be concept,override,forget_prompts,override_prompts"),
    ("concept,override,forget_prompts\n", ValueError, "lists no concepts"),
    ("concept,override,forget_prompts\ncat,tiger,cats.txt\nCat,lion,cats.txt\n", ValueError,
     "lists concept 'Cat' twice (rows 2 and 3)"),
    ("concept,override,forget_prompts\ncat,tiger\n", ValueError, "row 2: 2 cells, expected 3"),
    ("concept,override,forget_prompts\ncat,,cats.txt\n", ValueError, "give an override or an override_prompts file"),
])
def test_bad_tables_are_one_line(tmp_path, text, error, message):
    path = str(tmp_path / "missing.csv") if text is None else _table(tmp_path, text, FILES)
    with pytest.raises(error) as e:
        read_forget_table(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_missing_prompt_file_names_the_table_and_concept(tmp_path):
    path = _table(tmp_path, "concept,override,forget_prompts\ncat,tiger,cats.txt\ndog,wolf,nope.txt\n", FILES)
    with pytest.raises(FileNotFoundError, match=r"forget table .*table.csv, concept 'dog': forget prompt file not "
                                                r"found: .*nope.txt"):
        ForgetPromptTable.build_table(path)


def test_stream_samples_carry_their_own_concepts_override(tmp_path):
    path = _table(tmp_path, "concept,override,forget_prompts,override_prompts\ncat,tiger,cats.txt,\n"
                            "dog,,dogs.txt,birds_over.txt\n", FILES)
    t = ForgetPromptTable.build_table(path, shuffle_seed=0)
    # each row's pairs are the single-concept dataset's: regex override for cats, override file crossed for dogs
    cats = ForgetPrompts.build(path=str(tmp_path / "cats.txt"), concept_to_forget="cat", concept_to_override="tiger",
                               shuffle_seed=None)
    dogs = ForgetPrompts.build(path=str(tmp_path / "dogs.txt"), concept_to_forget="dog",
                               override_path=str(tmp_path / "birds_over.txt"), shuffle_seed=None)
    assert sorted(t.pairs) == sorted(cats.pairs + dogs.pairs) and len(t) == 3 + 4
    assert ("CAT in the snow", "tiger in the snow") in t.pairs
    own = {0: set(cats.pairs), 1: set(dogs.pairs)}
    seen = set()
    for step in range(6):
        b = t.batch(seed=3, step=step, stream=2, batch_size=5)
        for f, o, c in zip(b["forget"], b["override"], b["concept"]):
            assert (f, o) in own[c], (f, o, c)
            seen.add(c)
    assert seen == {0, 1}
    strings = t.possible_strings()
    assert {"a photo of a tiger", "an aquarium"} <= set(strings["override"])
    # the snapshot grid takes the rows' (unshuffled) pairs in turn
    grid = t.grid_items(4, seed=0)
    assert [(g["forget"], g["override"]) for g in grid[::2]] == [
        ("a photo of a cat", "a photo of a tiger"), ("a photo of a dog", "a photo of a fish"),
        ("a cat on a sofa", "a tiger on a sofa"), ("a photo of a dog", "an aquarium")]


def test_sd_prompts_rows_match_each_samples_concept(tmp_path):
    """SDPrompts with a table: forget and override rows of every sample are one pair of the table, and the
    table replaces the single-concept keys (with one note); without a table nothing changes."""
    from sfd_jax.sd.task import SDPrompts
    path = _table(tmp_path, f"concept,override,forget_prompts\nbrad pitt,a middle aged man,{PROMPTS}/brad_pitt.txt\n"
                            f"angelina jolie,a middle aged woman,{PROMPTS}/angelina_jolie.txt\n")
    cfg = load_config("sd15_celebrity")
    plain = SDPrompts(cfg, warn=lambda m: None)
    cfg.prompts.forget_table = path
    notes = []
    sp = SDPrompts(cfg, warn=notes.append)
    assert len(notes) == 1 and "replaces prompts.forget, prompts.concept_to_forget" in notes[0]
    batch = sp.host_batch(step=0, rounds=2, micro=8, tokenize=lambda ps: np.zeros((len(ps), 77), np.int32))
    pairs = set(sp.forget.pairs)
    concepts = set()
    for phase in ("sg", "g"):
        for f_row, o_row in zip(batch[f"{phase}_forget"].ravel(), batch[f"{phase}_override"].ravel()):
            f, o = sp.strings[f_row], sp.strings[o_row]
            assert (f, o) in pairs
            concepts.add("a middle aged woman" in o)
            assert re.sub("brad pitt", "a middle aged man", f, flags=re.I) == o or \
                re.sub("angelina jolie", "a middle aged woman", f, flags=re.I) == o
    assert concepts == {True, False}                   # both concepts are drawn
    # the single-concept prompts are those of a config without the key
    cfg2 = load_config("sd15_celebrity")
    assert SDPrompts(cfg2, warn=lambda m: None).strings == plain.strings


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from sfd_jax.sd.random_pipeline import write_random_pipeline
    return write_random_pipeline(str(tmp_path_factory.mktemp("tiny_sd")), "tiny", seed=0)


@pytest.mark.slow
def test_one_tiny_sd_step_with_two_concepts(tmp_path, pipeline):
    """The unchanged SD step on a batch of two concepts: every forget row's override row is its own concept's."""
    import tempfile

    import jax
    from sfd_jax.sd.config import tiny_sd_overrides
    from sfd_jax.sd.trainer import SDTrainer
    path = _table(tmp_path, f"concept,override,forget_prompts\nbrad pitt,a middle aged man,{PROMPTS}/brad_pitt.txt\n"
                            f"angelina jolie,a middle aged woman,{PROMPTS}/angelina_jolie.txt\n")
    cfg = tiny_sd_overrides(load_config("sd15_celebrity"), pipeline)
    cfg.prompts.forget_table = path
    cfg.prompts.forget = cfg.prompts.concept_to_forget = cfg.prompts.concept_to_override = ""
    tr = SDTrainer(cfg, tempfile.mkdtemp(dir=tmp_path))
    state, sh, frozen, frozen_sh, txs = tr.build()
    batch = tr.device_batch(0)
    pairs = set(tr.prompts.forget.pairs)
    rows = [(tr.prompts.strings[f], tr.prompts.strings[o]) for b in [batch] + [tr.device_batch(i) for i in (1, 2, 3)]
            for k in ("sg", "g")
            for f, o in zip(np.asarray(b[f"{k}_forget"]).ravel(), np.asarray(b[f"{k}_override"]).ravel())]
    assert all(r in pairs for r in rows) and len({"woman" in o for _, o in rows}) == 2
    new, m = tr.make_step(sh, frozen_sh, txs)(state, frozen, batch, tr.root_key)
    assert int(jax.device_get(new.step)) == 1
    assert all(np.isfinite(float(v)) for v in m.values()) and float(m["g_forget_loss"]) != 0


def test_demo_concept_lists_and_stage_keys():
    from sfd_jax.cli_utils import UsageError
    from sfd_jax.data.captions import load_world_data
    from sfd_jax.sd.demo import resolve_concept_lists, stage_key
    data = load_world_data("digits", None, None, split="test")
    assert resolve_concept_lists(data, "zero,seven", "one,one") == ((0, 7), (1, 1))
    assert resolve_concept_lists(data, "zero,seven", "one") == ((0, 7), (1, 1))
    assert resolve_concept_lists(data, "zero,one", None) == ((0, 1), (2, 2))      # next class not forgotten
    assert resolve_concept_lists(data, "zero", None) == ((0,), (1,))
    for forget, override, message in (("zero,zero", None, "--forget lists 'zero' twice"),
                                      ("zero,seven", "one,two,three", "--override names 3 concepts but --forget 2"),
                                      ("zero,seven", "seven", "--override 'seven' is one of the forgotten concepts"),
                                      ("zero,eleven", None, "--forget 'eleven' is not a class name")):
        with pytest.raises(UsageError, match=re.escape(message)):
            resolve_concept_lists(data, forget, override)
    # a single-concept stage's key is the config without the (empty) forget_table key it never had
    cfg = load_config("sd_world", )
    key = stage_key(cfg)
    assert "forget_table" not in key["prompts"] and key["prompts"]["remain"] == cfg.prompts.remain
    cfg.prompts.forget_table = "t.csv"
    assert stage_key(cfg)["prompts"]["forget_table"] == "t.csv"
