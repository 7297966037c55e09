"""Caption metrics through pycocoevalcap, the COCO caption evaluation code.

BLEU, ROUGE-L and CIDEr-D run in Python; the PTB tokenizer, METEOR and SPICE run Java. pycocoevalcap's
`Cider` is the CIDEr-D of the COCO evaluation (clipped n-gram counts, Gaussian length penalty, sigma 6).
Its idf comes from the references of the scored images, so CIDEr-D is 0 when only one image is scored.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from ..runtime.errors import EdgecapError
from ..runtime.vocab import tokenize

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE")
SPICE_TIMEOUT_S = 600.0
_BLEU = METRICS[:4]
# The Stanford CoreNLP jar SPICE needs; pycocoevalcap downloads it on first use, which we never do here.
_CORENLP_JAR = Path(get_stanford_models.SPICEDIR, get_stanford_models.SPICELIB, f"{get_stanford_models.JAR}.jar")
_SPICE_CHILD = """
import json, sys
from pycocoevalcap.spice.spice import Spice
pairs = json.load(sys.stdin)
gts = {i: refs for i, (refs, _) in enumerate(pairs)}
res = {i: [hyp] for i, (_, hyp) in enumerate(pairs)}
print(json.dumps(float(Spice().compute_score(gts, res)[0])))
"""

Captions = dict[str, list[str]]


@functools.cache
def java_available() -> bool:
    """True when a working `java` is on PATH (pycocoevalcap runs it by that name)."""
    if shutil.which("java") is None:
        return False
    try:
        return subprocess.run(["java", "-version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _check_inputs(references: dict[str, list[str]], hypotheses: dict[str, str]) -> None:
    if not references or not hypotheses:
        raise ValueError("references and hypotheses must both be non-empty")
    missing = [k for k in hypotheses if k not in references]
    if missing:
        raise ValueError(f"{len(missing)} hypothesis id(s) have no references, e.g. {missing[:3]}")
    empty = [k for k in hypotheses if not references[k]]
    if empty:
        raise ValueError(f"{len(empty)} image(s) have an empty reference list, e.g. {empty[:3]}")


def _tokenize(references: dict[str, list[str]], hypotheses: dict[str, str], tokenizer: str) -> tuple[Captions, Captions]:
    """Tokenized references and hypotheses (hypotheses as one-item lists), over the hypothesis ids."""
    if tokenizer == "simple":
        gts = {k: [" ".join(tokenize(c)) for c in references[k]] for k in hypotheses}
        return gts, {k: [" ".join(tokenize(h))] for k, h in hypotheses.items()}
    # One Java call for both sides: tag the ids so references and hypotheses stay apart.
    tagged = {("ref", k): [{"caption": c} for c in references[k]] for k in hypotheses}
    tagged.update({("hyp", k): [{"caption": h}] for k, h in hypotheses.items()})
    out = PTBTokenizer().tokenize(tagged)
    return {k: out[("ref", k)] for k in hypotheses}, {k: out[("hyp", k)] for k in hypotheses}


def _meteor(gts: Captions, res: Captions) -> float:
    """METEOR 1.5 through its Java process, which is always shut down afterwards."""
    meteor = Meteor()
    try:
        return meteor.compute_score(gts, res)[0]
    finally:
        with meteor.lock:
            proc = meteor.meteor_p
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                pipe.close()
            proc.kill()
            proc.wait()


def _spice(gts: Captions, res: Captions) -> float | str:
    """SPICE in a child process group with a timeout; any failure becomes "unavailable: <reason>"."""
    if not java_available():
        return "unavailable: Java not found"
    if not _CORENLP_JAR.exists():
        return (f"unavailable: Stanford CoreNLP models missing ({_CORENLP_JAR.name}); "
                "fetch them with `python -m pycocoevalcap.spice.get_stanford_models` (needs network)")
    payload = json.dumps([[gts[k], res[k][0]] for k in res])
    proc = subprocess.Popen([sys.executable, "-c", _SPICE_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(payload, timeout=SPICE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child's java runs in the same process group
        proc.communicate()
        return f"unavailable: timed out after {SPICE_TIMEOUT_S:g} s"
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        reason = (err.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return f"unavailable: {reason[:200]}"
    return float(json.loads(lines[-1]))


def score_captions(references: dict[str, list[str]], hypotheses: dict[str, str], *, tokenizer: str = "ptb",
                   metrics: Sequence[str] = ("BLEU", "METEOR", "ROUGE-L", "CIDEr-D")) -> dict[str, float | str]:
    """Score one hypothesis per image against its references, over the hypotheses' ids.

    `tokenizer` is "ptb" (COCO's Java PTBTokenizer) or "simple" (edgecap's tokenize, no Java). `metrics`
    names entries of METRICS, or "BLEU" for BLEU-1..4. Results come in METRICS order; SPICE is a float or
    "unavailable: <reason>".
    """
    _check_inputs(references, hypotheses)
    if tokenizer not in ("ptb", "simple"):
        raise ValueError(f"tokenizer must be 'ptb' or 'simple', got {tokenizer!r}")
    wanted: set[str] = set()
    for name in metrics:
        if name not in METRICS and name != "BLEU":
            raise ValueError(f"unknown metric {name!r}; choose from BLEU, {', '.join(METRICS)}")
        wanted.update(_BLEU if name == "BLEU" else (name,))
    if not wanted:
        raise ValueError("no metrics requested")
    needs_java = [what for what, needed in (("the PTB tokenizer", tokenizer == "ptb"), ("METEOR", "METEOR" in wanted))
                  if needed]
    if needs_java and not java_available():
        raise EdgecapError(f"Java is required for {' and '.join(needs_java)} "
                           "(install a JRE, e.g. apt-get install default-jre-headless)")

    gts, res = _tokenize(references, hypotheses, tokenizer)
    scores: dict[str, float | str] = {}
    if wanted & set(_BLEU):
        scores.update(zip(_BLEU, Bleu(4).compute_score(gts, res, verbose=0)[0]))
    if "METEOR" in wanted:
        scores["METEOR"] = _meteor(gts, res)
    if "ROUGE-L" in wanted:
        scores["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    if "CIDEr-D" in wanted:
        scores["CIDEr-D"] = Cider().compute_score(gts, res)[0]
    if "SPICE" in wanted:
        scores["SPICE"] = _spice(gts, res)
    return {m: scores[m] if isinstance(scores[m], str) else float(scores[m]) for m in METRICS if m in wanted}


def bleu4(references: dict[str, list[str]], hypotheses: dict[str, str]) -> float:
    """Corpus BLEU-4 with the simple tokenizer: the Java-free score used for early stopping."""
    return float(score_captions(references, hypotheses, tokenizer="simple", metrics=("BLEU-4",))["BLEU-4"])


# a caption that ends on one of these stopped mid-phrase ("a dog runs in the"): self-critical training is known
# to teach such endings, since CIDEr-D rewards the n-grams before them
DANGLING_WORDS = frozenset({"a", "an", "the", "of", "in", "on", "with", "and"})


def corpus_stats(hypotheses: dict[str, str]) -> dict[str, float]:
    """Diversity of generated captions, compared after the simple tokenizer ("A dog." == "a dog"), and the share
    that end on a function word (`DANGLING_WORDS`)."""
    if not hypotheses:
        raise ValueError("hypotheses must be non-empty")
    token_lists = [tokenize(h) for h in hypotheses.values()]
    distinct = len({" ".join(t) for t in token_lists})
    return {
        "distinct_captions": distinct,
        "distinct_ratio": distinct / len(token_lists),
        "vocab_used": len({w for t in token_lists for w in t}),
        "mean_length": sum(map(len, token_lists)) / len(token_lists),
        "dangling_share": sum(bool(t) and t[-1] in DANGLING_WORDS for t in token_lists) / len(token_lists),
    }
