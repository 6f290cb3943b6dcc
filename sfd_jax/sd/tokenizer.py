r"""Build the real CLIP tokenizer files (``vocab.json``, ``merges.txt``) offline, from open-clip-torch's BPE list.

  pip install --no-deps open-clip-torch
  python -m sfd_jax.sd.tokenizer --out DIR [--bpe path/to/bpe_simple_vocab_16e6.txt.gz]

writes a complete ``tokenizer/`` folder (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)
that ``transformers.CLIPTokenizer.from_pretrained(DIR)`` loads: 49,408 tokens, <|startoftext|> = 49406,
<|endoftext|> = 49407, max length 77, padding with <|endoftext|> (SD 1.x's convention).

How the files follow from the merge list: line 0 is a header; lines 1..48894 are the merges ("a b"); the vocabulary
is the 256 byte-level characters (GPT-2's reversible byte -> unicode table), the same 256 followed by ``</w>``,
each merge joined, then the two special tokens.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os

N_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode character table, in vocabulary order: the printable bytes
    (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to themselves, then the other bytes, in byte order, to code
    points 256, 257, ..."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def default_bpe_path() -> str:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz``, located without importing open_clip (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed; run `pip install --no-deps open-clip-torch` "
                                "or pass --bpe FILE")
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the open_clip installation")
    return path


def vocab_and_merges(bpe_gz: str) -> tuple[dict[str, int], list[str]]:
    with gzip.open(bpe_gz, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1:1 + N_MERGES]
    if len(merges) != N_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(f"{bpe_gz} is not the CLIP BPE merge list (expected {N_MERGES} lines 'a b' after a header)")
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split(" ")) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(out_dir: str, bpe_gz: str | None = None) -> str:
    """Write a CLIPTokenizer folder to ``out_dir`` (created); returns it."""
    vocab, merges = vocab_and_merges(bpe_gz or default_bpe_path())
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": BOS, "eos_token": EOS,
              "unk_token": EOS, "pad_token": EOS, "do_lower_case": True, "errors": "replace",
              "add_prefix_space": False}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, f, indent=2)
    return out_dir


def tokenize(tokenizer, prompts: list[str], max_length: int | None = None):
    """Prompts -> int32 ids [N, 77]: padded to max length with the pad token, truncated (SD's text conditioning)."""
    import numpy as np

    length = max_length or tokenizer.model_max_length
    ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                    return_tensors="np").input_ids
    return np.asarray(ids, np.int32)


def main(argv):
    from absl import flags

    from sfd_jax.cli_utils import UsageError

    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS.out:
        raise UsageError("--out is required")
    if flags.FLAGS.bpe and not os.path.isfile(flags.FLAGS.bpe):
        raise FileNotFoundError(f"--bpe file {flags.FLAGS.bpe!r} does not exist")
    print(f"wrote {write_clip_tokenizer(flags.FLAGS.out, flags.FLAGS.bpe)}")


def cli():
    from absl import flags

    from sfd_jax.cli_utils import run

    flags.DEFINE_string("out", None, "Output folder (e.g. MODEL/tokenizer).")
    flags.DEFINE_string("bpe", None, "bpe_simple_vocab_16e6.txt.gz (default: the one shipped with open_clip).")
    run(main, "sfd_jax.sd.tokenizer")


if __name__ == "__main__":
    cli()
