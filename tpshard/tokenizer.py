"""Tokenizers for prompts and generated text: nanoGPT's char vocabulary (meta.pkl), a tiktoken ranks
file (.tiktoken), or tiktoken's GPT-2 BPE, and the search that finds the right one for a checkpoint.

Every failure is one TpshardError line; nothing here prints.
"""

import base64
import binascii
import hashlib
import io
import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import tiktoken
import tiktoken.load

from tpshard.errors import TpshardError

# GPT-2's pre-tokenisation: contractions, letters, digits, other symbols, whitespace
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_VOCAB_SIZES = (50257, 50304)  # GPT-2's vocabulary, and nanoGPT's padding of it
GPT2_HOST = "openaipublic.blob.core.windows.net"
# the files tiktoken downloads for "gpt2" (tiktoken_ext/openai_public.py)
GPT2_URLS = (
    f"https://{GPT2_HOST}/gpt-2/encodings/main/vocab.bpe",
    f"https://{GPT2_HOST}/gpt-2/encodings/main/encoder.json",
)
TOKENIZER_HINT = "pass --tokenizer FILE (a .tiktoken ranks file or a nanoGPT meta.pkl)"


class Tokenizer:
    """Text <-> token ids. `source` is the file it came from (None for tiktoken's built-in gpt2)."""

    name: str
    source: Path | None
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Raw bytes: a BPE token may hold part of a UTF-8 character, so streaming callers feed these
        to an incremental UTF-8 decoder instead of decoding token by token."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"<Tokenizer {self.name}>"

    def _check_ids(self, ids: list[int]) -> None:
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise TpshardError(
                f"token id {bad} is outside the tokenizer's vocabulary of {self.vocab_size} ({self.name}); "
                "the model's vocab_size is larger than the tokenizer's: is this the right tokenizer?"
            )


class CharTokenizer(Tokenizer):
    """nanoGPT's character-level vocabulary (data/shakespeare_char/meta.pkl)."""

    def __init__(self, stoi: dict[str, int], itos: dict[int, str], vocab_size: int, source: Path | None):
        self.stoi, self.itos, self.vocab_size, self.source = stoi, itos, vocab_size, source
        self.name = f"char ({vocab_size} symbols) from {source}"

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            raise self._unknown_characters(text) from None

    def _unknown_characters(self, text: str, shown: int = 5) -> TpshardError:
        """Every character the vocabulary lacks, not just the first: the first `shown` distinct ones,
        each with the position of its first occurrence, and how many more there are."""
        first: dict[str, int] = {}
        for position, c in enumerate(text):
            if c not in self.stoi and c not in first:
                first[c] = position
        named = ", ".join(f"{c!r} (index {position})" for c, position in list(first.items())[:shown])
        more = f" and {len(first) - shown} more" if len(first) > shown else ""
        what = "character" if len(first) == 1 else f"{len(first)} characters"
        verb = "is" if len(first) == 1 else "are"
        return TpshardError(
            f"{what} {named}{more} {verb} not in the vocabulary of {self.source} "
            f"({self.vocab_size} symbols); use only characters from the training text"
        )

    def decode_bytes(self, ids: list[int]) -> bytes:
        self._check_ids(ids)
        # ids of a padded vocabulary may have no symbol: shown as U+FFFD rather than failing mid-stream
        return "".join(self.itos.get(i, "\ufffd") for i in ids).encode("utf-8")


class TiktokenTokenizer(Tokenizer):
    """A tiktoken Encoding: GPT-2's, or one built from a .tiktoken ranks file."""

    def __init__(
        self, encoding: tiktoken.Encoding, name: str, source: Path | None, ranks: dict[bytes, int] | None = None
    ):
        self.encoding, self.name, self.source = encoding, name, source
        self.vocab_size = encoding.n_vocab
        self.ranks = ranks  # kept when there is no single file to copy: see save_ranks

    def save_ranks(self, path: Path) -> None:
        """Write the BPE as a .tiktoken ranks file (special tokens are not part of that format)."""
        if self.ranks is None:
            raise TpshardError(f"{self.name}: no ranks to save")
        # by hand: tiktoken's dump_tiktoken_bpe writes through the optional blobfile package
        by_rank = sorted(self.ranks.items(), key=lambda item: item[1])
        path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in by_rank))

    def encode(self, text: str) -> list[int]:
        # like nanoGPT's sample.py: a literal <|endoftext|> in a prompt is the special token (gpt2 only)
        return self.encoding.encode(text, allowed_special="all")

    def decode_bytes(self, ids: list[int]) -> bytes:
        self._check_ids(ids)
        return self.encoding.decode_bytes(ids)


# ---------------------------------------------------------------------------------------------- meta.pkl


class _NoGlobalsUnpickler(pickle.Unpickler):
    """A meta.pkl is dicts, strings and ints, which need no globals; any global (a class, a function
    such as os.system) is how a pickle runs code, so every one is refused."""

    def find_class(self, module: str, name: str) -> object:
        raise pickle.UnpicklingError(f"global '{module}.{name}' is forbidden")


