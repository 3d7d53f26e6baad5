"""A larger MiniLM calibration set (issue 24: the NVFP4 candidates' helpers overfit 48 sentences), from text already
on the machine: nothing is downloaded.

    python tools/minilm_calib.py corpus                     # rewrite tools/data/sentences_extra.txt (offline sources)
    python tools/minilm_calib.py lines -n 512 -o c512.txt  # the ordered lines of an n-sentence calibration set
    onnxopt calib-data text model.onnx --tokenizer DIR --text c512.txt -o c512/     # one unpadded .npz per line

`corpus` (re)writes tools/data/sentences_extra.txt: prose sentences (6-28 words, no code characters) from python's own documentation
(pydoc_data.topics), stdlib docstrings, scikit-learn's dataset descriptions, installed packages' METADATA and vim's
help, round-robin over the sources, none of them in tools/data/sentences.txt (the 64 + 64 benchmark sentences), at
most 31 MiniLM tokens (the eval set's padded length). The text is technical English; the eval sentences are general
English (news, cooking, science), a domain shift the BENCHMARKS section measures. The committed file (569 sentences)
is the one the benchmarks used, written by a first version of this extraction (same sources and filters, another
traversal order): a rerun of `corpus` picks other sentences.

`lines -n N` keeps the benchmark split: `--auto` searches on the first 3/4 and verifies on the last 1/4, so the first
3N/4 lines are the 48 benchmark search sentences plus extra ones, the last N/4 the 16 benchmark verify sentences plus
others; within each part lines are ordered by token count, so --auto merges equal-length samples into batches.
The eval sentences (tools/data/sentences.txt lines 65-128) are never used.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import os
import pkgutil
import random
import re
import sys
import sysconfig
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models  # noqa: E402

EXTRA = real_models.DATA_DIR / "sentences_extra.txt"
MAX_TOKENS = 31
BAD = re.compile(r"[()\[\]{}=<>_`*#|@$%^~\\/:;\"]|\.\.|--|\bhttps?\b|\s[a-z]+\.[a-z]+\b")


def _sources() -> dict[str, str]:
    from pydoc_data import topics
    texts = {"pydoc": "\n".join(topics.topics.values())}
    docs = []
    std = sysconfig.get_paths()["stdlib"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in sorted(pkgutil.iter_modules([std]), key=lambda m: m.name):
            if m.name.startswith(("_", "test", "idlelib", "tkinter", "turtle", "antigravity", "this")):
                continue
            try:
                mod = importlib.import_module(m.name)
            except Exception:
                continue
            for o in [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]:
                d = getattr(o, "__doc__", None)
                if isinstance(d, str):
                    docs.append(d)
    texts["stdlib"] = "\n".join(docs)
    sp = sysconfig.get_paths()["purelib"]
    texts["sklearn"] = "\n".join(Path(f).read_text() for f in sorted(glob.glob(sp + "/sklearn/datasets/descr/*.rst")))
    texts["metadata"] = "\n".join(Path(f).read_text(errors="replace").split("\n\n", 1)[-1]
                                  for f in sorted(glob.glob(sp + "/*.dist-info/METADATA")))
    texts["vim"] = "\n".join(Path(f).read_text(errors="replace") for f in sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt")))
    return texts


def prose(text: str, exclude: set) -> list[str]:
    """Sentences of `text` that read as prose: 6-28 words, capitalised, ending a sentence, no code characters."""
    out = []
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", re.sub(r"\s+", " ", text)):
        s = s.strip()
        w = s.split()
        if not (6 <= len(w) <= 28) or not s[0].isupper() or s[-1] not in ".!?" or BAD.search(s):
            continue
        if sum(c.isalpha() or c == " " for c in s) < 0.93 * len(s) or sum(c.isupper() for c in s) > 0.15 * len(s):
            continue
        if s not in exclude:
            out.append(s)
    return list(dict.fromkeys(out))


def _tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(real_models.minilm_dir()), local_files_only=True)


def corpus(n: int, seed: int = 0) -> list[str]:
    """`n` extra sentences, round-robin over the sources, at most MAX_TOKENS MiniLM tokens."""
    rng = random.Random(seed)
    bench = set(real_models.read_sentences())
    tok = _tokenizer()
    pools = {k: rng.sample(v, len(v)) for k, v in ((k, prose(t, bench)) for k, t in _sources().items())}
    pick = []
    while len(pick) < n and any(pools.values()):
        for k in pools:
            while pools[k]:
                s = pools[k].pop()
                if len(tok(s)["input_ids"]) <= MAX_TOKENS:
                    pick.append(s)
                    break
            if len(pick) >= n:
                break
    return pick


def ordered_lines(n: int) -> list[str]:
    """The n calibration lines: 3n/4 search (benchmark 48 first in the pool), n/4 verify, each part by token count."""
    bench = real_models.read_sentences()[:real_models.N_CALIB_TEXT]
    extra = [s.strip() for s in EXTRA.read_text(encoding="utf-8").splitlines() if s.strip()]
    n_search = 3 * n // 4
    ns, nv = n_search - 48, n - n_search - 16
    if ns < 0 or nv < 0 or ns + nv > len(extra):
        raise SystemExit(f"-n {n}: between 64 and {64 + len(extra)} (and 3n/4 >= 48)")
    search, verify = bench[:48] + extra[:ns], bench[48:64] + extra[ns:ns + nv]
    tok = _tokenizer()

    def by_len(ss):
        return sorted(ss, key=lambda s: len(tok(s)["input_ids"]))  # stable: ties keep their order
    return by_len(search) + by_len(verify)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("-n", type=int, default=600)
    ln = sub.add_parser("lines")
    ln.add_argument("-n", type=int, default=256)
    ln.add_argument("-o", required=True)
    a = ap.parse_args(argv)
    if a.cmd == "corpus":
        EXTRA.write_text("\n".join(corpus(a.n)) + "\n", encoding="utf-8")
        print(f"wrote {EXTRA}")
    else:
        Path(a.o).write_text("\n".join(ordered_lines(a.n)) + "\n", encoding="utf-8")
        print(f"wrote {a.o}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
