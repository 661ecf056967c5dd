"""Tokenizers: nanoGPT's meta.pkl (safely unpickled), tiktoken ranks files, gpt2 offline, and the search."""

import base64
import codecs
import pickle
import socket
from pathlib import Path

import pytest
import tiktoken.load

from tpshard import tokenizer as tk
from tpshard.errors import TpshardError

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
SHAKESPEARE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
EM_DASH = "—".encode()  # e2 80 94: three bytes, split over two tokens by the ranks below


def write_meta(path: Path, chars: str) -> Path:
    """As nanoGPT's data/shakespeare_char/prepare.py writes it."""
    chars = sorted(set(chars))
    meta = {
        "vocab_size": len(chars),
        "itos": dict(enumerate(chars)),
        "stoi": {c: i for i, c in enumerate(chars)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(meta))
    return path


def write_ranks(path: Path, merges: list[bytes]) -> Path:
    tokens = [bytes([b]) for b in range(256)] + merges
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens)))
    return path


MERGES = [b"e ", b"th", b"the", b" the", b"\xc3\xa9", b"caf", b"caf\xc3\xa9", EM_DASH[:2], b"ea", b" s"]


# ---------------------------------------------------------------------------------------------- meta.pkl


def test_meta_pkl_round_trip(tmp_path):
    path = write_meta(tmp_path / "meta.pkl", SHAKESPEARE)
    tok = tk.load_meta_pkl(path)
    assert tok.vocab_size == len(set(SHAKESPEARE))
    assert tok.source == path and "char" in tok.name and str(path) in tok.name
    ids = tok.encode("hear me speak.\n")
    assert ids == [sorted(set(SHAKESPEARE)).index(c) for c in "hear me speak.\n"]
    assert tok.decode(ids) == "hear me speak.\n"
    assert tok.decode_bytes(ids) == b"hear me speak.\n"


def test_meta_pkl_unknown_character_is_named(tmp_path):
    tok = tk.load_meta_pkl(write_meta(tmp_path / "meta.pkl", SHAKESPEARE))
    with pytest.raises(TpshardError, match="'Z'"):
        tok.encode("Zounds")


def test_meta_pkl_id_beyond_vocab_is_refused(tmp_path):
    tok = tk.load_meta_pkl(write_meta(tmp_path / "meta.pkl", "abc"))
    with pytest.raises(TpshardError, match="outside the tokenizer's vocabulary of 3"):
        tok.decode([0, 3])


