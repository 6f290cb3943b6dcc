"""Prompt datasets for SD concept forgetting (sfd_jax.data.prompts;
README: "The original release and our differences" › SD prompts)."""
from __future__ import annotations

import collections
import re
from pathlib import Path

import numpy as np
import pytest

from sfd_jax.data.prompts import (ForgetPrompts, RemainPrompts, parse_use_neg, read_prompt_file,
                                  remain_prompt_path)

PROMPTS = Path(__file__).resolve().parents[2] / "configs" / "prompts"


def write(tmp_path, name, lines, end="\n"):
    path = tmp_path / name
    path.write_text(end.join(lines) + end, encoding="utf-8", newline="")
    return str(path)


@pytest.fixture
def brad(tmp_path):
    return write(tmp_path, "brad.txt", ["Brad Pitt at a cafe.", "A photo of BRAD PITT.", "brad pitt surfing.",
                                        "A dog in a park.", "Brad  Pitt with two spaces."])


# ---------------------------------------------------------------------------------------------------------------
# files

def test_read_prompt_file_strips_newline_and_cr_only(tmp_path):
    path = write(tmp_path, "a.txt", ["  lead space", "tail space  ", "x"], end="\r\n")
    assert read_prompt_file(path, "remain prompt", allow_blank=True) == ["  lead space", "tail space  ", "x"]
    assert read_prompt_file(path, "forget prompt", rstrip=True) == ["  lead space", "tail space", "x"]
    no_final_newline = tmp_path / "b.txt"
    no_final_newline.write_text("a\nb")
    assert read_prompt_file(str(no_final_newline), "x") == ["a", "b"]