def load_meta_pkl(path: Path | str) -> Tokenizer:
    path = Path(path)
    data = _read_bytes(path, "meta.pkl")
    try:
        meta = _NoGlobalsUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        if "is forbidden" in str(e):
            raise TpshardError(
                f"{path}: refused to unpickle: it references {str(e).split(' is ')[0]}, which a nanoGPT "
                "meta.pkl never does; tpshard does not run code from files (recreate it with prepare.py)"
            ) from None
        raise TpshardError(f"{path}: not a valid pickle ({e}); expected nanoGPT's meta.pkl") from None
    except Exception as e:  # a corrupt pickle can fail in many ways (EOFError, ValueError, ...)
        raise TpshardError(
            f"{path}: not a valid pickle ({type(e).__name__}: {e}); expected nanoGPT's meta.pkl"
        ) from None
    stoi, itos, vocab_size = _check_meta(meta, path)
    return CharTokenizer(stoi, itos, vocab_size, path)


def _check_meta(meta: object, path: Path) -> tuple[dict[str, int], dict[int, str], int]:
    expected = "expected nanoGPT's char meta.pkl: {'vocab_size': int, 'stoi': {str: int}, 'itos': {int: str}}"
    if not isinstance(meta, dict) or not isinstance(meta.get("stoi"), dict) or not isinstance(meta.get("itos"), dict):
        raise TpshardError(f"{path}: no 'stoi'/'itos' dicts in it; {expected}")
    stoi, itos = meta["stoi"], meta["itos"]
    if not all(isinstance(k, str) and type(v) is int for k, v in stoi.items()):
        raise TpshardError(f"{path}: 'stoi' must map str to int; {expected}")
    if not all(type(k) is int and isinstance(v, str) for k, v in itos.items()):
        raise TpshardError(f"{path}: 'itos' must map int to str; {expected}")
    vocab_size = meta.get("vocab_size", max(itos, default=-1) + 1)
    if type(vocab_size) is not int or vocab_size <= 0:
        raise TpshardError(f"{path}: 'vocab_size' must be a positive int; {expected}")
    ids = list(stoi.values()) + list(itos)
    if any(not 0 <= i < vocab_size for i in ids):
        raise TpshardError(f"{path}: token ids outside 0..{vocab_size - 1} (its vocab_size); {expected}")
    return stoi, itos, vocab_size


# ---------------------------------------------------------------------------------------------- .tiktoken


