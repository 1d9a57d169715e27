"""Text corpora. Offline and packaged: `wikipedia` (gensim's 106 articles; the last 30 are held out for evaluation
and never used for calibration), `austen` (Jane Austen's six novels from Debian's r-cran-janeaustenr; evaluation
only) and local .txt/.jsonl files. Online only: the `datasets` names wikitext2 and c4."""
from __future__ import annotations

import bz2
import glob
import gzip
import json
import re
import struct
import warnings
import zlib
from pathlib import Path

from boa.core.debian import unpacked_deb
from boa.core.errors import BoaError
from boa.core.io import atomic_file, cache_dir
from boa.data.hub import offline_unless_reachable

WIKIPEDIA_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKIPEDIA_HELDOUT_ARTICLES = 30
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
ONLINE_CORPORA = ("wikitext2", "c4")
OFFLINE_CORPORA = ("wikipedia", "austen", "a local .txt or .jsonl file")
SPLITS = ("calib", "eval")


def _cached_text(name: str, build) -> str:
    path = cache_dir("data") / f"{name}.txt"
    if not path.exists():
        text = build()
        with atomic_file(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return path.read_text(encoding="utf-8")


def _wikipedia_articles() -> list[str]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath

    articles = []
    with bz2.open(datapath(WIKIPEDIA_FILE), "rb") as dump:
        for title, markup, _ in extract_pages(dump):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            text = filter_wiki(markup).replace("'''", "").replace("''", "")
            text = re.sub(r"\n{3,}", "\n\n", text).strip()
            if text:
                articles.append(f"{title}\n\n{text}")
    return articles


def _wikipedia(split: str) -> str:
    def build(split=split):
        articles = _wikipedia_articles()
        held = articles[-WIKIPEDIA_HELDOUT_ARTICLES:]
        return "\n\n".join(held if split == "eval" else articles[:-WIKIPEDIA_HELDOUT_ARTICLES])

    return _cached_text(f"wikipedia-{split}", build)


def _read_r_lazyload(data_dir: Path) -> dict:
    """R's lazy-load database: Rdata.rdx (gzip) indexes Rdata.rdb, whose entries are a 4-byte length and zlib."""
    import rdata

    def parse(raw: bytes):
        with warnings.catch_warnings():  # rdata names the headerless stream "unknown file type"; it is one
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True))

    index = parse(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        chunk = rdb[int(offset) : int(offset) + int(length)]
        (expected,) = struct.unpack(">I", chunk[:4])
        raw = zlib.decompress(chunk[4:])
        assert len(raw) == expected, f"corrupt R database entry {name}"
        objects[str(name)] = parse(raw)
    return objects


def _austen_text() -> str:
    with unpacked_deb(AUSTEN_DEB, "BOA_AUSTEN_DEB", "the austen corpus") as root:
        (data_dir,) = glob.glob(str(root / "usr" / "lib" / "R" / "site-library" / "janeaustenr" / "data"))
        books = _read_r_lazyload(Path(data_dir))
    return "\n\n".join("\n".join(str(line) for line in books[name]) for name in AUSTEN_NOVELS)


def _utf8_lines(path: Path):
    """(line number, line) of a UTF-8 file; a byte that is not UTF-8 is a BoaError naming the line."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise BoaError(
                    f"calibration file {str(path)!r} is not UTF-8 text: line {number} has the byte "
                    f"0x{raw[err.start]:02x} at column {err.start + 1}; convert it to UTF-8 (e.g. `iconv -t UTF-8`)"
                ) from None


def _jsonl_text(path: Path, number: int, line: str) -> str:
    where = f"calibration file {str(path)!r}, line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise BoaError(f"{where} is not valid JSON ({err.msg} at column {err.colno}); each line of a .jsonl file "
                       'must be one object such as {"text": "..."}') from None
    if not isinstance(row, dict):
        kind = {str: "string", list: "array", bool: "boolean", type(None): "null"}.get(type(row), "number")
        raise BoaError(f'{where} is a JSON {kind}, not an object; write each line as {{"text": "..."}}')
    if not isinstance(row.get("text"), str):
        problem = "has no \"text\" key" if "text" not in row else "has a \"text\" that is not a string"
        raise BoaError(f'{where} {problem} (keys: {", ".join(map(str, row)) or "none"}); write each line as '
                       '{"text": "..."}')
    return row["text"]


def _local_file(path: Path) -> str:
    if path.suffix == ".jsonl":
        return "\n\n".join(_jsonl_text(path, n, line) for n, line in _utf8_lines(path) if line.strip())
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        for _ in _utf8_lines(path):  # raises at the first line that is not UTF-8
            pass
        raise


def _hub_dataset(name: str, split: str) -> str:
    try:
        import datasets

        # Where the Hub cannot be reached, datasets runs offline (its cache still serves) instead of ~25 s of retries.
        with offline_unless_reachable():
            if name == "wikitext2":
                rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1",
                                             split="train" if split == "calib" else "test")
            else:
                shard = ("en/c4-train.00000-of-01024.json.gz" if split == "calib"
                         else "en/c4-validation.00000-of-00008.json.gz")
                rows = datasets.load_dataset("allenai/c4", data_files={"x": shard}, split="x")
    except Exception as err:  # ImportError, or any of the hub's network errors
        cause = " ".join(str(err).split())
        raise BoaError(
            f"corpus {name!r} needs the `datasets` package and the Hugging Face Hub, which failed here ({cause}). "
            f"Offline corpora: {', '.join(OFFLINE_CORPORA)}"
        ) from err
    return "\n\n".join(rows["text"])


def corpus_text(name: str, split: str = "calib") -> str:
    """The text of a corpus: `calib` for calibration windows, `eval` for perplexity."""
    if split not in SPLITS:
        raise BoaError(f"split {split!r}: use one of {SPLITS}")
    if name == "wikipedia":
        return _wikipedia(split)
    if name == "austen":
        if split == "calib":
            raise BoaError("austen is an evaluation-only corpus (out of domain); calibrate on wikipedia or a file")
        return _cached_text("austen", _austen_text)
    if name in ONLINE_CORPORA:
        return _hub_dataset(name, split)
    path = Path(name).expanduser()
    if path.suffix in (".txt", ".jsonl"):
        if not path.is_file():
            raise BoaError(f"calibration file {name!r} does not exist")
        return _local_file(path)
    raise BoaError(
        f"unknown corpus {name!r}; offline: {', '.join(OFFLINE_CORPORA)}; online: {', '.join(ONLINE_CORPORA)}"
    )


def check_corpus(name: str, split: str = "calib") -> None:
    """corpus_text's refusals without its work, for checking names before a long run: an unknown name, a bad split,
    austen for calibration, a missing local file; a local file is read (its encoding and .jsonl lines checked).
    Whether an online corpus can be fetched is known only when it is."""
    if name in ("wikipedia", *ONLINE_CORPORA) and split in SPLITS:
        return
    if name == "austen" and split == "eval":
        return
    corpus_text(name, split)  # raises for the bad ones; a local file is only read