class Evil:
    """Unpickling this calls open(target, 'w'): creates a file, i.e. runs code."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return open, (str(self.target), "w")


def test_malicious_meta_pkl_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps({"vocab_size": 1, "stoi": {"a": 0}, "itos": {0: "a"}, "x": Evil(target)}))
    with pytest.raises(TpshardError, match="refused to unpickle") as info:
        tk.load_meta_pkl(path)
    assert "open" in str(info.value) and "\n" not in str(info.value)
    assert not target.exists()
    # the file really is dangerous: a plain pickle.load runs it
    pickle.loads(path.read_bytes()).get("x").close()
    assert target.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (["a", "b"], "no 'stoi'/'itos'"),
        ({"stoi": {"a": 0}}, "no 'stoi'/'itos'"),
        ({"vocab_size": 1, "stoi": {"a": "0"}, "itos": {0: "a"}}, "'stoi' must map str to int"),
        ({"vocab_size": 1, "stoi": {"a": 0}, "itos": {"0": "a"}}, "'itos' must map int to str"),
        ({"vocab_size": 1, "stoi": {"a": 0, "b": 1}, "itos": {0: "a", 1: "b"}}, "outside 0..0"),
        ({"vocab_size": "2", "stoi": {"a": 0}, "itos": {0: "a"}}, "'vocab_size' must be a positive int"),
    ],
)
def test_structurally_wrong_meta_pkl_is_refused(tmp_path, content, message):
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(TpshardError, match=message):
        tk.load_meta_pkl(path)


@pytest.mark.parametrize("data", [b"", b"\x80\x04\x95", b"not a pickle at all"])
def test_corrupt_meta_pkl_is_refused(tmp_path, data):
    path = tmp_path / "meta.pkl"
    path.write_bytes(data)
    with pytest.raises(TpshardError, match="not a valid pickle"):
        tk.load_meta_pkl(path)


def test_missing_meta_pkl(tmp_path):
    with pytest.raises(TpshardError, match="no such file"):
        tk.load_meta_pkl(tmp_path / "meta.pkl")


# ---------------------------------------------------------------------------------------------- .tiktoken


def test_tiktoken_file_round_trip(tmp_path):
    path = write_ranks(tmp_path / "x.tiktoken", MERGES)
    tok = tk.load_tiktoken_file(path)
    assert tok.vocab_size == 256 + len(MERGES)
    assert tok.source == path and tok.name == f"tiktoken BPE ({256 + len(MERGES)} tokens) from {path}"
    for text in [
        SHAKESPEARE,
        "café — ½ the sea",
        "  trailing spaces  \n\n",
        "日本語 ünïcödé 🙂",
        "<|endoftext|>",
    ]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode()
    assert tok.encode(" the") == [256 + MERGES.index(b" the")]  # merges are used
    assert tok.encode("café") == [256 + MERGES.index("café".encode())]


def test_tiktoken_file_matches_tiktokens_own_loader(tmp_path, monkeypatch):
    path = write_ranks(tmp_path / "x.tiktoken", MERGES)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's loader caches local files unless told not to
    assert tk.load_tiktoken_file(path).encoding._mergeable_ranks == tiktoken.load.load_tiktoken_bpe(str(path))


def test_rewritten_tiktoken_file_is_reread(tmp_path):
    # tiktoken.load.load_tiktoken_bpe would serve the first version again from its cache
    path = write_ranks(tmp_path / "x.tiktoken", MERGES)
    assert tk.load_tiktoken_file(path).vocab_size == 256 + len(MERGES)
    write_ranks(path, MERGES[:2])
    assert tk.load_tiktoken_file(path).vocab_size == 258


def test_decode_bytes_streams_a_character_split_across_tokens(tmp_path):
    tok = tk.load_tiktoken_file(write_ranks(tmp_path / "x.tiktoken", MERGES))
    text = "café — ½"
    ids = tok.encode(text)
    pieces = [tok.decode_bytes([i]) for i in ids]
    assert EM_DASH[:2] in pieces and EM_DASH[2:] in pieces  # the dash really is split
    assert "".join(p.decode(errors="replace") for p in pieces) != text  # token by token garbles it
    decoder = codecs.getincrementaldecoder("utf-8")()
    streamed = [decoder.decode(p) for p in pieces] + [decoder.decode(b"", final=True)]
    assert "".join(streamed) == text
    assert "\ufffd" not in "".join(streamed)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not base64!! 0\n", "line 1 is not 'base64-token rank'"),
        (b"YQ== zero\n", "line 1 is not 'base64-token rank'"),
        (b"YQ== 0 extra\n", "line 1 is not 'base64-token rank'"),
        (b"YQ== 0\nYg== 5\n", "ranks are not 0..1"),
        (b"YQ== 0\nYg== 1\n", "of the 256 single bytes have no rank"),
    ],
)
def test_bad_tiktoken_file_is_refused(tmp_path, content, message):
    path = tmp_path / "x.tiktoken"
    path.write_bytes(content)
    with pytest.raises(TpshardError, match=message):
        tk.load_tiktoken_file(path)


def test_special_token_in_prompt_is_encoded_like_nanogpt(tmp_path):
    # gpt2 has <|endoftext|>; nanoGPT's sample.py encodes it in prompts (allowed_special), so must we
    ranks = tk.load_tiktoken_file(write_ranks(tmp_path / "x.tiktoken", MERGES)).encoding._mergeable_ranks
    eot = len(ranks)
    encoding = tk.tiktoken.Encoding(
        "t", pat_str=tk.GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": eot}
    )
    tok = tk.TiktokenTokenizer(encoding, "t", None)
    assert tok.encode("a<|endoftext|>") == [ord("a"), eot]
    assert tok.decode([ord("a"), eot]) == "a<|endoftext|>"


# ---------------------------------------------------------------------------------------------- gpt2 offline


def offline(monkeypatch, tmp_path) -> list[str]:
    """An empty tiktoken cache and downloads that fail; returns the URLs tiktoken tried to read."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    tried: list[str] = []

    def no_network(url: str) -> bytes:
        tried.append(url)
        raise ConnectionError(f"offline (test): {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tk.tiktoken.registry, "ENCODINGS", {})  # nothing loaded earlier in this process
    return tried


def test_gpt2_offline_says_how_to_get_out(monkeypatch, tmp_path):
    tried = offline(monkeypatch, tmp_path)
    monkeypatch.setattr(tk, "_check_reachable", lambda host: None)  # the host answers; the download fails
    with pytest.raises(TpshardError) as info:
        tk.gpt2()
    message = str(info.value)
    assert tried and tried[0].endswith("vocab.bpe")
    assert "gpt2" in message and "TIKTOKEN_CACHE_DIR" in message and "--tokenizer" in message
    assert "\n" not in message


def test_gpt2_unreachable_host_fails_fast_without_download(monkeypatch, tmp_path):
    tried = offline(monkeypatch, tmp_path)
    timeouts: list[float] = []

    def unreachable(address, timeout):
        timeouts.append(timeout)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(TpshardError, match=r"TIKTOKEN_CACHE_DIR.*--tokenizer"):
        tk.gpt2()
    assert timeouts and timeouts[0] <= 10
    assert tried == []  # tiktoken's untimed download was never started


def test_gpt2_cached_files_skip_the_network_probe(monkeypatch, tmp_path):
    offline(monkeypatch, tmp_path)
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    assert not tk._gpt2_cached()
    for url in tk.GPT2_URLS:
        (cache / tk.hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"")
    assert tk._gpt2_cached()


# ---------------------------------------------------------------------------------------------- search


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """A run folder holding ckpt.pt and every kind of tokenizer, and a cwd with data/<dataset>/meta.pkl."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "out"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"")
    files = {
        "explicit": write_meta(tmp_path / "elsewhere" / "chars.pkl", "explicit"),
        "beside": write_meta(run / "meta.pkl", "beside"),
        "data": write_meta(tmp_path / "data" / "shakespeare_char" / "meta.pkl", "dataset"),
        "tiktoken": write_ranks(run / "vocab.tiktoken", MERGES[:3]),
    }
    monkeypatch.setattr(tk, "gpt2", lambda: FAKE_GPT2)  # the real one may need the network
    return run / "ckpt.pt", files


FAKE_GPT2 = tk.Tokenizer()
FAKE_GPT2.name, FAKE_GPT2.source, FAKE_GPT2.vocab_size = "tiktoken gpt2", None, 50257


def find(checkpoint, vocab_size=300, **kw):
    return tk.find_tokenizer(checkpoint, dataset="shakespeare_char", vocab_size=vocab_size, **kw)


def test_find_tokenizer_search_order(layout):
    ckpt, files = layout
    assert find(ckpt, explicit=files["explicit"]).source == files["explicit"]
    assert find(ckpt).source == files["beside"]
    assert find(ckpt.parent).source == files["beside"]  # the checkpoint's directory works too
    files["beside"].unlink()
    assert find(ckpt).source == Path("data/shakespeare_char/meta.pkl")
    files["data"].unlink()
    assert find(ckpt).source == files["tiktoken"]
    files["tiktoken"].unlink()
    assert find(ckpt, vocab_size=50304) is FAKE_GPT2
    assert find(ckpt, vocab_size=50257) is FAKE_GPT2
    with pytest.raises(TpshardError, match="no tokenizer found") as info:
        find(ckpt, vocab_size=300)
    for place in ("out/meta.pkl", "data/shakespeare_char/meta.pkl", "out/*.tiktoken", "--tokenizer"):
        assert place in str(info.value)


def test_find_tokenizer_without_dataset_skips_data_folder(layout):
    ckpt, files = layout
    files["beside"].unlink()
    tok = tk.find_tokenizer(ckpt, dataset=None, vocab_size=300)
    assert tok.source == files["tiktoken"]


def test_find_tokenizer_explicit_told_apart_by_content(layout, tmp_path):
    ckpt, files = layout
    ranks = tmp_path / "ranks.txt"
    ranks.write_bytes(files["tiktoken"].read_bytes())
    meta = tmp_path / "vocab.bin"
    meta.write_bytes(files["explicit"].read_bytes())
    assert find(ckpt, explicit=ranks).name.startswith("tiktoken BPE (259 tokens)")
    assert find(ckpt, explicit=meta).name.startswith("char (")


def test_find_tokenizer_explicit_missing(layout, tmp_path):
    ckpt, _ = layout
    with pytest.raises(TpshardError, match=r"no such tokenizer file.*--tokenizer"):
        find(ckpt, explicit=tmp_path / "nope.tiktoken")


def test_find_tokenizer_refuses_two_tiktoken_files(layout):
    ckpt, files = layout
    files["beside"].unlink()
    files["data"].unlink()
    write_ranks(ckpt.parent / "other.tiktoken", [])
    with pytest.raises(TpshardError, match=r"several \.tiktoken files.*other\.tiktoken, vocab\.tiktoken"):
        find(ckpt)


def test_find_tokenizer_refuses_a_bigger_vocabulary_than_the_model(layout):
    ckpt, files = layout
    with pytest.raises(TpshardError, match="has 259 tokens but the model only 100"):
        find(ckpt, vocab_size=100, explicit=files["tiktoken"])


# ---------------------------------------------------------------------------------------------- samples


def test_shipped_char_sample_tokenizer():
    tok = tk.find_tokenizer(SAMPLES / "shakespeare_char" / "ckpt.pt", dataset="shakespeare_char", vocab_size=65)
    assert tok.vocab_size == 65 and tok.source == SAMPLES / "shakespeare_char" / "meta.pkl"
    assert tok.decode(tok.encode(SHAKESPEARE)) == SHAKESPEARE


def test_shipped_bpe_sample_tokenizer():
    tok = tk.find_tokenizer(SAMPLES / "shakespeare_bpe" / "ckpt.pt", dataset="shakespeare_bpe", vocab_size=512)
    assert tok.vocab_size == 512 and tok.source == SAMPLES / "shakespeare_bpe" / "shakespeare_bpe.tiktoken"
    ids = tok.encode(SHAKESPEARE)
    assert len(ids) < len(SHAKESPEARE.encode()) / 1.5  # the merges compress English
    assert tok.decode(ids) == SHAKESPEARE
    assert tok.decode(tok.encode("café — ½")) == "café — ½"