def load_tiktoken_file(path: Path | str) -> Tokenizer:
    """A byte-level BPE from a tiktoken ranks file, pre-tokenised like GPT-2, with no special tokens."""
    path = Path(path)
    ranks = _parse_ranks(_read_bytes(path, ".tiktoken ranks file"), path)
    encoding = tiktoken.Encoding(name=path.stem, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    return TiktokenTokenizer(encoding, f"tiktoken BPE ({len(ranks)} tokens) from {path}", path)


def _parse_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    """tiktoken's format, parsed as tiktoken.load.load_tiktoken_bpe does. That function is not called:
    it caches even local files by path (in TIKTOKEN_CACHE_DIR or /tmp/data-gym-cache) and would return
    a stale copy after the file is rewritten."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TpshardError(
                f"{path}: line {number} is not 'base64-token rank' ({line[:60]!r}); expected a tiktoken ranks file"
            ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TpshardError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once; is the file complete?")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TpshardError(
            f"{path}: {len(missing)} of the 256 single bytes have no rank (e.g. byte {missing[0]}); "
            "a byte-level BPE needs all of them"
        )
    return ranks


# ---------------------------------------------------------------------------------------------- gpt2


def gpt2() -> Tokenizer:
    """tiktoken's GPT-2 BPE: from tiktoken's cache, or downloaded (the only network access in tpshard)."""
    if not _gpt2_cached():
        # tiktoken downloads with requests.get and no timeout: a firewall that drops packets would hang
        # for minutes, so check the host answers within seconds first
        _check_reachable(GPT2_HOST)
    try:
        encoding = tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise _gpt2_error(f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}") from None
    return TiktokenTokenizer(encoding, "tiktoken gpt2", None)


def _gpt2_error(reason: str) -> TpshardError:
    return TpshardError(
        f"could not download tiktoken's gpt2 BPE files ({reason}); offline, set TIKTOKEN_CACHE_DIR to a "
        f"folder holding tiktoken's cached gpt2 files, or {TOKENIZER_HINT}"
    )


def _gpt2_cached() -> bool:
    """Whether tiktoken will find both gpt2 files in its cache (its layout: sha1 of the URL as name)."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "data-gym-cache"
    return all((cache / hashlib.sha1(url.encode()).hexdigest()).is_file() for url in GPT2_URLS)


def _check_reachable(host: str, timeout: float = 5.0) -> None:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise _gpt2_error(f"{host} unreachable: {e}") from None


# ---------------------------------------------------------------------------------------------- search


HF_VOCAB_FILES = ("vocab.json", "merges.txt")


def load_hf_vocab(folder: Path) -> Tokenizer:
    """GPT-2's BPE from a Hugging Face directory's vocab.json + merges.txt: the same data as tiktoken's
    gpt2 files (encoder.json, vocab.bpe), converted by tiktoken itself, so an HF GPT-2 runs offline."""
    vocab, merges = (folder / name for name in HF_VOCAB_FILES)
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # tiktoken caches even local files by path; read them afresh
    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(merges), str(vocab))
    except (AttributeError, TypeError):  # vocab.json a list, a string, a number: tiktoken calls .items() on it
        raise TpshardError(
            f"{vocab}: not a JSON object of token: id; expected a GPT-2 vocab.json (with {merges.name})"
        ) from None
    except (OSError, ValueError, KeyError, AssertionError, RecursionError) as e:  # RecursionError: nested too deep
        why = f"{type(e).__name__}: {str(e)[:200]}"
        raise TpshardError(f"{folder}: vocab.json / merges.txt are not a GPT-2 BPE ({why})") from None
    finally:
        if cache is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = cache
    special = {"<|endoftext|>": len(ranks)}
    encoding = tiktoken.Encoding("gpt2-hf", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    return TiktokenTokenizer(encoding, f"GPT-2 BPE from {vocab} + {merges.name}", None, ranks)


def load_tokenizer_file(path: Path | str) -> Tokenizer:
    """A meta.pkl or a .tiktoken file, told apart by suffix, else by content (pickles start with 0x80)."""
    path = Path(path)
    if not path.is_file():
        from tpshard.files.atomic import file_status

        _, problem = file_status(path)
        what = "no such tokenizer file" if problem in (None, "missing") else f"is {problem}, not a tokenizer file"
        raise TpshardError(f"{path}: {what}; {TOKENIZER_HINT}")
    if path.suffix == ".pkl":
        return load_meta_pkl(path)
    if path.suffix == ".tiktoken":
        return load_tiktoken_file(path)
    with path.open("rb") as f:
        is_pickle = f.read(1) == b"\x80"
    return load_meta_pkl(path) if is_pickle else load_tiktoken_file(path)


def find_tokenizer(
    checkpoint: Path | str, *, dataset: object, vocab_size: int, explicit: Path | str | None = None
) -> Tokenizer:
    """The tokenizer for a checkpoint (a ckpt.pt or its directory, or a shard directory), looked for in
    this order: `explicit` (for a shard set opened by the caller: the one its manifest names, unless
    the user gave one); meta.pkl beside the checkpoint;
    data/<dataset>/meta.pkl under the current directory (where nanoGPT's sample.py looks); the one
    *.tiktoken beside the checkpoint; tiktoken's gpt2 when vocab_size is GPT-2's. It must not have more
    tokens than the model. dataset is the training config's, as found: anything but a name (an int, a
    list, from a forged checkpoint) is no dataset."""
    dataset = dataset if isinstance(dataset, str) and dataset else None
    tokenizer = _search(Path(checkpoint), dataset, vocab_size, Path(explicit) if explicit else None)
    if tokenizer.vocab_size > vocab_size:
        raise TpshardError(
            f"{tokenizer.name} has {tokenizer.vocab_size} tokens but the model only {vocab_size}: "
            f"not this model's tokenizer; {TOKENIZER_HINT}"
        )
    return tokenizer


def _search(checkpoint: Path, dataset: str | None, vocab_size: int, explicit: Path | None) -> Tokenizer:
    if explicit is not None:
        return load_tokenizer_file(explicit)
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    candidates: list[tuple[Path, Callable[[Path], Tokenizer]]] = [(folder / "meta.pkl", load_meta_pkl)]
    if dataset:
        candidates.append((Path("data") / dataset / "meta.pkl", load_meta_pkl))
    for path, load in candidates:
        if path.is_file():
            return load(path)
    looked = [str(p) for p, _ in candidates] + [str(folder / "*.tiktoken")]
    ranks_files = sorted(folder.glob("*.tiktoken"))
    if len(ranks_files) == 1:
        return load_tiktoken_file(ranks_files[0])
    if len(ranks_files) > 1:
        names = ", ".join(p.name for p in ranks_files)
        raise TpshardError(f"{folder}: several .tiktoken files ({names}); say which: --tokenizer FILE")
    if all((folder / name).is_file() for name in HF_VOCAB_FILES):
        return load_hf_vocab(folder)
    if vocab_size in GPT2_VOCAB_SIZES:
        return gpt2()
    raise TpshardError(
        f"no tokenizer found for {checkpoint} (vocab_size {vocab_size}, not GPT-2's); looked for "
        f"{', '.join(looked)}; {TOKENIZER_HINT}"
    )


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TpshardError(f"{path}: no such file; expected a {what}") from None
    except OSError as e:
        raise TpshardError(f"{path}: cannot read the {what} ({e.strerror})") from None