def test_remain_keeps_blank_lines_forget_side_files_refuse_them(tmp_path):
    path = write(tmp_path, "r.txt", ["a", "", "b"])
    assert RemainPrompts.from_path(path).prompts == ["a", "", "b"]
    with pytest.raises(ValueError, match=r"forget prompt file .*r\.txt has a blank line at line 2"):
        ForgetPrompts.build(path=path, concept_to_forget="a", concept_to_override="b")
    for kw in ("override_path", "pos_path", "neg_path", "val_path"):
        with pytest.raises(ValueError, match="blank line at line 2"):
            ForgetPrompts.build(concept_to_forget="a", concept_to_override="b", **{kw: path})


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="remain prompt file or directory not found"):
        RemainPrompts.from_path(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="forget prompt file not found"):
        ForgetPrompts.build(path=str(tmp_path / "nope.txt"), concept_to_forget="a", concept_to_override="b")
    with pytest.raises(FileNotFoundError, match="neg prompt file not found"):
        ForgetPrompts.build(concept_to_forget="a", concept_to_override="b", neg_path=str(tmp_path / "n.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        ForgetPrompts.build(path=str(empty), concept_to_forget="a", concept_to_override="b")
    blank_only = write(tmp_path, "blank.txt", ["", "  "])
    with pytest.raises(ValueError, match="is empty"):
        RemainPrompts.from_path(blank_only)


def test_remain_prompt_path_discovers_the_original_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="aesthetics_6_plus.txt, aesthetics_625_plus.txt"):
        remain_prompt_path(str(tmp_path))
    write(tmp_path, "aesthetics_65_plus.txt", ["c"])
    assert remain_prompt_path(str(tmp_path)).endswith("aesthetics_65_plus.txt")
    write(tmp_path, "aesthetics_625_plus.txt", ["b"])
    assert remain_prompt_path(str(tmp_path)).endswith("aesthetics_625_plus.txt")
    six = write(tmp_path, "aesthetics_6_plus.txt", ["a"])
    assert remain_prompt_path(str(tmp_path)) == six
    assert remain_prompt_path(six) == six
    assert RemainPrompts.from_path(str(tmp_path)).prompts == ["a"]


# ---------------------------------------------------------------------------------------------------------------
# building

def test_regex_override_is_case_insensitive(brad):
    ds = ForgetPrompts.build(path=brad, concept_to_forget="brad pitt", concept_to_override="a middle aged man",
                             shuffle_seed=None)
    assert ds.pairs[:3] == [("Brad Pitt at a cafe.", "a middle aged man at a cafe."),
                            ("A photo of BRAD PITT.", "A photo of a middle aged man."),
                            ("brad pitt surfing.", "a middle aged man surfing.")]
    assert ds.unmatched_concept_prompts() == ["A dog in a park.", "Brad  Pitt with two spaces."]
    assert not any(ds.is_val) and ds.neg is None and ds.pos is None and not ds.has_neg


def test_regex_special_characters(brad):
    ds = ForgetPrompts.build(path=brad, concept_to_forget=r"brad\s+pitt", concept_to_override="a man",
                             shuffle_seed=None)
    assert ds.pairs[4] == ("Brad  Pitt with two spaces.", "a man with two spaces.")
    assert ds.unmatched_concept_prompts() == ["A dog in a park."]
    ds = ForgetPrompts.build(concept_to_forget="c++", concept_to_override="x", max_size=1, shuffle_seed=None)
    assert ds.pairs == [("c++", "x++")]     # "c++" is a regex (possessive c+): only the letter is replaced
    ds = ForgetPrompts.build(concept_to_forget="a.b", concept_to_override="X", max_size=1, shuffle_seed=None)
    assert ds.pairs == [("a.b", "X")]
    with pytest.raises(ValueError, match="not a valid regex"):
        ForgetPrompts.build(concept_to_forget="(oops", concept_to_override="x")


def test_empty_concept_leaves_prompt_unchanged(tmp_path):
    subjects = write(tmp_path, "s.txt", ["Man", "Woman"])
    ds = ForgetPrompts.build(path=subjects, concept_to_forget="", concept_to_override="", shuffle_seed=None)
    assert ds.pairs == [("Man", "Man"), ("Woman", "Woman")]
    assert ds.unmatched_concept_prompts() == []


def test_concept_list_is_tiled_to_max_size_and_files_are_truncated_not_tiled(brad):
    ds = ForgetPrompts.build(concept_to_forget="cat|dog|fox", concept_to_override="animal", max_size=7,
                             shuffle_seed=None)
    assert [f for f, _ in ds.pairs] == ["cat", "dog", "fox", "cat", "dog", "fox", "cat"]
    assert {o for _, o in ds.pairs} == {"animal"}
    ds = ForgetPrompts.build(concept_to_forget="Brad Pitt", concept_to_override="a man", max_size=4)
    assert ds.pairs == [("Brad Pitt", "a man")] * 4
    assert len(ForgetPrompts.build(path=brad, concept_to_forget="x", concept_to_override="y", max_size=3)) == 3
    assert len(ForgetPrompts.build(path=brad, concept_to_forget="x", concept_to_override="y", max_size=99)) == 5


def test_override_file_gives_forget_major_cartesian_product(tmp_path):
    forget = write(tmp_path, "f.txt", ["f1", "f2"])
    over = write(tmp_path, "o.txt", ["o1", "o2", "o3"])
    ds = ForgetPrompts.build(path=forget, override_path=over, shuffle_seed=None)   # no concept needed
    assert ds.pairs == [("f1", "o1"), ("f1", "o2"), ("f1", "o3"), ("f2", "o1"), ("f2", "o2"), ("f2", "o3")]
    assert ds.unmatched_concept_prompts() == []


def test_empty_string_paths(tmp_path, brad):
    ds = ForgetPrompts.build(path=brad, concept_to_forget="brad pitt", concept_to_override="a man",
                             override_path="", pos_path="", neg_path="", val_path="")
    assert ds.pos is None and ds.neg is None and not ds.has_neg and ds.val_prompts() == []
    with pytest.raises(FileNotFoundError, match="forget prompt file not found: ''"):
        ForgetPrompts.build(path="", concept_to_forget="brad pitt", concept_to_override="a man")


def test_bad_build_arguments(brad):
    with pytest.raises(ValueError, match="concept_to_override or override file required"):
        ForgetPrompts.build(path=brad, concept_to_forget="brad pitt")
    with pytest.raises(ValueError, match="forget prompt file or concept_to_forget is required"):
        ForgetPrompts.build(concept_to_override="x")
    with pytest.raises(ValueError, match="concept_to_forget is required"):
        ForgetPrompts.build(path=brad, concept_to_override="x")
    with pytest.raises(ValueError, match="empty entry"):
        ForgetPrompts.build(concept_to_forget="cat|", concept_to_override="x")
    with pytest.raises(ValueError, match="max_size"):
        ForgetPrompts.build(concept_to_forget="cat", concept_to_override="x", max_size=0)


def test_shuffle_is_reproducible_and_matches_randomstate_shuffle(tmp_path):
    forget = write(tmp_path, "f.txt", [f"Brad Pitt {i}" for i in range(20)])
    val = write(tmp_path, "v.txt", ["v1", "v2"])
    kw = dict(path=forget, concept_to_forget="brad pitt", concept_to_override="man", val_path=val)
    plain = ForgetPrompts.build(shuffle_seed=None, **kw)
    a, b = ForgetPrompts.build(shuffle_seed=3, **kw), ForgetPrompts.build(shuffle_seed=3, **kw)
    c = ForgetPrompts.build(shuffle_seed=4, **kw)
    assert a.pairs == b.pairs and a.is_val == b.is_val
    assert a.pairs != c.pairs and sorted(a.pairs) == sorted(c.pairs) == sorted(plain.pairs)
    assert plain.is_val == [False] * 20 + [True] * 2
    assert all(v == (p[0] in ("v1", "v2")) for p, v in zip(a.pairs, a.is_val))
    # the permutation equals shuffling each list in place with a fresh RandomState(seed)
    pairs, is_val = list(plain.pairs), list(plain.is_val)
    np.random.RandomState(3).shuffle(pairs)
    np.random.RandomState(3).shuffle(is_val)
    assert a.pairs == pairs and a.is_val == is_val


# ---------------------------------------------------------------------------------------------------------------
# items and batches

@pytest.fixture
def nudity(tmp_path):
    subjects = write(tmp_path, "subjects.txt", ["Man", "Woman", "Person"])
    pos = write(tmp_path, "pos.txt", ["kw one", "kw two"])
    neg = write(tmp_path, "neg.txt", ["neg a", "neg b", "neg c"])
    val = write(tmp_path, "val.txt", ["val dog", "val cat"])
    return ForgetPrompts.build(path=subjects, concept_to_forget="", concept_to_override="", pos_path=pos,
                               neg_path=neg, val_path=val)


def test_pos_insertion_both_placements_and_not_on_val(nudity):
    rng = np.random.default_rng(0)
    i = nudity.train_indices()[0]
    subject = nudity.pairs[i][0]
    seen = collections.Counter()
    for _ in range(200):
        it = nudity.item(i, rng)
        assert it["override"] == subject and it["neg"] in ("neg a", "neg b", "neg c")
        m = re.fullmatch(rf"(kw one|kw two) {subject}|{subject}, (kw one|kw two)", it["forget"])
        assert m, it["forget"]
        seen[("prefix" if m.group(1) else "suffix", m.group(1) or m.group(2))] += 1
    assert len(seen) == 4                     # both placements x both keywords occur
    for v in (k for k, flag in enumerate(nudity.is_val) if flag):
        it = nudity.item(v, rng)
        assert it["forget"] == it["override"] == nudity.pairs[v][0] and it["neg"] is None


def test_neg_pairing_in_batches(nudity, brad):
    b = nudity.batch(seed=1, step=0, stream=0, batch_size=30)
    assert len(b["neg"]) == 30 and set(b["neg"]) <= {"neg a", "neg b", "neg c"} and len(set(b["neg"])) > 1
    assert set(b["override"]) <= {"Man", "Woman", "Person"}
    plain = ForgetPrompts.build(path=brad, concept_to_forget="brad pitt", concept_to_override="a man")
    assert plain.batch(seed=1, step=0, stream=0, batch_size=4)["neg"] is None


def test_val_never_in_training_batches_but_in_grid(nudity):
    val = set(nudity.val_prompts())
    assert val == {"val dog", "val cat"}
    for step in range(50):
        b = nudity.batch(seed=0, step=step, stream=step % 2, batch_size=8)
        assert not val & set(b["forget"]) and not val & set(b["override"])
    assert val <= set(nudity.batch(0, 0, 0, 5, include_val=True)["forget"])   # 5 = every item (one epoch)
    grid = nudity.grid_items(16, seed=0)
    assert len(grid) == 32 and {g["forget"] for g in grid if g["is_val"]} == val
    assert all(g["neg"] is None for g in grid)


def test_grid_items_layout(tmp_path):
    forget = write(tmp_path, "f.txt", [f"Brad Pitt {i}" for i in range(50)])
    val = write(tmp_path, "v.txt", [f"val {i}" for i in range(6)])
    pos = write(tmp_path, "p.txt", ["k1", "k2", "k3"])
    neg = write(tmp_path, "n.txt", ["bad"])
    ds = ForgetPrompts.build(path=forget, concept_to_forget="brad pitt", concept_to_override="a man",
                             val_path=val, neg_path=neg)
    grid = ds.grid_items()                  # 8 forget (unshuffled) + 6 val = 14 items, cycled to 16, each twice
    order = [f"Brad Pitt {i}" for i in range(8)] + [f"val {i}" for i in range(6)]
    order = order + order[:2]
    assert [g["forget"] for g in grid] == [p for p in order for _ in range(2)]
    assert grid[0]["override"] == "a man 0" and grid[16]["override"] == "val 0"
    ds = ForgetPrompts.build(path=forget, concept_to_forget="brad pitt", concept_to_override="a man",
                             val_path=val, pos_path=pos, neg_path=neg)
    grid = ds.grid_items(16, seed=5)
    assert grid == ds.grid_items(16, seed=5)
    forget_copies = [g["forget"] for g in grid if not g["is_val"]]
    assert all(re.fullmatch(r"k[123] Brad Pitt \d|Brad Pitt \d, k[123]", f) for f in forget_copies)
    assert any(grid[2 * n]["forget"] != grid[2 * n + 1]["forget"] for n in range(8))   # independent draws
    assert len(ds.grid_items(3)) == 6


def test_batch_is_deterministic_per_seed_and_stream(nudity):
    a = nudity.batch(seed=7, step=3, stream=0, batch_size=12)
    assert a == nudity.batch(seed=7, step=3, stream=0, batch_size=12)
    assert a != nudity.batch(seed=8, step=3, stream=0, batch_size=12)
    assert a != nudity.batch(seed=7, step=3, stream=1, batch_size=12)
    assert a != nudity.batch(seed=7, step=4, stream=0, batch_size=12)
    remain = RemainPrompts([f"caption {i}" for i in range(100)])
    r = remain.batch(seed=7, step=3, stream=0, batch_size=16)
    assert r == remain.batch(seed=7, step=3, stream=0, batch_size=16)
    assert r != remain.batch(seed=7, step=3, stream=1, batch_size=16)
    assert r != remain.batch(seed=6, step=3, stream=0, batch_size=16)


@pytest.mark.parametrize("process_count", [2, 4])
def test_host_shards_concatenate_to_the_single_process_batch(nudity, process_count):
    remain = RemainPrompts([f"caption {i}" for i in range(37)])
    for step in (0, 1, 9):
        full = nudity.batch(seed=2, step=step, stream=1, batch_size=8)
        shards = [nudity.batch(seed=2, step=step, stream=1, batch_size=8, process_index=k,
                               process_count=process_count) for k in range(process_count)]
        for key in ("forget", "override", "neg"):
            assert sum((s[key] for s in shards), []) == full[key]
        full_r = remain.batch(2, step, 0, 8)
        assert sum((remain.batch(2, step, 0, 8, k, process_count) for k in range(process_count)), []) == full_r


def test_each_epoch_covers_every_train_item_once(nudity):
    remain = RemainPrompts([f"caption {i}" for i in range(10)])
    # batch 4 over 10 items: global positions 0..39 = 4 epochs
    seq = sum((remain.batch(seed=0, step=s, stream=0, batch_size=4) for s in range(10)), [])
    for e in range(4):
        assert sorted(seq[10 * e:10 * e + 10]) == sorted(remain.prompts)
    assert seq[:10] != seq[10:20]
    n = len(nudity.train_indices())
    seq = sum((nudity.batch(seed=0, step=s, stream=0, batch_size=n)["override"] for s in range(3)), [])
    for e in range(3):
        assert sorted(seq[n * e:n * e + n]) == sorted(nudity.pairs[i][1] for i in nudity.train_indices())


def test_possible_strings_is_complete(tmp_path, nudity):
    strings = nudity.possible_strings()
    assert len(strings["forget"]) == 3 * 2 * 2 + 2 and strings["neg"] == ["neg a", "neg b", "neg c"]
    assert "kw one Man" in strings["forget"] and "Man, kw two" in strings["forget"]
    forget, override = set(strings["forget"]), set(strings["override"])
    for step in range(200):
        b = nudity.batch(seed=11, step=step, stream=step % 2, batch_size=4, include_val=step % 3 == 0)
        assert set(b["forget"]) <= forget and set(b["override"]) <= override
        assert set(n for n in b["neg"] if n is not None) <= set(strings["neg"])
    assert {g["forget"] for g in nudity.grid_items()} <= forget
    brad = write(tmp_path, "b.txt", ["Brad Pitt a", "Brad Pitt b"])
    plain = ForgetPrompts.build(path=brad, concept_to_forget="brad pitt", concept_to_override="man")
    assert plain.possible_strings() == {"forget": ["Brad Pitt a", "Brad Pitt b"], "override": ["man a", "man b"],
                                        "neg": []}


def test_batch_argument_errors(nudity):
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        nudity.batch(seed=0, step=0, stream=0, batch_size=8, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        nudity.batch(seed=0, step=0, stream=0, batch_size=8, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="batch_size"):
        nudity.batch(seed=0, step=0, stream=0, batch_size=0)
    with pytest.raises(ValueError, match="seed"):
        nudity.batch(seed=-1, step=0, stream=0, batch_size=2)


def test_parse_use_neg():
    assert parse_use_neg("0,0,1") == (False, False, True)
    assert parse_use_neg("1, 1, 1") == (True, True, True)
    assert parse_use_neg((1, 0, True)) == (True, False, True)
    assert parse_use_neg([False, False, False]) == (False, False, False)
    for bad in ("0,1", "0,0,2", "yes", "", (1, 1), [1, 1, 1, 1], 1, None, (0.5, 0, 0)):
        with pytest.raises(ValueError, match="use_neg must be three 0/1 flags"):
            parse_use_neg(bad)


# ---------------------------------------------------------------------------------------------------------------
# the project's prompt files

COUNTS = {"brad_pitt.txt": 50, "brad_pitt_val.txt": 6, "angelina_jolie.txt": 50, "angelina_jolie_val.txt": 6,
          "nudity_subjects.txt": 12, "nudity_val.txt": 6, "nsfw_negative.txt": 1, "remain_example.txt": 40}


@pytest.mark.parametrize("name", sorted(COUNTS) + ["nsfw_keywords.txt"])
def test_project_prompt_files_parse(name):
    path = PROMPTS / name
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and "\r" not in text
    lines = read_prompt_file(str(path), name)            # raises on blank lines
    if name == "nsfw_keywords.txt":
        assert 20 <= len(lines) <= 30
    else:
        assert len(lines) == COUNTS[name]
    if name not in ("nsfw_negative.txt",):
        assert len(set(lines)) == len(lines)
    assert all(len(line.split()) <= 40 and line == line.strip() for line in lines)


def test_project_forget_files_mention_the_concept_and_build():
    for name, concept in (("brad_pitt", "brad pitt"), ("angelina_jolie", "angelina jolie")):
        ds = ForgetPrompts.build(path=str(PROMPTS / f"{name}.txt"), concept_to_forget=concept,
                                 concept_to_override="a person", val_path=str(PROMPTS / f"{name}_val.txt"))
        assert ds.unmatched_concept_prompts() == []
        assert all(concept not in o.lower() for (_, o), v in zip(ds.pairs, ds.is_val) if not v)
        assert sum(concept in p.lower() for p in ds.val_prompts()) == 3
    keywords = read_prompt_file(str(PROMPTS / "nsfw_keywords.txt"), "pos")
    assert read_prompt_file(str(PROMPTS / "nsfw_negative.txt"), "neg") == [", ".join(keywords)]
    ds = ForgetPrompts.build(path=str(PROMPTS / "nudity_subjects.txt"), concept_to_forget="", concept_to_override="",
                             pos_path=str(PROMPTS / "nsfw_keywords.txt"), neg_path=str(PROMPTS / "nsfw_negative.txt"),
                             val_path=str(PROMPTS / "nudity_val.txt"))
    assert len(ds.train_indices()) == 12 and len(ds.val_prompts()) == 6
    subjects = read_prompt_file(str(PROMPTS / "nudity_subjects.txt"), "forget")
    variants = {v for s in subjects for k in keywords for v in (f"{k} {s}", f"{s}, {k}")}
    assert len(variants) == 12 * 2 * len(keywords)
    assert ds.possible_strings()["forget"] == sorted(variants | set(ds.val_prompts()))


def test_project_prompt_files_fit_clip_77_tokens(tmp_path):
    pytest.importorskip("transformers")
    from sfd_jax.sd.tokenizer import default_bpe_path, write_clip_tokenizer
    try:
        bpe = default_bpe_path()
    except FileNotFoundError:
        pytest.skip("open-clip-torch is not installed (pip install --no-deps open-clip-torch)")
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(str(tmp_path / "tok"), bpe))
    for path in PROMPTS.glob("*.txt"):
        for line in read_prompt_file(str(path), path.name):
            assert len(tok(line).input_ids) <= 77, (path.name, line)
